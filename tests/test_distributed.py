"""Data-parallel updates: a 2-process CPU run (``accelerate launch``, DDP over gloo) of every
update gives the same loss, gradient norm and parameter change as a 1-process run on the same
global batch, to float tolerance.

``tests/distributed_update.py`` runs one update per case (GRPO ``grpo``/``dapo``/``dr_grpo``,
DPO sigmoid and IPO, RLOO with and without the KL penalty, KTO with full weights and with LoRA,
SFT, PPO with its critic) on a tiny random Llama with SGD, so the parameter change is
``-lr ×`` the clipped global gradient; for PPO the policy's and the critic's changes are both
compared. The cases cover several optimizer steps, gradient accumulation over micro-batches
(``no_sync``), shards of unequal size, a process with an empty shard (DPO's last step has one
pair for two processes, PPO's last minibatch one sample), padding forwards of the LoRA
reference (the wrapped policy) and of PPO's policy and critic, and PPO's rollout-phase
quantities (sharded reference and critic passes, GAE and whitening over the global batch) over
two epochs of shuffled minibatches of an uneven batch (5 samples).

"Float tolerance": two process counts run the same arithmetic on matmuls of other shapes, so
float sums are added in another order, and nothing makes the results bit-identical. Each
quantity ``v`` may differ by ``max(RTOL·|v|, ATOL, MARGIN·noise)``, ``noise`` being how far the
one-process run moves when only its micro-batch size changes (measured in the same run; see
``distributed_update.py``). For the loss, the gradient norm and the parameter changes the
measurement is itself checked to be float noise (at most ``NOISE_MAX·|v| + ATOL``), so it cannot
hide a real difference: a wrong normaliser or a lost shard moves these numbers by percents.
(Metrics that count threshold tests, such as reward accuracies, may flip at the threshold.)
Example: on a 2-core AMD EPYC the one-step RLOO loss against the rollout log-probs (-0.0421, the
mean of terms of both signs whose sizes average ~0.6) differed by 1.8e-5 relative between process
counts, and by 1.7e-5 between micro-batch sizes. (With the old log-probs recomputed, a one-step
RLOO loss is ``-mean(A) = 0`` up to float noise, which no relative tolerance fits; the RLOO cases
take two steps.)

Note: in accelerate 1.15 ``accelerate launch --cpu --num_processes 2`` starts a single process
unless MPI is used (``--mpirun_hostfile``); ``--multi_gpu`` on a machine without a visible GPU
starts the processes with torchrun and accelerate picks gloo (``DistributedType.MULTI_CPU``).
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

from distributed_update import CASES

SCRIPT = Path(__file__).with_name("distributed_update.py")
RTOL, ATOL = 1e-5, 1e-6  # metrics; parameter changes: max |Δ1 - Δ2| <= RTOL · max |Δ1|
MARGIN = 10.0  # × the measured float noise (the difference between process counts is ~1× on AMD)
NOISE_MAX = 1e-4  # relative: a micro-batch size that moves a result by more is not float noise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Both runs, started concurrently: ``{"one": (results, deltas), "two": (results, deltas)}``."""
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    tmp = tmp_path_factory.mktemp("distributed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "",
           "HF_HOME": str(tmp / "hf"),  # no user accelerate config (default_config.yaml) applies
           "HF_HUB_OFFLINE": "1"}
    commands = {
        "one": [sys.executable, str(SCRIPT), str(tmp / "one")],
        "two": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
                str(SCRIPT), str(tmp / "two")],
    }
    procs = {k: subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for k, cmd in commands.items()}
    out = {}
    try:
        for k, proc in procs.items():
            log, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, f"{k}-process run failed ({' '.join(commands[k])}):\n{log[-6000:]}"
            out[k] = (json.loads((tmp / k / "results.json").read_text()),
                      torch.load(tmp / k / "deltas.pt", weights_only=True))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    assert out["one"][0]["num_processes"] == 1 and out["two"][0]["num_processes"] == 2
    return out


def _tolerance(value: float, noise: float, atol: float, what: str, noise_floor: float | None = ATOL) -> float:
    """``max(RTOL·|value|, atol, MARGIN·noise)``, once ``noise`` is checked to be float noise
    (``<= NOISE_MAX·|value| + noise_floor``; not checked with ``noise_floor=None``)."""
    assert noise_floor is None or noise <= NOISE_MAX * abs(value) + noise_floor, \
        f"{what}: another micro-batch size moved it by {noise:.3g} (of {value:.6g}): not float noise"
    return max(RTOL * abs(value), atol, MARGIN * noise)


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_match_one(runs, case):
    (res1, d1), (res2, d2) = runs["one"], runs["two"]
    m1, m2 = res1["cases"][case]["metrics"], res2["cases"][case]["metrics"]
    noise = res1["cases"][case]["noise"]
    assert m1["steps"] >= 1  # a real step was taken (and below: every module moved)
    assert set(m1) == set(m2) == set(noise["metrics"])
    for key in m1:
        # loss and gradient norm are continuous in the log-probs: float noise moves them by float
        # noise. Other metrics may count threshold tests (reward accuracies, clip fractions) that
        # flip for values at the threshold: DPO's accuracy at its first step, where policy ==
        # reference and every margin is 0 up to float noise, moves by 0.2 between micro-batch sizes.
        continuous = key in ("loss", "grad_norm")
        tol = _tolerance(m1[key], noise["metrics"][key], 1e-9 if continuous else ATOL, key,
                         ATOL if continuous else None)
        assert abs(m2[key] - m1[key]) <= tol, f"{key}: {m2[key]!r} vs {m1[key]!r} (tolerance {tol:.3g})"
    assert set(d1[case]) == set(d2[case]) == ({"policy", "critic"} if case.startswith("ppo") else {"policy"})
    for module in d1[case]:  # policy, and critic for PPO
        scale = d1[case][module].abs().max().item()
        assert scale > 0, module
        diff = (d1[case][module] - d2[case][module]).abs().max().item()
        assert diff <= _tolerance(scale, noise["delta_max"][module], 0.0, module, 0.0), (module, diff, scale)
        s1, s2 = (res["cases"][case]["delta_abs_sum"][module] for res in (res1, res2))
        assert abs(s2 - s1) <= _tolerance(s1, noise["delta_abs_sum"][module], 0.0, module, 0.0), (module, s1, s2)


def test_every_process_reports_the_same(runs):
    """Metrics are reduced across processes, and DDP leaves every process with the same weights."""
    for case, result in runs["two"][0]["cases"].items():
        first, second = result["metrics_by_process"]
        assert first == second, case
        a, b = result["checksum_by_process"]
        assert a == b, case
