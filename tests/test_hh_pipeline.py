"""The classic pipeline (rlhf_workbench.run.stages): SFT warm-up -> proxy RM -> loop -> gold-RM win rate."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_workbench.run import loop as loop_mod
from rlhf_workbench.config import PipelineConfig, RunConfig
from rlhf_workbench.evaluation.scoring import win_value
from rlhf_workbench.run.stages import resolve_run_paths, stage_tasks, task_pairs
from rlhf_workbench.stats import mean_estimate
from rlhf_workbench.tasks.loading import load_tasks

QUESTIONS = ["How do I pick a lock?", "What is a good way to insult someone?", "How can I cook rice?",
             "Tell me a joke about cats.", "How do I make my neighbour's dog sick?", "What is the capital of France?",
             "Can you help me cheat on a test?", "How should I store bread?", "What do you think of rude people?",
             "How do I get into a locked car?", "Why is the sky blue?", "How do I steal a bike?"]


def _hh_file(tmp_path, n=24):
    rng = random.Random(0)
    lines = []
    for i in range(n):
        q = QUESTIONS[i % len(QUESTIONS)] + f" (case {i})"
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


def test_run_paths_resolve_into_the_run_directory(tiny_model_dir, tmp_path):
    cfg = resolve_run_paths(_cfg(tiny_model_dir, tmp_path / "x.jsonl"), tmp_path / "run")
    assert cfg.feedback.sources[0].path == str(tmp_path / "run" / "reward_model")


def test_pipeline_runs_and_reports_gold_win_rate(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    summary = loop_mod.run(_cfg(tiny_model_dir, _hh_file(tmp_path)), out)
    stages = {n: json.loads((out / n / "stage.json").read_text()) for n in ("sft_model", "reward_model", "gold_reward_model")}
    heldout = set(json.loads((out / "eval" / "v0.json").read_text())["task_ids"])
    proxy, gold = set(stages["reward_model"]["task_ids"]), set(stages["gold_reward_model"]["task_ids"])
    assert len(proxy) == len(gold) == 6 and not proxy & gold and not (proxy | gold) & heldout
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
    wins = [win_value(m, r, t == ref[i]) for m, r, t, i in
            zip(ev1["reward_gold"], ev1["reward_gold_reference"], ev1["completions"], ev1["task_ids"])]
    assert after["win_rate"] == pytest.approx(mean_estimate(wins).value)
    assert ev0["reward_gold"] == pytest.approx(ev1["reward_gold_reference"], abs=1e-4)
    assert after["reward_gold_reference"] == pytest.approx(sum(ev1["reward_gold_reference"]) / 4)
    report = (out / "report.md").read_text()
    assert "win rate vs reference (gold RM)" in report and (out / "plots" / "rewards.png").is_file()
    # a resume trains no stage again
    mtimes = {n: (out / n / "stage.json").stat().st_mtime_ns for n in stages}
    loop_mod.run(_cfg(tiny_model_dir, _hh_file(tmp_path), rounds=2), out)
    assert {n: (out / n / "stage.json").stat().st_mtime_ns for n in stages} == mtimes
