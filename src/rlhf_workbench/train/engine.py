"""The training engine: one optimisation phase of any algorithm, planned, sharded, accumulated
and synchronised in one place.

Each algorithm has its own module that prepares its batch and computes its per-micro-batch
loss (:mod:`~rlhf_workbench.train.dpo`, :mod:`~rlhf_workbench.train.grpo`,
:mod:`~rlhf_workbench.train.sft`, :mod:`~rlhf_workbench.train.rloo`, :mod:`~rlhf_workbench.train.kto`,
:mod:`~rlhf_workbench.train.ppo`); the maths lives in :mod:`rlhf_workbench.train.losses` and
:mod:`rlhf_workbench.train.ppo_losses`. This module plans the phase (:func:`plan`), runs the
micro-batches of this process through :func:`micro_steps` (padding micro-batches, gradient-sync
context, backward scaling, clipping and the optimizer step), the forwards through ``accelerate``
(autocast; DDP, FSDP or DeepSpeed when started with ``accelerate launch``), the no-gradient
reference and old-log-prob passes, and reduces the metric sums (:class:`Tally`). Every update
has the signature ``update(pair, optimizer, accelerator, batch, cfg)`` and returns a dict of
float metrics named as TRL logs them. Every forward goes through
:func:`~rlhf_workbench.model.logprobs.packed_logps`: the sequences of a micro-batch that share a
prompt (a DPO pair, a GRPO/RLOO group) share that prompt's forward pass, and their completions
are packed without padding — the same log-probs as the plain layout (tests/test_fast_paths.py),
for about half the work on HH-RLHF pairs (benchmarks/train_throughput.py).

Data-parallel design (``W = accelerator.num_processes``; identical to one process when W = 1)
--------------------------------------------------------------------------------------------
Every update takes the *global* batch, the same list on every process (the loop broadcasts
it from the main process), and plans the phase from that list alone, so every process
derives the same plan without communication: the items are cut into
``min(optim.steps_per_round, n)`` contiguous optimizer steps of near-equal size, each step
into ``W`` contiguous shards of near-equal size (process ``accelerator.process_index`` takes
its shard; a shard may be empty when a step has fewer items than processes), and each shard
into micro-batches of ``optim.micro_batch_size`` sequences (``micro_batch_size // 2`` pairs
for DPO). Whatever depends on the batch as a whole is computed over the global batch before
sharding: GRPO advantages (set by the loop), RLOO's leave-one-out advantages and KL-penalised
rewards (reference passes sharded, per-sequence KL all-reduced), KTO's reference point ``z0``
(a reduced sum over the step). Every loss normaliser is a global count: sequences of the step
(DPO pairs, GRPO ``grpo``/``dr_grpo``, RLOO, KTO) or completion tokens (GRPO ``bnpo``/``dapo``,
SFT). Each process backpropagates ``W · Σ_{its items} ℓ_i / N_global``; DDP, FSDP and
DeepSpeed average gradients over the ``W`` processes, so the synchronised gradient is
``Σ_{all items} ℓ_i / N_global``, the one-process gradient of the same global batch, and the
norm that ``accelerator.clip_grad_norm_`` returns and clips is the global one. Every process
runs the same number of forward and backward passes of the wrapped model per step (a process
with a smaller or empty shard runs padding micro-batches whose loss is multiplied by 0),
because each of them can be a collective operation (DDP's buffer broadcast, FSDP / ZeRO-3
parameter gathers, the gradient all-reduce). Gradients are synchronised once per optimizer
step: the micro-batches before a step's last run under ``accelerator.no_sync`` (DDP; under
FSDP they are reduce-scattered every micro-batch instead, which keeps gradients sharded) with
accelerate's ``sync_gradients`` flag off, so DeepSpeed accumulates and steps only at the
step's last micro-batch. Metrics are accumulated as sums over each process's items and
reduced over processes with one ``accelerator.reduce`` at the end, so every process returns
the numbers one process would return for the same batch, up to float rounding (the batch
composition of each forward differs, changing padding and summation order; measured
1-vs-2-process differences are ~1e-7 relative, see ``tests/test_distributed.py``). The
Accelerator must be built with ``gradient_accumulation_steps=1`` or the default; a larger
value is cancelled (accumulation is done here), and ``W`` is taken as the data-parallel size.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch
from accelerate.utils import DistributedType

from rlhf_workbench.config import RunConfig
from rlhf_workbench.model.loading import PolicyPair
from rlhf_workbench.model.logprobs import packed_logps
from rlhf_workbench.model.rollout import autocast
from rlhf_workbench.model.sharding import is_sharded
from rlhf_workbench.train.samples import Sample

# --------------------------------------------------------------------------------------------
# Planning: steps, shards, micro-batches (identical on every process)
# --------------------------------------------------------------------------------------------


def chunks(items: list, size: int) -> Iterator[list]:
    """Consecutive slices of ``items`` of ``size`` elements (the last one shorter)."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


def split(items: list, parts: int) -> list[list]:
    """``items`` cut into ``parts`` contiguous pieces whose sizes differ by at most one (longer
    pieces first); pieces are empty when ``parts > len(items)``."""
    q, r = divmod(len(items), parts)
    out, start = [], 0
    for p in range(parts):
        size = q + (1 if p < r else 0)
        out.append(items[start : start + size])
        start += size
    return out


@dataclass
class Step:
    """One optimizer step of a phase.

    Attributes:
        items: global indices of the step's items.
        shards: the step's items, one contiguous shard per process.
    """

    items: list[int]
    shards: list[list[int]]


def plan(indices, num_steps: int, world: int) -> list[Step]:
    """Split ``indices`` into ``min(num_steps, len(indices))`` near-equal contiguous optimizer
    steps and each step into ``world`` near-equal contiguous shards."""
    indices = list(indices)
    steps = split(indices, max(1, min(num_steps, len(indices))))
    return [Step(s, split(s, world)) for s in steps]


def rank_items(steps: list[Step], world: int) -> list[list[int]]:
    """Per process, every item it trains on over the whole phase (its shards of all steps)."""
    return [[i for st in steps for i in st.shards[r]] for r in range(world)]


def micro_batches(shards: list[list[int]], rank: int, size: int) -> list[list[int] | None]:
    """Micro-batches of process ``rank``'s shard, padded with ``None`` (a padding micro-batch)
    to the count of the process with the most, and at least one, so that every process runs
    the same number of forward and backward passes."""
    mine = list(chunks(shards[rank], size))
    count = max(1, max(math.ceil(len(s) / size) for s in shards))
    return mine + [None] * (count - len(mine))


# --------------------------------------------------------------------------------------------
# Forward passes, gradient synchronisation, metrics
# --------------------------------------------------------------------------------------------


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (CPU for a module without parameters)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def forward_logps(model, samples: list[Sample], pad_id: int, temperature: float, mixed_precision: str,
                  device: torch.device | None = None):
    """``([B, T] float32 per-token log-probs, [B, T] long completion mask)`` of ``samples``, by
    :func:`~rlhf_workbench.model.logprobs.packed_logps` (samples with the same prompt share its
    forward pass) under ``mixed_precision`` autocast; logits divided by ``temperature``."""
    with autocast(mixed_precision):
        return packed_logps(model, [s.prompt_ids for s in samples], [s.token_ids for s in samples], pad_id,
                            temperature, device)


def pad_rows(rows, like: torch.Tensor) -> torch.Tensor:
    """A tensor shaped and typed like ``like`` (``[B, T]``) holding row ``j``'s values in its first
    ``len(rows[j])`` columns and zeros after."""
    out = torch.zeros_like(like)
    for j, row in enumerate(rows):
        row = torch.as_tensor(row, dtype=like.dtype).to(like.device)
        out[j, : row.numel()] = row
    return out


@contextlib.contextmanager
def sync_context(accelerator, modules: Sequence[torch.nn.Module], sync: bool):
    """Context of one micro-batch's forward and backward; gradients are synchronised across
    processes only when ``sync`` (the last micro-batch of an optimizer step).

    Otherwise accelerate's ``sync_gradients`` flag is off (DeepSpeed then neither reduces at a
    boundary nor steps) and, except under FSDP, each of ``modules`` runs under
    ``accelerator.no_sync`` (DDP accumulates locally). FSDP keeps syncing (reduce-scatter) every
    micro-batch, which keeps gradients sharded; that is correct because every process runs the
    same micro-batches.
    """
    if sync:
        yield
        return
    state = accelerator.gradient_state
    previous = state.sync_gradients
    state._set_sync_gradients(False)
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    try:
        with contextlib.ExitStack() as stack:
            for module in modules:
                stack.enter_context(contextlib.nullcontext() if fsdp else accelerator.no_sync(module))
            yield
    finally:
        state._set_sync_gradients(previous)


def backward(accelerator, loss: torch.Tensor, padding: bool = False) -> None:
    """Backpropagate this process's part of the global objective.

    ``loss`` is already divided by the global normaliser; it is multiplied by the number of
    processes, which the gradient averaging of DDP / FSDP / DeepSpeed divides out again, and by
    ``gradient_accumulation_steps``, which ``accelerator.backward`` (or DeepSpeed) divides out.
    A padding micro-batch contributes ``0 · loss``: zero gradients, but the same collectives.
    """
    scale = 0.0 if padding else float(accelerator.num_processes * accelerator.gradient_accumulation_steps)
    accelerator.backward(loss * scale)


def all_sum(accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over processes (the tensor itself for one process)."""
    return tensor if accelerator.num_processes == 1 else accelerator.reduce(tensor, reduction="sum")


class Tally:
    """Metric sums over this process's items, summed over processes by :meth:`reduce` (one
    collective; the keys are fixed up front so every process reduces the same vector)."""

    def __init__(self, *keys: str):
        self.sums = dict.fromkeys(keys, 0.0)

    def add(self, key: str, value) -> None:
        """Add ``value`` (a float or a one-element tensor) to the sum ``key``."""
        self.sums[key] += float(value)

    def reduce(self, accelerator) -> dict[str, float]:
        """``{key: sum over all processes}`` (a collective when there are several processes)."""
        if accelerator.num_processes == 1:
            return dict(self.sums)
        t = torch.tensor(list(self.sums.values()), dtype=torch.float64, device=accelerator.device)
        return dict(zip(self.sums, all_sum(accelerator, t).tolist()))


def require_old_logps(samples: list[Sample], indices, who: str, optional: bool = False) -> None:
    """Raise ValueError unless every ``samples[i]`` (``i`` in ``indices``) has one recorded
    log-prob per completion token; with ``optional``, samples without any pass."""
    for i in indices:
        s = samples[i]
        if optional and s.old_logps is None:
            continue
        if s.old_logps is None or len(s.old_logps) != len(s.token_ids):
            got = None if s.old_logps is None else len(s.old_logps)
            raise ValueError(f"{who}: sample {i} needs old_logps recorded at rollout, one per completion token "
                             f"({len(s.token_ids)}), got {got}")


# --------------------------------------------------------------------------------------------
# The micro-step loop of every update
# --------------------------------------------------------------------------------------------


@dataclass
class MicroBatch:
    """One real (non-padding) micro-batch of this process, yielded by :meth:`Phase.micro_steps`
    inside its gradient-sync context.

    Attributes:
        items: global indices of its items.
        step: the optimizer step it belongs to.
        first_step: whether that step is the phase's first (the policy has not moved yet).
    """

    items: list[int]
    step: Step
    first_step: bool


class Phase:
    """One optimisation phase of an update: the micro-step loop, the optimizer steps and the
    metric tally, shared by every algorithm.

    Args:
        accelerator: the ``accelerate.Accelerator``.
        optimizer: stepped once per :class:`Step`.
        modules: the wrapped modules trained together (the policy; PPO: policy and critic):
            each runs under ``no_sync`` in a non-final micro-batch.
        params: returns the parameters to clip at each step (called at each step: FSDP2
            registers other parameter objects while a module is unsharded).
        max_grad_norm: clipping threshold (``optim.max_grad_norm``).
        keys: the metric sums of :attr:`tally`.
    """

    def __init__(self, accelerator, optimizer, modules: Sequence[torch.nn.Module],
                 params: Callable[[], Iterable[torch.nn.Parameter]], max_grad_norm: float, *keys: str):
        self.accelerator, self.optimizer, self.modules = accelerator, optimizer, list(modules)
        self.params, self.max_grad_norm = params, max_grad_norm
        self.tally = Tally(*keys)
        self.grad_norms: list[float] = []

    @classmethod
    def for_policy(cls, pair: PolicyPair, optimizer, accelerator, cfg: RunConfig, *keys: str) -> "Phase":
        """The phase of a policy-only update: ``pair.train_module`` put in train mode, clipped to
        ``cfg.optim.max_grad_norm``."""
        model = pair.train_module
        model.train()
        return cls(accelerator, optimizer, [model], model.parameters, cfg.optim.max_grad_norm, *keys)

    def micro_steps(self, steps: list[Step], size: int,
                    pad_forward: Callable[[list[int]], torch.Tensor]) -> Iterator[MicroBatch]:
        """Yield this process's micro-batches of ``steps`` (``size`` items each), each inside
        :func:`sync_context` (gradients synchronised at a step's last micro-batch); the caller
        computes the micro-batch's loss and calls :meth:`backward`. Padding micro-batches (a
        process with a smaller or empty shard) are run here: ``pad_forward(items)`` on the step's
        first item, backpropagated times 0 (the same collectives as a real one). After each
        step's micro-batches: clip, step, zero the gradients, record the norm.
        """
        rank = self.accelerator.process_index
        for n, step in enumerate(steps):
            micros = micro_batches(step.shards, rank, size)
            for j, micro in enumerate(micros):
                with sync_context(self.accelerator, self.modules, sync=j == len(micros) - 1):
                    if micro is None:
                        backward(self.accelerator, pad_forward(step.items[:1]), padding=True)
                        continue
                    yield MicroBatch(micro, step, n == 0)
            self.grad_norms.append(self.optimizer_step())

    def backward(self, loss: torch.Tensor) -> None:
        """:func:`backward` of a real micro-batch's loss (already divided by the global normaliser)."""
        backward(self.accelerator, loss)

    def optimizer_step(self) -> float:
        """Clip to ``max_grad_norm``, step and zero the gradients; returns the global
        pre-clipping gradient norm (NaN where the backend reports none)."""
        grad_norm = self.accelerator.clip_grad_norm_(self.params(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float("nan") if grad_norm is None else float(grad_norm)

    def reduce(self) -> dict[str, float]:
        """The tally summed over processes (:meth:`Tally.reduce`)."""
        return self.tally.reduce(self.accelerator)

    @property
    def grad_norm(self) -> float:
        """Mean over the phase's steps of the global pre-clipping gradient norm."""
        return sum(self.grad_norms) / len(self.grad_norms)


# --------------------------------------------------------------------------------------------
# Reference log-probs
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def reference_logps(pair: PolicyPair, samples: list[Sample], cfg: RunConfig, temperature: float = 1.0) -> list[torch.Tensor]:
    """Per-token reference log-probs of every sample, on this process (no communication, no gradient).

    Args:
        pair: policy and reference (LoRA: the policy with adapters disabled, unwrapped).
        samples: the sequences; ``cfg.optim.micro_batch_size`` per forward.
        temperature: logits are divided by it (the rollout temperature for on-policy losses).

    Returns:
        list of ``[T_i]`` float32 tensors (nats), one per sample, on the reference's device.
    """
    out = []
    pad_id = pair.tokenizer.pad_token_id
    model = pair.ref_model
    device = module_device(model)
    with pair.reference_context():
        for chunk in chunks(samples, cfg.optim.micro_batch_size):
            logps, cmask = forward_logps(model, chunk, pad_id, temperature, cfg.model.mixed_precision, device)
            out.extend(logps[i, : len(s.token_ids)].float() for i, s in enumerate(chunk))
    return out


@torch.no_grad()
def sharded_reference(pair: PolicyPair, accelerator, samples: list[Sample], per_rank: list[list[int]],
                       cfg: RunConfig, temperature: float) -> dict[int, torch.Tensor]:
    """Reference per-token log-probs of this process's samples ``per_rank[rank]``.

    Full fine-tuning: the frozen reference (not wrapped, no collectives; under FSDP sharded like
    the policy, so its forwards all-gather and need the padding forwards too). LoRA: the wrapped
    policy with adapters disabled, so padding forwards keep the count of forwards equal on
    every process.

    Returns:
        ``{index: [T_i] float32 tensor on accelerator.device}`` for this process's indices.
    """
    rank = accelerator.process_index
    wrapped = pair.reference is None
    model = pair.train_module if wrapped else pair.reference
    collective = wrapped or is_sharded(model)  # every process must run as many forwards
    device = accelerator.device if wrapped else module_device(model)
    pad_id = pair.tokenizer.pad_token_id
    out: dict[int, torch.Tensor] = {}
    with pair.reference_context():
        for chunk in micro_batches(per_rank, rank, cfg.optim.micro_batch_size):
            if chunk is None:
                if collective:
                    forward_logps(model, samples[:1], pad_id, temperature, cfg.model.mixed_precision, device)
                continue
            logps, _ = forward_logps(model, [samples[i] for i in chunk], pad_id, temperature,
                                      cfg.model.mixed_precision, device)
            for j, i in enumerate(chunk):
                out[i] = logps[j, : len(samples[i].token_ids)].float().to(accelerator.device)
    return out


# --------------------------------------------------------------------------------------------
# Old log-probs: recomputed in the training layout, or the rollout's
# --------------------------------------------------------------------------------------------


def recompute_old_logps(cfg: RunConfig) -> bool:
    """Whether GRPO (several steps), RLOO and PPO recompute their old log-probs
    (:func:`old_logps_pass`): ``optim.old_logps`` ``recompute``, or ``auto`` (the default) with
    ``model.mixed_precision`` bf16. In fp32 the recorded log-probs equal a training forward's to
    float noise (~1e-5 nats/token, ``tests/test_logprobs_bf16.py``), so ``auto`` saves the pass."""
    mode = cfg.optim.old_logps
    return mode == "recompute" or (mode == "auto" and cfg.model.mixed_precision == "bf16")


@torch.no_grad()
def old_logps_pass(pair: PolicyPair, accelerator, samples: list[Sample], steps: list[Step], cfg: RunConfig,
                   temperature: float) -> dict[int, torch.Tensor]:
    """The current policy's per-token log-probs of this process's items of ``steps``, without
    gradient, through exactly the forward the training loop runs next: the same model
    (``pair.train_module``, in its current mode), function (:func:`forward_logps`), autocast and
    micro-batches (:func:`micro_batches` of each step's shards, padding forwards included, so
    every process runs as many forwards as the training loop will). The first optimizer step's
    forward therefore recomputes them bit for bit and its ratio is exactly 1.

    Why (``optim.old_logps: recompute``, or ``auto`` under bf16, :func:`recompute_old_logps`):
    under bf16 autocast the log-probs the rollout records while decoding (KV cache, one token at
    a time) and a training-shaped forward of the same weights are rounded differently; on
    SmolLM2-135M they differ by 0.03 nats/token on average (max 0.4), which puts 22-31 % of
    20-token sequence ratios outside [0.8, 1.2] before any update, and PPO's first step (configs/
    ppo.yaml) saw token ratios up to 1 ± 0.38 and clipped 0.8 % of its tokens with the recorded
    log-probs, none with recomputed ones (``benchmarks/results/bf16_ratio.json``): clipping
    would see a policy change that did not happen. TRL recomputes the old log-probs the same way
    whenever the policy takes several steps per generation.

    Cost: one no-grad forward over the trained completions per round (GRPO and RLOO with one
    optimizer step per round need none: the detached training log-probs are the recomputed
    ones). Measured at the demo's 16 × 8 completions (≤ 48 tokens) on a 2-core AMD EPYC shared
    with other work (load ~6.7, so upper bounds): 50 s wall (32 s CPU) for this packed pass, 98 s
    (61 s CPU) for PPO's padded one, against 196 s to generate the round's completions in the
    same run — a quarter to a half of the round's generation time, which is why ``auto`` skips
    it in fp32, where the recorded log-probs already match. ``rollout`` keeps the recorded
    log-probs, those of the distribution that actually sampled the tokens (an importance weight
    that includes the decode/training mismatch), at no cost.

    Args:
        samples: the global batch.
        steps: the phase's plan (:func:`plan`), as the training loop will run it.
        temperature: the rollout temperature.

    Returns:
        ``{index: [T_i] float32 tensor (nats) on accelerator.device}`` for this process's items.
    """
    rank, mb = accelerator.process_index, cfg.optim.micro_batch_size
    pad_id, mp, model = pair.tokenizer.pad_token_id, cfg.model.mixed_precision, pair.train_module
    out: dict[int, torch.Tensor] = {}
    for step in steps:
        for micro in micro_batches(step.shards, rank, mb):
            idx = step.items[:1] if micro is None else micro
            logps, _ = forward_logps(model, [samples[i] for i in idx], pad_id, temperature, mp, accelerator.device)
            for j, i in enumerate(micro or []):
                out[i] = logps[j, : len(samples[i].token_ids)].float()
    return out


def rollout_drift(samples: list[Sample], recomputed: dict[int, torch.Tensor]) -> tuple[float, float]:
    """``(Σ |recomputed - recorded|, token count)`` over the samples in ``recomputed`` that carry
    rollout log-probs (``Sample.old_logps``, one per token; others are skipped): how far the log-probs recorded while sampling are
    from the training forward's, in nats, summed over tokens. The updates report the ratio as
    ``rollout_logp_diff`` (nats per token; the loop logs ``train/rollout_logp_diff``).

    Args:
        recomputed: ``{index: [T_i] tensor}``, e.g. from :func:`old_logps_pass`.
    """
    total, count = 0.0, 0
    for i, lp in recomputed.items():
        rec = samples[i].old_logps
        if rec is not None and len(rec) and len(rec) == lp.numel():
            total += (lp.detach().double().cpu() - torch.tensor(rec, dtype=torch.float64)).abs().sum().item()
            count += len(rec)
    return total, float(count)


def tally_drift(tally: Tally, samples: list[Sample], logps) -> None:
    """Add :func:`rollout_drift` to ``tally``'s ``drift``/``drift_tokens``; ``logps`` is a
    ``{index: [T_i]}`` dict into ``samples`` or a ``[B, T]`` tensor whose row ``j`` is ``samples[j]``."""
    if isinstance(logps, torch.Tensor):
        logps = {j: logps[j, : len(s.token_ids)] for j, s in enumerate(samples)}
    total, count = rollout_drift(samples, logps)
    tally.add("drift", total)
    tally.add("drift_tokens", count)


def policy_and_old_logps(pair: PolicyPair, samples: list[Sample], mb: "MicroBatch", cfg: RunConfig, on_policy: bool,
                         fresh: dict[int, torch.Tensor] | None, phase: "Phase"):
    """One micro-batch of a clipped policy-gradient update (GRPO, RLOO): the policy's current
    per-token log-probs and the ratio's denominator ("old" log-probs).

    ``old`` is the detached current log-probs when ``on_policy`` (one optimizer step per rollout:
    ratio 1, as TRL with ``num_iterations = 1``), else ``fresh[i]`` (recomputed before the
    phase, :func:`old_logps_pass`) or the rollout's recorded ``old_logps``. On the phase's first
    step without recomputed log-probs, the drift between the rollout's and the current log-probs
    is tallied for free (:func:`tally_drift`).

    Returns:
        ``(batch, logps, completion_mask, old)``: the micro-batch's samples and three ``[B, T]``
        tensors (nats; mask 1.0 on completion tokens).
    """
    idx = mb.items
    batch = [samples[i] for i in idx]
    logps, cmask = forward_logps(pair.train_module, batch, pair.tokenizer.pad_token_id, cfg.rollout.temperature,
                                 cfg.model.mixed_precision, phase.accelerator.device)
    if mb.first_step and fresh is None:  # the policy has not moved yet: drift for free
        tally_drift(phase.tally, batch, logps)
    if on_policy:
        old = logps.detach()
    else:
        old = pad_rows([fresh[i] if fresh is not None else s.old_logps for i, s in zip(idx, batch)], logps)
    return batch, logps, cmask, old


def drift_metric(sums: dict[str, float]) -> dict[str, float]:
    """``{"rollout_logp_diff": nats per token}`` from a tally's ``drift``/``drift_tokens``, or {}."""
    return {"rollout_logp_diff": sums["drift"] / sums["drift_tokens"]} if sums["drift_tokens"] else {}
