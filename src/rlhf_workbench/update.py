"""Policy updates with real gradients: one DPO or GRPO optimisation phase per round.

The maths lives in :mod:`rlhf_workbench.losses`; this module batches sequences, runs the
forward/backward passes through ``accelerate`` (autocast, DDP when launched with
``accelerate launch``), accumulates gradients over micro-batches, clips and steps AdamW.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import RunConfig
from .logprobs import completion_logps
from .losses import dpo_loss, grpo_loss
from .models import PolicyPair
from .rollout import autocast, pad_batch


@dataclass
class Sample:
    """A prompt and one completion as token ids, with what the losses need.

    ``old_logps`` are the sampling policy's per-token log-probs recorded at rollout
    (temperature-scaled); ``advantage`` is used by GRPO and RLOO; ``reward`` is the
    sequence-level score (PPO's score, RLOO's reward); ``label`` is KTO's
    desirable (True) / undesirable (False) tag.
    """

    prompt_ids: list[int]
    token_ids: list[int]
    old_logps: list[float] | None = None
    advantage: float = 0.0
    reward: float = 0.0
    label: bool | None = None


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _forward_logps(model, samples: list[Sample], pad_id: int, temperature: float, mixed_precision: str):
    ids, mask, cmask = pad_batch([s.prompt_ids for s in samples], [s.token_ids for s in samples], pad_id)
    with autocast(mixed_precision):
        logps = completion_logps(model, ids, mask, cmask.shape[1], temperature)
    return logps, cmask


def _step(pair: PolicyPair, optimizer, accelerator, cfg: RunConfig) -> float:
    grad_norm = accelerator.clip_grad_norm_(pair.train_module.parameters(), cfg.optim.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


@torch.no_grad()
def reference_logps(pair: PolicyPair, samples: list[Sample], cfg: RunConfig, temperature: float = 1.0) -> list[torch.Tensor]:
    """Per-token reference log-probs for each sample (computed once, no gradient).

    Returns:
        list of ``[T_i]`` float32 tensors, one per sample.
    """
    out = []
    pad_id = pair.tokenizer.pad_token_id
    with pair.reference_context():
        for chunk in _chunks(samples, cfg.optim.micro_batch_size):
            logps, cmask = _forward_logps(pair.ref_model, chunk, pad_id, temperature, cfg.model.mixed_precision)
            out.extend(logps[i, : len(s.token_ids)].float() for i, s in enumerate(chunk))
    return out


def dpo_update(pair: PolicyPair, optimizer, accelerator, pairs: list[tuple[Sample, Sample]], cfg: RunConfig) -> dict[str, float]:
    """DPO on ``(chosen, rejected)`` pairs: reference log-probs precomputed once, then
    ``cfg.optim.steps_per_round`` optimizer steps over equal slices of the pairs.

    Returns:
        Mean metrics over the phase with TRL's names: ``loss``, ``rewards/chosen``,
        ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``,
        ``logps/rejected``, ``grad_norm``, ``steps`` (optimizer steps; 0 when there are no pairs).
    """
    if not pairs:
        return {"steps": 0.0}
    pad_id = pair.tokenizer.pad_token_id
    flat = [s for p in pairs for s in p]
    ref = reference_logps(pair, flat, cfg)
    ref_sums = torch.stack([r.sum() for r in ref]).view(-1, 2)
    sums: dict[str, list[float]] = {}
    pair.train_module.train()
    n_steps = min(cfg.optim.steps_per_round, len(pairs))
    step_size = -(-len(pairs) // n_steps)
    index = list(range(len(pairs)))
    for step_idx in _chunks(index, step_size):
        for micro in _chunks(step_idx, max(1, cfg.optim.micro_batch_size // 2)):
            samples = [pairs[i][0] for i in micro] + [pairs[i][1] for i in micro]
            logps, cmask = _forward_logps(pair.train_module, samples, pad_id, 1.0, cfg.model.mixed_precision)
            seq = (logps * cmask).sum(-1)
            lengths = cmask.sum(-1)
            n = len(micro)
            loss, stats = dpo_loss(
                seq[:n], seq[n:], ref_sums[micro, 0], ref_sums[micro, 1], beta=cfg.dpo.beta,
                loss_type=cfg.dpo.loss_type, label_smoothing=cfg.dpo.label_smoothing,
                chosen_lengths=lengths[:n], rejected_lengths=lengths[n:],
            )
            accelerator.backward(loss * n / len(step_idx))
            stats = {k: v.mean().item() for k, v in stats.items()}
            stats.update({"loss": loss.item(), "logps/chosen": seq[:n].mean().item(), "logps/rejected": seq[n:].mean().item()})
            for k, v in stats.items():
                sums.setdefault(k, []).append(v * n)
        sums.setdefault("grad_norm", []).append(_step(pair, optimizer, accelerator, cfg) * len(pairs) / n_steps)
    return {**{k: sum(v) / len(pairs) for k, v in sums.items()}, "steps": float(n_steps)}


def grpo_update(pair: PolicyPair, optimizer, accelerator, samples: list[Sample], cfg: RunConfig) -> dict[str, float]:
    """GRPO on one rollout batch whose advantages are already set.

    Completions with zero advantage contribute no policy gradient; when ``β = 0`` they are
    skipped entirely, with the loss normalisers still counting them so the objective is
    exactly the one over the full batch (TRL's ``grpo``/``dr_grpo`` normalisation).
    Old log-probs are the ones recorded at rollout (no recomputation).

    Returns:
        Mean metrics: ``loss``, ``kl``, ``clip_ratio``, ``grad_norm``, ``steps`` (optimizer steps
        taken). When every advantage is 0 and β = 0 the objective is exactly 0 and no step is taken.
    """
    g = cfg.grpo
    pad_id = pair.tokenizer.pad_token_id
    temperature = cfg.rollout.temperature
    total = len(samples)
    active = [s for s in samples if g.beta > 0 or s.advantage != 0.0]
    if not active:
        return {"loss": 0.0, "kl": 0.0, "clip_ratio": 0.0, "grad_norm": 0.0, "steps": 0.0}
    ref = reference_logps(pair, active, cfg, temperature) if g.beta > 0 else None
    max_len = cfg.rollout.max_new_tokens
    pair.train_module.train()
    n_steps = min(cfg.optim.steps_per_round, len(active))
    step_size = -(-len(active) // n_steps)
    sums: dict[str, float] = {}
    order = list(range(len(active)))
    for step_idx in _chunks(order, step_size):
        step_total = total * len(step_idx) / len(active)  # the share of the full batch this step stands for
        num_items = sum(len(active[i].token_ids) for i in step_idx)
        for micro in _chunks(step_idx, cfg.optim.micro_batch_size):
            batch = [active[i] for i in micro]
            logps, cmask = _forward_logps(pair.train_module, batch, pad_id, temperature, cfg.model.mixed_precision)
            T = cmask.shape[1]
            old = torch.zeros_like(logps)
            for j, s in enumerate(batch):
                old[j, : len(s.old_logps)] = torch.tensor(s.old_logps)
            ref_t = None
            if ref is not None:
                ref_t = torch.zeros_like(logps)
                for j, i in enumerate(micro):
                    ref_t[j, : ref[i].numel()] = ref[i]
            adv = torch.tensor([s.advantage for s in batch], dtype=logps.dtype)
            loss_type = "dapo" if g.loss_type in ("bnpo", "dapo") else g.loss_type
            loss, stats = grpo_loss(
                logps, old, ref_t, adv, cmask, beta=g.beta, epsilon=g.epsilon, epsilon_high=g.epsilon_high,
                loss_type=loss_type, max_completion_length=max_len, num_items=num_items,
            )
            weight = 1.0 if loss_type == "dapo" else len(batch) / step_total
            accelerator.backward(loss * weight)
            n_tok = float(cmask.sum())
            sums["loss"] = sums.get("loss", 0.0) + loss.item() * weight
            for k in ("kl", "clip_ratio"):
                sums[k] = sums.get(k, 0.0) + stats[k].item() * n_tok
            sums["_tokens"] = sums.get("_tokens", 0.0) + n_tok
            del T
        sums["grad_norm"] = sums.get("grad_norm", 0.0) + _step(pair, optimizer, accelerator, cfg)
    n_tok = sums.pop("_tokens")
    return {
        "loss": sums["loss"] / n_steps,
        "kl": sums["kl"] / n_tok,
        "clip_ratio": sums["clip_ratio"] / n_tok,
        "grad_norm": sums["grad_norm"] / n_steps,
        "steps": float(n_steps),
    }
