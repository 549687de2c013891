"""Policy-optimisation losses (DPO, GRPO, KTO, RLOO) as pure functions of tensors.

No model, optimizer or data loading here: each function takes log-probabilities and
returns a loss plus the statistics TRL logs under the same names, so each can be checked
against TRL (the numerical oracle) and against the paper's formula on small examples.

Shapes: ``B`` = number of sequences (pairs for DPO, completions for GRPO), ``T`` = number
of completion tokens (right-padded). Log-probabilities are natural logs (nats). PPO's losses are in
:mod:`rlhf_workbench.train.ppo_losses`, the reward model's in :mod:`rlhf_workbench.train.rm_loss`.
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


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl: torch.Tensor | float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Kahneman-Tversky Optimization loss for unpaired binary feedback (Ethayarajh et al. 2024,
    sec. 4, eq. 8, the KTO loss ``E[λ_y - v(x, y)]``; TRL's comments number it eq. 7 and the
    weight bound below eq. 8, so check the numbering against the paper version you read).

    With the implicit reward ``r = policy_logps - ref_logps`` and the reference point ``z0``:

    - desirable (thumbs up): ``λ_D (1 - σ(β (r - z0)))``
    - undesirable (thumbs down): ``λ_U (1 - σ(β (z0 - r)))``

    and the loss is the plain mean of these ``B`` weighted terms, as in TRL 1.16's
    ``KTOTrainer._compute_loss`` (the weights are not renormalised: ``sum(w_i ℓ_i) / B``).
    ``z0 = max(0, mean(kl))`` is detached, so no gradient flows through the reference point.
    TRL estimates it from mismatched pairs: completion ``y_{i-1}`` scored under prompt ``x_i``
    (the batch rotated by one), ``kl = logπ(y_{i-1}|x_i) - logπ_ref(y_{i-1}|x_i)``. TRL averages
    the losses with ``nanmean``; here a NaN propagates (identical for finite inputs).

    Args:
        policy_logps: ``[B]`` summed completion log-probs under the policy (nats).
        ref_logps: ``[B]`` the same under the frozen reference.
        labels: ``[B]`` bool (or 0/1), True = desirable.
        kl: the KL estimate ``z0``: a scalar, or a ``[B']`` tensor of mismatched-pair log-ratios
            that is averaged; detached and clamped at 0 here either way (clamping twice is harmless).
        beta: inverse temperature β of the implicit reward (TRL default 0.1).
        desirable_weight, undesirable_weight: λ_D and λ_U (TRL's ``desirable_weight`` and
            ``undesirable_weight``); the paper recommends ``λ_D n_D / (λ_U n_U)`` in [1, 4/3]
            (TRL warns outside it).

    Returns:
        ``(loss, stats)``: scalar loss and detached stats with TRL's names:
        ``rewards/chosen`` and ``logps/chosen`` (``[n_desirable]``: ``β r`` and ``policy_logps`` of
        the desirable examples; TRL logs their mean, and nothing when there are none),
        ``rewards/rejected`` and ``logps/rejected`` (``[n_undesirable]``, likewise), ``kl``
        (scalar ``z0``), and ``rewards/margins`` (scalar, mean chosen reward minus mean rejected
        reward; only present, as in TRL, when the batch has both kinds).

    Raises:
        ValueError: mismatched shapes or an empty batch.
    """
    if policy_logps.dim() != 1 or policy_logps.shape != ref_logps.shape or labels.shape != policy_logps.shape:
        raise ValueError(
            f"kto_loss: policy_logps, ref_logps and labels must all be [B]; got {tuple(policy_logps.shape)}, "
            f"{tuple(ref_logps.shape)}, {tuple(labels.shape)}"
        )
    if policy_logps.numel() == 0:
        raise ValueError("kto_loss: empty batch")
    desirable = labels.to(torch.bool)
    z0 = torch.as_tensor(kl, dtype=policy_logps.dtype, device=policy_logps.device).detach().mean().clamp(min=0)
    logratios = policy_logps - ref_logps
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (logratios - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratios))),
    )
    rewards = (beta * logratios).detach()
    stats = {
        "rewards/chosen": rewards[desirable],
        "rewards/rejected": rewards[~desirable],
        "logps/chosen": policy_logps.detach()[desirable],
        "logps/rejected": policy_logps.detach()[~desirable],
        "kl": z0,
    }
    if desirable.any() and (~desirable).any():
        stats["rewards/margins"] = stats["rewards/chosen"].mean() - stats["rewards/rejected"].mean()
    return losses.mean(), stats


def _nanstd(x: torch.Tensor) -> torch.Tensor:
    """Unbiased std over the non-NaN entries (TRL's ``trl.trainer.utils.nanstd`` for a whole tensor)."""
    mean = torch.nanmean(x)
    count = (~torch.isnan(x)).sum()
    return (torch.nanmean((x - mean) ** 2) * count / (count - 1)).sqrt()


def rloo_advantages(
    rewards: torch.Tensor,
    group_size: int,
    kl: torch.Tensor | None = None,
    beta: float = 0.0,
    normalize: bool = False,
    reward_clip_range: tuple[float, float] | None = None,
    eps: float = 1e-4,
) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024, eq. 6; Kool et al. 2019).

    Within each group of ``K = group_size`` completions of one prompt,
    ``A_i = r_i - 1/(K-1) Σ_{j≠i} r_j`` (equivalently ``K/(K-1) (r_i - mean(r_group))``), as in
    TRL 1.16's ``RLOOTrainer._generate_and_score_completions``, which first (in this order):

    1. clamps the rewards to ``reward_clip_range`` (TRL's ``reward_clip_range``);
    2. folds a sequence-level KL penalty into the reward, ``r_i - β kl_i`` (TRL's ``beta``, default
       0.05 there), where ``kl_i = Σ_t (old_logps - ref_logps)·mask`` is the first-order (k1)
       log-ratio of the sampled completion summed over its tokens, which can be negative. TRL logs
       ``kl`` as ``Σ_i kl_i / (number of completion tokens)``;

    and afterwards optionally normalises over the whole batch (TRL's ``normalize_advantages``,
    default False): ``(A - mean(A)) / (std(A) + 1e-4)``, unbiased std. NaN rewards mark
    unscorable completions (every reward function returned None): they are left out of their
    siblings' baselines and of the normalisation, and get advantage 0. A group with a single
    scorable completion, or ``group_size == 1``, gets zero advantages.

    The RLOO policy loss is not :func:`grpo_loss` with these advantages: TRL's RLOO clips a
    sequence-level ratio and has no KL term in the loss; see :func:`rloo_loss`.

    Args:
        rewards: ``[B]`` one scalar reward per completion, groups contiguous (``B = G * group_size``).
        group_size: completions per prompt (K, TRL's ``num_generations``).
        kl: ``[B]`` summed per-sequence log-ratios ``kl_i`` (see above); needed when ``beta != 0``.
        beta: KL coefficient β of the reward penalty.
        normalize: batch-wide standardisation of the advantages.
        reward_clip_range: ``(min, max)`` for the rewards, or None.
        eps: added to the std when normalising (TRL: 1e-4).

    Returns:
        ``[B]`` advantages (not detached from ``rewards`` / ``kl``).

    Raises:
        ValueError: ``B`` not a multiple of ``group_size``, ``group_size < 1``, or ``beta != 0``
            without a ``[B]`` ``kl``.
    """
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rloo_advantages: {rewards.numel()} rewards is not a multiple of group_size {group_size}")
    if reward_clip_range is not None:
        rewards = rewards.clamp(min=reward_clip_range[0], max=reward_clip_range[1])
    if beta != 0.0:
        if kl is None or kl.shape != rewards.shape:
            raise ValueError("rloo_advantages: beta != 0 needs kl, one summed log-ratio per completion ([B])")
        rewards = rewards - beta * kl
    if group_size == 1:  # no siblings, no baseline: TRL returns zeros
        advantages = torch.zeros_like(rewards)
    else:
        grouped = rewards.view(-1, group_size)
        counts = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
        baselines = (torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (counts - 1)
        advantages = (grouped - baselines).view(-1)
    if normalize:
        advantages = (advantages - torch.nanmean(advantages)) / (_nanstd(advantages) + eps)
    return torch.nan_to_num(advantages, nan=0.0)


def rloo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor | None = None,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped RLOO policy loss with a sequence-level ratio, as TRL 1.16's ``RLOOTrainer``.

    ``ρ_i = exp(log π(y_i|x) - log π_old(y_i|x))`` on whole-sequence log-probs,
    ``ℓ_i = -min(ρ_i A_i, clip(ρ_i, 1-ε, 1+ε_high) A_i)``, loss = mean over the ``B`` sequences.
    This is the REINFORCE estimator of Ahmadian et al. 2024 (eq. 6, there without clipping:
    with ``old_logps == logps.detach()`` the value is ``-mean(A)`` and the gradient is
    ``-mean(A_i ∇ log π(y_i|x))``), with PPO's clip (Schulman et al. 2017, eq. 7) applied per
    sequence as TRL does. Unlike :func:`grpo_loss` there is no per-token ratio, no length
    normalisation and no KL term: RLOO's KL penalty is in the reward (:func:`rloo_advantages`).

    Args:
        logps: ``[B]`` summed completion log-probs under the policy being trained, or ``[B, T]``
            per-token ones (then summed over ``completion_mask``).
        old_logps: the same under the policy that sampled them (TRL's ``old_logps``), ``[B]`` or
            ``[B, T]`` independently of ``logps``.
        advantages: ``[B]`` (see :func:`rloo_advantages`).
        completion_mask: ``[B, T]`` 1 for completion tokens, 0 for padding; needed for ``[B, T]`` inputs.
        epsilon: lower clip range ε; ``epsilon_high`` the upper one (defaults to ε).

    Returns:
        ``(loss, stats)``: scalar loss and detached scalars over sequences:
        ``clip_ratio/low_mean`` (``ρ < 1-ε`` and ``A < 0``), ``clip_ratio/high_mean``
        (``ρ > 1+ε_high`` and ``A > 0``) and ``clip_ratio`` (either; TRL logs it as
        ``clip_ratio/region_mean``).

    Raises:
        ValueError: shapes that do not fit together.
    """

    def sequence_sum(x: torch.Tensor, name: str) -> torch.Tensor:
        if x.dim() != 2:
            return x
        if completion_mask is None or x.shape != completion_mask.shape:
            raise ValueError(f"rloo_loss: per-token {name} [B, T] needs a completion_mask of the same shape")
        return torch.where(completion_mask.bool(), x, 0.0).sum(-1)

    logps, old_logps = sequence_sum(logps, "logps"), sequence_sum(old_logps, "old_logps")
    if logps.dim() != 1 or old_logps.shape != logps.shape or advantages.shape != logps.shape:
        raise ValueError(
            f"rloo_loss: logps, old_logps and advantages must be [B]; got {tuple(logps.shape)}, "
            f"{tuple(old_logps.shape)}, {tuple(advantages.shape)}"
        )
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped * advantages).mean()
    with torch.no_grad():
        low = ((ratio < 1 - epsilon) & (advantages < 0)).float()
        high = ((ratio > 1 + epsilon_high) & (advantages > 0)).float()
        stats = {
            "clip_ratio/low_mean": low.mean(),
            "clip_ratio/high_mean": high.mean(),
            "clip_ratio": (low + high).mean(),
        }
    return loss, stats
