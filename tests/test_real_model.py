"""Integration: the real default model (SmolLM2-135M-Instruct from the bundled GGUF) through one
full round of the loop on GSM8K and PubMedQA items from ../shared/data (small sizes)."""

import json
from pathlib import Path

import pytest
import torch

from rlhf_workbench.run import loop as loop_mod
from rlhf_workbench.config import load_config
from rlhf_workbench.model.loading import load_policy

pytestmark = pytest.mark.slow
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_bundled_gguf_converts_to_identical_plain_model():
    from transformers import AutoModelForCausalLM

    from rlhf_workbench.config import ModelConfig
    from rlhf_workbench.model.loading import bundled_gguf_path

    pair = load_policy(ModelConfig(mixed_precision="no"))
    gguf = bundled_gguf_path()
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = pair.tokenizer("What is 2 + 2?", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(pair.policy(ids).logits, quantized(ids).logits)
    assert getattr(pair.policy.config, "quantization_config", None) is None


def _convert(out: str) -> None:
    from rlhf_workbench.model.loading import bundled_gguf_path, convert_gguf

    convert_gguf(bundled_gguf_path(), Path(out))


def test_two_processes_converting_the_bundled_model_at_once_both_succeed(tmp_path):
    """Two workers of a benchmark converted into one fresh cache at the same moment; the second
    rename failed with 'Directory not empty' and stopped the benchmark. Both must succeed, and
    leave one complete copy and no temporary directory."""
    import multiprocessing as mp

    out = tmp_path / "cache" / "smollm2-135m-instruct"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_convert, args=(str(out),)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["smollm2-135m-instruct"]


@pytest.mark.parametrize("name,fmt,file", [("gsm8k", "gsm8k", "gsm8k/train.jsonl"),
                                           ("pubmedqa", "pubmedqa", "pubmedqa/pqal_train.json")])
def test_one_round_on_shared_data(name, fmt, file, shared_data, tmp_path):
    cfg = load_config(CONFIGS / f"{name}.yaml", {
        "tasks.path": str(shared_data / file), "tasks.limit": 40, "tasks.heldout_size": 4, "rounds": 1,
        "rollout.prompts_per_round": 2, "rollout.num_generations": 2, "rollout.max_new_tokens": 24,
        "eval.max_new_tokens": 24, "eval.kl_samples": 2,
    })
    summary = loop_mod.run(cfg, tmp_path / name)
    assert summary["rounds"] == 1 and summary["eval_after"]["n"] == 4
    assert json.loads((tmp_path / name / "summary.json").read_text())["eval_before"]["n"] == 4
