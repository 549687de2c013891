"""GRPO (Shao et al. 2024): group-relative advantages and the clipped objective with a k3 KL
penalty, one optimisation phase per round.

The maths is :func:`~rlhf_workbench.train.losses.group_advantages` and
:func:`~rlhf_workbench.train.losses.grpo_loss`; planning, data parallelism, gradient accumulation,
the optimizer steps and the old log-probs (:func:`~rlhf_workbench.train.engine.old_logps_pass`)
are :mod:`rlhf_workbench.train.engine`'s (read its module docstring). This module sets the
advantages of each :class:`~rlhf_workbench.train.samples.SampleGroup` and computes each
micro-batch's loss.
"""

from __future__ import annotations

import torch

from rlhf_workbench.config import RunConfig
from rlhf_workbench.model.loading import PolicyPair
from rlhf_workbench.train.engine import (
    MicroBatch,
    Phase,
    drift_metric,
    forward_logps,
    old_logps_pass,
    pad_rows,
    policy_and_old_logps,
    plan,
    rank_items,
    recompute_old_logps,
    require_old_logps,
    sharded_reference,
    tally_drift,
)
from rlhf_workbench.train.losses import group_advantages, grpo_loss
from rlhf_workbench.train.samples import Sample, SampleGroup, flatten, group_size

NAMES = ("kl", "clip_ratio", "clip_ratio/low_mean", "clip_ratio/high_mean")


def set_group_advantages(groups: list[SampleGroup], scale: str) -> None:
    """Set ``Sample.advantage`` of every member of ``groups`` to its group-relative advantage
    (:func:`~rlhf_workbench.train.losses.group_advantages` of the groups' rewards, ``scale``:
    ``grpo.scale_rewards``), over the whole batch of groups.

    Raises:
        ValueError: groups of different sizes.
    """
    samples = flatten(groups)
    if not samples:
        return
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
    for s, a in zip(samples, group_advantages(rewards, group_size(groups, "grpo"), scale).tolist()):
        s.advantage = a


def _normaliser(loss_type: str, lengths: list[int], items: list[int], n_batch: int, active: list[int],
                active_tokens: int) -> float:
    """A step's share of the whole batch's normaliser (see :func:`grpo_update`)."""
    if loss_type == "dapo":
        return max(1.0, sum(lengths) * sum(lengths[i] for i in items) / max(1, active_tokens))
    return n_batch * len(items) / len(active)


def _micro_loss(pair: PolicyPair, samples: list[Sample], mb: MicroBatch, cfg: RunConfig, loss_type: str,
                on_policy: bool, fresh, ref, phase: Phase) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """``(loss, stats, completion mask)`` of one micro-batch (:func:`~rlhf_workbench.train.losses.grpo_loss`
    with ``num_items`` 1: the caller divides by the step's normaliser)."""
    g, idx = cfg.grpo, mb.items
    batch, logps, cmask, old = policy_and_old_logps(pair, samples, mb, cfg, on_policy, fresh, phase)
    ref_t = None if ref is None else pad_rows([ref[i] for i in idx], logps)
    adv = torch.tensor([s.advantage for s in batch], dtype=logps.dtype, device=logps.device)
    loss, stats = grpo_loss(
        logps, old, ref_t, adv, cmask, beta=g.beta, epsilon=g.epsilon, epsilon_high=g.epsilon_high,
        loss_type=loss_type, max_completion_length=cfg.rollout.max_new_tokens, num_items=1.0,
    )
    return loss, stats, cmask


def grpo_update(pair: PolicyPair, optimizer, accelerator, batch: list[SampleGroup] | list[Sample],
                cfg: RunConfig) -> dict[str, float]:
    """GRPO (:func:`~rlhf_workbench.train.losses.grpo_loss`, Shao et al. 2024 eq. 3) on one rollout
    batch whose advantages are already set (group-relative, over the global batch:
    :func:`set_group_advantages`).

    Log-probs are at the rollout temperature. Old log-probs: with one optimizer step per batch
    (``steps_per_round`` 1, or fewer active completions than steps) the policy cannot move during
    the phase, so the old log-probs are the detached current ones (ratio exactly 1; TRL does the
    same when ``num_iterations = 1``); with several steps they are recomputed before the first
    step by :func:`~rlhf_workbench.train.engine.old_logps_pass` (``optim.old_logps: recompute``, or
    ``auto``, the default, under bf16: first-step ratio exactly 1) or the ones recorded at rollout
    (``rollout``, or ``auto`` in fp32).
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
        batch: the global batch, identical on every process: groups, or their samples in order,
            with ``advantage`` and ``old_logps`` (one per completion token) set.

    Returns:
        ``loss`` (mean over steps of the step objective), token means over the trained completions
        of ``kl`` (k3 to the reference; 0 when β = 0), ``clip_ratio``, ``clip_ratio/low_mean``,
        ``clip_ratio/high_mean``; ``grad_norm`` (mean over steps), ``steps``; and, when the
        trained completions carry rollout log-probs, ``rollout_logp_diff`` (mean
        ``|current - recorded|`` before any step, nats per token,
        :func:`~rlhf_workbench.train.engine.rollout_drift`: over the recomputed completions, else over
        the first step's from its own forward). When every advantage is 0 and β = 0 the objective
        is exactly 0, no step is taken and all metrics are 0.

    Raises:
        ValueError: several steps and an active sample with ``old_logps`` of the wrong length,
            or without any (``optim.old_logps: rollout``).
    """
    samples = flatten(batch) if batch and isinstance(batch[0], SampleGroup) else list(batch)
    g = cfg.grpo
    active = [i for i, s in enumerate(samples) if g.beta > 0 or s.advantage != 0.0]
    if not active:
        return {"loss": 0.0, **dict.fromkeys(NAMES, 0.0), "grad_norm": 0.0, "steps": 0.0}
    world, temperature = accelerator.num_processes, cfg.rollout.temperature
    loss_type = "dapo" if g.loss_type in ("bnpo", "dapo") else g.loss_type
    steps = plan(active, cfg.optim.steps_per_round, world)
    on_policy = len(steps) == 1
    recompute = not on_policy and recompute_old_logps(cfg)
    if not on_policy:
        require_old_logps(samples, active, "grpo_update", optional=recompute)
    ref = sharded_reference(pair, accelerator, samples, rank_items(steps, world), cfg, temperature) if g.beta > 0 else None
    lengths = [len(s.token_ids) for s in samples]
    active_tokens = sum(lengths[i] for i in active)
    phase = Phase.for_policy(pair, optimizer, accelerator, cfg, "loss", *NAMES, "tokens", "drift", "drift_tokens")
    fresh = old_logps_pass(pair, accelerator, samples, steps, cfg, temperature) if recompute else None
    if fresh is not None:
        tally_drift(phase.tally, samples, fresh)

    def pad_forward(idx: list[int]) -> torch.Tensor:
        return forward_logps(pair.train_module, [samples[i] for i in idx], pair.tokenizer.pad_token_id, temperature,
                             cfg.model.mixed_precision, accelerator.device)[0].sum()

    for mb in phase.micro_steps(steps, cfg.optim.micro_batch_size, pad_forward):
        norm = _normaliser(loss_type, lengths, mb.step.items, len(samples), active, active_tokens)
        loss, stats, cmask = _micro_loss(pair, samples, mb, cfg, loss_type, on_policy, fresh, ref, phase)
        # As a sum over the micro-batch: Σ_i mean_t ℓ (grpo), Σ ℓ / max_len (dr_grpo), Σ ℓ (dapo).
        part = (loss if loss_type == "dapo" else loss * len(mb.items)) / norm
        phase.backward(part)
        n_tok = float(cmask.sum())
        phase.tally.add("loss", part.item())
        for k in NAMES:
            phase.tally.add(k, stats[k].item() * n_tok)
        phase.tally.add("tokens", n_tok)
    sums = phase.reduce()
    tokens = max(1.0, sums["tokens"])
    return {"loss": sums["loss"] / len(steps), **{k: sums[k] / tokens for k in NAMES},
            "grad_norm": phase.grad_norm, "steps": float(len(steps)), **drift_metric(sums)}
