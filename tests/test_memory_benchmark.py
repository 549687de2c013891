"""benchmarks/memory.py on a tiny model: the tensor accounting it reports is right (a PPO update
with a full policy holds policy, reference and critic; with LoRA the reference is the policy
itself and AdamW covers the adapters and the critic only)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _memory_module():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("memory_bench", BENCH / "memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _param_mib(model) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 20


def test_ppo_memory_accounting_full_and_lora(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    mem = _memory_module()
    monkeypatch.setattr(mem, "N_SEQ", 4)
    monkeypatch.setattr(mem, "PROMPT", 6)
    monkeypatch.setattr(mem, "COMPLETION", 5)
    size = _param_mib(AutoModelForCausalLM.from_pretrained(tiny_model_dir))  # tied embedding counted once
    results = {}
    for name in ("ppo", "ppo_lora"):
        algorithm, overrides = mem.CASES[name]
        raw = mem._config(algorithm, overrides)
        raw["model"]["name"] = str(tiny_model_dir)
        results[name] = mem.one_update(algorithm, raw)
    full, lora = results["ppo"]["tensors"], results["ppo_lora"]["tensors"]
    assert results["ppo"]["steps"] == 1 and results["ppo"]["peak_rss_mb"] >= results["ppo"]["loaded_rss_mb"] > 0
    assert abs(full["policy"] - size) < 1e-6 and abs(full["reference"] - size) < 1e-6
    critic = full["critic"]
    assert critic > 0
    assert abs(full["trainable"] - (size + critic)) < 1e-6  # every policy and critic weight trains
    assert abs(full["adamw"] - 2 * full["trainable"]) < 1e-6  # exp_avg + exp_avg_sq per trained weight
    assert lora["reference"] == 0.0  # the LoRA reference is the policy with adapters disabled
    assert lora["policy"] > size  # base weights plus adapters
    adapters = lora["trainable"] - lora["critic"]
    assert 0 < adapters < 0.5 * size
    assert abs(lora["adamw"] - 2 * lora["trainable"]) < 1e-6


def test_every_number_is_measured_by_the_run_that_writes_it(tiny_model_dir, tmp_path):
    """No constant result in the script (the old ``FULL_ROUND`` wrote a fixed 7,126.5 MB peak into
    every ``memory.json``): ``--full-round`` measures a whole PPO round and writes its own file,
    whose figures come from that run (the tiny model's round is far below the old constant)."""
    import json

    from test_benchmarks_smoke import _load

    mem = _load("memory")  # importable by its name: the worker process unpickles its functions
    source = (BENCH / "memory.py").read_text()
    assert not hasattr(mem, "FULL_ROUND") and "7126.5" not in source and "2380.1" not in source
    out = tmp_path / "round.json"
    mem.main(["--full-round", "--model", str(tiny_model_dir), "--out", str(out)])
    got = json.loads(out.read_text())
    ppo = got["ppo"]
    assert 0 < ppo["rss_before_update_mb"] <= ppo["peak_rss_mb"] < 4000  # measured on the tiny model
    assert ppo["wall_s"] > 0 and ppo["run_config"]["algorithm"] == "ppo" and ppo["run_config"]["rounds"] == 1
    assert got["command"].startswith("python benchmarks/memory.py --full-round --model ")
    assert set(got["load"]) == {"at_start", "at_end", "cores"} and len(got["load"]["at_end"]) == 3
    assert got["processor"]["model"]
