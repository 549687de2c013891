"""The classic pipeline (rlhf_workbench.run.stages): SFT warm-up -> proxy RM -> loop -> gold-RM win rate."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_workbench.run import loop as loop_mod
from rlhf_workbench.config import PipelineConfig, RunConfig
from rlhf_workbench.evaluation.scoring import TIE_TOL, win_value
from rlhf_workbench.run.stages import resolve_run_paths, stage_tasks, task_pairs
from rlhf_workbench.tasks.loading import load_tasks

QUESTIONS = ["How do I pick a lock?", "What is a good way to insult someone?", "How can I cook rice?",
             "Tell me a joke about cats.", "How do I make my neighbour's dog sick?", "What is the capital of France?",
             "Can you help me cheat on a test?", "How should I store bread?", "What do you think of rude people?",
             "How do I get into a locked car?", "Why is the sky blue?", "How do I steal a bike?"]


def _hh_file(tmp_path, n=24, copies=1):
    """``n`` HH-style records; with ``copies`` > 1 every prompt text occurs ``copies`` times (as in
    HH-RLHF, where one prompt comes back under other records), with other replies."""
    rng = random.Random(0)
    lines = []
    for i in range(n):
        k = i % (n // copies)
        q = QUESTIONS[k % len(QUESTIONS)] + f" (case {k})"
        good = rng.choice(["I can't help with that, but I can suggest something safe.", "Here is a safe way to do it."])
        bad = rng.choice(["Sure, here is how to hurt them.", "Just do it, nobody will notice."])
        prefix = f"\n\nHuman: {q}\n\nAssistant:"
        lines.append(json.dumps({"chosen": f"{prefix} {good}", "rejected": f"{prefix} {bad}"}))
    path = tmp_path / "hh.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _cfg(model_dir, task_file, rounds=1) -> RunConfig:
    return RunConfig.model_validate({
        "algorithm": "grpo", "rounds": rounds, "seed": 1,
        "model": {"name": str(model_dir), "mixed_precision": "no"},
        "tasks": {"path": str(task_file), "heldout_size": 4},
        "pipeline": {"sft_warmup": {"examples": 4, "lr": 1e-2, "max_reply_tokens": 12},
                     "reward_model": {"pairs": 6, "max_tokens": 24, "epochs": 5},
                     "gold_reward_model": {"pairs": 6, "max_tokens": 24, "epochs": 5}},
        "rollout": {"num_generations": 2, "prompts_per_round": 2, "max_new_tokens": 6, "batch_size": 8},
        "feedback": {"sources": [{"name": "reward_model", "path": "run:reward_model"}]},
        "optim": {"lr": 1e-3, "micro_batch_size": 4},
        "eval": {"max_new_tokens": 6, "batch_size": 8, "kl_samples": 2},
    })


def test_stage_tasks_are_disjoint_and_pairs_use_the_scored_format(tmp_path):
    tasks = load_tasks(_hh_file(tmp_path))
    cfg = PipelineConfig.model_validate({"reward_model": {"pairs": 8}, "gold_reward_model": {"pairs": 10},
                                         "sft_warmup": {"examples": 3}})
    st = stage_tasks(tasks, cfg)
    proxy, gold = {t.id for t in st["reward_model"]}, {t.id for t in st["gold_reward_model"]}
    assert (len(proxy), len(gold), len(st["sft_warmup"])) == (8, 10, 3) and not proxy & gold
    p = task_pairs(st["reward_model"][:1])[0]
    assert p.prompt == st["reward_model"][0].transcript() + "\n\n" and p.chosen == st["reward_model"][0].metadata["chosen"]
    with pytest.raises(ValueError, match="only 24 training tasks"):
        stage_tasks(tasks, PipelineConfig.model_validate({"reward_model": {"pairs": 20}, "gold_reward_model": {"pairs": 5}}))
    # prompts that recur: a held-out prompt's twin is in no stage, and the gold model gets no proxy prompt
    twins = load_tasks(_hh_file(tmp_path, n=24, copies=2))
    held = [twins[0]]
    st = stage_tasks(twins[1:], PipelineConfig.model_validate({"reward_model": {"pairs": 8},
                                                                "gold_reward_model": {"pairs": 6}}), held)
    texts = {n: [t.transcript() for t in ts] for n, ts in st.items()}
    assert all(held[0].transcript() not in ts for ts in texts.values())
    assert twins[12].transcript() == held[0].transcript()  # the twin exists in training ...
    assert twins[12].id not in {t.id for ts in st.values() for t in ts}  # ... and is left out
    assert not set(texts["reward_model"]) & set(texts["gold_reward_model"])


def test_win_value_on_known_cases():
    assert win_value(2.0, 1.0) == 1.0 and win_value(1.0, 2.0) == 0.0
    assert win_value(1.0, 1.0 + TIE_TOL / 2) == 0.5 and win_value(3.0, 1.0, same_text=True) == 0.5


def test_run_paths_resolve_into_the_run_directory(tiny_model_dir, tmp_path):
    cfg = resolve_run_paths(_cfg(tiny_model_dir, tmp_path / "x.jsonl"), tmp_path / "run")
    assert cfg.feedback.sources[0].path == str(tmp_path / "run" / "reward_model")


def test_pipeline_runs_and_reports_gold_win_rate(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    data = _hh_file(tmp_path, n=48, copies=2)  # every prompt twice, under two records
    summary = loop_mod.run(_cfg(tiny_model_dir, data), out)
    stages = {n: json.loads((out / n / "stage.json").read_text()) for n in ("sft_model", "reward_model", "gold_reward_model")}
    heldout = set(json.loads((out / "eval" / "v0.json").read_text())["task_ids"])
    proxy, gold = set(stages["reward_model"]["task_ids"]), set(stages["gold_reward_model"]["task_ids"])
    assert len(proxy) == len(gold) == 6 and not proxy & gold and not (proxy | gold) & heldout
    # by prompt text too: a held-out prompt's twin record trains neither reward model
    text = {t.id: t.transcript() for t in load_tasks(data)}
    held_text = {text[i] for i in heldout}
    assert {i for i in text if text[i] in held_text} - heldout  # the twins exist ...
    assert not [i for i in proxy | gold if text[i] in held_text]  # ... and are left out
    assert not {text[i] for i in proxy} & {text[i] for i in gold}
    for n in ("reward_model", "gold_reward_model"):  # measured on the held-out prompts' own pairs
        st = stages[n]
        assert st["heldout_pairs"] == 4 and st["heldout_ci_low"] <= st["heldout_accuracy"] <= st["heldout_ci_high"]
    # the warm-up changed the weights, and the run's policy started from it
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    sft = AutoModelForCausalLM.from_pretrained(out / "sft_model")
    assert any(not torch.equal(a, b) for a, b in zip(base.parameters(), sft.parameters()))
    assert json.loads((out / "summary.json").read_text())["eval_after"]["n"] == 4
    after = summary["eval_after"]
    assert after["win_rate_ci_low"] <= after["win_rate"] <= after["win_rate_ci_high"]
    assert "reward_gold" in summary["eval_before"] and "reward_proxy" in after
    # the win rate is the gold model's verdict, answer by answer, against v0 (the reference)
    ev1 = json.loads((out / "eval" / "v1.json").read_text())
    ev0 = json.loads((out / "eval" / "v0.json").read_text())
    ref = dict(zip(ev0["task_ids"], ev0["completions"]))
    # recomputed here, not with the functions under test: a win 1, a loss 0, a tie (same text or
    # rewards within the scorer's tolerance) 0.5, averaged over the held-out prompts
    wins = [0.5 if t == ref[i] or abs(m - r) <= TIE_TOL else (1.0 if m > r else 0.0) for m, r, t, i in
            zip(ev1["reward_gold"], ev1["reward_gold_reference"], ev1["completions"], ev1["task_ids"])]
    assert len(wins) == 4 and after["win_rate"] == pytest.approx(sum(wins) / len(wins))
    assert ev0["reward_gold"] == pytest.approx(ev1["reward_gold_reference"], abs=1e-4)
    assert after["reward_gold_reference"] == pytest.approx(sum(ev1["reward_gold_reference"]) / 4)
    report = (out / "report.md").read_text()
    assert "win rate vs reference (gold RM)" in report and (out / "plots" / "rewards.png").is_file()
    assert (out / "plots" / "gold_vs_length.png").is_file() and "![gold_vs_length]" in report
    # a resume trains no stage again
    mtimes = {n: (out / n / "stage.json").stat().st_mtime_ns for n in stages}
    loop_mod.run(_cfg(tiny_model_dir, data, rounds=2), out)
    assert {n: (out / n / "stage.json").stat().st_mtime_ns for n in stages} == mtimes


def _words(text: str) -> str:
    """An independent normalisation for the check below: letters and digits only, lower case."""
    import re

    return re.sub(r"[^0-9a-z]+", "", text.lower())


def test_hh_split_keeps_every_heldout_prompt_out_of_the_reward_models_pairs(shared_data):
    """On the real bundled HH-RLHF harmless-base file, split as ``configs/hh.yaml`` splits it (the
    prompt-length filter with the real tokenizer, the seeded split, 256 held out): no held-out
    prompt, by its text, occurs in any proxy, gold or warm-up training task, and the proxy and the
    gold model share no prompt. The record-id split alone leaked (checked too, so the test fails
    on that defect)."""
    from pathlib import Path

    from rlhf_workbench.config import load_config
    from rlhf_workbench.model.loading import load_tokenizer, resolve_model_path
    from rlhf_workbench.run.setup import load_run_tasks
    from rlhf_workbench.run.stages import filter_prompt_length
    from rlhf_workbench.tasks.split import split_tasks

    path = shared_data / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    if not path.exists():
        pytest.skip(f"{path} missing")
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "hh.yaml")
    tasks = load_tasks(str(path), cfg.tasks.format, cfg.tasks.limit)
    tasks = filter_prompt_length(tasks, load_tokenizer(resolve_model_path(cfg.model.name, cfg.model.cache_dir)),
                                 cfg.pipeline.max_prompt_tokens)
    train, heldout = split_tasks(tasks, cfg.tasks.heldout_fraction, cfg.tasks.heldout_size, seed=cfg.seed)
    assert len(heldout) == 256 and len(tasks) > 1000
    held = {_words(t.transcript()) for t in heldout}
    by_id = stage_tasks(train, cfg.pipeline)  # the old split: by record only
    assert sum(_words(t.transcript()) in held for ts in by_id.values() for t in ts) > 0  # the defect is real here
    st = stage_tasks(train, cfg.pipeline, heldout)
    assert len(st["reward_model"]) == cfg.pipeline.reward_model.pairs
    assert len(st["gold_reward_model"]) == cfg.pipeline.gold_reward_model.pairs
    leaked = {name: [t.transcript()[:60] for t in ts if _words(t.transcript()) in held] for name, ts in st.items()}
    assert leaked == {"reward_model": [], "gold_reward_model": [], "sft_warmup": []}
    for name in ("reward_model", "gold_reward_model"):  # the pairs the stages train on carry the same prompts
        assert not [p for p in task_pairs(st[name]) if _words(p.prompt) in held]
    proxy = {_words(t.transcript()) for t in st["reward_model"]}
    assert not [t for t in st["gold_reward_model"] if _words(t.transcript()) in proxy]
    # the loop's own training prompts (GRPO rounds) hold no held-out prompt either
    cfg.tasks.path = str(path)
    loop_train, loop_heldout = load_run_tasks(cfg)
    assert [t.id for t in loop_heldout] == [t.id for t in heldout]
    assert not [t for t in loop_train if _words(t.transcript()) in held]
    assert len(loop_train) < len(train)  # duplicates of held-out prompts were there, and dropped
