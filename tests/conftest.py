"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Directory of the shared read-only data sets (GSM8K, PubMedQA, ...).

    ``$RLHF_SHARED_DATA`` if set, else ``<repo>/../shared/data``; the test is skipped when the
    directory does not exist.
    """
    env = os.environ.get("RLHF_SHARED_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path} (set RLHF_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The default model's real tokenizer (from the bundled GGUF), saved alone to a directory."""
    from transformers import AutoTokenizer

    from rlhf_workbench.models import bundled_gguf_path

    gguf = bundled_gguf_path()
    out = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer_dir, tmp_path_factory) -> Path:
    """A tiny randomly initialised Llama (hidden size 32, 2 layers) with the real SmolLM2
    tokenizer, saved so that ``load_policy(ModelConfig(name=str(path)))`` loads it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def seed_rollout(store, pair, texts: dict, round: int = 1, version: int = 0, tasks: dict | None = None) -> int:
    """Store a rollout of hand-written traces, as if policy ``version`` had sampled them.

    ``texts`` maps task id -> list of completion texts. Token ids come from the real tokenizer and
    the per-token log-probs from a real forward pass of ``pair.policy``; each trace is verified by
    the real verifier. Returns the rollout id.
    """
    import torch

    from rlhf_workbench.logprobs import completion_logps
    from rlhf_workbench.loop import _store_rollout
    from rlhf_workbench.rollout import Completion, render_prompt

    tasks = tasks or {t.id: t for split in ("train", "heldout") for t in store.tasks(split)}
    comps = []
    for task_id, group in texts.items():
        prompt = render_prompt(pair.tokenizer, tasks[task_id])
        for k, text in enumerate(group):
            ids = pair.tokenizer.encode(text, add_special_tokens=False) + [pair.tokenizer.eos_token_id]
            full = torch.tensor([prompt + ids])
            with torch.no_grad():
                logps = completion_logps(pair.policy, full, torch.ones_like(full), len(ids))[0].tolist()
            comps.append(Completion(task_id, k, prompt, ids, logps, text, True))
    return _store_rollout(store, round, version, {"seeded": True}, tasks, comps)


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread and no ``datasets`` progress bars for a module (light CPU, deterministic
    sums in the TRL comparisons); restores the thread count afterwards."""
    import datasets
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    yield
    torch.set_num_threads(previous)
