"""RLOO: REINFORCE leave-one-out (Ahmadian et al. 2024) as TRL's ``RLOOTrainer``, one optimisation
phase per round.

The maths is :func:`~rlhf_workbench.losses.rloo_advantages` and
:func:`~rlhf_workbench.losses.rloo_loss`; batching, data parallelism, gradient accumulation and
the old log-probs (:func:`~rlhf_workbench.update.old_logps_pass`) follow
:mod:`rlhf_workbench.update` (read its module docstring), whose helpers this module uses.
``rlhf_workbench.update.rloo_update`` still names the same function.
"""

from __future__ import annotations

import torch

from .config import RunConfig
from .losses import rloo_advantages, rloo_loss
from .models import PolicyPair
from .update import (
    Sample,
    _all_sum,
    _backward,
    _drift_metric,
    _forward_logps,
    _micro_batches,
    _pad_rows,
    _plan,
    _require_old_logps,
    _sharded_reference,
    _split,
    _Step,
    _step,
    _sync_context,
    _Tally,
    _tally_drift,
    old_logps_pass,
    recompute_old_logps,
)


def rloo_update(pair: PolicyPair, optimizer, accelerator, samples: list[Sample], cfg: RunConfig) -> dict[str, float]:
    """REINFORCE leave-one-out (Ahmadian et al. 2024) as TRL 1.16's ``RLOOTrainer``, on one rollout
    batch of contiguous groups of ``K = cfg.rollout.num_generations`` completions per prompt.

    1. With ``β = cfg.rloo.beta != 0``, reference log-probs at the rollout temperature (sharded
       over processes) give each completion's summed k1 log-ratio
       ``kl_i = Σ_t (old_logps - ref_logps)``, all-reduced so every process holds all of them;
       ``old_logps`` are the policy's recomputed in the reference pass's micro-batches (no
       gradient, when :func:`~rlhf_workbench.update.recompute_old_logps`: an unchanged policy
       then has a KL of exactly 0) or those recorded at rollout.
    2. Advantages over the global batch: :func:`~rlhf_workbench.losses.rloo_advantages` of the
       ``Sample.reward`` values (clamped to ``reward_clip_range``, minus ``β kl_i``, leave-one-out
       baseline within each group, optional batch-wide normalisation), before any sharding.
    3. ``cfg.optim.steps_per_round`` steps of :func:`~rlhf_workbench.losses.rloo_loss` (clipped
       sequence-level ratio against the old log-probs, ``ε = epsilon``/``epsilon_high``; when
       recomputed these are the detached training log-probs for one step, else those of
       :func:`~rlhf_workbench.update.old_logps_pass`, so the first step's ratio is exactly 1;
       otherwise the recorded ones), mean over sequences. Completions with an advantage of
       exactly 0 have no loss and no gradient and are skipped; the normaliser still counts them (``n_batch · n_step / n_active``
       sequences per step), so the objective is the mean over the whole batch. When every
       advantage is 0 no step is taken.

    Args:
        samples: the global batch, identical on every process, with ``reward`` and ``old_logps``
            (per completion token, at the rollout temperature; optional when recomputed) set.

    Returns:
        ``loss`` (mean over steps of the step objective), ``clip_ratio``, ``clip_ratio/low_mean``,
        ``clip_ratio/high_mean`` (fractions of the trained sequences), ``grad_norm`` (mean over
        steps), ``steps``; with β != 0 also ``kl`` (TRL: ``Σ_i kl_i`` / completion tokens of the
        batch, nats per token); when the trained completions carry rollout log-probs,
        ``rollout_logp_diff`` (as :func:`~rlhf_workbench.update.grpo_update`'s). Only ``{"steps": 0.0}`` for an empty batch.

    Raises:
        ValueError: the batch is not a multiple of K, or a sample lacks ``old_logps`` of the right
            length (when recomputed, only a wrong length).
    """
    rc, K = cfg.rloo, cfg.rollout.num_generations
    if not samples:
        return {"steps": 0.0}
    if len(samples) % K:
        raise ValueError(f"rloo_update: {len(samples)} samples is not a multiple of num_generations K={K}")
    recompute = recompute_old_logps(cfg)
    _require_old_logps(samples, range(len(samples)), "rloo_update", optional=recompute)
    rank, world = accelerator.process_index, accelerator.num_processes
    pad_id, mp, temperature = pair.tokenizer.pad_token_id, cfg.model.mixed_precision, cfg.rollout.temperature
    n = len(samples)
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
    model = pair.train_module
    model.train()
    kl, extra = None, {}
    if rc.beta != 0.0:
        shards = _split(list(range(n)), world)
        ref = _sharded_reference(pair, accelerator, samples, shards, cfg, temperature)
        # the policy's in the same micro-batches as the reference's
        pol = old_logps_pass(pair, accelerator, samples, [_Step(list(range(n)), shards)], cfg, temperature) \
            if recompute else None
        local = torch.zeros(n, dtype=torch.float64, device=accelerator.device)
        for i, r in ref.items():
            old = pol[i] if pol is not None else torch.tensor(samples[i].old_logps, dtype=torch.float64)
            local[i] = (old.double().to(r.device) - r.double()).sum()
        kl = _all_sum(accelerator, local).float().cpu()
        extra["kl"] = kl.sum().item() / max(1, sum(len(s.token_ids) for s in samples))
    advantages = rloo_advantages(rewards, K, kl, rc.beta, rc.normalize_advantages, rc.reward_clip_range).tolist()
    names = ("clip_ratio", "clip_ratio/low_mean", "clip_ratio/high_mean")
    active = [i for i in range(n) if advantages[i] != 0.0]
    if not active:
        return {"loss": 0.0, **dict.fromkeys(names, 0.0), "grad_norm": 0.0, "steps": 0.0, **extra}
    steps = _plan(active, cfg.optim.steps_per_round, world)
    on_policy = recompute and len(steps) == 1  # the detached training log-probs are the recomputed ones
    fresh = old_logps_pass(pair, accelerator, samples, steps, cfg, temperature) if recompute and not on_policy else None
    tally = _Tally("loss", *names, "sequences", "drift", "drift_tokens")
    if fresh is not None:
        _tally_drift(tally, samples, fresh)
    grad_norms = []
    for first, step in zip([True] + [False] * len(steps), steps):
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
                if first and fresh is None:  # the policy has not moved yet: drift for free
                    _tally_drift(tally, batch, logps)
                if on_policy:
                    old = logps.detach()
                else:
                    old = _pad_rows([fresh[i] if fresh is not None else s.old_logps for i, s in zip(idx, batch)], logps)
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
            "grad_norm": sum(grad_norms) / len(grad_norms), "steps": float(len(steps)), **extra,
            **_drift_metric(sums)}
