"""`rlhf train` (offline DPO / KTO / SFT / reward model from a TRL-format file) and `rlhf eval` on
its held-out prompts, end to end through typer's CliRunner on the tiny random model of conftest."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from rlhf_workbench.cli import app
from rlhf_workbench.tasks.preferences import load_offline_file
from rlhf_workbench.tasks.task import TaskFormatError

runner = CliRunner()
FP32 = ("--set", 'model.mixed_precision="no"')  # quoted: YAML reads a bare no as false
N_PAIRS, HELDOUT_FRACTION = 16, 0.25


def invoke(*args):
    r = runner.invoke(app, [str(a) for a in args])
    r.text = " ".join(r.output.split())  # rich wraps long lines at the terminal width
    return r


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def preference_records(n: int = N_PAIRS) -> list[dict]:
    """Distinct prompts; the chosen reply always says the same short thing, the rejected another."""
    return [{"prompt": f"Question {i}: is {i} a whole number?", "chosen": "Yes, it is.",
             "rejected": f"I refuse to say anything about {i}."} for i in range(n)]


def sum_logps(model, tokenizer, records, side: str) -> torch.Tensor:
    """Summed completion log-probs of each record's ``side`` under ``model`` (plain layout, no packing)."""
    from rlhf_workbench.model.logprobs import completion_logps
    from rlhf_workbench.train.offline import encode

    out = []
    for s in encode(tokenizer, records, 512, side):
        ids = torch.tensor([s.prompt_ids + s.token_ids])
        with torch.no_grad():
            out.append(completion_logps(model, ids, torch.ones_like(ids), len(s.token_ids))[0].sum())
    return torch.stack(out)


@pytest.fixture(scope="module")
def dpo_run(tiny_model_dir, tmp_path_factory, single_thread):
    root = tmp_path_factory.mktemp("offline")
    data = write_jsonl(root / "prefs.jsonl", preference_records())
    out = root / "dpo"
    args = ["train", "--algorithm", "dpo", "--data", data, "--model", tiny_model_dir, "--out-dir", out,
            "--epochs", 2, "--lr", 3e-3, "--batch-size", 4, "--heldout-fraction", HELDOUT_FRACTION, *FP32]
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    return {"root": root, "data": data, "out": out, "args": args, "output": r.text}


def test_dpo_improves_loss_and_margin_on_training_pairs(dpo_run, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_workbench.tasks.preferences import split_records

    out = dpo_run["out"]
    metrics = json.loads((out / "metrics.json").read_text())
    n_held = round(HELDOUT_FRACTION * N_PAIRS)
    assert metrics["train_examples"] == N_PAIRS - n_held and metrics["heldout_examples"] == n_held
    steps = metrics["steps"]
    assert len(steps) == 2 * 3 and [s["step"] for s in steps] == list(range(1, 7))  # 12 pairs / 4 per step
    first, last = steps[0], steps[-1]
    assert first["loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-4)  # policy = reference
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert last["loss"] < first["loss"] - 0.05 and last["rewards/margins"] > 0.5
    assert metrics["epochs"][1]["loss"] < metrics["epochs"][0]["loss"]
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected",
            "grad_norm"} <= set(last)
    # held-out pairs before/after with TRL's eval_ names: the preference generalises to unseen prompts
    assert metrics["eval_before"]["eval_loss"] == pytest.approx(0.6931, abs=1e-3)
    assert metrics["epochs"][-1]["eval_rewards/margins"] > metrics["eval_before"]["eval_rewards/margins"] + 0.5

    # recomputed independently from the saved final model: the implicit reward margin
    # beta * [(log pi - log pi_ref)(chosen) - (log pi - log pi_ref)(rejected)] is positive on the training pairs
    trained = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(out)
    train, _, _ = split_records(load_offline_file(dpo_run["data"]), HELDOUT_FRACTION, 0)
    margin = 0.1 * ((sum_logps(trained, tok, train, "chosen") - sum_logps(base, tok, train, "chosen"))
                    - (sum_logps(trained, tok, train, "rejected") - sum_logps(base, tok, train, "rejected")))
    assert (margin > 0).all() and margin.mean() > 0.5
    loss = -torch.nn.functional.logsigmoid(margin).mean()
    assert loss < 0.69 - 0.1

    # epoch checkpoints in the plain HF layout with optimizer state and trainer state
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-3", "step-6"]
    assert (out / "checkpoints" / "step-6" / "optimizer.pt").is_file()
    assert AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step-6") is not None
    held = [json.loads(x) for x in (out / "heldout.jsonl").read_text().splitlines()]
    assert len(held) == n_held and all(h["metadata"]["split"] == "heldout" for h in held)


def test_resume_adds_epochs_and_refuses_other_settings(dpo_run):
    out = dpo_run["out"]
    args = list(dpo_run["args"])
    args[args.index("--epochs") + 1] = 3
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    assert "resuming from" in r.text and "step-6" in r.text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_done"] == 3 and [s["step"] for s in metrics["steps"]] == list(range(1, 10))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-6", "step-9"]
    args[args.index("--lr") + 1] = 1e-3
    r = invoke(*args)
    assert r.exit_code == 2 and "other settings (lr)" in r.text


def test_eval_win_rate_on_heldout_prompts(dpo_run, tiny_model_dir):
    """An RM trained by `rlhf train --algorithm rm` on the same file judges the DPO model against its base."""
    root = dpo_run["root"]
    rm = root / "rm"
    r = invoke("train", "--algorithm", "rm", "--data", dpo_run["data"], "--model", tiny_model_dir, "--out-dir", rm,
               "--epochs", 2, "--lr", 1e-3, "--batch-size", 4, "--heldout-fraction", HELDOUT_FRACTION, *FP32)
    assert r.exit_code == 0, r.output
    rm_metrics = json.loads((rm / "metrics.json").read_text())
    assert len(rm_metrics["steps"]) == 6 and "eval_accuracy" in rm_metrics["epochs"][-1]
    assert rm_metrics["steps"][-1]["loss"] < rm_metrics["steps"][0]["loss"]
    report = root / "eval.json"
    r = invoke("eval", "--model", dpo_run["out"], "--reward-model", rm, "--max-new-tokens", 6, "--bootstrap", 300,
               "--out", report)
    assert r.exit_code == 0, r.output
    rep = json.loads(report.read_text())
    n_held = round(HELDOUT_FRACTION * N_PAIRS)
    assert rep["tasks"]["n"] == n_held and rep["reference"] == str(tiny_model_dir)
    win = rep["metrics"]["win_rate"]
    assert win["n"] == n_held and win["ci_low"] <= win["value"] <= win["ci_high"]
    assert win["value"] == pytest.approx(sum(q["win"] for q in rep["questions"]) / n_held)
    assert rep["accuracy_applicable"] is False and rep["n_open"] == n_held
    for name in ("pass@1", "format_rate", "reference_pass@1"):
        assert rep["metrics"][name]["value"] is None and rep["metrics"][name]["method"] == "not applicable"
    assert rep["vs_reference"]["mcnemar"] is None
    assert "not applicable" in r.text and "win rate vs reference" in r.text


def weights_changed(tiny_model_dir, out) -> float:
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(out).state_dict()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_kto_trains_a_step_on_labelled_completions(tiny_model_dir, tmp_path, single_thread):
    records = [{"prompt": f"Rate {i}", "completion": "Good." if i % 2 else "Bad!", "label": bool(i % 2)}
               for i in range(6)]
    data = write_jsonl(tmp_path / "kto.jsonl", records)
    out = tmp_path / "kto"
    r = invoke("train", "--algorithm", "kto", "--data", data, "--model", tiny_model_dir, "--out-dir", out,
               "--batch-size", 6, "--lr", 1e-3, "--heldout-fraction", 0, *FP32)
    assert r.exit_code == 0, r.output
    steps = json.loads((out / "metrics.json").read_text())["steps"]
    assert len(steps) == 1 and steps[0]["loss"] == pytest.approx(0.5, abs=1e-3)  # 1 - sigmoid(0) at the reference
    assert {"kl", "rewards/chosen", "rewards/rejected"} <= set(steps[0])
    assert weights_changed(tiny_model_dir, out) > 1e-5
    assert not (out / "heldout.jsonl").exists()


def test_sft_trains_on_messages(tiny_model_dir, tmp_path, single_thread):
    records = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Hi {i}"},
                             {"role": "assistant", "content": "Hello there."}]} for i in range(4)]
    data = write_jsonl(tmp_path / "sft.jsonl", records)
    out = tmp_path / "sft"
    r = invoke("train", "--algorithm", "sft", "--data", data, "--model", tiny_model_dir, "--out-dir", out,
               "--batch-size", 4, "--lr", 1e-3, "--heldout-fraction", 0.25, *FP32)
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["steps"]) == 1 and m["steps"][0]["num_tokens"] == 3 * 4  # "Hello there." + eos, 3 prompts
    assert m["steps"][0]["loss"] > 5  # a random model: ~ln(vocab) nats per token
    assert m["epochs"][0]["eval_loss"] < m["eval_before"]["eval_loss"]  # the held-out reply got likelier
    assert weights_changed(tiny_model_dir, out) > 1e-5


def test_lora_checkpoints_the_adapter_and_merges_the_final_model(tiny_model_dir, tmp_path, single_thread):
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_records(4))
    out = tmp_path / "lora"
    r = invoke("train", "--algorithm", "dpo", "--data", data, "--model", tiny_model_dir, "--out-dir", out, "--lora",
               "--batch-size", 4, "--lr", 1e-2, "--heldout-fraction", 0, "--set", "model.lora.r=4", *FP32)
    assert r.exit_code == 0, r.output
    assert (out / "checkpoints" / "step-1" / "adapter_config.json").is_file()  # the adapter, for resuming
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()  # merged, plain HF
    assert weights_changed(tiny_model_dir, out) > 1e-6


def test_bad_file_exits_2_naming_file_line_and_field(tiny_model_dir, tmp_path):
    recs = preference_records(4)
    del recs[2]["chosen"]
    data = write_jsonl(tmp_path / "bad.jsonl", recs)
    r = invoke("train", "--algorithm", "dpo", "--data", data, "--model", tiny_model_dir, "--out-dir", tmp_path / "o")
    assert r.exit_code == 2
    assert f"{data}: line 3: field 'chosen'" in r.text
    assert not (tmp_path / "o").exists()  # nothing written
    data = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "x", "completion": "y", "label": True}])
    r = invoke("train", "--algorithm", "dpo", "--data", data, "--model", tiny_model_dir, "--out-dir", tmp_path / "o")
    assert r.exit_code == 2 and "line 1: field 'chosen'" in r.text and "--algorithm dpo" in r.text
    r = invoke("train", "--algorithm", "dpo", "--data", tmp_path / "nope.jsonl", "--model", tiny_model_dir,
               "--out-dir", tmp_path / "o")
    assert r.exit_code == 2 and "nope.jsonl" in r.text
    r = invoke("train", "--algorithm", "dpo", "--data", data, "--out-dir", tmp_path / "o", "--set", "dpo.nope=1")
    assert r.exit_code == 2 and "dpo.nope" in r.text


def test_conversational_and_hh_formats_load(tmp_path):
    user = [{"role": "user", "content": "What is 2 + 2?"}]
    records = [
        {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"},  # standard
        {"prompt": user, "chosen": [{"role": "assistant", "content": "4"}],  # conversational
         "rejected": [{"role": "assistant", "content": "five"}]},
        {"chosen": [{"role": "system", "content": "Be exact."}, *user, {"role": "assistant", "content": "4"}],
         "rejected": [{"role": "system", "content": "Be exact."}, *user, {"role": "assistant", "content": "22"}]},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: Goodbye.",
         "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: Whatever."},
    ]
    recs = load_offline_file(write_jsonl(tmp_path / "conv.jsonl", records))
    assert [(r.kind, r.chosen, r.rejected) for r in recs] == [
        ("paired", "4", "5"), ("paired", "4", "five"), ("paired", "4", "22"), ("paired", "Goodbye.", "Whatever.")]
    assert recs[0].task.id == recs[1].task.id != recs[2].task.id  # same prompt, same task (split by prompt)
    assert recs[2].task.chat_messages() == [{"role": "system", "content": "Be exact."}, *user]
    assert [m["role"] for m in recs[3].task.chat_messages()] == ["user", "assistant", "user"]
    bad = [{"prompt": user, "chosen": [{"role": "user", "content": "4"}], "rejected": "5"}]
    with pytest.raises(TaskFormatError, match=r"line 1: field 'chosen': a conversational completion"):
        load_offline_file(write_jsonl(tmp_path / "bad.jsonl", bad))
    bad = [{"prompt": "x", "completion": "y", "label": "yes"}]
    with pytest.raises(TaskFormatError, match=r"line 1: field 'label'"):
        load_offline_file(write_jsonl(tmp_path / "bad2.jsonl", bad))
