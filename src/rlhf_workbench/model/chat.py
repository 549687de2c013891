"""A chat model: a causal LM answering OpenAI-style ``messages``, and loading one to serve.

:class:`ChatModel` renders ``messages`` with the tokenizer's chat template (generation prompt
appended, exactly as :func:`rlhf_workbench.model.rollout.render_prompt` renders a task, so the
model answers as it does in the loop), generates (greedy at temperature 0, else sampled) and
cuts each answer at EOS or a stop string. It takes plain arguments and returns a
:class:`ChatCompletion`; two clients share it: the HTTP server ``rlhf serve-model``
(:mod:`rlhf_workbench.app.serve_model`, which adds the OpenAI request and response schema) and
the in-process LLM judge (:class:`rlhf_workbench.feedback.judge.LocalChat`), so both give the
same answers.

:func:`load_served_model` loads what either serves: a preset, a hub id, a local model, a run
checkpoint (a LoRA adapter merged into its base) or a run directory (:func:`served_path`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from rlhf_workbench.model.loading import DTYPES, load_tokenizer, resolve_model_path


class ContextLengthError(ValueError):
    """The prompt plus ``max_tokens`` does not fit the model's context (the message names
    ``max_tokens``, the prompt length and the context size)."""


@dataclass(frozen=True)
class ChatChoice:
    """One generated answer.

    Attributes:
        text: the answer, special tokens removed, cut at EOS or the first stop string.
        n_tokens: generated tokens it counts (the EOS token included when one ended it).
        finish_reason: ``"stop"`` (EOS or a stop string) or ``"length"`` (hit ``max_tokens``).
        logprobs: when asked for, ``(token, logprob)`` of each of the ``n_tokens`` generated tokens:
            the token's text and its log-probability (nats) under the model's own distribution
            (raw logits, temperature 1, before top-p), as OpenAI's ``logprobs.content``; else None.
    """

    text: str
    n_tokens: int
    finish_reason: str
    logprobs: tuple[tuple[str, float], ...] | None = None


@dataclass(frozen=True)
class ChatCompletion:
    """The answers to one prompt: ``prompt_tokens`` (after the chat template) and ``n`` choices."""

    prompt_tokens: int
    choices: list[ChatChoice]


class ChatModel:
    """A causal LM and its tokenizer answering chat requests, one at a time (thread-safe).

    Args:
        model: a ``transformers`` causal LM (eval mode is set here).
        tokenizer: its tokenizer; needs a chat template.
        name: the model's id (reported by the API, a label for logs).

    Raises:
        ValueError: the tokenizer has no chat template.
    """

    def __init__(self, model, tokenizer, name: str):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"{name}: the tokenizer has no chat template")
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.lock = threading.Lock()
        gen_eos = model.generation_config.eos_token_id
        self.eos_ids = {tokenizer.eos_token_id} | set(
            gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        self.eos_ids.discard(None)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Chat-templated prompt token ids (generation prompt appended), as ``render_prompt``."""
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def prompt_text(self, messages: list[dict[str, str]]) -> str:
        """The chat-templated prompt as text (what :meth:`prompt_ids` tokenizes)."""
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    @torch.no_grad()
    def complete(self, messages: list[dict[str, str]], max_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, n: int = 1, stop: list[str] | None = None,
                 seed: int | None = None, logprobs: bool = False) -> ChatCompletion:
        """Answer ``messages`` (``{"role", "content"}`` dicts) ``n`` times.

        Args:
            max_tokens: most tokens generated per answer.
            temperature: 0 decodes greedily (the ``n`` choices are then one generation,
                repeated); above 0 samples with ``top_p`` (nucleus) and no top-k.
            stop: strings that end an answer (cut from the text, as OpenAI does).
            seed: seeds torch's generator before generating, for reproducible samples.
            logprobs: also return each generated token's log-probability (:class:`ChatChoice`).

        Raises:
            ContextLengthError: the prompt plus ``max_tokens`` exceeds the model's
                ``max_position_embeddings``.
        """
        prompt = self.prompt_ids(messages)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and len(prompt) + max_tokens > limit:
            raise ContextLengthError(f"max_tokens: prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds "
                                     f"the model's context of {limit} tokens")
        greedy = temperature == 0
        rows = 1 if greedy else n  # greedy choices are identical: generate once
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([prompt] * rows, dtype=torch.long, device=device)
        kwargs: dict[str, Any] = dict(max_new_tokens=max_tokens, pad_token_id=self.pad_id, do_sample=not greedy)
        if greedy:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        if stop:
            kwargs.update(stop_strings=stop, tokenizer=self.tokenizer)
        with self.lock:
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      return_dict_in_generate=True, output_logits=logprobs, **kwargs)
        seqs = out.sequences
        choices = [self._finish(seqs[i % rows, len(prompt):].tolist(), max_tokens, stop or []) for i in range(n)]
        if logprobs:
            choices = [self._with_logprobs(c, seqs[i % rows, len(prompt):], out.logits, i % rows)
                       for i, c in enumerate(choices)]
        return ChatCompletion(prompt_tokens=len(prompt), choices=choices)

    def _with_logprobs(self, choice: ChatChoice, row: torch.Tensor, logits: tuple, r: int) -> ChatChoice:
        """``choice`` with the log-probabilities of its ``n_tokens`` tokens (row ``r`` of the step logits)."""
        pairs = []
        for step in range(min(choice.n_tokens, len(logits))):
            token = int(row[step])
            logp = torch.log_softmax(logits[step][r].float(), dim=-1)[token].item()
            pairs.append((self.tokenizer.decode([token]), logp))
        return ChatChoice(choice.text, choice.n_tokens, choice.finish_reason, tuple(pairs))

    def _finish(self, row: list[int], max_new: int, stop: list[str]) -> ChatChoice:
        """The answer in one generated row: cut at EOS, padding or a stop string."""
        for i, t in enumerate(row):
            if t in self.eos_ids:
                return ChatChoice(self.tokenizer.decode(row[:i], skip_special_tokens=True), i + 1, "stop")
        while row and row[-1] == self.pad_id:  # a finished row of a sampled batch
            row = row[:-1]
        text = self.tokenizer.decode(row, skip_special_tokens=True)
        cuts = [text.find(s) for s in stop if s in text]
        if cuts:
            return ChatChoice(text[: min(cuts)], len(row), "stop")
        return ChatChoice(text, len(row), "length" if len(row) >= max_new else "stop")


def served_path(name: str) -> Path:
    """The directory :func:`load_served_model` loads for ``name``: a run directory's final
    ``policy/``, else its newest checkpoint; any other name as a path (which may not exist: a
    preset or hub id).

    Raises:
        FileNotFoundError: a run directory without ``policy/`` or checkpoints.
    """
    path = Path(name)
    if path.is_dir() and not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
        ckpts = sorted((p for p in (path / "checkpoints").glob("v*") if p.name[1:].isdigit()),
                       key=lambda p: int(p.name[1:])) if (path / "checkpoints").is_dir() else []
        if (path / "policy").is_dir():
            return path / "policy"
        if ckpts:
            return ckpts[-1]
        raise FileNotFoundError(f"{name}: no model here (config.json, adapter_config.json, policy/ or checkpoints/v*)")
    return path


def load_served_model(name: str, dtype: str = "fp32", cache_dir: str | None = None):
    """Load a model to serve: ``(model, tokenizer)``, on the GPU when there is one, in eval mode.

    Args:
        name: a preset short name (the bundled ``smollm2-135m``), a hub id, a local model
            directory, a run checkpoint (``runs/x/checkpoints/v3``; a LoRA adapter checkpoint
            is merged into its base) or a run directory (its final ``policy/``, else its newest
            checkpoint).
        dtype: ``"fp32"`` or ``"bf16"``.
        cache_dir: where the bundled GGUF is converted
            (:func:`rlhf_workbench.model.loading.resolve_model_path`).

    Raises:
        FileNotFoundError: a run directory without ``policy/`` or checkpoints.
    """
    path = served_path(name)
    if path.is_dir() and (path / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM  # slow to import: only for adapters

        model = AutoPeftModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype]).merge_and_unload()
        tokenizer = load_tokenizer(str(path))
    else:
        resolved = str(path) if path.exists() else resolve_model_path(name, cache_dir)
        tokenizer = load_tokenizer(resolved)
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=DTYPES[dtype])
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval(), tokenizer
