"""Traces from an API model in the loop (issue 25), end to end over real HTTP on loopback: mixed
rounds (K policy samples + M teacher traces per prompt), the teacher behind ``rlhf serve-model``
(a different tiny checkpoint) and behind a fault-injecting proxy (tests/teacher_endpoint.py),
ranked by an expert through the web app's HTTP API, training the student off-policy; the
teacher's log-probs stored when the endpoint returns them and None when it does not; collection
only, exported and trained on with ``rlhf train --algorithm dpo``."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from sqlalchemy import select

from conftest import gradio_api_call, loop_beside_app
from teacher_endpoint import ByOrder, TeacherEndpoint

from rlhf_workbench.config import RunConfig
from rlhf_workbench.store import CompletionRow, PreferencePair, Store

PASSWORD = "password-123"
K, M = 2, 2


@pytest.fixture(scope="module")
def tiny_teacher_dir(tokenizer_dir, tmp_path_factory):
    """Another tiny random Llama (seed 1, so other weights than the student's) with the real tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    out = tmp_path_factory.mktemp("tiny-teacher")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def served_teacher(tiny_teacher_dir):
    """``rlhf serve-model``'s app serving the tiny teacher on a free loopback port; yields (base_url, model, tokenizer)."""
    from rlhf_workbench.app.serve_model import ServerThread, make_app
    from rlhf_workbench.model.chat import load_served_model

    model, tok = load_served_model(str(tiny_teacher_dir))
    with ServerThread(make_app(model, tok, "tiny-teacher")) as server:
        yield server.base_url, model, tok


def _weights_changed(before_dir, after_dir) -> bool:
    a, b = load_file(str(before_dir / "model.safetensors")), load_file(str(after_dir / "model.safetensors"))
    return any(not torch.equal(a[k], b[k]) for k in a if k in b)


def _cfg(model_dir, url: str, tasks, **extra) -> RunConfig:
    teacher = {"base_url": url, "model": "teacher", "num_generations": M, "max_concurrency": 3, "timeout_s": 2.0,
               "max_retries": 4, "backoff_s": 0.01, "temperature": 1.0}
    raw = {"algorithm": "dpo", "rounds": 2, "seed": 0, "model": {"name": str(model_dir), "mixed_precision": "no"},
           "tasks": tasks, "sft": {"warmup_rounds": 1},
           "rollout": {"num_generations": K, "prompts_per_round": 3, "max_new_tokens": 8, "batch_size": 16,
                       "teacher": teacher},
           "optim": {"lr": 1e-3, "micro_batch_size": 8},
           "eval": {"max_new_tokens": 4, "batch_size": 8, "kl_samples": 2}}
    for key, value in extra.items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return RunConfig.model_validate(raw)


def test_mixed_rounds_store_both_sources_and_train_the_student_off_policy(tiny_model_dir, tmp_path):
    """Keyed additions, an arithmetic teacher behind faults, rule feedback: SFT (round 1) and DPO (round 2)
    train on the teacher's verified traces; GRPO's batch leaves them out."""
    from transformers import AutoTokenizer

    from rlhf_workbench.model.rollout import render_prompt
    from rlhf_workbench.run.loop import _round_batch, run

    from rlhf_workbench.model.api_rollout import request_seed

    out = tmp_path / "run"
    faulty = ByOrder([[], ["429"], ["503"], ["hang"]])  # the hang outlasts the 2 s timeout
    with TeacherEndpoint(plan=faulty, hang_s=3.0, wrong_every=3) as ep:
        cfg = _cfg(tiny_model_dir, ep.base_url, {"path": "bundled:arithmetic", "max_heldout": 4})
        summary = run(cfg, out, Console(quiet=True))
    store = Store(run_dir=out)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tasks = {t.id: t for t in store.tasks("train")}
    requests = 0
    for round in (1, 2):
        rollout = store.rollout_for_round(round)
        assert rollout.settings["teacher"]["model"] == "teacher"
        requests += rollout.settings["teacher_usage"]["requests"]
        by_task: dict[str, list[CompletionRow]] = {}
        for c in rollout.completions:
            by_task.setdefault(c.task_id, []).append(c)
        assert len(by_task) == 3
        for task_id, rows in by_task.items():
            assert sorted(c.index for c in rows) == list(range(K + M))  # no trace lost, none twice
            assert [c.origin for c in sorted(rows, key=lambda c: c.index)] == ["sample"] * K + ["teacher"] * M
            for c in rows:
                if c.origin != "teacher":
                    assert len(c.logps) == len(c.token_ids) and c.api_logprobs is None
                    continue
                task = tasks[task_id]
                assert ep.answered[request_seed(cfg.seed, round, task_id, c.index - K)] == [c.text]
                assert c.logps == [] and c.api_logprobs is None  # this endpoint returns no log-probs
                assert c.prompt_ids == render_prompt(tok, task)  # under the policy's tokenizer
                assert c.token_ids == tok(c.text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                a, b = (int(x) for x in task.question[len("What is "):-1].split(" + "))
                assert c.verification.correct == c.text.endswith(f"Answer: {a + b}")  # verified like any trace
    faults = [f for _, _, f in ep.received]
    assert (faults.count("429"), faults.count("503"), faults.count("hang")) == (3, 3, 3)  # 12 traces, 3 per plan
    assert requests == len(ep.received) == summary["teacher_usage"]["requests"]
    assert summary["teacher_usage"]["retries"] == len(faults) - faults.count("200")
    assert summary["teacher_usage"]["traces"] == 2 * 3 * M
    metrics = {v.id: v.metrics for v in store.versions() if v.id > 0}
    assert metrics[1]["train/teacher_in_batch"] > 0 and metrics[1]["train/sft_traces"] >= metrics[1]["train/teacher_in_batch"]
    assert metrics[2]["train/teacher_in_batch"] > 0  # DPO pairs whose chosen trace is the teacher's
    assert metrics[2]["train/teacher/requests"] == store.rollout_for_round(2).settings["teacher_usage"]["requests"]
    assert _weights_changed(tiny_model_dir, out / "policy")
    rollout = store.rollout_for_round(2)
    grpo, _ = _round_batch(store, rollout, cfg, "grpo")
    sampled = [c for c in rollout.completions if c.origin == "sample"]
    assert len(grpo) == len(sampled) and all(len(s.old_logps) == len(s.token_ids) for s in grpo)
    sft, stats = _round_batch(store, rollout, cfg, "sft")
    teacher_ids = {tuple(c.token_ids) for c in rollout.completions if c.origin == "teacher" and c.verification.correct}
    assert teacher_ids and teacher_ids <= {tuple(s.token_ids) for s in sft} and stats["teacher_in_batch"] > 0


def test_serve_model_logprobs_are_the_models_own_and_absent_when_not_returned(served_teacher, tiny_model_dir,
                                                                            tmp_path):
    from transformers import AutoTokenizer

    from rlhf_workbench.config import TeacherConfig
    from rlhf_workbench.model.api_rollout import teacher_rollout
    from rlhf_workbench.run.loop import store_rollout
    from rlhf_workbench.tasks.task import Task

    url, model, ttok = served_teacher
    task = Task(id="a1", question="What is 12 + 30?", answer="42")
    student_tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = TeacherConfig(base_url=url, model="tiny-teacher", num_generations=1, temperature=0, max_tokens=6)
    comps, usage = teacher_rollout(cfg, [task], student_tok, round=1, seed=0, max_tokens=6)
    got = comps[0].extra["api_logprobs"]
    # the greedy continuation and its log-probs from a forward pass of the teacher itself
    prompt = ttok.apply_chat_template(task.chat_messages(), add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=ttok.pad_token_id)[0, len(prompt):].tolist()
        logits = model(torch.tensor([prompt + gen])).logits[0, len(prompt) - 1:-1].float()
    n = len(got["tokens"])
    want = torch.log_softmax(logits, -1)[torch.arange(len(gen)), torch.tensor(gen)][:n]
    assert n >= 1 and got["tokens"] == [ttok.decode([t]) for t in gen[:n]]
    assert got["logprobs"] == pytest.approx(want.tolist(), abs=1e-4)
    assert usage["traces_with_logprobs"] == 1 and usage["completion_tokens"] == n
    with TeacherEndpoint(upstream=url, strip_logprobs=True) as proxy:  # an endpoint that returns none
        bare, usage2 = teacher_rollout(cfg.model_copy(update={"base_url": proxy.base_url}), [task], student_tok, 1, 0, 6)
    assert bare[0].text == comps[0].text and bare[0].extra["api_logprobs"] is None
    assert usage2["traces_with_logprobs"] == 0
    store = Store(run_dir=tmp_path)
    store.add_tasks([task], "train")
    store.publish_version(0, None, "base", None, {}, round=0)
    from dataclasses import replace

    store_rollout(store, 1, 0, {}, {task.id: task}, [comps[0], replace(bare[0], index=1)])
    rows = sorted(store.rollout_for_round(1).completions, key=lambda c: c.index)
    assert rows[0].api_logprobs == got and rows[1].api_logprobs is None
    assert [r.origin for r in rows] == ["teacher", "teacher"]


def _open_tasks(tmp_path):
    things = ["tea", "rivers", "owls", "bread", "maps", "clocks"]
    rows = [{"id": f"t{i}", "prompt": f"Tell me something about {w}.", "metadata": {"split": "train"}}
            for i, w in enumerate(things)]
    rows += [{"id": "h1", "prompt": "Describe the sea.", "metadata": {"split": "heldout"}}]
    path = tmp_path / "open.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def teacher_first(item: dict, origin: dict) -> list[int]:
    """Every group holding a teacher trace first (``origin`` looked up in the database: the page and
    the API do not say who wrote a trace)."""
    return [0 if any(origin[c] == "teacher" for c in g["completion_ids"]) else 1 for g in item["groups"]]


def shortest_first(item: dict, origin: dict) -> list[int]:
    """Groups ranked by the length of their text, shortest first."""
    lengths = sorted({len(g["text"]) for g in item["groups"]})
    return [lengths.index(len(g["text"])) for g in item["groups"]]


def _expert(url: str, stop: threading.Event, store: Store, seen: list, rank=teacher_first) -> None:
    """Ranks through /next_item and /submit only, by ``rank(item, origin)`` (one rank per group)."""
    with httpx.Client(base_url=url, timeout=60, trust_env=False) as http:
        http.post("/login", data={"username": "expert", "password": PASSWORD}).raise_for_status()
        while not stop.is_set():
            _, data = gradio_api_call(http, "next_item", [])
            item = json.loads(data[0])
            if not item:
                time.sleep(0.2)
                continue
            seen.append(item)
            with store.session() as s:
                origin = {c.id: c.origin for c in s.scalars(select(CompletionRow).where(
                    CompletionRow.id.in_(item["completion_ids"])))}
            ranks = rank(item, origin)
            event, out = gradio_api_call(http, "submit", [item["rollout_id"], item["task_id"], json.dumps(ranks),
                                                          "teacher first", "[]", item["revision"], "[]"])
            assert event == "complete" and str(out[0]).startswith("ok"), f"submit: {event} {out}"


def test_teacher_behind_serve_model_is_ranked_blind_in_the_app_and_trains_the_student(
        served_teacher, tiny_model_dir, tmp_path):
    from rlhf_workbench.human.accounts import create_user

    url = served_teacher[0]
    out = tmp_path / "run"
    with TeacherEndpoint(upstream=url, plan=ByOrder([["429"], []])) as proxy:
        cfg = _cfg(tiny_model_dir, proxy.base_url, {"path": str(_open_tasks(tmp_path))}, rounds=1,
                   **{"sft.warmup_rounds": 0, "rollout.teacher.logprobs": True, "feedback.source": "human",
                      "feedback.min_rankings": 3, "feedback.poll_seconds": 0.2, "feedback.min_verified": 2,
                      "rollout.teacher.model": "tiny-teacher"})
        store = Store(cfg.db_url, out)
        create_user(store, "expert", PASSWORD)
        seen = []
        _, errors = loop_beside_app(cfg, out, lambda url, stop: _expert(url, stop, store, seen))
    assert not errors, errors
    assert [f for _, _, f in proxy.received].count("429") == 3  # every other trace was rate-limited once
    rollout = store.rollout_for_round(1)
    teacher_rows = [c for c in rollout.completions if c.origin == "teacher"]
    assert len(teacher_rows) == 3 * M and all(c.api_logprobs and len(c.api_logprobs["tokens"]) ==
                                              len(c.api_logprobs["logprobs"]) > 0 for c in teacher_rows)
    assert all(lp <= 0 for c in teacher_rows for lp in c.api_logprobs["logprobs"])
    # served blind: both sources in one item, nothing in the answer says which is which
    assert len(seen) >= 3 and all(len(i["completion_ids"]) == K + M for i in seen)
    assert all("sources" not in i and all("sources" not in g for g in i["groups"]) for i in seen)
    assert "tiny-teacher" not in json.dumps(seen)
    with store.session() as s:
        pairs = list(s.scalars(select(PreferencePair)))
        chosen = [s.get(CompletionRow, p.chosen_id).origin for p in pairs]
    assert pairs and set(chosen) == {"teacher"}  # the expert put the teacher's traces first
    metrics = store.versions()[-1].metrics
    assert metrics["train/teacher_in_batch"] == metrics["train/pairs"] == len(pairs)
    assert metrics["train/teacher/retries"] == metrics["train/teacher/rate_limited"] == 3
    assert _weights_changed(tiny_model_dir, out / "policy")


def test_collection_only_exports_a_dataset_that_rlhf_train_dpo_trains_on(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from rlhf_workbench.cli import app
    from rlhf_workbench.run.loop import run

    out = tmp_path / "collect"
    with TeacherEndpoint(wrong_every=3) as ep:
        cfg = _cfg(tiny_model_dir, ep.base_url, {"path": "bundled:arithmetic", "max_heldout": 4},
                   algorithm="none", rounds=2, **{"rollout.teacher.num_generations": 3, "rollout.prompts_per_round": 4,
                                                  "dpo.pairing": "best_vs_worst"})
        summary = run(cfg, out, Console(quiet=True))
    store = Store(run_dir=out)
    assert summary["algorithm"] == "none" and summary["teacher_usage"]["traces"] == 2 * 4 * 3
    assert summary["teacher_usage"]["requests"] == len(ep.received)
    assert not (out / "checkpoints").exists() and not (out / "policy").exists()  # no policy, no update
    rows = [c for r in (1, 2) for c in store.rollout_for_round(r).completions]
    assert len(rows) == 24 and {c.origin for c in rows} == {"teacher"}
    runner = CliRunner()
    r = runner.invoke(app, ["export", "--run", str(out), "--out-dir", str(tmp_path / "export")])
    assert r.exit_code == 0, r.output
    exported = [json.loads(x) for x in (tmp_path / "export" / "preferences.jsonl").read_text().splitlines()]
    assert exported and len(exported) == summary["pairs"]
    assert {(e["chosen_origin"], e["rejected_origin"]) for e in exported} == {("teacher", "teacher")}
    for e in exported:  # the chosen answer is right, the rejected one wrong (off by one)
        a, b = (int(x) for x in e["prompt"].split("What is ")[1].split("?")[0].split(" + "))
        assert e["chosen"].endswith(f"Answer: {a + b}") and e["rejected"].endswith(f"Answer: {a + b + 1}")
    r = runner.invoke(app, ["train", "--algorithm", "dpo", "--data", str(tmp_path / "export" / "preferences.jsonl"),
                            "--out-dir", str(tmp_path / "dpo"), "--model", str(tiny_model_dir), "--lr", "1e-3",
                            "--batch-size", "2", "--heldout-fraction", "0.25"])
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "dpo" / "metrics.json").read_text())
    assert metrics["train_examples"] > 0 and len(metrics["steps"]) > 0
    assert _weights_changed(tiny_model_dir, tmp_path / "dpo")


def test_teacher_benchmark_quick(tiny_model_dir, tiny_teacher_dir, tmp_path):
    """``benchmarks/teacher_traces.py --quick``: both arms against a teacher served by ``rlhf serve-model``
    in its own process; the result holds the accuracies, the teacher's usage and portable paths."""
    import importlib.util
    import sys

    from test_benchmark_results import absolute_paths

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    spec = importlib.util.spec_from_file_location("teacher_traces", bench / "teacher_traces.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "result.json"
    result = module.main(["--quick", "--student", str(tiny_model_dir), "--teacher", str(tiny_teacher_dir),
                          "--work", str(tmp_path / "work"), "--out", str(out)])
    on_disk = json.loads(out.read_text())
    assert absolute_paths(on_disk) == [] and set(on_disk["processor"]) >= {"model", "cores"}
    assert on_disk["v0"]["n"] == on_disk["teacher"]["n"] == on_disk["no_teacher"]["n"] == 4
    usage = result["teacher"]["teacher_usage"]
    assert usage["traces"] == 2 * 2 * 2 and usage["requests"] >= usage["traces"] and usage["completion_tokens"] > 0
    assert set(result["ratios"]) <= {"after_over_before/teacher", "after_over_before/no_teacher",
                                     "teacher_over_no_teacher"}
    assert result["configs"]["no_teacher"]["rollout"]["teacher"] is None
    assert sum(r["train/teacher/requests"] for r in result["teacher"]["rounds"].values()) == usage["requests"]


def test_the_page_has_a_slot_per_trace_and_names_sources_only_when_asked():
    from rlhf_workbench.app.build import trace_slots
    from rlhf_workbench.app.render import item_json, pair_md, trace_md
    from rlhf_workbench.human.duplicates import group_traces
    from rlhf_workbench.human.items import Item, Trace
    from rlhf_workbench.tasks.task import Task

    teacher = {"base_url": "http://127.0.0.1:1/v1", "model": "m", "num_generations": 3}
    assert trace_slots(RunConfig.model_validate({"rollout": {"num_generations": 4, "teacher": teacher}})) == 7
    assert trace_slots(RunConfig.model_validate({"algorithm": "none", "rollout": {"teacher": teacher}})) == 3
    assert trace_slots(RunConfig.model_validate({"rollout": {"num_generations": 4}})) == 4
    traces = [Trace(1, "Answer: 4", "ok", "policy"), Trace(2, "Answer:  4 ", "ok", "teacher"),
              Trace(3, "2 + 2 = 4\nAnswer: 4", "ok", "teacher")]
    entries = group_traces(traces)  # identical texts from both sources are one entry
    assert [(e.completion_ids, e.sources) for e in entries] == [([1, 2], ["policy", "teacher"]), ([3], ["teacher"])]
    assert "written by the policy and the teacher" in trace_md(1, entries[0].trace, 2, entries[0].sources)
    assert "written by" not in trace_md(1, entries[0].trace, 2) and "written by" not in pair_md("A", entries[1])
    assert "written by the teacher" in pair_md("A", entries[1], show_source=True)
    item = Item(rollout_id=1, round=1, policy_version=0, task=Task(id="t", question="What is 2 + 2?", answer="4"),
                verified=traces, rejected=[])
    assert "sources" not in json.dumps(item_json(item)) and "teacher" not in json.dumps(item_json(item))
    shown = item_json(item, show_source=True)
    assert shown["sources"] == ["policy", "teacher", "teacher"] and shown["groups"][0]["sources"] == ["policy", "teacher"]


def test_collection_only_with_experts_in_the_app_exports_their_rankings(served_teacher, tiny_model_dir, tmp_path):
    """``algorithm: none`` with ``feedback.source: human``: the teacher's traces alone, served in the
    app (M per item), ranked by an expert through the HTTP API, exported with the expert's name."""
    from rlhf_workbench.human.accounts import create_user
    from rlhf_workbench.human.export import preference_rows

    out = tmp_path / "collect"
    cfg = _cfg(tiny_model_dir, served_teacher[0], {"path": str(_open_tasks(tmp_path))}, algorithm="none", rounds=1,
               **{"rollout.teacher.num_generations": 3, "rollout.teacher.model": "tiny-teacher",
                  "feedback.source": "human", "feedback.min_rankings": 3, "feedback.poll_seconds": 0.2})
    store = Store(cfg.db_url, out)
    create_user(store, "expert", PASSWORD)
    seen = []
    summary, errors = loop_beside_app(cfg, out, lambda url, stop: _expert(url, stop, store, seen, shortest_first))
    assert not errors, errors
    assert summary["algorithm"] == "none" and summary["teacher_usage"]["traces"] == 3 * 3
    assert len(seen) == 3 and all(len(i["completion_ids"]) == 3 for i in seen)  # the M teacher traces
    rows = preference_rows(store)
    assert rows and {(r["source"], r["annotator"], r["chosen_origin"], r["rejected_origin"]) for r in rows} == {
        ("human", "expert", "teacher", "teacher")}
    assert all(len(r["chosen"]) < len(r["rejected"]) for r in rows)  # the expert's preference: shorter first
    assert not (out / "checkpoints").exists()
