"""RLOO: REINFORCE leave-one-out (Ahmadian et al. 2024) as TRL's ``RLOOTrainer``, one optimisation
phase per round.

The maths is :func:`~rlhf_workbench.train.losses.rloo_advantages` and
:func:`~rlhf_workbench.train.losses.rloo_loss`; planning, data parallelism, gradient accumulation,
the optimizer steps and the old log-probs (:func:`~rlhf_workbench.train.engine.old_logps_pass`)
are :mod:`rlhf_workbench.train.engine`'s (read its module docstring). This module computes the
advantages over the batch's :class:`~rlhf_workbench.train.samples.SampleGroup` objects and each
micro-batch's loss.
"""

from __future__ import annotations

import torch

from rlhf_workbench.config import RunConfig
from rlhf_workbench.model.loading import PolicyPair
from rlhf_workbench.train.engine import (
    MicroBatch,
    Phase,
    Step,
    all_sum,
    drift_metric,
    forward_logps,
    old_logps_pass,
    policy_and_old_logps,
    plan,
    recompute_old_logps,
    require_old_logps,
    sharded_reference,
    split,
    tally_drift,
)
from rlhf_workbench.train.losses import rloo_advantages, rloo_loss
from rlhf_workbench.train.samples import Sample, SampleGroup, as_groups, flatten, group_size

NAMES = ("clip_ratio", "clip_ratio/low_mean", "clip_ratio/high_mean")


def sequence_kl(pair: PolicyPair, accelerator, samples: list[Sample], cfg: RunConfig,
                recompute: bool) -> torch.Tensor:
    """``[B]`` float32 summed k1 log-ratios ``kl_i = Σ_t (old_logps - ref_logps)`` of every sample
    (CPU), each process computing its contiguous shard and one all-reduce gathering them; the old
    log-probs are the policy's in the reference pass's micro-batches when ``recompute``, else the
    recorded ones. Log-probs at the rollout temperature."""
    n, temperature = len(samples), cfg.rollout.temperature
    shards = split(list(range(n)), accelerator.num_processes)
    ref = sharded_reference(pair, accelerator, samples, shards, cfg, temperature)
    # the policy's in the same micro-batches as the reference's
    pol = old_logps_pass(pair, accelerator, samples, [Step(list(range(n)), shards)], cfg, temperature) \
        if recompute else None
    local = torch.zeros(n, dtype=torch.float64, device=accelerator.device)
    for i, r in ref.items():
        old = pol[i] if pol is not None else torch.tensor(samples[i].old_logps, dtype=torch.float64)
        local[i] = (old.double().to(r.device) - r.double()).sum()
    return all_sum(accelerator, local).float().cpu()


def _micro_loss(pair: PolicyPair, samples: list[Sample], mb: MicroBatch, advantages: list[float], cfg: RunConfig,
                on_policy: bool, fresh, phase: Phase):
    """``(loss, stats)`` of one micro-batch (:func:`~rlhf_workbench.train.losses.rloo_loss`)."""
    idx = mb.items
    _, logps, cmask, old = policy_and_old_logps(pair, samples, mb, cfg, on_policy, fresh, phase)
    adv = torch.tensor([advantages[i] for i in idx], dtype=logps.dtype, device=logps.device)
    return rloo_loss(logps, old, adv, cmask, epsilon=cfg.rloo.epsilon, epsilon_high=cfg.rloo.epsilon_high)


def rloo_update(pair: PolicyPair, optimizer, accelerator, batch: list[SampleGroup] | list[Sample],
                cfg: RunConfig) -> dict[str, float]:
    """REINFORCE leave-one-out (Ahmadian et al. 2024) as TRL 1.16's ``RLOOTrainer``, on one rollout
    batch of groups of ``K`` completions per prompt.

    1. With ``β = cfg.rloo.beta != 0``, :func:`sequence_kl` gives each completion's summed k1
       log-ratio (old log-probs recomputed when
       :func:`~rlhf_workbench.train.engine.recompute_old_logps`: an unchanged policy then has a KL
       of exactly 0; else those recorded at rollout).
    2. Advantages over the global batch: :func:`~rlhf_workbench.train.losses.rloo_advantages` of the
       ``Sample.reward`` values (clamped to ``reward_clip_range``, minus ``β kl_i``, leave-one-out
       baseline within each group, optional batch-wide normalisation), before any sharding.
    3. ``cfg.optim.steps_per_round`` steps of :func:`~rlhf_workbench.train.losses.rloo_loss` (clipped
       sequence-level ratio against the old log-probs, ``ε = epsilon``/``epsilon_high``; when
       recomputed these are the detached training log-probs for one step, else those of
       :func:`~rlhf_workbench.train.engine.old_logps_pass`, so the first step's ratio is exactly 1;
       otherwise the recorded ones), mean over sequences. Completions with an advantage of
       exactly 0 have no loss and no gradient and are skipped; the normaliser still counts them
       (``n_batch · n_step / n_active`` sequences per step), so the objective is the mean over the
       whole batch. When every advantage is 0 no step is taken.

    Args:
        batch: the global batch, identical on every process: :class:`SampleGroup` objects of equal
            size, or their samples as contiguous groups of ``K = cfg.rollout.num_generations``;
            with ``reward`` and ``old_logps`` (per completion token, at the rollout temperature;
            optional when recomputed) set.

    Returns:
        ``loss`` (mean over steps of the step objective), ``clip_ratio``, ``clip_ratio/low_mean``,
        ``clip_ratio/high_mean`` (fractions of the trained sequences), ``grad_norm`` (mean over
        steps), ``steps``; with β != 0 also ``kl`` (TRL: ``Σ_i kl_i`` / completion tokens of the
        batch, nats per token); when the trained completions carry rollout log-probs,
        ``rollout_logp_diff`` (as :func:`~rlhf_workbench.train.grpo.grpo_update`'s). Only
        ``{"steps": 0.0}`` for an empty batch.

    Raises:
        ValueError: a flat batch that is not a multiple of K, groups of different sizes, or a
            sample lacking ``old_logps`` of the right length (when recomputed, only a wrong length).
    """
    rc = cfg.rloo
    groups = as_groups(batch, cfg.rollout.num_generations, "rloo_update")
    samples = flatten(groups)
    if not samples:
        return {"steps": 0.0}
    K = group_size(groups, "rloo_update")
    recompute = recompute_old_logps(cfg)
    require_old_logps(samples, range(len(samples)), "rloo_update", optional=recompute)
    n = len(samples)
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
    phase = Phase.for_policy(pair, optimizer, accelerator, cfg, "loss", *NAMES, "sequences", "drift", "drift_tokens")
    kl, extra = None, {}
    if rc.beta != 0.0:
        kl = sequence_kl(pair, accelerator, samples, cfg, recompute)
        extra["kl"] = kl.sum().item() / max(1, sum(len(s.token_ids) for s in samples))
    advantages = rloo_advantages(rewards, K, kl, rc.beta, rc.normalize_advantages, rc.reward_clip_range).tolist()
    active = [i for i in range(n) if advantages[i] != 0.0]
    if not active:
        return {"loss": 0.0, **dict.fromkeys(NAMES, 0.0), "grad_norm": 0.0, "steps": 0.0, **extra}
    steps = plan(active, cfg.optim.steps_per_round, accelerator.num_processes)
    on_policy = recompute and len(steps) == 1  # the detached training log-probs are the recomputed ones
    fresh = old_logps_pass(pair, accelerator, samples, steps, cfg, cfg.rollout.temperature) \
        if recompute and not on_policy else None
    if fresh is not None:
        tally_drift(phase.tally, samples, fresh)

    def pad_forward(idx: list[int]) -> torch.Tensor:
        return forward_logps(pair.train_module, [samples[i] for i in idx], pair.tokenizer.pad_token_id,
                             cfg.rollout.temperature, cfg.model.mixed_precision, accelerator.device)[0].sum()

    for mb in phase.micro_steps(steps, cfg.optim.micro_batch_size, pad_forward):
        loss, stats = _micro_loss(pair, samples, mb, advantages, cfg, on_policy, fresh, phase)
        part = loss * len(mb.items) / (n * len(mb.step.items) / len(active))
        phase.backward(part)
        phase.tally.add("loss", part.item())
        for k in NAMES:
            phase.tally.add(k, stats[k].item() * len(mb.items))
        phase.tally.add("sequences", len(mb.items))
    sums = phase.reduce()
    return {"loss": sums["loss"] / len(steps), **{k: sums[k] / sums["sequences"] for k in NAMES},
            "grad_norm": phase.grad_norm, "steps": float(len(steps)), **extra, **drift_metric(sums)}
