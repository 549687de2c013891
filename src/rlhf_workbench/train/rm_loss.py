"""The reward model's loss: Bradley-Terry on preference pairs, a pure function of tensors
(checked against TRL's ``RewardTrainer``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pairwise reward-model loss under the Bradley–Terry preference model.

    ``P(chosen ≻ rejected) = σ(r_c - r_r)`` (Bradley & Terry 1952); the reward model is fit by
    minimising ``-log σ(r_c - r_r)`` averaged over pairs (Ouyang et al. 2022, eq. 1). With a
    ``margin`` ``m`` the loss is ``-log σ(r_c - r_r - m)`` (Touvron et al. 2023, Llama 2, eq. 2;
    TRL ``RewardTrainer`` with a ``margin`` column): pairs judged far apart must be separated
    by at least ``m``.

    Args:
        chosen_rewards, rejected_rewards: ``[B]`` scalar rewards (unitless logits) of the
            preferred and the dispreferred sequence of each pair.
        margin: optional ``[B]`` (or scalar) required reward gap, same units as the rewards.

    Returns:
        ``(loss, stats)``: scalar mean loss, and detached ``stats`` named as TRL 1.16's
        ``RewardTrainer.compute_loss`` logs them: ``accuracy`` (fraction of pairs with
        ``r_c > r_r``, ties count as wrong), ``margin`` (mean ``r_c - r_r``, without the
        target margin), ``min_reward``, ``mean_reward``, ``max_reward`` (over all ``2B`` rewards).

    Raises:
        ValueError: the reward tensors are not 1-D of the same length, or ``margin`` does not
            broadcast to ``[B]``.
    """
    if chosen_rewards.dim() != 1 or chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(
            f"bradley_terry_loss: rewards must be [B] tensors of equal length, got "
            f"{tuple(chosen_rewards.shape)} and {tuple(rejected_rewards.shape)}"
        )
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        margin = torch.as_tensor(margin, dtype=diff.dtype, device=diff.device)
        if margin.dim() > 1 or (margin.dim() == 1 and margin.shape[0] not in (1, diff.shape[0])):
            raise ValueError(f"bradley_terry_loss: margin of shape {tuple(margin.shape)} does not match B={diff.shape[0]}")
        loss = -F.logsigmoid(diff - margin).mean()
    else:
        loss = -F.logsigmoid(diff).mean()
    with torch.no_grad():
        all_rewards = torch.cat([chosen_rewards, rejected_rewards]).detach()
        stats = {
            "accuracy": (diff > 0).float().mean().detach(),
            "margin": diff.mean().detach(),
            "min_reward": all_rewards.min(),
            "mean_reward": all_rewards.mean(),
            "max_reward": all_rewards.max(),
        }
    return loss, stats
