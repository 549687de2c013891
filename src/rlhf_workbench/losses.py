"""Preference-optimisation losses as pure functions of tensors.

No model, optimizer or data loading here: each function takes log-probabilities and
returns a loss plus the statistics TRL logs under the same names, so each can be checked
against TRL (the numerical oracle) and against the paper's formula on small examples.

Shapes: ``B`` = number of sequences (pairs for DPO, completions for GRPO), ``T`` = number
of completion tokens (right-padded). Log-probabilities are natural logs (nats).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

DPOLossType = Literal["sigmoid", "hinge", "ipo", "robust"]
GRPOLossType = Literal["grpo", "dr_grpo", "bnpo", "dapo"]


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Direct Preference Optimization loss (Rafailov et al. 2023, eq. 7) and variants.

    With ``h = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)``:

    - ``sigmoid``: ``-log σ(β h)`` (DPO eq. 7); with ``label_smoothing = ε`` this is cDPO,
      ``-(1-ε) log σ(β h) - ε log σ(-β h)``.
    - ``hinge``: ``max(0, 1 - β h)`` (SLiC, Zhao et al. 2023).
    - ``ipo``: ``(h / L - 1/(2β))²`` with ``h`` averaged per completion token
      (Azar et al. 2023, eq. 17; per-token normalisation as in TRL).
    - ``robust``: ``(-(1-ε) log σ(β h) + ε log σ(-β h)) / (1 - 2ε)`` (Chowdhury et al. 2024).

    Args:
        chosen_logps, rejected_logps: ``[B]`` summed completion log-probs under the policy.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` the same under the frozen reference.
        beta: inverse temperature β of the implicit reward ``β log π/π_ref``.
        loss_type: one of ``sigmoid``, ``hinge``, ``ipo``, ``robust``.
        label_smoothing: ε in [0, 0.5), the assumed probability that a label is flipped.
        chosen_lengths, rejected_lengths: ``[B]`` completion token counts, required for ``ipo``.

    Returns:
        ``(loss, stats)``: scalar mean loss, and ``stats`` with TRL's metric names
        ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``
        (``[B]`` tensors, detached; rewards are ``β (logps - ref_logps)`` in nats).

    Raises:
        ValueError: unknown ``loss_type``, ε outside [0, 0.5) for robust, or missing lengths for ipo.
    """
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("dpo_loss: loss_type 'ipo' needs chosen_lengths and rejected_lengths")
        h = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"dpo_loss: label_smoothing must lie in [0, 0.5) for 'robust', got {label_smoothing}")
        losses = (
            -(1 - label_smoothing) * F.logsigmoid(beta * h) + label_smoothing * F.logsigmoid(-beta * h)
        ) / (1 - 2 * label_smoothing)
    else:
        raise ValueError(f"dpo_loss: unknown loss_type {loss_type!r}; expected sigmoid, hinge, ipo or robust")
    chosen_rewards = (beta * chosen_logratios).detach()
    rejected_rewards = (beta * rejected_logratios).detach()
    stats = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
    }
    return losses.mean(), stats


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: Literal["group", "batch", "none"] = "group", eps: float = 1e-4
) -> torch.Tensor:
    """Group-relative advantages (GRPO, Shao et al. 2024, sec. 4.1.2, outcome supervision).

    ``A_i = (r_i - mean(r_group)) / (std(r_group) + eps)``; ``scale="batch"`` divides by the
    std of the whole batch instead, ``scale="none"`` does not divide (Dr. GRPO, Liu et al. 2025).
    The std is the unbiased sample std, as in TRL.

    Args:
        rewards: ``[B]`` one scalar reward per completion, groups contiguous (``B = G * group_size``).
        group_size: completions per prompt (K, TRL's ``num_generations``).
        scale: ``group``, ``batch`` or ``none``.
        eps: added to the std so that a group with equal rewards gets zero advantages.

    Returns:
        ``[B]`` advantages.

    Raises:
        ValueError: ``B`` not a multiple of ``group_size``, or unknown ``scale``.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"group_advantages: {rewards.numel()} rewards is not a multiple of group_size {group_size}")
    grouped = rewards.view(-1, group_size)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1)
    elif scale == "batch":
        std = rewards.std().expand_as(rewards)
    elif scale == "none":
        return advantages
    else:
        raise ValueError(f"group_advantages: unknown scale {scale!r}; expected group, batch or none")
    return advantages / (std + eps)


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: GRPOLossType = "grpo",
    max_completion_length: int | None = None,
    num_items: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped GRPO objective with a k3 KL penalty (Shao et al. 2024, eq. 3 and eq. 4).

    Per token: ``ρ = exp(logps - old_logps)``,
    ``ℓ = -min(ρ A, clip(ρ, 1-ε, 1+ε_high) A) + β KL``, with the k3 estimator
    ``KL = exp(ref - logps) - (ref - logps) - 1`` (Schulman 2020). Aggregation over tokens:

    - ``grpo``: mean over each sequence's tokens, then mean over sequences (eq. 3's 1/|o_i|).
    - ``dr_grpo``: sum over all tokens / (B · max_completion_length) (Liu et al. 2025, no length bias).
    - ``bnpo``: sum over all tokens / number of completion tokens in the batch.
    - ``dapo``: sum over all tokens / ``num_items`` (tokens in the whole generation batch, Yu et al. 2025);
      equals ``bnpo`` when ``num_items`` is None.

    Args:
        logps: ``[B, T]`` per-token log-probs of the sampled tokens under the policy being trained.
        old_logps: ``[B, T]`` the same under the policy that sampled them (recorded at rollout).
        ref_logps: ``[B, T]`` the same under the reference, or None when ``beta == 0``.
        advantages: ``[B]`` one advantage per completion (see :func:`group_advantages`).
        completion_mask: ``[B, T]`` 1 for completion tokens, 0 for padding.
        beta: KL coefficient β.
        epsilon: lower clip range ε; ``epsilon_high`` the upper one (defaults to ε; DAPO's clip-higher).
        loss_type: ``grpo``, ``dr_grpo``, ``bnpo`` or ``dapo``.
        max_completion_length: the ``T`` normaliser of ``dr_grpo`` (defaults to ``logps.shape[1]``).
        num_items: token normaliser of ``dapo``.

    Returns:
        ``(loss, stats)``: scalar loss and detached scalars ``kl`` (mean k3 per token),
        ``clip_ratio`` (fraction of tokens where the clipped term was taken), ``clip_ratio/low_mean``,
        ``clip_ratio/high_mean``.

    Raises:
        ValueError: unknown ``loss_type``, or ``beta > 0`` without ``ref_logps``.
    """
    mask = completion_mask.to(logps.dtype)
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    adv = advantages.unsqueeze(1)
    per_token_loss = -torch.min(ratio * adv, clipped * adv)
    kl = torch.zeros_like(logps)
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("grpo_loss: beta > 0 needs ref_logps")
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        per_token_loss = per_token_loss + beta * kl
    elif ref_logps is not None:
        kl = (torch.exp(ref_logps - logps) - (ref_logps - logps) - 1).detach()
    n_tokens = mask.sum().clamp(min=1.0)
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "dr_grpo":
        max_len = max_completion_length or logps.shape[1]
        loss = (per_token_loss * mask).sum() / (logps.shape[0] * max_len)
    elif loss_type in ("bnpo", "dapo"):
        denom = n_tokens if (loss_type == "bnpo" or num_items is None) else max(float(num_items), 1.0)
        loss = (per_token_loss * mask).sum() / denom
    else:
        raise ValueError(f"grpo_loss: unknown loss_type {loss_type!r}; expected grpo, dr_grpo, bnpo or dapo")
    with torch.no_grad():
        low = ((ratio < 1 - epsilon) & (adv < 0)).to(mask.dtype)
        high = ((ratio > 1 + epsilon_high) & (adv > 0)).to(mask.dtype)
        stats = {
            "kl": (kl.detach() * mask).sum() / n_tokens,
            "clip_ratio/low_mean": (low * mask).sum() / n_tokens,
            "clip_ratio/high_mean": (high * mask).sum() / n_tokens,
            "clip_ratio": ((low + high) * mask).sum() / n_tokens,
        }
    return loss, stats
