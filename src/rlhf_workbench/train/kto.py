"""KTO: Kahneman-Tversky optimisation (Ethayarajh et al. 2024) on unpaired desirable / undesirable
traces, one optimisation phase per round.

The maths is :func:`~rlhf_workbench.train.losses.kto_loss`; planning, data parallelism, gradient
accumulation and the optimizer steps are :mod:`rlhf_workbench.train.engine`'s (read its module
docstring). This module pairs each trace with a mismatched completion for the reference point
``z0``, estimates ``z0`` before each step and computes each micro-batch's loss.
"""

from __future__ import annotations

import torch

from rlhf_workbench.config import RunConfig
from rlhf_workbench.model.loading import PolicyPair
from rlhf_workbench.train.engine import Phase, Step, all_sum, forward_logps, micro_batches, plan, rank_items, sharded_reference
from rlhf_workbench.train.losses import kto_loss
from rlhf_workbench.train.samples import Sample

KEYS = ("loss", "rewards/chosen", "logps/chosen", "n_chosen", "rewards/rejected", "logps/rejected", "n_rejected")


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


@torch.no_grad()
def reference_point(pair: PolicyPair, accelerator, kl_samples: list[Sample], ref_kl: dict[int, torch.Tensor],
                    step: Step, cfg: RunConfig) -> torch.Tensor:
    """KTO's ``z0 = max(0, mean_i [log π(y_j|x_i) - log π_ref(y_j|x_i)])`` over the step's global items,
    under the current policy without gradient (TRL's estimate), through this process's
    micro-batches (padding forwards included) and one all-reduce. Returns a float32 scalar."""
    local = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    pad_id, mp = pair.tokenizer.pad_token_id, cfg.model.mixed_precision
    for micro in micro_batches(step.shards, accelerator.process_index, cfg.optim.micro_batch_size):
        idx = step.items[:1] if micro is None else micro
        logps, cmask = forward_logps(pair.train_module, [kl_samples[i] for i in idx], pad_id, 1.0, mp, accelerator.device)
        if micro is None:
            continue
        ratios = (logps * cmask).sum(-1) - torch.stack([ref_kl[i].sum() for i in idx])
        local += torch.stack([ratios.double().sum(), torch.tensor(float(len(idx)), dtype=torch.float64,
                                                                  device=local.device)])
    total = all_sum(accelerator, local)
    return (total[0] / total[1]).clamp(min=0).float()


def _metrics(sums: dict[str, float], n: int, z0s: list[float]) -> dict[str, float]:
    """The phase's metrics from the reduced sums (see :func:`kto_update`), without ``grad_norm``/``steps``."""
    out = {"loss": sums["loss"] / n, "kl": sum(z0s) / len(z0s)}
    for kind in ("chosen", "rejected"):
        if sums[f"n_{kind}"]:
            out[f"rewards/{kind}"] = sums[f"rewards/{kind}"] / sums[f"n_{kind}"]
            out[f"logps/{kind}"] = sums[f"logps/{kind}"] / sums[f"n_{kind}"]
    if sums["n_chosen"] and sums["n_rejected"]:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


def kto_update(pair: PolicyPair, optimizer, accelerator, samples: list[Sample], cfg: RunConfig) -> dict[str, float]:
    """KTO (:func:`~rlhf_workbench.train.losses.kto_loss`, Ethayarajh et al. 2024 eq. 8) on unpaired
    traces labelled desirable (``Sample.label`` True: verified-correct and top-ranked) or
    undesirable (False: wrong or flagged), plus the thumbs up / down from the playground and
    ``rlhf serve-model --run`` not yet used (:mod:`rlhf_workbench.feedback.thumbs`, with ``feedback.thumbs``).

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
    world = accelerator.num_processes
    pad_id, mp = pair.tokenizer.pad_token_id, cfg.model.mixed_precision
    kl_samples = [Sample(s.prompt_ids, samples[j].token_ids) for s, j in zip(samples, kto_kl_partners(samples))]
    steps = plan(range(len(samples)), cfg.optim.steps_per_round, world)
    mine = rank_items(steps, world)
    ref = sharded_reference(pair, accelerator, samples, mine, cfg, 1.0)
    ref_kl = sharded_reference(pair, accelerator, kl_samples, mine, cfg, 1.0)
    phase = Phase.for_policy(pair, optimizer, accelerator, cfg, *KEYS)

    def forward(idx: list[int]):
        return forward_logps(pair.train_module, [samples[i] for i in idx], pad_id, 1.0, mp, accelerator.device)

    z0s = []
    for step in steps:
        z0 = reference_point(pair, accelerator, kl_samples, ref_kl, step, cfg)
        z0s.append(z0.item())
        for mb in phase.micro_steps([step], cfg.optim.micro_batch_size, lambda idx: forward(idx)[0].sum()):
            logps, cmask = forward(mb.items)
            seq = (logps * cmask).sum(-1)
            labels = torch.tensor([bool(samples[i].label) for i in mb.items], device=seq.device)
            loss, stats = kto_loss(seq, torch.stack([ref[i].sum() for i in mb.items]), labels, z0, beta=k.beta,
                                   desirable_weight=k.desirable_weight, undesirable_weight=k.undesirable_weight)
            phase.backward(loss * len(mb.items) / len(step.items))
            phase.tally.add("loss", loss.item() * len(mb.items))
            for name in ("rewards/chosen", "logps/chosen", "rewards/rejected", "logps/rejected"):
                phase.tally.add(name, stats[name].sum().item())
            phase.tally.add("n_chosen", stats["rewards/chosen"].numel())
            phase.tally.add("n_rejected", stats["rewards/rejected"].numel())
    return {**_metrics(phase.reduce(), len(samples), z0s), "grad_norm": phase.grad_norm, "steps": float(len(steps))}
