"""The whole loop on a tiny model: outputs, store contents, resume after an interrupted round,
and bad input stopping before anything is written."""

import json

import pytest
import torch
from sqlalchemy import func, select

from rlhf_workbench.run import loop as loop_mod
from rlhf_workbench.config import ConfigError, RunConfig, load_config
from rlhf_workbench.store import CompletionRow, PolicyVersion, PreferencePair, Rollout, Store, VerificationRow
from rlhf_workbench.tasks.task import TaskFormatError


def tiny_cfg(model_dir, algorithm="grpo", rounds=2) -> RunConfig:
    return RunConfig.model_validate({
        "algorithm": algorithm, "rounds": rounds, "seed": 3,
        "model": {"name": str(model_dir), "mixed_precision": "no"},
        "tasks": {"path": "bundled:arithmetic", "limit": 1000, "max_heldout": 4},
        "rollout": {"num_generations": 2, "prompts_per_round": 2, "max_new_tokens": 6, "batch_size": 8},
        "optim": {"lr": 1e-3, "micro_batch_size": 4},
        "eval": {"max_new_tokens": 6, "batch_size": 8, "kl_samples": 4},
    })


def count(store, model):
    with store.session() as s:
        return s.scalar(select(func.count()).select_from(model))


def test_run_writes_outputs_and_store(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    summary = loop_mod.run(tiny_cfg(tiny_model_dir), out)
    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    for k in ("eval_before", "eval_after"):
        assert 0.0 <= saved[k]["accuracy"] <= 1.0 and saved[k]["n"] == 4
    assert saved["rounds"] == 2 and saved["wall_seconds"] > 0
    assert (out / "report.md").read_text().count("![") >= 3
    for png in ("accuracy", "reward", "loss"):
        assert (out / "plots" / f"{png}.png").stat().st_size > 1000
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "policy")
    store = Store(run_dir=out)
    assert [v.id for v in store.versions()] == [0, 1, 2]
    assert count(store, Rollout) == 2 and count(store, CompletionRow) == 2 * 2 * 2
    assert count(store, VerificationRow) == 8
    # Held-out tasks are never sampled for training.
    heldout = {t.id for t in store.tasks("heldout")}
    with store.session() as s:
        trained = set(s.scalars(select(CompletionRow.task_id)))
    assert trained and not trained & heldout
    # Stored rollout log-probs line up with the stored token ids.
    with store.session() as s:
        for c in s.scalars(select(CompletionRow)):
            assert len(c.logps) == len(c.token_ids)
    metrics = store.metrics()
    assert {"eval/accuracy", "train/reward", "train/loss", "eval/kl"} <= set(metrics)


def test_resume_after_interrupted_round(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = tiny_cfg(tiny_model_dir, rounds=2)
    real_update = loop_mod.grpo_update
    calls = {"n": 0}

    def crashing_update(pair, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # round 2: rollout is stored, then the update dies
            raise KeyboardInterrupt("simulated crash")
        return marking_update(pair, *args, **kwargs)

    def marking_update(pair, *args, **kwargs):
        # The real update, plus a visible mark on the weights, so the checkpoint lineage can be
        # checked (the tiny random model earns no reward, hence no gradient of its own).
        stats = real_update(pair, *args, **kwargs)
        with torch.no_grad():
            pair.policy.model.norm.weight += 1.0
        return stats

    monkeypatch.setattr(loop_mod, "grpo_update", crashing_update)
    with pytest.raises(KeyboardInterrupt):
        loop_mod.run(cfg, out)
    store = Store(run_dir=out)
    assert [v.id for v in store.versions()] == [0, 1]
    assert count(store, Rollout) == 2  # round 2's rollout survived the crash
    with store.session() as s:
        round2_ids = sorted(s.scalars(select(CompletionRow.id).join(Rollout).where(Rollout.round == 2)))
    monkeypatch.setattr(loop_mod, "grpo_update", marking_update)
    summary = loop_mod.run(cfg, out)
    assert summary["rounds"] == 2
    assert [v.id for v in store.versions()] == [0, 1, 2]
    assert count(store, Rollout) == 2  # resumed with the stored rollout, nothing sampled twice
    with store.session() as s:
        assert sorted(s.scalars(select(CompletionRow.id).join(Rollout).where(Rollout.round == 2))) == round2_ids
        assert s.get(PolicyVersion, 2).parent_id == 1
    # Round 2 trained from the v1 checkpoint (one mark), not from the base model: two marks.
    from safetensors.torch import load_file

    base = load_file(tiny_model_dir / "model.safetensors")["model.norm.weight"]
    v2 = load_file(out / "checkpoints" / "v2" / "model.safetensors")["model.norm.weight"]
    assert torch.allclose(v2, base + 2.0)
    monkeypatch.setattr(loop_mod, "grpo_update", real_update)

    # Running again with more rounds continues; the same config with a changed field is refused.
    cfg3 = tiny_cfg(tiny_model_dir, rounds=3)
    assert loop_mod.run(cfg3, out)["rounds"] == 3
    bad = tiny_cfg(tiny_model_dir, rounds=3)
    bad.optim.lr = 0.5
    with pytest.raises(ValueError, match="another config"):
        loop_mod.run(bad, out)


def test_dpo_loop_stores_pairs_with_correct_chosen(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg(tiny_model_dir, algorithm="dpo", rounds=1)
    loop_mod.run(cfg, out)
    store = Store(run_dir=out)
    with store.session() as s:
        for p in s.scalars(select(PreferencePair)):
            assert s.get(VerificationRow, p.chosen_id).correct
            assert not (s.get(VerificationRow, p.rejected_id).correct and False)


def test_bad_task_file_stops_before_writing(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1", "question": "q", "answer": "3"}\n{"id": "2", "question": "q2"}\n')
    cfg = tiny_cfg(tiny_model_dir)
    cfg.tasks.path = str(bad)
    out = tmp_path / "run"
    with pytest.raises(TaskFormatError, match=r"bad\.jsonl.*line 2.*answer"):
        loop_mod.run(cfg, out)
    assert not out.exists()


def test_config_errors_name_the_field(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("rollout:\n  num_generations: 1\n  tempreature: 0.5\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "rollout.num_generations" in str(e.value) and "rollout.tempreature" in str(e.value)
    assert str(p) in str(e.value)
    p.write_text("rollout: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(p)


@pytest.mark.parametrize("algorithm", ["ppo", "rloo", "kto"])
def test_other_algorithms_after_an_sft_warmup_round(tiny_model_dir, tmp_path, algorithm):
    """Round 1 fine-tunes on verified traces (SFT warm-up); round 2 runs ``algorithm``. A tiny
    random model earns no verified trace, so hand-written traces (one right, one wrong per
    task) are seeded for both rounds; the published versions, metrics and (for PPO) the saved
    critic show which update ran."""
    from conftest import seed_rollout
    from rlhf_workbench.model.loading import load_policy
    from rlhf_workbench.train.ppo import load_critic

    out = tmp_path / "run"
    cfg = tiny_cfg(tiny_model_dir, algorithm=algorithm, rounds=2)
    cfg.sft.warmup_rounds = 1
    loop_mod.run(cfg.model_copy(update={"rounds": 0}), out)  # v0 and the stored tasks
    store = Store(run_dir=out)
    pair = load_policy(cfg.model)
    train = store.tasks("train")
    for round in (1, 2):
        batch = loop_mod.prompts_for_round(train, round, cfg.rollout.prompts_per_round, cfg.seed)
        answers = {t.id: [f"Answer: {t.answer}", f"Answer: {int(t.answer) + 1}"] for t in batch}
        seed_rollout(store, pair, answers, round=round, version=round - 1)
        loop_mod.run(cfg.model_copy(update={"rounds": round}), out)
    versions = store.versions()
    assert [(v.id, v.algorithm) for v in versions] == [(0, "base"), (1, "sft"), (2, algorithm)]
    metrics = store.metrics()
    assert metrics["train/steps"][0][1] >= 1 and metrics["train/sft_traces"][0][1] == 2  # one verified trace per task
    assert metrics["train/steps"][1][1] >= 1
    if algorithm == "ppo":
        assert "train/objective/kl" in metrics and "train/val/explained_variance" in metrics
        critic = load_critic(cfg, checkpoint=str(out / "checkpoints" / "v2" / "critic"))
        assert critic is not None
    if algorithm == "kto":
        assert metrics["train/desirable"][-1][1] == 2 and metrics["train/undesirable"][-1][1] == 2


def test_loop_under_two_processes(tiny_model_dir, tmp_path):
    """``accelerate launch`` with 2 processes (DDP over gloo) runs the unchanged loop: each
    process samples half of the round's prompts, the main process stores them all once."""
    import os
    import socket
    import subprocess
    import sys

    import yaml

    cfg = tiny_cfg(tiny_model_dir, rounds=1)
    cfg.rollout.prompts_per_round = 3  # odd: the processes get 2 and 1 prompts
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
           "-m", "rlhf_workbench.cli", "run", "--config", str(path), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    store = Store(run_dir=out)
    assert [v.id for v in store.versions()] == [0, 1]
    rollout = store.rollout_for_round(1)
    assert rollout.settings["num_processes"] == 2
    comps = rollout.completions
    assert len(comps) == 3 * 2 and len({(c.task_id, c.index) for c in comps}) == 6
    expected = {t.id for t in loop_mod.prompts_for_round(store.tasks("train"), 1, 3, cfg.seed)}
    assert {c.task_id for c in comps} == expected
    assert json.loads((out / "summary.json").read_text())["rounds"] == 1
