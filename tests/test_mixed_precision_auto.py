"""``model.mixed_precision: auto``: bf16 or fp32 chosen by what the machine measures.

The decision is tested on injected measurements (both branches, the threshold, CUDA), and the
real measurement of this machine is checked to be consistent with the decision it leads to.
"""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from rlhf_workbench.model import loading as models
from rlhf_workbench.config import ModelConfig
from rlhf_workbench.model.loading import AUTO_BF16_MIN_SPEEDUP, matmul_flops, resolve_mixed_precision


def _never():
    raise AssertionError("measured although the answer needs no measurement")


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_config_accepts_auto_and_nothing_else():
    assert ModelConfig(mixed_precision="auto").mixed_precision == "auto"
    with pytest.raises(ValidationError):
        ModelConfig(mixed_precision="fp16")


def test_fixed_values_are_kept_without_measuring(cpu_only):
    assert resolve_mixed_precision("no", measure=_never) == "no"
    assert resolve_mixed_precision("bf16", measure=_never) == "bf16"


@pytest.mark.parametrize("fp32, bf16, expected", [
    (100e9, 600e9, "bf16"),  # AMX
    (100e9, AUTO_BF16_MIN_SPEEDUP * 100e9, "bf16"),  # at the threshold
    (100e9, 149e9, "no"),
    (100e9, 40e9, "no"),  # bf16 emulated
])
def test_cpu_decision_follows_the_measured_ratio(cpu_only, capsys, fp32, bf16, expected):
    assert resolve_mixed_precision("auto", measure=lambda: (fp32, bf16)) == expected
    logged = capsys.readouterr().err
    assert f"auto -> {expected}" in logged and f"fp32 {fp32 / 1e9:.0f} GFLOP/s" in logged


@pytest.mark.parametrize("supported, expected", [(True, "bf16"), (False, "no")])
def test_cuda_uses_bf16_where_supported(monkeypatch, supported, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "a GPU")
    assert resolve_mixed_precision("auto", measure=_never) == expected


def test_this_machine_measured_and_decided_consistently(cpu_only, capsys):
    assert matmul_flops(torch.float32, n=64, seconds=0.0) > 0
    fp32, bf16 = models.measured_fp32_bf16_flops()
    assert all(math.isfinite(v) and v > 1e8 for v in (fp32, bf16)), (fp32, bf16)
    assert models.measured_fp32_bf16_flops() == (fp32, bf16)  # measured once per process
    choice = resolve_mixed_precision("auto")
    assert choice == ("bf16" if bf16 >= AUTO_BF16_MIN_SPEEDUP * fp32 else "no")
    print(capsys.readouterr().err)  # shown with -s: what this machine picks


def test_load_policy_resolves_auto_in_the_config(tiny_model_dir, cpu_only, monkeypatch):
    monkeypatch.setattr(models, "measured_fp32_bf16_flops", lambda: (100e9, 200e9))
    cfg = ModelConfig(name=str(tiny_model_dir), mixed_precision="auto")
    models.load_policy(cfg)
    assert cfg.mixed_precision == "bf16"  # what every reader of the config sees from now on
    monkeypatch.setattr(models, "measured_fp32_bf16_flops", lambda: (100e9, 100e9))
    cfg = ModelConfig(name=str(tiny_model_dir), mixed_precision="auto")
    models.load_policy(cfg)
    assert cfg.mixed_precision == "no"


def test_cli_generation_settings_resolve_auto(cpu_only, monkeypatch):
    from rlhf_workbench.evaluation.selection import generation_settings

    monkeypatch.setattr(models, "measured_fp32_bf16_flops", lambda: (100e9, 600e9))
    assert generation_settings({"model": {"mixed_precision": "auto"}}, None, None, None)[2] == "bf16"
    assert generation_settings(None, None, None, "auto")[2] == "bf16"
    with pytest.raises(ValueError, match="no, bf16 or auto"):
        generation_settings(None, None, None, "fp16")
