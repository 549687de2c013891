"""Policy updates with real gradients: one DPO, GRPO, RLOO, KTO or rejection-sampling SFT
optimisation phase per round (RLOO in :mod:`rlhf_workbench.rloo`, KTO in :mod:`rlhf_workbench.kto`,
PPO in :mod:`rlhf_workbench.ppo`, all on this module's helpers).

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
from .losses import dpo_loss, grpo_loss
from .models import PolicyPair
from .rollout import autocast
from .sharding import is_sharded


@dataclass
class Sample:
    """A prompt and one completion as token ids, with what the losses need.

    ``old_logps`` are the sampling policy's per-token log-probs recorded at rollout
    (temperature-scaled; the ratio's denominator only when they are not recomputed, see
    :func:`recompute_old_logps`); ``advantage`` is used by GRPO; ``reward`` is the sequence-level
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


def _require_old_logps(samples: list[Sample], indices, who: str, optional: bool = False) -> None:
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
    device = accelerator.device if wrapped else _device(model)
    pad_id = pair.tokenizer.pad_token_id
    out: dict[int, torch.Tensor] = {}
    with pair.reference_context():
        for chunk in _micro_batches(per_rank, rank, cfg.optim.micro_batch_size):
            if chunk is None:
                if collective:
                    _forward_logps(model, samples[:1], pad_id, temperature, cfg.model.mixed_precision, device)
                continue
            logps, _ = _forward_logps(model, [samples[i] for i in chunk], pad_id, temperature,
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
def old_logps_pass(pair: PolicyPair, accelerator, samples: list[Sample], steps: list[_Step], cfg: RunConfig,
                   temperature: float) -> dict[int, torch.Tensor]:
    """The current policy's per-token log-probs of this process's items of ``steps``, without
    gradient, through exactly the forward the training loop runs next: the same model
    (``pair.train_module``, in its current mode), function (:func:`_forward_logps`), autocast and
    micro-batches (:func:`_micro_batches` of each step's shards, padding forwards included, so
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
        steps: the phase's plan (:func:`_plan`), as the training loop will run it.
        temperature: the rollout temperature.

    Returns:
        ``{index: [T_i] float32 tensor (nats) on accelerator.device}`` for this process's items.
    """
    rank, mb = accelerator.process_index, cfg.optim.micro_batch_size
    pad_id, mp, model = pair.tokenizer.pad_token_id, cfg.model.mixed_precision, pair.train_module
    out: dict[int, torch.Tensor] = {}
    for step in steps:
        for micro in _micro_batches(step.shards, rank, mb):
            idx = step.items[:1] if micro is None else micro
            logps, _ = _forward_logps(model, [samples[i] for i in idx], pad_id, temperature, mp, accelerator.device)
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


def _tally_drift(tally: _Tally, samples: list[Sample], logps) -> None:
    """Add :func:`rollout_drift` to ``tally``'s ``drift``/``drift_tokens``; ``logps`` is a
    ``{index: [T_i]}`` dict into ``samples`` or a ``[B, T]`` tensor whose row ``j`` is ``samples[j]``."""
    if isinstance(logps, torch.Tensor):
        logps = {j: logps[j, : len(s.token_ids)] for j, s in enumerate(samples)}
    total, count = rollout_drift(samples, logps)
    tally.add("drift", total)
    tally.add("drift_tokens", count)


def _drift_metric(sums: dict[str, float]) -> dict[str, float]:
    """``{"rollout_logp_diff": nats per token}`` from a tally's ``drift``/``drift_tokens``, or {}."""
    return {"rollout_logp_diff": sums["drift"] / sums["drift_tokens"]} if sums["drift_tokens"] else {}


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
    same when ``num_iterations = 1``); with several steps they are recomputed before the first
    step by :func:`old_logps_pass` (``optim.old_logps: recompute``, or ``auto``, the default,
    under bf16: first-step ratio exactly 1) or the ones recorded at rollout (``rollout``, or
    ``auto`` in fp32).
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
        ``clip_ratio/high_mean``; ``grad_norm`` (mean over steps), ``steps``; and, when the
        trained completions carry rollout log-probs, ``rollout_logp_diff`` (mean
        ``|current - recorded|`` before any step, nats per token, :func:`rollout_drift`: over the
        recomputed completions, else over the first step's from its own forward). When every advantage
        is 0 and β = 0 the objective is exactly 0, no step is taken and all metrics are 0.

    Raises:
        ValueError: several steps and an active sample with ``old_logps`` of the wrong length,
            or without any (``optim.old_logps: rollout``).
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
    recompute = not on_policy and recompute_old_logps(cfg)
    if not on_policy:
        _require_old_logps(samples, active, "grpo_update", optional=recompute)
    ref = _sharded_reference(pair, accelerator, samples, _rank_items(steps, world), cfg, temperature) if g.beta > 0 else None
    lengths = [len(s.token_ids) for s in samples]
    active_tokens = sum(lengths[i] for i in active)
    tally = _Tally("loss", *names, "tokens", "drift", "drift_tokens")
    model = pair.train_module
    model.train()
    fresh = old_logps_pass(pair, accelerator, samples, steps, cfg, temperature) if recompute else None
    if fresh is not None:
        _tally_drift(tally, samples, fresh)
    grad_norms = []
    for first, step in zip([True] + [False] * len(steps), steps):
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
                if first and fresh is None:  # the policy has not moved yet: drift for free
                    _tally_drift(tally, batch, logps)
                if on_policy:
                    old = logps.detach()
                else:
                    old = _pad_rows([fresh[i] if fresh is not None else s.old_logps for i, s in zip(idx, batch)], logps)
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
            "grad_norm": sum(grad_norms) / len(grad_norms), "steps": float(len(steps)), **_drift_metric(sums)}


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


# --------------------------------------------------------------------------------------------
# RLOO and KTO live in their own modules; importable from here as before
# --------------------------------------------------------------------------------------------

_MOVED = {"rloo_update": "rloo", "kto_update": "kto", "kto_kl_partners": "kto"}


def __getattr__(name: str):
    """``rloo_update`` (:mod:`rlhf_workbench.rloo`), ``kto_update`` and ``kto_kl_partners``
    (:mod:`rlhf_workbench.kto`), imported on first use (those modules import this one)."""
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f".{_MOVED[name]}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
