"""DPO (Rafailov et al. 2023) on ``(chosen, rejected)`` pairs, one optimisation phase per round.

The loss is :func:`~rlhf_workbench.train.losses.dpo_loss`; planning, data parallelism, gradient
accumulation and the optimizer steps are :mod:`rlhf_workbench.train.engine`'s (read its module
docstring). This module prepares the pairs and computes each micro-batch's loss.
"""

from __future__ import annotations

import torch

from rlhf_workbench.config import RunConfig
from rlhf_workbench.model.loading import PolicyPair
from rlhf_workbench.train.engine import Phase, forward_logps, plan, rank_items, sharded_reference
from rlhf_workbench.train.losses import dpo_loss
from rlhf_workbench.train.samples import Sample

KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
        "logps/chosen", "logps/rejected")


def dpo_update(pair: PolicyPair, optimizer, accelerator, pairs: list[tuple[Sample, Sample]], cfg: RunConfig) -> dict[str, float]:
    """DPO (:func:`~rlhf_workbench.train.losses.dpo_loss`, Rafailov et al. 2023 eq. 7 and variants) on
    ``(chosen, rejected)`` pairs.

    Reference log-probs are computed once (each process for its own pairs), then
    ``cfg.optim.steps_per_round`` optimizer steps run over near-equal contiguous slices of the
    pairs; each step's loss is the mean over the step's pairs (global count, see the engine's
    module docstring), log-probs summed over completion tokens at temperature 1. A micro-batch
    holds ``optim.micro_batch_size // 2`` pairs.

    Args:
        pairs: the global batch, identical on every process.

    Returns:
        Metrics with TRL's names, means over all pairs of the phase: ``loss``, ``rewards/chosen``,
        ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies`` (β·log-ratios, nats),
        ``logps/chosen``, ``logps/rejected`` (summed log-probs, nats); ``grad_norm`` (mean over
        steps of the global pre-clipping norm) and ``steps``. Only ``{"steps": 0.0}`` without pairs.

    Raises:
        ValueError: from :func:`~rlhf_workbench.train.losses.dpo_loss` (bad ``cfg.dpo``).
    """
    if not pairs:
        return {"steps": 0.0}
    world = accelerator.num_processes
    pad_id, mp = pair.tokenizer.pad_token_id, cfg.model.mixed_precision
    steps = plan(range(len(pairs)), cfg.optim.steps_per_round, world)
    flat = [s for p in pairs for s in p]
    ref = sharded_reference(pair, accelerator, flat, [[2 * i + k for i in items for k in (0, 1)]
                                                      for items in rank_items(steps, world)], cfg, 1.0)
    phase = Phase.for_policy(pair, optimizer, accelerator, cfg, *KEYS)

    def forward(idx: list[int]):
        batch = [pairs[i][0] for i in idx] + [pairs[i][1] for i in idx]
        return forward_logps(pair.train_module, batch, pad_id, 1.0, mp, accelerator.device)

    per_micro = max(1, cfg.optim.micro_batch_size // 2)
    for mb in phase.micro_steps(steps, per_micro, lambda idx: forward(idx)[0].sum()):
        idx, n = mb.items, len(mb.items)
        logps, cmask = forward(idx)
        seq = (logps * cmask).sum(-1)
        lengths = cmask.sum(-1)
        loss, stats = dpo_loss(
            seq[:n], seq[n:], torch.stack([ref[2 * i].sum() for i in idx]),
            torch.stack([ref[2 * i + 1].sum() for i in idx]), beta=cfg.dpo.beta,
            loss_type=cfg.dpo.loss_type, label_smoothing=cfg.dpo.label_smoothing,
            chosen_lengths=lengths[:n], rejected_lengths=lengths[n:],
        )
        phase.backward(loss * n / len(mb.step.items))
        phase.tally.add("loss", loss.item() * n)
        for k, v in stats.items():
            phase.tally.add(k, v.sum().item())
        phase.tally.add("logps/chosen", seq[:n].sum().item())
        phase.tally.add("logps/rejected", seq[n:].sum().item())
    sums = phase.reduce()
    return {**{k: sums[k] / len(pairs) for k in KEYS}, "grad_norm": phase.grad_norm, "steps": float(len(steps))}
