"""Rollout: sample K reasoning traces per prompt from the current policy, batched.

For every completion we keep its text, token ids and the per-token log-probabilities of
the sampled tokens under the policy that sampled it, recomputed by a forward pass (not
taken from processed generation scores, which top-p and temperature warp), together with
the sampling settings. Greedy evaluation uses the same path with ``do_sample=False``.

The loop samples through a :class:`RolloutEngine`, so that a serving engine (vLLM on GPUs,
weights pushed after every update, as OpenRLHF and verl do) can replace the in-process
Hugging Face ``generate`` of :class:`HFEngine` without touching the loop.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from .logprobs import completion_logps
from .tasks import Task


@dataclass
class Completion:
    """One sampled trace.

    Attributes:
        task_id: the task it answers.
        index: position within its group (0..K-1).
        prompt_ids: the chat-templated prompt token ids.
        token_ids: completion token ids, up to and including EOS (or a stop string's last token).
        logps: per-token log-probs of ``token_ids`` under the sampling policy (temperature-scaled
            logits, as TRL), nats; ``len(logps) == len(token_ids)``.
        text: decoded completion without special tokens.
        finished: True when it ended with EOS or a stop string rather than hitting the length cap.
    """

    task_id: str
    index: int
    prompt_ids: list[int]
    token_ids: list[int]
    logps: list[float]
    text: str
    finished: bool
    extra: dict = field(default_factory=dict)


def autocast(mixed_precision: str):
    """``torch.autocast`` on CPU/GPU for ``mixed_precision == "bf16"``, else a no-op context."""
    if mixed_precision == "bf16":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def render_prompt(tokenizer, task: Task) -> list[int]:
    """Chat-templated prompt token ids for a task (generation prompt appended)."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": task.prompt()}], add_generation_prompt=True, tokenize=True
    )
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def _trim(ids: list[int], eos_ids: set[int], pad_id: int, stop_ids: list[list[int]]) -> tuple[list[int], bool]:
    """Cut a generated row after its first EOS or stop sequence; drop trailing padding."""
    for i, t in enumerate(ids):
        if t in eos_ids:
            return ids[: i + 1], True
        for s in stop_ids:
            if s and ids[max(0, i + 1 - len(s)) : i + 1] == s:
                return ids[: i + 1], True
    while ids and ids[-1] == pad_id and pad_id not in eos_ids:
        ids = ids[:-1]
    return ids, False


def pad_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int):
    """Left-pad prompts and right-pad completions into one ``[B, P + T]`` batch.

    Returns:
        ``(input_ids, attention_mask, completion_mask)``: ``[B, P+T]``, ``[B, P+T]``, ``[B, T]`` tensors,
        masks as ``long``; ``T`` is the longest completion.
    """
    P = max(len(p) for p in prompts)
    T = max(1, max(len(c) for c in completions))
    B = len(prompts)
    input_ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P + T), dtype=torch.long)
    completion_mask = torch.zeros((B, T), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[i, P - len(p) : P] = torch.tensor(p)
        attention_mask[i, P - len(p) : P] = 1
        if c:
            input_ids[i, P : P + len(c)] = torch.tensor(c)
            attention_mask[i, P : P + len(c)] = 1
            completion_mask[i, : len(c)] = 1
    return input_ids, attention_mask, completion_mask


@torch.no_grad()
def generate(
    model,
    tokenizer,
    tasks: list[Task],
    num_generations: int = 1,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    stop: list[str] | None = None,
    batch_size: int = 64,
    mixed_precision: str = "no",
    compute_logps: bool = True,
    progress=None,
) -> list[Completion]:
    """Sample ``num_generations`` completions for each task (greedy when ``do_sample`` is False).

    Args:
        model: the policy (HF or PEFT causal LM).
        tokenizer: its tokenizer (left padding).
        tasks: prompts to answer; completions are returned grouped by task, in task order.
        num_generations: K completions per task.
        do_sample, temperature, top_p, max_new_tokens: sampling settings (``generate`` semantics).
        stop: stop strings; a completion is cut after the first one.
        batch_size: sequences per ``generate`` call.
        mixed_precision: ``"bf16"`` runs generation and the log-prob pass under autocast.
        compute_logps: recompute per-token log-probs with a forward pass (needed for training).
        progress: optional callable ``(n_done)`` called after each batch.

    Returns:
        ``len(tasks) * num_generations`` :class:`Completion` objects.
    """
    was_training = model.training
    model.eval()
    eos_ids = set(tokenizer.convert_tokens_to_ids([tokenizer.eos_token]))
    gen_eos = model.generation_config.eos_token_id
    eos_ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    pad_id = tokenizer.pad_token_id
    stop = stop or []
    stop_ids = [tokenizer.encode(s, add_special_tokens=False) for s in stop]
    jobs = [(t, k, render_prompt(tokenizer, t)) for t in tasks for k in range(num_generations)]
    out: list[Completion] = []
    # Sort by prompt length so that batches carry little padding; restore order at the end.
    order = sorted(range(len(jobs)), key=lambda i: len(jobs[i][2]))
    results: dict[int, Completion] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        prompts = [jobs[i][2] for i in idx]
        input_ids, attention_mask, _ = pad_batch(prompts, [[] for _ in prompts], pad_id)
        P = max(len(p) for p in prompts)
        input_ids, attention_mask = input_ids[:, :P], attention_mask[:, :P]
        gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad_id)
        if do_sample:
            gen_kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        else:
            gen_kwargs.update(temperature=None, top_p=None, top_k=None)
        if stop:
            gen_kwargs.update(stop_strings=stop, tokenizer=tokenizer)
        with autocast(mixed_precision):
            seqs = model.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)
        rows = []
        for row in seqs[:, P:].tolist():
            rows.append(_trim(row, eos_ids, pad_id, stop_ids))
        logps_rows: list[list[float]] = [[] for _ in rows]
        if compute_logps and any(r[0] for r in rows):
            ids, mask, cmask = pad_batch(prompts, [r[0] for r in rows], pad_id)
            with autocast(mixed_precision):
                lp = completion_logps(model, ids, mask, cmask.shape[1], temperature if do_sample else 1.0)
            logps_rows = [lp[i, : len(r[0])].tolist() for i, r in enumerate(rows)]
        for j, i in enumerate(idx):
            task, k, prompt_ids = jobs[i]
            token_ids, finished = rows[j]
            results[i] = Completion(
                task_id=task.id, index=k, prompt_ids=prompt_ids, token_ids=token_ids, logps=logps_rows[j],
                text=tokenizer.decode(token_ids, skip_special_tokens=True), finished=finished,
            )
        if progress:
            progress(len(idx))
    out = [results[i] for i in range(len(jobs))]
    model.train(was_training)
    return out


class RolloutEngine(Protocol):
    """What the loop needs from a generation backend.

    ``generate`` returns ``len(tasks) * num_generations`` :class:`Completion` objects grouped by
    task, with per-token log-probs of the sampled tokens under the current policy (temperature-
    scaled); ``sync_weights`` is called after every policy update, before the next rollout.
    """

    def generate(self, tasks: list[Task], num_generations: int, temperature: float, top_p: float,
                 max_new_tokens: int, stop: list[str], progress: Callable[[int], None] | None = None
                 ) -> list[Completion]: ...

    def sync_weights(self, policy) -> None: ...


@dataclass
class HFEngine:
    """The default engine: :func:`generate` with the training policy itself (in-process, no copy),
    so ``sync_weights`` has nothing to do."""

    model: object
    tokenizer: object
    batch_size: int = 64
    mixed_precision: str = "no"

    def generate(self, tasks, num_generations, temperature, top_p, max_new_tokens, stop, progress=None):
        """Sample with Hugging Face ``generate``; see :func:`generate` for the arguments."""
        return generate(self.model, self.tokenizer, tasks, num_generations, True, temperature, top_p,
                        max_new_tokens, stop, self.batch_size, self.mixed_precision, progress=progress)

    def sync_weights(self, policy) -> None:
        """Nothing to do: the engine samples from the training module's own weights."""
