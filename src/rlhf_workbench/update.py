"""Policy updates with real gradients: one DPO, GRPO, RLOO, KTO or rejection-sampling SFT
optimisation phase per round.

The maths lives in :mod:`rlhf_workbench.losses`; this module batches sequences, runs the
forward/backward passes through ``accelerate`` (autocast; DDP, FSDP or DeepSpeed when started
with ``accelerate launch``), accumulates gradients over micro-batches, clips and steps the
optimizer. Every update has the signature ``update(pair, optimizer, accelerator, batch, cfg)``
and returns a dict of float metrics named as TRL logs them. Every forward goes through
:func:`~rlhf_workbench.logprobs.packed_logps`: the sequences of a micro-batch that share a
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

import torch
from accelerate.utils import DistributedType

from .config import RunConfig
from .logprobs import packed_logps
from .losses import dpo_loss, grpo_loss, kto_loss, rloo_advantages, rloo_loss
from .models import PolicyPair
from .rollout import autocast


@dataclass
class Sample:
    """A prompt and one completion as token ids, with what the losses need.

    ``old_logps`` are the sampling policy's per-token log-probs recorded at rollout
    (temperature-scaled); ``advantage`` is used by GRPO; ``reward`` is the sequence-level
    score (PPO's score, RLOO's reward); ``label`` is KTO's desirable (True) / undesirable
    (False) tag.
    """

    prompt_ids: list[int]
    token_ids: list[int]
    old_logps: list[float] | None = None
    advantage: float = 0.0
    reward: float = 0.0
    label: bool | None = None


# --------------------------------------------------------------------------------------------
# Planning: steps, shards, micro-batches (identical on every process)
# --------------------------------------------------------------------------------------------


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _split(items: list, parts: int) -> list[list]:
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
class _Step:
    items: list[int]  # global indices of the items of one optimizer step
    shards: list[list[int]]  # the step's items, one contiguous shard per process


def _plan(indices, num_steps: int, world: int) -> list[_Step]:
    """Split ``indices`` into ``min(num_steps, len(indices))`` near-equal contiguous optimizer
    steps and each step into ``world`` near-equal contiguous shards."""
    indices = list(indices)
    steps = _split(indices, max(1, min(num_steps, len(indices))))
    return [_Step(s, _split(s, world)) for s in steps]


def _rank_items(steps: list[_Step], world: int) -> list[list[int]]:
    """Per process, every item it trains on over the whole phase (its shards of all steps)."""
    return [[i for st in steps for i in st.shards[r]] for r in range(world)]


def _micro_batches(shards: list[list[int]], rank: int, size: int) -> list[list[int] | None]:
    """Micro-batches of process ``rank``'s shard, padded with ``None`` (a padding micro-batch)
    to the count of the process with the most, and at least one, so that every process runs
    the same number of forward and backward passes."""
    mine = list(_chunks(shards[rank], size))
    count = max(1, max(math.ceil(len(s) / size) for s in shards))
    return mine + [None] * (count - len(mine))


# --------------------------------------------------------------------------------------------
# Forward passes, gradient synchronisation, metrics
# --------------------------------------------------------------------------------------------


def _device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _forward_logps(model, samples: list[Sample], pad_id: int, temperature: float, mixed_precision: str,
                   device: torch.device | None = None):
    """``([B, T] float32 per-token log-probs, [B, T] long completion mask)`` of ``samples``, by
    :func:`~rlhf_workbench.logprobs.packed_logps` (samples with the same prompt share its
    forward pass)."""
    with autocast(mixed_precision):
        return packed_logps(model, [s.prompt_ids for s in samples], [s.token_ids for s in samples], pad_id,
                            temperature, device)


def _forward_sft(model, samples: list[Sample], pad_id: int, mixed_precision: str, device: torch.device):
    """Like :func:`_forward_logps` at temperature 1, plus whether each completion token is the
    model's argmax prediction. Returns ``(logps [B, T], correct [B, T] bool, cmask [B, T])``."""
    with autocast(mixed_precision):
        logps, cmask, correct = packed_logps(model, [s.prompt_ids for s in samples],
                                             [s.token_ids for s in samples], pad_id, 1.0, device, return_argmax=True)
    return logps, correct, cmask


def _pad_rows(rows, like: torch.Tensor) -> torch.Tensor:
    """A tensor shaped and typed like ``like`` (``[B, T]``) holding row ``j``'s values in its first
    ``len(rows[j])`` columns and zeros after."""
    out = torch.zeros_like(like)
    for j, row in enumerate(rows):
        row = torch.as_tensor(row, dtype=like.dtype).to(like.device)
        out[j, : row.numel()] = row
    return out


@contextlib.contextmanager
def _sync_context(accelerator, model, sync: bool):
    """Context of one micro-batch's forward and backward; gradients are synchronised across
    processes only when ``sync`` (the last micro-batch of an optimizer step).

    Otherwise accelerate's ``sync_gradients`` flag is off (DeepSpeed then neither reduces at a
    boundary nor steps) and, except under FSDP, the module runs under ``accelerator.no_sync``
    (DDP accumulates locally). FSDP keeps syncing (reduce-scatter) every micro-batch, which
    keeps gradients sharded; that is correct because every process runs the same micro-batches.
    """
    if sync:
        yield
        return
    state = accelerator.gradient_state
    previous = state.sync_gradients
    state._set_sync_gradients(False)
    no_sync = contextlib.nullcontext() if accelerator.distributed_type == DistributedType.FSDP else accelerator.no_sync(model)
    try:
        with no_sync:
            yield
    finally:
        state._set_sync_gradients(previous)


def _backward(accelerator, loss: torch.Tensor, padding: bool = False) -> None:
    """Backpropagate this process's part of the global objective.

    ``loss`` is already divided by the global normaliser; it is multiplied by the number of
    processes, which the gradient averaging of DDP / FSDP / DeepSpeed divides out again, and by
    ``gradient_accumulation_steps``, which ``accelerator.backward`` (or DeepSpeed) divides out.
    A padding micro-batch contributes ``0 · loss``: zero gradients, but the same collectives.
    """
    scale = 0.0 if padding else float(accelerator.num_processes * accelerator.gradient_accumulation_steps)
    accelerator.backward(loss * scale)


def _step(pair: PolicyPair, optimizer, accelerator, cfg: RunConfig) -> float:
    """Clip to ``optim.max_grad_norm``, step and zero the gradients; returns the global
    pre-clipping gradient norm (NaN where the backend reports none)."""
    grad_norm = accelerator.clip_grad_norm_(pair.train_module.parameters(), cfg.optim.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float("nan") if grad_norm is None else float(grad_norm)


def _all_sum(accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over processes (the tensor itself for one process)."""
    return tensor if accelerator.num_processes == 1 else accelerator.reduce(tensor, reduction="sum")


class _Tally:
    """Metric sums over this process's items, summed over processes by :meth:`reduce` (one
    collective; the keys are fixed up front so every process reduces the same vector)."""

    def __init__(self, *keys: str):
        self.sums = dict.fromkeys(keys, 0.0)

    def add(self, key: str, value) -> None:
        self.sums[key] += float(value)

    def reduce(self, accelerator) -> dict[str, float]:
        if accelerator.num_processes == 1:
            return dict(self.sums)
        t = torch.tensor(list(self.sums.values()), dtype=torch.float64, device=accelerator.device)
        return dict(zip(self.sums, _all_sum(accelerator, t).tolist()))


def _require_old_logps(samples: list[Sample], indices, who: str) -> None:
    for i in indices:
        s = samples[i]
        if s.old_logps is None or len(s.old_logps) != len(s.token_ids):
            got = None if s.old_logps is None else len(s.old_logps)
            raise ValueError(f"{who}: sample {i} needs old_logps recorded at rollout, one per completion token "
                             f"({len(s.token_ids)}), got {got}")


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
    device = _device(model)
    with pair.reference_context():
        for chunk in _chunks(samples, cfg.optim.micro_batch_size):
            logps, cmask = _forward_logps(model, chunk, pad_id, temperature, cfg.model.mixed_precision, device)
            out.extend(logps[i, : len(s.token_ids)].float() for i, s in enumerate(chunk))
    return out


@torch.no_grad()
def _sharded_reference(pair: PolicyPair, accelerator, samples: list[Sample], per_rank: list[list[int]],
                       cfg: RunConfig, temperature: float) -> dict[int, torch.Tensor]:
    """Reference per-token log-probs of this process's samples ``per_rank[rank]``.

    Full fine-tuning: the frozen reference (not wrapped, no collectives). LoRA: the wrapped
    policy with adapters disabled, so padding forwards keep the count of forwards equal on
    every process.

    Returns:
        ``{index: [T_i] float32 tensor on accelerator.device}`` for this process's indices.
    """
    rank = accelerator.process_index
    wrapped = pair.reference is None
    model = pair.train_module if wrapped else pair.reference
    device = accelerator.device if wrapped else _device(model)
    pad_id = pair.tokenizer.pad_token_id
    out: dict[int, torch.Tensor] = {}
    with pair.reference_context():
        for chunk in _micro_batches(per_rank, rank, cfg.optim.micro_batch_size):
            if chunk is None:
                if wrapped:
                    _forward_logps(model, samples[:1], pad_id, temperature, cfg.model.mixed_precision, device)
                continue
            logps, _ = _forward_logps(model, [samples[i] for i in chunk], pad_id, temperature,
                                      cfg.model.mixed_precision, device)
            for j, i in enumerate(chunk):
                out[i] = logps[j, : len(samples[i].token_ids)].float().to(accelerator.device)
    return out


# --------------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------------


def dpo_update(pair: PolicyPair, optimizer, accelerator, pairs: list[tuple[Sample, Sample]], cfg: RunConfig) -> dict[str, float]:
    """DPO (:func:`~rlhf_workbench.losses.dpo_loss`, Rafailov et al. 2023 eq. 7 and variants) on
    ``(chosen, rejected)`` pairs.

    Reference log-probs are computed once (each process for its own pairs), then
    ``cfg.optim.steps_per_round`` optimizer steps run over near-equal contiguous slices of the
    pairs; each step's loss is the mean over the step's pairs (global count, see the module
    docstring), log-probs summed over completion tokens at temperature 1.

    Args:
        pairs: the global batch, identical on every process.

    Returns:
        Metrics with TRL's names, means over all pairs of the phase: ``loss``, ``rewards/chosen``,
        ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies`` (β·log-ratios, nats),
        ``logps/chosen``, ``logps/rejected`` (summed log-probs, nats); ``grad_norm`` (mean over
        steps of the global pre-clipping norm) and ``steps``. Only ``{"steps": 0.0}`` without pairs.

    Raises:
        ValueError: from :func:`~rlhf_workbench.losses.dpo_loss` (bad ``cfg.dpo``).
    """
    if not pairs:
        return {"steps": 0.0}
    rank, world = accelerator.process_index, accelerator.num_processes
    pad_id, mp = pair.tokenizer.pad_token_id, cfg.model.mixed_precision
    steps = _plan(range(len(pairs)), cfg.optim.steps_per_round, world)
    flat = [s for p in pairs for s in p]
    ref = _sharded_reference(pair, accelerator, flat, [[2 * i + k for i in items for k in (0, 1)]
                                                       for items in _rank_items(steps, world)], cfg, 1.0)
    keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected")
    tally = _Tally(*keys)
    model = pair.train_module
    model.train()
    grad_norms = []
    per_micro = max(1, cfg.optim.micro_batch_size // 2)
    for step in steps:
        micros = _micro_batches(step.shards, rank, per_micro)
        for j, micro in enumerate(micros):
            idx = step.items[:1] if micro is None else micro
            batch = [pairs[i][0] for i in idx] + [pairs[i][1] for i in idx]
            with _sync_context(accelerator, model, sync=j == len(micros) - 1):
                logps, cmask = _forward_logps(model, batch, pad_id, 1.0, mp, accelerator.device)
                if micro is None:
                    _backward(accelerator, logps.sum(), padding=True)
                    continue
                seq = (logps * cmask).sum(-1)
                lengths = cmask.sum(-1)
                n = len(idx)
                loss, stats = dpo_loss(
                    seq[:n], seq[n:], torch.stack([ref[2 * i].sum() for i in idx]),
                    torch.stack([ref[2 * i + 1].sum() for i in idx]), beta=cfg.dpo.beta,
                    loss_type=cfg.dpo.loss_type, label_smoothing=cfg.dpo.label_smoothing,
                    chosen_lengths=lengths[:n], rejected_lengths=lengths[n:],
                )
                _backward(accelerator, loss * n / len(step.items))
            tally.add("loss", loss.item() * n)
            for k, v in stats.items():
                tally.add(k, v.sum().item())
            tally.add("logps/chosen", seq[:n].sum().item())
            tally.add("logps/rejected", seq[n:].sum().item())
        grad_norms.append(_step(pair, optimizer, accelerator, cfg))
    sums = tally.reduce(accelerator)
    return {**{k: sums[k] / len(pairs) for k in keys}, "grad_norm": sum(grad_norms) / len(grad_norms),
            "steps": float(len(steps))}


# --------------------------------------------------------------------------------------------
# GRPO
# --------------------------------------------------------------------------------------------


def grpo_update(pair: PolicyPair, optimizer, accelerator, samples: list[Sample], cfg: RunConfig) -> dict[str, float]:
    """GRPO (:func:`~rlhf_workbench.losses.grpo_loss`, Shao et al. 2024 eq. 3) on one rollout
    batch whose advantages are already set (group-relative, over the global batch).

    Log-probs are at the rollout temperature. Old log-probs: with one optimizer step per batch
    (``steps_per_round`` 1, or fewer active completions than steps) the policy cannot move during
    the phase, so the old log-probs are the detached current ones (ratio exactly 1; TRL does the
    same when ``num_iterations = 1``); with several steps they are the ones recorded at rollout.
    Completions with zero advantage contribute no policy gradient; when
    ``β = 0`` they are skipped entirely, the normalisers still counting them, so the objective
    is exactly the one over the full batch. The remaining ("active") completions are split into
    ``cfg.optim.steps_per_round`` steps; a step's normaliser is its share of the whole batch:
    ``grpo``/``dr_grpo``: ``n_batch · n_step / n_active`` sequences (``dr_grpo`` also divides by
    ``rollout.max_new_tokens``, Liu et al. 2025); ``bnpo``/``dapo``: completion tokens of the whole
    batch (zero-advantage completions included, TRL's ``dapo`` ``num_items_in_batch``) times
    the step's share of the active tokens. ``bnpo`` is treated as ``dapo``: TRL's per-device
    token count would make the objective depend on the number of processes.

    Args:
        samples: the global batch, identical on every process, with ``advantage`` and
            ``old_logps`` (one per completion token) set.

    Returns:
        ``loss`` (mean over steps of the step objective), token means over the trained completions
        of ``kl`` (k3 to the reference; 0 when β = 0), ``clip_ratio``, ``clip_ratio/low_mean``,
        ``clip_ratio/high_mean``; ``grad_norm`` (mean over steps), ``steps``. When every advantage
        is 0 and β = 0 the objective is exactly 0, no step is taken and all metrics are 0.

    Raises:
        ValueError: an active sample without ``old_logps`` of the right length (several steps).
    """
    g = cfg.grpo
    names = ("kl", "clip_ratio", "clip_ratio/low_mean", "clip_ratio/high_mean")
    active = [i for i, s in enumerate(samples) if g.beta > 0 or s.advantage != 0.0]
    if not active:
        return {"loss": 0.0, **dict.fromkeys(names, 0.0), "grad_norm": 0.0, "steps": 0.0}
    rank, world = accelerator.process_index, accelerator.num_processes
    pad_id, mp, temperature = pair.tokenizer.pad_token_id, cfg.model.mixed_precision, cfg.rollout.temperature
    loss_type = "dapo" if g.loss_type in ("bnpo", "dapo") else g.loss_type
    steps = _plan(active, cfg.optim.steps_per_round, world)
    on_policy = len(steps) == 1
    if not on_policy:
        _require_old_logps(samples, active, "grpo_update")
    ref = _sharded_reference(pair, accelerator, samples, _rank_items(steps, world), cfg, temperature) if g.beta > 0 else None
    lengths = [len(s.token_ids) for s in samples]
    active_tokens = sum(lengths[i] for i in active)
    tally = _Tally("loss", *names, "tokens")
    model = pair.train_module
    model.train()
    grad_norms = []
    for step in steps:
        if loss_type == "dapo":
            norm = max(1.0, sum(lengths) * sum(lengths[i] for i in step.items) / max(1, active_tokens))
        else:
            norm = len(samples) * len(step.items) / len(active)
        micros = _micro_batches(step.shards, rank, cfg.optim.micro_batch_size)
        for j, micro in enumerate(micros):
            idx = step.items[:1] if micro is None else micro
            batch = [samples[i] for i in idx]
            with _sync_context(accelerator, model, sync=j == len(micros) - 1):
                logps, cmask = _forward_logps(model, batch, pad_id, temperature, mp, accelerator.device)
                if micro is None:
                    _backward(accelerator, logps.sum(), padding=True)
                    continue
                old = logps.detach() if on_policy else _pad_rows([s.old_logps for s in batch], logps)
                ref_t = None if ref is None else _pad_rows([ref[i] for i in idx], logps)
                adv = torch.tensor([s.advantage for s in batch], dtype=logps.dtype, device=logps.device)
                loss, stats = grpo_loss(
                    logps, old, ref_t, adv, cmask, beta=g.beta, epsilon=g.epsilon, epsilon_high=g.epsilon_high,
                    loss_type=loss_type, max_completion_length=cfg.rollout.max_new_tokens, num_items=1.0,
                )
                # As a sum over the micro-batch: Σ_i mean_t ℓ (grpo), Σ ℓ / max_len (dr_grpo), Σ ℓ (dapo).
                part = (loss if loss_type == "dapo" else loss * len(batch)) / norm
                _backward(accelerator, part)
            n_tok = float(cmask.sum())
            tally.add("loss", part.item())
            for k in names:
                tally.add(k, stats[k].item() * n_tok)
            tally.add("tokens", n_tok)
        grad_norms.append(_step(pair, optimizer, accelerator, cfg))
    sums = tally.reduce(accelerator)
    tokens = max(1.0, sums["tokens"])
    return {"loss": sums["loss"] / len(steps), **{k: sums[k] / tokens for k in names},
            "grad_norm": sum(grad_norms) / len(grad_norms), "steps": float(len(steps))}


# --------------------------------------------------------------------------------------------
# RLOO
# --------------------------------------------------------------------------------------------


def rloo_update(pair: PolicyPair, optimizer, accelerator, samples: list[Sample], cfg: RunConfig) -> dict[str, float]:
    """REINFORCE leave-one-out (Ahmadian et al. 2024) as TRL 1.16's ``RLOOTrainer``, on one rollout
    batch of contiguous groups of ``K = cfg.rollout.num_generations`` completions per prompt.

    1. With ``β = cfg.rloo.beta != 0``, reference log-probs at the rollout temperature (sharded
       over processes) give each completion's summed k1 log-ratio
       ``kl_i = Σ_t (old_logps - ref_logps)``, all-reduced so every process holds all of them.
    2. Advantages over the global batch: :func:`~rlhf_workbench.losses.rloo_advantages` of the
       ``Sample.reward`` values (clamped to ``reward_clip_range``, minus ``β kl_i``, leave-one-out
       baseline within each group, optional batch-wide normalisation), before any sharding.
    3. ``cfg.optim.steps_per_round`` steps of :func:`~rlhf_workbench.losses.rloo_loss` (clipped
       sequence-level ratio against the rollout ``old_logps``, ``ε = epsilon``/``epsilon_high``),
       mean over sequences. Completions with an advantage of exactly 0 have no loss and no
       gradient and are skipped; the normaliser still counts them (``n_batch · n_step / n_active``
       sequences per step), so the objective is the mean over the whole batch. When every
       advantage is 0 no step is taken.

    Args:
        samples: the global batch, identical on every process, with ``reward`` and ``old_logps``
            (per completion token, at the rollout temperature) set.

    Returns:
        ``loss`` (mean over steps of the step objective), ``clip_ratio``, ``clip_ratio/low_mean``,
        ``clip_ratio/high_mean`` (fractions of the trained sequences), ``grad_norm`` (mean over
        steps), ``steps``; with β != 0 also ``kl`` (TRL: ``Σ_i kl_i`` / completion tokens of the
        batch, nats per token). Only ``{"steps": 0.0}`` for an empty batch.

    Raises:
        ValueError: the batch is not a multiple of K, or a sample lacks ``old_logps`` of the right length.
    """
    rc, K = cfg.rloo, cfg.rollout.num_generations
    if not samples:
        return {"steps": 0.0}
    if len(samples) % K:
        raise ValueError(f"rloo_update: {len(samples)} samples is not a multiple of num_generations K={K}")
    _require_old_logps(samples, range(len(samples)), "rloo_update")
    rank, world = accelerator.process_index, accelerator.num_processes
    pad_id, mp, temperature = pair.tokenizer.pad_token_id, cfg.model.mixed_precision, cfg.rollout.temperature
    n = len(samples)
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
    kl, extra = None, {}
    if rc.beta != 0.0:
        ref = _sharded_reference(pair, accelerator, samples, _split(list(range(n)), world), cfg, temperature)
        local = torch.zeros(n, dtype=torch.float64, device=accelerator.device)
        for i, r in ref.items():
            local[i] = (torch.tensor(samples[i].old_logps, dtype=torch.float64, device=r.device) - r.double()).sum()
        kl = _all_sum(accelerator, local).float().cpu()
        extra["kl"] = kl.sum().item() / max(1, sum(len(s.token_ids) for s in samples))
    advantages = rloo_advantages(rewards, K, kl, rc.beta, rc.normalize_advantages, rc.reward_clip_range).tolist()
    names = ("clip_ratio", "clip_ratio/low_mean", "clip_ratio/high_mean")
    active = [i for i in range(n) if advantages[i] != 0.0]
    if not active:
        return {"loss": 0.0, **dict.fromkeys(names, 0.0), "grad_norm": 0.0, "steps": 0.0, **extra}
    steps = _plan(active, cfg.optim.steps_per_round, world)
    tally = _Tally("loss", *names, "sequences")
    model = pair.train_module
    model.train()
    grad_norms = []
    for step in steps:
        norm = n * len(step.items) / len(active)
        micros = _micro_batches(step.shards, rank, cfg.optim.micro_batch_size)
        for j, micro in enumerate(micros):
            idx = step.items[:1] if micro is None else micro
            batch = [samples[i] for i in idx]
            with _sync_context(accelerator, model, sync=j == len(micros) - 1):
                logps, cmask = _forward_logps(model, batch, pad_id, temperature, mp, accelerator.device)
                if micro is None:
                    _backward(accelerator, logps.sum(), padding=True)
                    continue
                old = _pad_rows([s.old_logps for s in batch], logps)
                adv = torch.tensor([advantages[i] for i in idx], dtype=logps.dtype, device=logps.device)
                loss, stats = rloo_loss(logps, old, adv, cmask, epsilon=rc.epsilon, epsilon_high=rc.epsilon_high)
                part = loss * len(batch) / norm
                _backward(accelerator, part)
            tally.add("loss", part.item())
            for k in names:
                tally.add(k, stats[k].item() * len(batch))
            tally.add("sequences", len(batch))
        grad_norms.append(_step(pair, optimizer, accelerator, cfg))
    sums = tally.reduce(accelerator)
    return {"loss": sums["loss"] / len(steps), **{k: sums[k] / sums["sequences"] for k in names},
            "grad_norm": sum(grad_norms) / len(grad_norms), "steps": float(len(steps)), **extra}


# --------------------------------------------------------------------------------------------
# KTO
# --------------------------------------------------------------------------------------------


def kto_kl_partners(samples: list[Sample]) -> list[int]:
    """For each sample ``i``, the index ``j`` of the completion scored under prompt ``x_i`` for
    KTO's reference point ``z0`` (the mismatched pair ``(x_i, y_j)``).

    TRL pairs ``x_i`` with ``y_{i-1}`` of the same (shuffled) batch. The loop's batches are
    grouped by prompt, where ``y_{i-1}`` is mostly a completion *of* ``x_i`` and the pair would
    not be mismatched, so the rotation is by the smallest shift ``s ≥ 1`` for which every
    ``x_i`` differs from ``x_{(i-s) mod n}`` (for groups of K completions per prompt, ``s = K``:
    the same position in the previous group, as diverse as TRL's rotation); when no single
    shift works, each ``i`` takes the nearest earlier sample (cyclically) with another prompt,
    and when all prompts are equal, ``i - 1`` (TRL's rotation; ``i`` itself for one sample).
    Depends on the batch only, not on the number of processes.

    Args:
        samples: the global batch.

    Returns:
        ``n`` indices into ``samples``.
    """
    n = len(samples)
    ids: dict[tuple, int] = {}
    prompts = [ids.setdefault(tuple(s.prompt_ids), len(ids)) for s in samples]
    for shift in range(1, n):
        if all(prompts[i] != prompts[(i - shift) % n] for i in range(n)):
            return [(i - shift) % n for i in range(n)]
    return [next(((i - s) % n for s in range(1, n) if prompts[(i - s) % n] != prompts[i]), (i - 1) % n)
            for i in range(n)]


def kto_update(pair: PolicyPair, optimizer, accelerator, samples: list[Sample], cfg: RunConfig) -> dict[str, float]:
    """KTO (:func:`~rlhf_workbench.losses.kto_loss`, Ethayarajh et al. 2024 eq. 8) on unpaired
    traces labelled desirable (``Sample.label`` True: verified-correct and top-ranked) or
    undesirable (False: wrong or flagged). Playground thumbs are stored
    (:class:`~rlhf_workbench.store.BinaryFeedback`) but not trained on yet.

    Reference log-probs of the traces and of their mismatched KL pairs
    (:func:`kto_kl_partners`) are computed once; then ``cfg.optim.steps_per_round`` steps over
    near-equal contiguous slices. Each step first estimates the reference point as TRL does,
    ``z0 = max(0, mean_i [log π(y_j|x_i) - log π_ref(y_j|x_i)])`` under the current policy
    without gradient, the mean over the step's global items (a reduced sum), then takes the
    mean KTO loss over the step's items with ``β``, ``λ_D``, ``λ_U`` from ``cfg.kto``. Summed
    completion log-probs at temperature 1.

    Args:
        samples: the global batch, identical on every process, every ``label`` set.

    Returns:
        TRL's names: ``loss`` (mean over all items of the phase), ``kl`` (mean over steps of
        ``z0``, nats), ``rewards/chosen`` and ``logps/chosen`` (means over the desirable items,
        only when there are some), ``rewards/rejected`` and ``logps/rejected`` (likewise),
        ``rewards/margins`` (mean chosen minus mean rejected reward, only with both kinds),
        ``grad_norm`` (mean over steps), ``steps``. Only ``{"steps": 0.0}`` for an empty batch.

    Raises:
        ValueError: a sample without ``label``.
    """
    k = cfg.kto
    if not samples:
        return {"steps": 0.0}
    missing = [i for i, s in enumerate(samples) if s.label is None]
    if missing:
        raise ValueError(f"kto_update: samples {missing[:5]} have no label (True desirable / False undesirable)")
    rank, world = accelerator.process_index, accelerator.num_processes
    pad_id, mp, mb = pair.tokenizer.pad_token_id, cfg.model.mixed_precision, cfg.optim.micro_batch_size
    partners = kto_kl_partners(samples)
    kl_samples = [Sample(s.prompt_ids, samples[j].token_ids) for s, j in zip(samples, partners)]
    steps = _plan(range(len(samples)), cfg.optim.steps_per_round, world)
    mine = _rank_items(steps, world)
    ref = _sharded_reference(pair, accelerator, samples, mine, cfg, 1.0)
    ref_kl = _sharded_reference(pair, accelerator, kl_samples, mine, cfg, 1.0)
    tally = _Tally("loss", "rewards/chosen", "logps/chosen", "n_chosen", "rewards/rejected", "logps/rejected", "n_rejected")
    model = pair.train_module
    model.train()
    grad_norms, z0s = [], []
    for step in steps:
        micros = _micro_batches(step.shards, rank, mb)
        local = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
        with torch.no_grad():
            for micro in micros:
                idx = step.items[:1] if micro is None else micro
                logps, cmask = _forward_logps(model, [kl_samples[i] for i in idx], pad_id, 1.0, mp, accelerator.device)
                if micro is None:
                    continue
                ratios = (logps * cmask).sum(-1) - torch.stack([ref_kl[i].sum() for i in idx])
                local += torch.stack([ratios.double().sum(), torch.tensor(float(len(idx)), dtype=torch.float64,
                                                                          device=local.device)])
        total = _all_sum(accelerator, local)
        z0 = (total[0] / total[1]).clamp(min=0).float()
        z0s.append(z0.item())
        for j, micro in enumerate(micros):
            idx = step.items[:1] if micro is None else micro
            batch = [samples[i] for i in idx]
            with _sync_context(accelerator, model, sync=j == len(micros) - 1):
                logps, cmask = _forward_logps(model, batch, pad_id, 1.0, mp, accelerator.device)
                if micro is None:
                    _backward(accelerator, logps.sum(), padding=True)
                    continue
                seq = (logps * cmask).sum(-1)
                labels = torch.tensor([bool(s.label) for s in batch], device=seq.device)
                loss, stats = kto_loss(seq, torch.stack([ref[i].sum() for i in idx]), labels, z0, beta=k.beta,
                                       desirable_weight=k.desirable_weight, undesirable_weight=k.undesirable_weight)
                _backward(accelerator, loss * len(batch) / len(step.items))
            tally.add("loss", loss.item() * len(batch))
            for name in ("rewards/chosen", "logps/chosen", "rewards/rejected", "logps/rejected"):
                tally.add(name, stats[name].sum().item())
            tally.add("n_chosen", stats["rewards/chosen"].numel())
            tally.add("n_rejected", stats["rewards/rejected"].numel())
        grad_norms.append(_step(pair, optimizer, accelerator, cfg))
    sums = tally.reduce(accelerator)
    out = {"loss": sums["loss"] / len(samples), "kl": sum(z0s) / len(z0s)}
    for kind in ("chosen", "rejected"):
        if sums[f"n_{kind}"]:
            out[f"rewards/{kind}"] = sums[f"rewards/{kind}"] / sums[f"n_{kind}"]
            out[f"logps/{kind}"] = sums[f"logps/{kind}"] / sums[f"n_{kind}"]
    if sums["n_chosen"] and sums["n_rejected"]:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return {**out, "grad_norm": sum(grad_norms) / len(grad_norms), "steps": float(len(steps))}


# --------------------------------------------------------------------------------------------
# Rejection-sampling SFT
# --------------------------------------------------------------------------------------------


def sft_update(pair: PolicyPair, optimizer, accelerator, samples: list[Sample], cfg: RunConfig) -> dict[str, float]:
    """Rejection-sampling fine-tuning (RAFT, Dong et al. 2023; RFT, Yuan et al. 2023): maximum
    likelihood on the completion tokens of verified-correct traces (the loop passes only those).

    ``cfg.sft.epochs`` passes over the traces, each cut into ``cfg.optim.steps_per_round``
    optimizer steps (same order every epoch); a step's loss is the mean token negative
    log-likelihood ``-Σ log π(y_t | x, y_<t) / N_tokens`` over the completion tokens of the step's
    traces, ``N_tokens`` counted over the global step (TRL ``SFTTrainer`` with completion-only
    loss; prompts are not trained on). Temperature 1. ``cfg.sft.lr``, when set, replaces the
    optimizer's learning rate for this phase only (restored afterwards). Traces with no
    completion token are ignored.

    Args:
        samples: the global batch, identical on every process.

    Returns:
        ``loss`` (token-weighted mean NLL over the phase, nats/token, measured before each step's
        update), ``mean_token_accuracy`` (fraction of completion tokens that are the model's argmax
        prediction, TRL's name), ``num_tokens`` (completion tokens trained on in this call, all
        epochs; TRL's counts prompt tokens too), ``grad_norm`` (mean over steps), ``steps``.
        Only ``{"steps": 0.0}`` when no trace has a completion token.
    """
    sc = cfg.sft
    items = [i for i, s in enumerate(samples) if s.token_ids]
    if not items:
        return {"steps": 0.0}
    rank, world = accelerator.process_index, accelerator.num_processes
    pad_id, mp = pair.tokenizer.pad_token_id, cfg.model.mixed_precision
    lrs = [group["lr"] for group in optimizer.param_groups]
    if sc.lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = sc.lr
    tally = _Tally("nll", "correct", "tokens")
    model = pair.train_module
    model.train()
    grad_norms = []
    try:
        for _ in range(sc.epochs):
            for step in _plan(items, cfg.optim.steps_per_round, world):
                norm = float(sum(len(samples[i].token_ids) for i in step.items))
                micros = _micro_batches(step.shards, rank, cfg.optim.micro_batch_size)
                for j, micro in enumerate(micros):
                    idx = step.items[:1] if micro is None else micro
                    batch = [samples[i] for i in idx]
                    with _sync_context(accelerator, model, sync=j == len(micros) - 1):
                        logps, correct, cmask = _forward_sft(model, batch, pad_id, mp, accelerator.device)
                        if micro is None:
                            _backward(accelerator, logps.sum(), padding=True)
                            continue
                        nll = -(logps * cmask).sum()
                        _backward(accelerator, nll / norm)
                    tally.add("nll", nll.item())
                    tally.add("correct", (correct & cmask.bool()).sum().item())
                    tally.add("tokens", cmask.sum().item())
                grad_norms.append(_step(pair, optimizer, accelerator, cfg))
    finally:
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
    sums = tally.reduce(accelerator)
    return {"loss": sums["nll"] / sums["tokens"], "mean_token_accuracy": sums["correct"] / sums["tokens"],
            "num_tokens": sums["tokens"], "grad_norm": sum(grad_norms) / len(grad_norms),
            "steps": float(len(grad_norms))}
