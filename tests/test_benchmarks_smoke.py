"""Smoke runs of the throughput benchmarks (``--quick`` on the tiny random Llama with the real
tokenizer): each writes its JSON with positive finite ``ratios``, the processor it ran on and no
absolute path; DPO's first-step loss is ln 2 for both systems (policy == reference) and agrees
to 1e-4; greedy generation is identical token for token with plain ``model.generate``.

The DPO benchmark reads HH-RLHF from the shared data directory (``shared_data`` fixture:
skipped, with its reason, when the directory is missing).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState
from test_benchmark_results import absolute_paths

pytest.importorskip("trl")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    """The benchmark script as module ``name`` (importable by that name, with ``benchmarks/`` on
    ``sys.path``, so that its worker processes can unpickle its functions)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _check_ratios(result: dict, path: Path, expected: set[str]) -> None:
    on_disk = json.loads(path.read_text())
    assert absolute_paths(on_disk) == []  # e.g. the tiny model's temporary directory: its name only
    assert set(on_disk["processor"]) == {"model", "amx", "bf16_flags", "cores", "usable_cores"}
    assert set(on_disk["ratios"]) == expected
    for key, value in on_disk["ratios"].items():
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    assert on_disk["ratios"] == pytest.approx(result["ratios"])


def test_machine_peak_quick(tmp_path):
    out = tmp_path / "machine_peak.json"
    result = _load("machine_peak").main(["--quick", "--threads", "1", "--out", str(out)])
    _check_ratios(result, out, {"bf16_vs_fp32"})
    for dtype in ("fp32", "bf16"):
        assert result["peak_flops"][dtype] > 1e8  # any CPU does more than 0.1 GFLOP/s


def test_generation_throughput_quick(tiny_model_dir, tmp_path):
    out = tmp_path / "generation.json"
    result = _load("generation_throughput").main(["--quick", "--model", str(tiny_model_dir), "--threads", "1",
                                                  "--out", str(out)])
    _check_ratios(result, out, {"ours/bs=1", "ours/bs=2", "ours/sampled_k=2"})
    assert result["identical"] is True
    assert all(s["tokens"] > 0 for s in result["sampled"]["systems"].values())
    assert all(v["identical"] for v in result["by_batch_size"].values())
    for v in result["by_batch_size"].values():
        assert v["systems"]["ours"]["tokens"] == v["systems"]["generate"]["tokens"] > 0


def test_bf16_vs_fp32_quick(tiny_model_dir, shared_data, tmp_path):
    out = tmp_path / "bf16.json"
    result = _load("bf16_vs_fp32").main(["--quick", "--model", str(tiny_model_dir), "--data-dir", str(shared_data),
                                         "--threads", "1", "--out", str(out)])
    _check_ratios(result, out, {"bf16/steps_per_s", "bf16_weights/steps_per_s"})
    first = result["first_step"]
    assert first["loss_fp32"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    assert first["loss_bf16"] == pytest.approx(math.log(2), abs=1e-6)
    assert 0.5 < first["grad_cosine"] <= 1.0 + 1e-6
    for run in result["runs"].values():
        assert len(run["per_step"]) == 2 and run["param_rel_change"] > 0


def test_train_throughput_quick(tiny_model_dir, shared_data, tmp_path):
    out = tmp_path / "train.json"
    result = _load("train_throughput").main(["--quick", "--model", str(tiny_model_dir), "--data", "hh",
                                             "--data-dir", str(shared_data), "--threads", "1", "--lr", "1e-3",
                                             "--out", str(out)])
    _check_ratios(result, out, {"dpo_hh/pairs_per_s", "dpo_hh/tokens_per_s", "grpo/completions_per_s",
                                "grpo/tokens_per_s"})
    dpo = result["dpo_hh"]["systems"]
    ours, trl = dpo["ours"]["first_step_loss"], dpo["trl"]["first_step_loss"]
    assert ours == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1
    assert trl == pytest.approx(math.log(2), abs=1e-4)
    assert abs(ours - trl) < 1e-4
    assert len(dpo["ours"]["losses"]) == len(dpo["trl"]["losses"]) == 3  # 1 warm-up + 2 timed steps
    # every step, not only the first (ln 2 whatever the update does): after each update both
    # systems' losses have moved away from ln 2 and agree, so a wrong DPO step shows here
    for step, (a, b) in enumerate(zip(dpo["ours"]["losses"], dpo["trl"]["losses"])):
        assert a == pytest.approx(b, abs=2e-4), (step, a, b)
    assert abs(dpo["ours"]["losses"][-1] - math.log(2)) > 1e-3
    for bench in (dpo, result["grpo"]["systems"]):  # the systems took turns, one step each, never overlapping
        spans = sorted([(*span, name) for name in ("ours", "trl") for span in bench[name]["step_spans"]])
        assert [name for *_, name in spans] == ["ours", "trl"] * 3
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
        for name in ("ours", "trl"):
            assert bench[name]["timed_seconds"] == pytest.approx(sum(bench[name]["step_seconds"][1:]))
    peak = result["peak_flops"]["value"]
    for system in dpo.values():  # FLOPs of the positions each forward computed, padding included
        assert system["mfu_executed"] == pytest.approx(system["executed_flops"] / system["timed_seconds"] / peak)
    assert dpo["ours"]["executed_flops"] < dpo["trl"]["executed_flops"]  # the prompt once per pair, no padding
    grpo = result["grpo"]["systems"]
    for system in (*dpo.values(), *grpo.values()):
        assert system["peak_rss_mb"] > 0 and 0 < system["mfu"] < 1
    for system in grpo.values():
        assert system["completions_per_s"] > 0 and len(system["losses"]) == 3
    # GRPO's loss is ~0 on-policy whatever the implementation, so it proves nothing here (the loss is
    # checked against TRL's in tests/test_losses_vs_trl.py). What ours must do: a step whose groups
    # all got one reward (a step mean of 0 or 1) has no advantage to learn from and trains nothing.
    ours_grpo = grpo["ours"]
    assert len(ours_grpo["reward_mean"]) == len(ours_grpo["trained_fraction"]) == 3
    for mean, trained in zip(ours_grpo["reward_mean"], ours_grpo["trained_fraction"]):
        if mean in (0.0, 1.0):
            assert trained == 0.0, (mean, trained)
        assert 0.0 <= trained <= 1.0


def test_reward_model_hh_smoke(tiny_model_dir, shared_data, tmp_path):
    """benchmarks/reward_model_hh.py on the tiny model and 160 real HH pairs: both sides built from one
    settings object, every setting recorded for both and equal (the shuffle's difference carries
    its reason), the same pairs; the default command reproduces the README's 320 / 1,992 split."""
    rm = _load("reward_model_hh")
    out = tmp_path / "rm.json"
    try:
        result = rm.main(["--model", str(tiny_model_dir), "--data", str(shared_data / "hh-rlhf" / "harmless-base-test.jsonl.gz"),
                          "--max-tokens", "16", "--heldout", "32", "--limit", "160", "--epochs", "1", "--lrs", "1e-2", "3e-3",
                          "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    finally:  # TRL's Trainer set accelerate's process-wide state (bf16): later tests build their own
        AcceleratorState._reset_state(reset_partial_state=True)
    on_disk = json.loads(out.read_text())
    assert absolute_paths(on_disk) == [] and on_disk["command"].startswith("python benchmarks/reward_model_hh.py --model ")
    eq = result["equal"]
    ours, trl = eq["settings"]["ours"], eq["settings"]["trl"]
    assert set(ours) == set(trl)
    assert eq["settings_differences"]["unexplained"] == [] and set(eq["settings_differences"]["differences"]) == {"shuffle"}
    assert ours["gradient_checkpointing"] is trl["gradient_checkpointing"] is False
    assert ours["train_pairs"] == trl["train_pairs"] == 128 and eq["ours"]["train_pairs"] == eq["trl"]["train_pairs"]
    assert [r["lr"] for r in eq["ours"]["sweep"]] == [r["lr"] for r in eq["trl"]["sweep"]] == [1e-2, 3e-3]
    assert eq["trl"]["path_check"]["max_abs_reward_diff"] < 1e-3  # TRL's model reads the cached features
    for side in ("ours", "trl"):
        assert eq[side]["heldout"]["n"] == 32 and eq[side]["best_lr"] in (1e-2, 3e-3)
    # a TRL run with another epoch count would be caught
    assert rm.settings_differences(ours, {**trl, "epochs": 2})["unexplained"] == ["epochs"]
    args = rm.parse_args([])
    assert args.heldout == 320
    train, held, n = rm.split_pairs(shared_data / "hh-rlhf" / "harmless-base-test.jsonl.gz", args.heldout, args.seed)
    assert (n, len(held), len(train)) == (2312, 320, 1992)
