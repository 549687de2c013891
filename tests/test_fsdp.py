"""Sharded training (FSDP2 through accelerate, on the CPU over gloo): the update of a 2-process
FSDP run equals one process, and the loop runs a round under FSDP, writing plain Hugging Face
checkpoints.

``tests/fsdp_worker.py`` trains the tiny random Llama of ``distributed_update.py`` with one update
per case (GRPO with its KL term, DPO with an empty shard, KTO, PPO with its critic) on the same
fixed global batches, once in one process without sharding and once under
``accelerate launch --config_file configs/accelerate/fsdp.yaml`` with 2 processes, where the
policy, the frozen reference and the critic are FSDP2 modules holding half of the elements each.
The optimizer is SGD, so the parameter change is ``-lr ×`` the clipped global gradient: comparing
the changes (gathered from the shards) compares gradients. Measured on a 2-core AMD EPYC: the
changes agree to 7e-9 (of 0.045), the losses and gradient norms to 3e-7 relative; a lost shard or
a wrong normaliser moves them by percents, so ``RTOL = 1e-4`` leaves room only for float noise.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fsdp_worker import CASES

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("fsdp_worker.py")
ACCELERATE_CONFIG = ROOT / "configs" / "accelerate" / "fsdp.yaml"
RTOL, ATOL = 1e-4, 1e-7


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(*args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIG),
            "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
            *args]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> dict:
    """The three runs, started together: ``one`` and ``two`` (worker results and deltas) and
    ``loop`` (the run directory and the launcher's output)."""
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    tmp = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "",
           "HF_HOME": str(tmp / "hf"), "HF_HUB_OFFLINE": "1"}
    config = tmp / "ppo.yaml"
    config.write_text(yaml.safe_dump({
        "algorithm": "ppo", "rounds": 1, "seed": 3,
        "model": {"name": str(tiny_model_dir), "mixed_precision": "no"},
        "tasks": {"path": "bundled:arithmetic", "limit": 1000, "max_heldout": 4},
        "rollout": {"num_generations": 2, "prompts_per_round": 3, "max_new_tokens": 6, "batch_size": 8},
        "optim": {"lr": 1e-3, "micro_batch_size": 2},
        "ppo": {"ppo_epochs": 1, "num_mini_batches": 1, "kl_coef": 0.1},
        "eval": {"max_new_tokens": 6, "batch_size": 8, "kl_samples": 4},
        "tracking": {"backend": "none"},
    }))
    commands = {
        "one": [sys.executable, str(WORKER), str(tmp / "one")],
        "two": _launch(str(WORKER), str(tmp / "two")),
        "loop": _launch("-m", "rlhf_workbench.cli", "run", "--config", str(config), "--out", str(tmp / "run")),
    }
    procs = {k: subprocess.Popen(cmd, env=env, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for k, cmd in commands.items()}
    out = {}
    try:
        for k, proc in procs.items():
            log, _ = proc.communicate(timeout=400)
            assert proc.returncode == 0, f"{k} failed ({' '.join(commands[k])}):\n{log[-6000:]}"
            if k == "loop":
                out[k] = (tmp / "run", log)
            else:
                out[k] = (json.loads((tmp / k / "results.json").read_text()),
                          torch.load(tmp / k / "deltas.pt", weights_only=True))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return out


def test_the_runs_are_what_they_claim(runs):
    one, two = runs["one"][0], runs["two"][0]
    assert (one["num_processes"], one["fsdp"]) == (1, False)
    assert (two["num_processes"], two["fsdp"]) == (2, True)
    for case, result in two["cases"].items():
        facts = result["sharded"]
        assert facts["policy"] and facts["reference"] and facts["critic"], (case, facts)
        assert 0.4 < facts["policy_local_fraction"] < 0.6, (case, facts)  # each process holds about half


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp_update_matches_one_process(runs, case):
    (res1, d1), (res2, d2) = runs["one"], runs["two"]
    m1, m2 = res1["cases"][case]["metrics"], res2["cases"][case]["metrics"]
    assert m1["steps"] >= 1 and m1["steps"] == m2["steps"]
    for key in ("loss", "grad_norm"):
        assert abs(m1[key] - m2[key]) <= RTOL * abs(m1[key]) + ATOL, (key, m1[key], m2[key])
    assert set(d1[case]) == set(d2[case]) == ({"policy", "critic"} if case == "ppo" else {"policy"})
    for module in d1[case]:
        scale = d1[case][module].abs().max().item()
        assert scale > 0, module  # the module moved
        diff = (d1[case][module] - d2[case][module]).abs().max().item()
        assert diff <= RTOL * scale, (module, diff, scale)


def test_loop_round_under_fsdp_writes_plain_checkpoints(runs, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    run_dir, log = runs["loop"]
    assert "sharding: FSDP2 over 2 processes (cpu, gloo)" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["eval_after"]["n"] == 4
    assert summary["eval_after"]["kl"] > 0  # evaluated against a reference that is not the trained policy
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    for path in (run_dir / "checkpoints" / "v1", run_dir / "policy"):
        state = AutoModelForCausalLM.from_pretrained(path).state_dict()  # the plain HF layout
        assert state.keys() == base.keys()
        assert all(state[k].shape == base[k].shape for k in base)
        assert max((state[k] - base[k]).abs().max().item() for k in base) > 0  # the round trained it
    critic = AutoModelForSequenceClassification.from_pretrained(run_dir / "checkpoints" / "v1" / "critic")
    assert critic.config.num_labels == 1
    assert not (run_dir / "checkpoints" / "v1" / "optimizer.pt").exists()  # sharded state: not saved
