"""Rejection-sampling fine-tuning (RAFT, Dong et al. 2023; RFT, Yuan et al. 2023): maximum
likelihood on verified-correct traces, one optimisation phase per round.

Planning, data parallelism, gradient accumulation and the optimizer steps are
:mod:`rlhf_workbench.train.engine`'s (read its module docstring); this module computes each
micro-batch's token negative log-likelihood.
"""

from __future__ import annotations

import torch

from rlhf_workbench.config import RunConfig
from rlhf_workbench.model.loading import PolicyPair
from rlhf_workbench.model.logprobs import packed_logps
from rlhf_workbench.model.rollout import autocast
from rlhf_workbench.train.engine import Phase, plan
from rlhf_workbench.train.samples import Sample


def forward_sft(model, samples: list[Sample], pad_id: int, mixed_precision: str, device: torch.device):
    """Like :func:`~rlhf_workbench.train.engine.forward_logps` at temperature 1, plus whether each
    completion token is the model's argmax prediction. Returns ``(logps [B, T], correct [B, T]
    bool, cmask [B, T])``."""
    with autocast(mixed_precision):
        logps, cmask, correct = packed_logps(model, [s.prompt_ids for s in samples],
                                             [s.token_ids for s in samples], pad_id, 1.0, device, return_argmax=True)
    return logps, correct, cmask


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
    pad_id, mp = pair.tokenizer.pad_token_id, cfg.model.mixed_precision
    lrs = [group["lr"] for group in optimizer.param_groups]
    if sc.lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = sc.lr
    phase = Phase.for_policy(pair, optimizer, accelerator, cfg, "nll", "correct", "tokens")

    def forward(idx: list[int]):
        return forward_sft(pair.train_module, [samples[i] for i in idx], pad_id, mp, accelerator.device)

    steps = [st for _ in range(sc.epochs) for st in plan(items, cfg.optim.steps_per_round, accelerator.num_processes)]
    try:
        for mb in phase.micro_steps(steps, cfg.optim.micro_batch_size, lambda idx: forward(idx)[0].sum()):
            logps, correct, cmask = forward(mb.items)
            nll = -(logps * cmask).sum()
            phase.backward(nll / float(sum(len(samples[i].token_ids) for i in mb.step.items)))
            phase.tally.add("nll", nll.item())
            phase.tally.add("correct", (correct & cmask.bool()).sum().item())
            phase.tally.add("tokens", cmask.sum().item())
    finally:
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
    sums = phase.reduce()
    return {"loss": sums["nll"] / sums["tokens"], "mean_token_accuracy": sums["correct"] / sums["tokens"],
            "num_tokens": sums["tokens"], "grad_norm": phase.grad_norm, "steps": float(len(phase.grad_norms))}
