"""Rollout: sample K reasoning traces per prompt from the current policy, batched.

For every completion we keep its text, token ids and the per-token log-probabilities of
the sampled tokens under the policy that sampled it: read from the very logits that chose
each token, temperature-scaled but before the top-p cut (TRL's convention), so no second
forward pass is needed (tests/test_fast_paths.py checks them against a fresh forward pass, and
tests/test_logprobs_bf16.py under bf16 autocast; both sides use ``logprobs.token_logps``).
Decoding is our own loop over the Hugging Face model (:func:`decode`): each distinct prompt
is run once for its K samples, the prefix all prompts share once per batch, finished rows
leave the batch. Greedy evaluation uses the same path with ``do_sample=False``.

The loop samples through a :class:`RolloutEngine`, so that a serving engine (vLLM on GPUs,
weights pushed after every update, as OpenRLHF and verl do) can replace the in-process
Hugging Face ``generate`` of :class:`HFEngine` without touching the loop.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from rlhf_workbench.model.logprobs import scale_logits, token_logps
from rlhf_workbench.tasks.task import Task


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
    """Chat-templated prompt token ids for a task (generation prompt appended); a multi-turn
    open task is rendered as its messages, so the policy continues as the assistant."""
    ids = tokenizer.apply_chat_template(
        task.chat_messages(), add_generation_prompt=True, tokenize=True
    )
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


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


def _common_prefix(prompts: list[list[int]]) -> int:
    """Length of the longest token prefix shared by all ``prompts``, leaving every prompt at
    least one token of its own (0 for a single prompt)."""
    if len(prompts) < 2:
        return 0
    shortest = min(len(p) for p in prompts)
    first = prompts[0]
    n = 0
    while n < shortest - 1 and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


def cache_arg(model) -> str:
    """Name of the forward argument (and output field) holding the KV cache: ``cache`` in the
    transformers releases that renamed it (passing ``past_key_values`` there warns on every
    run), ``past_key_values`` in older ones. Read from the base model's ``forward`` signature."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model
    return _cache_arg_of(type(base))


@functools.lru_cache(maxsize=None)
def _cache_arg_of(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def _prefill(model, prompts: list[list[int]], pad_id: int):
    """Run distinct prompts once: the token prefix they all share (the chat template's system turn
    and whatever else every prompt starts with) at batch 1, then each prompt's own remainder,
    left-padded, on top of that cache.

    Returns:
        ``(cache, attention_mask [U, C + S] long, logits [U, V])``: the KV cache of the ``U``
        prompts, the mask over its columns (0 = padding between prefix and remainder), and the
        logits at each prompt's last token.
    """
    U, C = len(prompts), _common_prefix(prompts)
    cache, kv = None, cache_arg(model)
    if C:
        cache = getattr(model(input_ids=torch.tensor([prompts[0][:C]]), position_ids=torch.arange(C)[None],
                              use_cache=True, logits_to_keep=1), kv)
        cache.batch_repeat_interleave(U)
    S = max(len(p) - C for p in prompts)
    ids = torch.full((U, S), pad_id, dtype=torch.long)
    mask = torch.zeros((U, C + S), dtype=torch.long)
    mask[:, :C] = 1
    for u, p in enumerate(prompts):
        rest = p[C:]
        ids[u, S - len(rest) :] = torch.tensor(rest, dtype=torch.long)
        mask[u, C + S - len(rest) :] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, C:]
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, **{kv: cache},
                use_cache=True, logits_to_keep=1)
    return getattr(out, kv), mask, out.logits[:, -1, :]


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float):
    """Next tokens and their log-probs from last-position logits ``[R, V]``.

    Greedy: argmax (what ``generate`` does without logits processors), log-probs at temperature 1.
    Sampling: nucleus sampling (Holtzman et al. 2020) from ``softmax(logits.float() / temperature)``
    (:func:`~rlhf_workbench.model.logprobs.scale_logits`); the returned log-probs are those of that
    temperature-scaled distribution before the top-p cut (TRL's convention for
    ``old_per_token_logps``), from :func:`~rlhf_workbench.model.logprobs.token_logps`, the function the
    training passes use, so that both round the same way under bf16. Returns
    ``(tokens [R], logps [R] float32 nats)``.
    """
    scaled = scale_logits(logits, temperature if do_sample else 1.0)  # float32 first, then / T
    if not do_sample:
        tokens = logits.argmax(-1)
    else:
        probs = torch.softmax(scaled, dim=-1)
        if top_p < 1.0:
            sorted_p, order = probs.sort(-1, descending=True)
            sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p > top_p, 0.0)
            tokens = order.gather(-1, torch.multinomial(sorted_p, 1)).squeeze(-1)
        else:
            tokens = torch.multinomial(probs, 1).squeeze(-1)
    return tokens, token_logps(scaled, tokens)  # scaled is float32 already: token_logps(logits, tokens, T)


PACKED_WEIGHTS_MAX_BYTES = 1 << 30
"""Largest total size of fp32 ``nn.Linear`` weights that :func:`packed_linears` packs (a packed copy
is kept per layer between calls: for SmolLM2-135M 0.54 GB; above 1 GiB the memory is not worth ~10 %)."""


_PACKED: "weakref.WeakKeyDictionary[torch.nn.Linear, tuple]" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def packed_linears(model, rows: int):
    """Within the block, the model's fp32 CPU ``nn.Linear`` layers multiply by weights pre-packed
    for inputs of ``rows`` rows (MKL ``cblas_sgemm_pack``; ``torch.ops.mkl._mkl_linear``, the op
    that ``torch.compile`` emits for frozen fp32 Linear layers on CPU).

    Why: a decoding step multiplies a few rows (one per sequence) by every weight matrix, and at
    so few rows MKL spends a large share of ``sgemm`` re-packing the weight on every call. With the
    weight packed once, a step of SmolLM2-135M at 16 rows takes ~10 % less time (matmuls alone
    ~20 %: 38 vs 47 ms measured on the 2-core CPU). The product is MKL's packed GEMM
    (``cblas_sgemm_compute``), not ``F.linear``'s ``sgemm``: bit-identical to it where checked on
    an Intel Xeon (4 rows), but not guaranteed — on a 2-core AMD EPYC with 2 threads, 5-7 and 9-11
    rows add the sums in another order (4, 8, 12-39 rows and 1 thread: identical); SmolLM2-135M's
    logits then move by up to 1.1e-4, as much as float32's own error against float64. Greedy
    decoding can then part from ``model.generate`` only where two top logits are that close (as
    ``generate`` itself may between batch shapes); tests/test_fast_paths.py checks that the packed
    logits are as accurate as the plain ones, and greedy output against ``model.generate`` up to
    such near-ties. Inputs with another row count (the prefill, a batch that has shrunk) take the
    op's ``F.linear`` fallback: bit-identical to ``F.linear``, the same op on the same shapes.

    Packs are cached per layer (in a weak-keyed table, so that the model itself stays deep-copyable
    and picklable) keyed by ``(rows, weight version, storage)``, so they are built
    once (~0.2 s for SmolLM2-135M) and rebuilt after an in-place change of the weight (a
    ``torch.optim`` step, ``load_state_dict``). Changes the version counter does not see — a
    *fused* optimizer's step, writes through ``.data`` — need :func:`clear_packed_weights`, which
    :meth:`HFEngine.sync_weights` calls after every update of the loop.
    A no-op for fewer than 4 rows (there MKL multiplies vector by matrix without packing: 1 row
    19.7 ms per step's matmuls plain vs 21.5 packed, 2 rows equal, 4 rows 36.8 vs 27.2, 64 rows
    84 vs 66), when MKL is unavailable, under autocast, for non-fp32 or non-CPU weights, or when the
    fp32 Linear weights exceed :data:`PACKED_WEIGHTS_MAX_BYTES`; layers whose ``forward`` is
    already replaced (e.g. by accelerate hooks) are left alone. LoRA (PEFT) layers are packed
    through their ``nn.Linear`` base and adapter layers.
    """
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and "forward" not in m.__dict__
               and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"]
    usable = (rows >= 4 and linears and torch.backends.mkl.is_available()
              and hasattr(torch.ops.mkl, "_mkl_linear") and not torch.is_autocast_enabled("cpu")
              and sum(m.weight.numel() * 4 for m in linears) <= PACKED_WEIGHTS_MAX_BYTES)
    if not usable:
        yield
        return
    for m in linears:
        key = (rows, m.weight._version, m.weight.data_ptr())
        if _PACKED.get(m, (None,))[0] != key:
            _PACKED[m] = (key, torch.ops.mkl._mkl_reorder_linear_weight(m.weight.detach(), rows))
        m.forward = _packed_forward(m, _PACKED[m][1], rows)
    try:
        yield
    finally:
        for m in linears:
            del m.forward


def clear_packed_weights(model) -> None:
    """Forget the packs :func:`packed_linears` cached for ``model``'s layers (rebuilt at the next
    decoding call)."""
    for m in model.modules():
        _PACKED.pop(m, None)


def _packed_forward(m: torch.nn.Linear, packed: torch.Tensor, rows: int):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkl._mkl_linear(x, packed, m.weight, m.bias, rows)
    return forward


@torch.no_grad()
def decode(model, prompts: list[list[int]], rows: list[int], eos_ids: set[int], pad_id: int, do_sample: bool,
           temperature: float, top_p: float, max_new_tokens: int, finished_text=None):
    """Autoregressive decoding of ``len(rows)`` sequences, row ``r`` continuing ``prompts[rows[r]]``.

    Faster than ``model.generate`` on the same work because (1) every distinct prompt is run once
    and its KV cache copied to all its rows (the K samples of a GRPO group), and the token prefix
    all prompts share is run once for the batch (:func:`_prefill`); (2) rows that have finished
    are dropped from the batch (once a quarter of the batch is done, so that the cache is not
    copied at every step); (3) the log-prob of each chosen token is read from the logits that
    chose it, so no second forward pass is needed; (4) the weights are pre-packed for the batch's
    row count (:func:`packed_linears`). Greedy decoding takes the argmax of the same
    logits as ``generate``; the benchmark checks the outputs token for token.

    Args:
        model: causal LM (HF or PEFT) in eval mode.
        prompts: distinct prompt token ids.
        rows: for each sequence to decode, the index of its prompt.
        eos_ids: tokens that end a sequence (kept as its last token).
        do_sample, temperature, top_p, max_new_tokens: as in ``generate``.
        finished_text: optional ``(token_ids) -> bool``, True when a stop string has appeared.

    Returns:
        per row ``(token_ids, logps, finished)``; ``logps[t]`` (nats) is the log-prob of
        ``token_ids[t]`` under the policy (temperature-scaled when sampling), ``finished`` is True
        when the sequence ended with EOS or a stop string rather than at ``max_new_tokens``.
    """
    cache, mask, logits = _prefill(model, prompts, pad_id)
    if rows != list(range(len(prompts))):  # rows already in prompt order (greedy, K = 1) need no copy
        select = torch.tensor(rows, dtype=torch.long)
        cache.batch_select_indices(select)
        mask, logits = mask[select], logits[select]
    positions = mask.sum(-1)
    active = list(range(len(rows)))  # the sequence held in each batch row
    tokens_out: list[list[int]] = [[] for _ in rows]
    logps_out: list[list[float]] = [[] for _ in rows]
    done = [False] * len(rows)
    with packed_linears(model, len(rows)):
        for step in range(max_new_tokens):
            tokens, logps = _pick(logits, do_sample, temperature, top_p)
            for j, (tok, lp) in enumerate(zip(tokens.tolist(), logps.tolist())):
                r = active[j]
                if done[r]:
                    continue
                tokens_out[r].append(tok)
                logps_out[r].append(lp)
                done[r] = tok in eos_ids or (finished_text is not None and finished_text(tokens_out[r]))
            keep = [j for j, r in enumerate(active) if not done[r]]
            if not keep or step == max_new_tokens - 1:
                break
            if 4 * (len(active) - len(keep)) >= len(active):
                idx = torch.tensor(keep, dtype=torch.long)
                cache.batch_select_indices(idx)
                mask, positions, tokens = mask[idx], positions[idx], tokens[idx]
                active = [active[j] for j in keep]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
            logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None],
                           **{cache_arg(model): cache}, use_cache=True, logits_to_keep=1).logits[:, -1, :]
            positions = positions + 1
    return [(tokens_out[r], logps_out[r], done[r]) for r in range(len(rows))]


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
    progress=None,
) -> list[Completion]:
    """Sample ``num_generations`` completions for each task (greedy when ``do_sample`` is False).

    Args:
        model: the policy (HF or PEFT causal LM).
        tokenizer: its tokenizer.
        tasks: prompts to answer; completions are returned grouped by task, in task order.
        num_generations: K completions per task; a task's K completions share its prompt's
            forward pass (:func:`decode`).
        do_sample, temperature, top_p, max_new_tokens: sampling settings (``generate`` semantics).
        stop: stop strings; a completion ends at the token that completes the first one.
        batch_size: sequences decoded together (prompts sorted by length, a task's K together).
        mixed_precision: ``"bf16"`` decodes under autocast.
        progress: optional callable ``(n_done)`` called after each batch.

    Returns:
        ``len(tasks) * num_generations`` :class:`Completion` objects with per-token log-probs.
    """
    was_training = model.training
    model.eval()
    eos_ids = set(tokenizer.convert_tokens_to_ids([tokenizer.eos_token]))
    gen_eos = model.generation_config.eos_token_id
    eos_ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    stop = [s for s in (stop or []) if s]
    finished_text = None
    if stop:
        def finished_text(ids: list[int]) -> bool:
            text = tokenizer.decode(ids, skip_special_tokens=True)
            return any(s in text for s in stop)
    jobs = [(t, k, render_prompt(tokenizer, t)) for t in tasks for k in range(num_generations)]
    # Sort by prompt length so that batches carry little padding (stable: a task's K stay together).
    order = sorted(range(len(jobs)), key=lambda i: len(jobs[i][2]))
    results: dict[int, Completion] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        prompts: dict[tuple[int, ...], int] = {}
        rows = [prompts.setdefault(tuple(jobs[i][2]), len(prompts)) for i in idx]
        with autocast(mixed_precision):
            out = decode(model, [list(p) for p in prompts], rows, eos_ids, tokenizer.pad_token_id, do_sample,
                         temperature, top_p, max_new_tokens, finished_text)
        for i, (token_ids, logps, finished) in zip(idx, out):
            task, k, prompt_ids = jobs[i]
            results[i] = Completion(
                task_id=task.id, index=k, prompt_ids=prompt_ids, token_ids=token_ids, logps=logps,
                text=tokenizer.decode(token_ids, skip_special_tokens=True), finished=finished,
            )
        if progress:
            progress(len(idx))
    model.train(was_training)
    return [results[i] for i in range(len(jobs))]


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
    so ``sync_weights`` only drops the decoding weight packs (:func:`clear_packed_weights`)."""

    model: object
    tokenizer: object
    batch_size: int = 64
    mixed_precision: str = "no"

    def generate(self, tasks, num_generations, temperature, top_p, max_new_tokens, stop, progress=None):
        """Sample with :func:`generate` (our decoding loop); see it for the arguments."""
        return generate(self.model, self.tokenizer, tasks, num_generations, True, temperature, top_p,
                        max_new_tokens, stop, self.batch_size, self.mixed_precision, progress=progress)

    def sync_weights(self, policy) -> None:
        """The engine samples from the training module's own weights; only its packed copies for
        decoding are dropped, whatever optimizer changed the weights."""
        clear_packed_weights(self.model)
