"""PPO's losses for language models as pure functions of tensors: per-token KL-penalised
rewards, GAE, masked whitening, the clipped policy and value losses and the critic's explained
variance (Ouyang et al. 2022; Schulman et al. 2016, 2017; Huang et al. 2024, "The N+
implementation details of RLHF with PPO"; TRL's PPOTrainer / PPOv2Trainer as the reference design).

Shapes: ``B`` completions, ``T`` completion tokens (right-padded); log-probs in nats.
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` is 1 (TRL's ``masked_mean`` without ``axis``).

    Args:
        x: any shape, e.g. ``[B, T]`` per-token values.
        mask: same shape as ``x``, 1 (or True) for entries that count, 0 for padding.

    Returns:
        Scalar tensor ``Σ x·m / Σ m`` (NaN when the mask is empty, as in TRL).

    Raises:
        ValueError: ``x`` and ``mask`` differ in shape.
    """
    if x.shape != mask.shape:
        raise ValueError(f"masked_mean: x {tuple(x.shape)} and mask {tuple(mask.shape)} differ in shape")
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum()


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the masked entries (TRL's ``masked_var``).

    ``Var = mean_m((x - mean_m(x))²)``, times the Bessel correction ``n / (n - 1)`` with
    ``n = Σ mask`` when ``unbiased``.

    Args:
        x, mask: as in :func:`masked_mean`.
        unbiased: apply Bessel's correction.

    Returns:
        Scalar tensor, in the squared units of ``x``.

    Raises:
        ValueError: shapes differ, the mask is empty, or ``unbiased`` with a single masked entry
            (TRL raises for an empty mask only and divides by zero for one entry).
    """
    if x.shape != mask.shape:
        raise ValueError(f"masked_var: x {tuple(x.shape)} and mask {tuple(mask.shape)} differ in shape")
    n = mask.to(x.dtype).sum()
    if n == 0:
        raise ValueError("masked_var: the mask is empty")
    if unbiased and n < 2:
        raise ValueError("masked_var: the unbiased variance needs at least two masked entries")
    var = masked_mean((x - masked_mean(x, mask)) ** 2, mask)
    return var * n / (n - 1) if unbiased else var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Standardise ``x`` with the masked mean and unbiased variance (TRL's ``masked_whiten``).

    ``(x - μ) / sqrt(σ² + 1e-8)``, and with ``shift_mean=False`` the mean is added back,
    ``(x - μ) / sqrt(σ² + 1e-8) + μ`` (only the scale changes; TRL uses this for
    ``whiten_rewards`` so that the sign of the rewards is kept). Entries outside the mask are
    transformed too (they take part in nothing); callers zero them if they need to.

    Args:
        x, mask: as in :func:`masked_mean` (at least two masked entries).
        shift_mean: subtract the mean (True) or keep it.

    Returns:
        Tensor shaped like ``x``.

    Raises:
        ValueError: see :func:`masked_var`.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def _check_right_padded(mask: torch.Tensor, name: str) -> None:
    if mask.dim() != 2:
        raise ValueError(f"{name}: mask must be [B, T], got {tuple(mask.shape)}")
    m = mask.bool()
    if (m[:, 1:] & ~m[:, :-1]).any():
        raise ValueError(f"{name}: mask must be right-padded (each row 1…1 0…0)")


def kl_penalty_rewards(
    scores: torch.Tensor,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO rewards: a k1 KL penalty on every token plus the sequence score at the last one.

    ``kl_t = logps_t - ref_logps_t`` (the k1 estimator, Schulman 2020; TRL's ``kl_penalty="kl"``),
    ``r_t = -kl_coef · kl_t`` for every completion token, and the sequence-level score is added
    at the last completion token of each row: ``r_{last} += score``. Summed over a sequence this
    is the RLHF objective of Ouyang et al. 2022, eq. 2 (``r_θ(x, y) - β log(π/π_ref)``) without
    the pretraining term; placing the score on the last token is TRL's old ``PPOTrainer.compute_rewards``
    (``reward[last_non_masked_index] += score``) and N+ details (Huang et al. 2024, "reward at
    the EOS token"). (TRL's PPOv2 puts it one position *after* the last token; not done here.)

    Args:
        scores: ``[B]`` sequence scores (reward-model logits or rule rewards, any unit).
        logps: ``[B, T]`` per-token log-probs of the sampled tokens under the sampling policy (nats).
        ref_logps: ``[B, T]`` the same under the frozen reference.
        mask: ``[B, T]`` 1 for completion tokens, 0 for padding; any pattern is accepted, the score
            goes to each row's last 1.
        kl_coef: β, the KL coefficient (nats of reward per nat of log-ratio).

    Returns:
        ``(rewards, kl)``: ``[B, T]`` per-token rewards and ``[B, T]`` per-token k1 log-ratios, both
        zero at padding; not detached from the inputs.

    Raises:
        ValueError: shapes that do not fit together, or a row with no completion token (its score
            would be lost).
    """
    if logps.dim() != 2 or logps.shape != ref_logps.shape or logps.shape != mask.shape:
        raise ValueError(
            f"kl_penalty_rewards: logps, ref_logps and mask must be the same [B, T]; got {tuple(logps.shape)}, "
            f"{tuple(ref_logps.shape)}, {tuple(mask.shape)}"
        )
    if scores.shape != (logps.shape[0],):
        raise ValueError(f"kl_penalty_rewards: scores must be [B={logps.shape[0]}], got {tuple(scores.shape)}")
    m = mask.bool()
    if not m.any(dim=1).all():
        raise ValueError("kl_penalty_rewards: a row has no completion tokens")
    kl = torch.where(m, logps - ref_logps, torch.zeros_like(logps))
    rewards = -kl_coef * kl
    T = m.shape[1]
    last = T - 1 - m.flip(1).int().argmax(dim=1)  # index of each row's last 1
    rows = torch.arange(m.shape[0], device=m.device)
    rewards = rewards.index_put((rows, last), scores.to(rewards.dtype), accumulate=True)
    return rewards, kl


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation over completion tokens (Schulman et al. 2016, eq. 16).

    ``δ_t = r_t + γ V_{t+1} - V_t`` and ``Â_t = Σ_l (γλ)^l δ_{t+l}``, computed backwards as
    ``Â_t = δ_t + γλ Â_{t+1}``; the returns (the value targets) are ``R_t = Â_t + V_t``.
    ``V_t`` is the value of the state before token ``t`` is emitted. The episode ends at each
    row's last completion token: the value after it is 0 and padding contributes nothing
    (TRL's ``PPOTrainer.compute_advantages``, which zeroes rewards and values at padding
    first). Advantages are not whitened here (see :func:`masked_whiten`).

    Args:
        rewards: ``[B, T]`` per-token rewards (see :func:`kl_penalty_rewards`).
        values: ``[B, T]`` critic values ``V(s_t)``, same units as the rewards.
        mask: ``[B, T]`` right-padded completion mask (1…1 0…0 per row).
        gamma: discount γ in [0, 1].
        lam: GAE λ in [0, 1].

    Returns:
        ``(advantages, returns)``: ``[B, T]`` each, zero at padding.

    Raises:
        ValueError: shapes differ, or the mask is not right-padded.
    """
    if rewards.shape != values.shape or rewards.shape != mask.shape:
        raise ValueError(
            f"gae_advantages: rewards, values and mask must be the same [B, T]; got {tuple(rewards.shape)}, "
            f"{tuple(values.shape)}, {tuple(mask.shape)}"
        )
    _check_right_padded(mask, "gae_advantages")
    m = mask.to(values.dtype)
    values = values * m
    rewards = rewards * m
    T = rewards.shape[1]
    last = torch.zeros_like(rewards[:, 0])
    reversed_adv = []
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t < T - 1 else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last = delta + gamma * lam * last
        reversed_adv.append(last)
    advantages = torch.stack(reversed_adv[::-1], dim=1) * m
    return advantages, (advantages + values) * m


def ppo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float = 0.2,
    cliprange_value: float = 0.2,
    vf_coef: float = 0.1,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped policy loss plus a clipped value loss and an entropy bonus, per token.

    With ``ρ_t = exp(logps_t - old_logps_t)``:

    - policy: ``ℓ^π_t = max(-Â_t ρ_t, -Â_t clip(ρ_t, 1-ε, 1+ε))``, the negative of the clipped
      surrogate ``L^CLIP`` (Schulman et al. 2017, eq. 7);
    - value: ``ℓ^V_t = ½ max((V_t - R_t)², (clip(V_t, V^old_t - c, V^old_t + c) - R_t)²)``
      (value clipping as in OpenAI's baselines / lm-human-preferences; Huang et al. 2024, N+ details);
    - ``loss = mean_m(ℓ^π) + vf_coef · mean_m(ℓ^V) - entropy_coef · mean_m(H)``,

    where ``mean_m`` is the mean over all completion tokens of the batch (TRL PPOv2's
    ``masked_mean``; the PPO paper's eq. 9 with ``c_1 = vf_coef``, ``c_2 = entropy_coef``).

    Args:
        logps: ``[B, T]`` per-token log-probs of the sampled tokens under the policy being trained.
        old_logps: ``[B, T]`` the same under the policy that sampled them.
        values: ``[B, T]`` critic values being trained, ``V(s_t)``.
        old_values: ``[B, T]`` the critic's values at rollout.
        advantages: ``[B, T]`` (usually whitened) GAE advantages, no gradient.
        returns: ``[B, T]`` value targets ``Â + V^old``.
        mask: ``[B, T]`` 1 for completion tokens, 0 for padding.
        cliprange: ε of the ratio clip.
        cliprange_value: ``c``, the value clip around ``old_values`` (value units).
        vf_coef: weight of the value loss.
        entropy: optional ``[B, T]`` per-token entropy of the policy (nats).
        entropy_coef: weight of the entropy bonus (needs ``entropy`` when non-zero).

    Returns:
        ``(loss, stats)``: scalar loss and detached scalars named as TRL's PPO trainers log them:
        ``policy/approxkl_avg`` (``½ mean_m((logps - old_logps)²)``; TRL PPOv2 averages over padding
        too, the old PPOTrainer masks as here), ``policy/clipfrac_avg`` (fraction of tokens where the
        clipped policy term is the larger), ``loss/policy_avg``, ``loss/value_avg`` (``mean_m(ℓ^V)``,
        the ½ included), ``val/clipfrac_avg`` (tokens where the clipped value loss is the larger),
        ``val/ratio`` (``mean_m(ρ)``), and ``policy/entropy_avg`` when ``entropy`` is given.

    Raises:
        ValueError: shapes differ, the mask is empty, or ``entropy_coef != 0`` without ``entropy``.
    """
    _check_ppo_inputs(mask, entropy, entropy_coef, logps=logps, old_logps=old_logps, values=values,
                      old_values=old_values, advantages=advantages, returns=returns)
    vf_loss, vf_losses1, vf_losses2 = clipped_value_loss(values, old_values.detach(), returns.detach(), mask,
                                                         cliprange_value)
    old_logps = old_logps.detach()
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    pg_loss, pg_losses1, pg_losses2 = clipped_policy_loss(ratio, advantages.detach(), mask, cliprange)

    loss = pg_loss + vf_coef * vf_loss
    if entropy is not None and entropy_coef != 0.0:
        loss = loss - entropy_coef * masked_mean(entropy, mask)
    with torch.no_grad():
        m = mask.bool()
        stats = {
            "policy/approxkl_avg": 0.5 * masked_mean(log_ratio.detach() ** 2, m),
            "policy/clipfrac_avg": masked_mean((pg_losses2 > pg_losses1).to(logps.dtype), m),
            "loss/policy_avg": pg_loss.detach(),
            "loss/value_avg": vf_loss.detach(),
            "val/clipfrac_avg": masked_mean((vf_losses2 > vf_losses1).to(values.dtype), m),
            "val/ratio": masked_mean(ratio.detach(), m),
        }
        if entropy is not None:
            stats["policy/entropy_avg"] = masked_mean(entropy.detach(), m)
    return loss, stats


def _check_ppo_inputs(mask: torch.Tensor, entropy: torch.Tensor | None, entropy_coef: float,
                      **tensors: torch.Tensor) -> None:
    """Raise :func:`ppo_loss`'s ValueErrors (shapes, empty mask, entropy coefficient without entropy)."""
    if entropy is not None:
        tensors["entropy"] = entropy
    for name, x in tensors.items():
        if x.shape != mask.shape or x.dim() != 2:
            raise ValueError(f"ppo_loss: {name} {tuple(x.shape)} must be [B, T] like mask {tuple(mask.shape)}")
    if not mask.bool().any():
        raise ValueError("ppo_loss: the mask is empty")
    if entropy_coef != 0.0 and entropy is None:
        raise ValueError("ppo_loss: entropy_coef != 0 needs entropy")


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss ``½ mean_m max((V - R)², (clip(V, V_old ± c) - R)²)`` (OpenAI
    baselines / lm-human-preferences; Huang et al. 2024).

    Args:
        values, old_values, returns, mask: ``[B, T]`` (``old_values`` and ``returns`` detached).
        cliprange_value: ``c`` (value units).

    Returns:
        ``(loss, unclipped [B, T], clipped [B, T])`` squared errors.
    """
    v_clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    vf_losses1 = (values - returns) ** 2
    vf_losses2 = (v_clipped - returns) ** 2
    return 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask), vf_losses1, vf_losses2


def clipped_policy_loss(ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                        cliprange: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The negative clipped surrogate ``mean_m max(-A ρ, -A clip(ρ, 1-ε, 1+ε))`` (Schulman et al.
    2017, eq. 7), per token.

    Args:
        ratio, advantages, mask: ``[B, T]`` (``advantages`` detached).
        cliprange: ε.

    Returns:
        ``(loss, unclipped [B, T], clipped [B, T])`` per-token terms.
    """
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return masked_mean(torch.max(pg_losses1, pg_losses2), mask), pg_losses1, pg_losses2


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fraction of the variance of the returns that the critic explains: ``1 - Var(R - V) / Var(R)``.

    Masked population variances over the completion tokens (as CleanRL's ``explained_var``,
    which uses ``np.var``); 1 is a perfect critic, 0 a constant one, negative worse than
    constant. NaN when the returns have zero variance (CleanRL does the same).

    Args:
        values: ``[B, T]`` critic values.
        returns: ``[B, T]`` value targets.
        mask: ``[B, T]`` 1 for completion tokens.

    Returns:
        Scalar tensor (unitless), detached.

    Raises:
        ValueError: shapes differ or the mask is empty.
    """
    if values.shape != returns.shape or values.shape != mask.shape:
        raise ValueError(
            f"explained_variance: values, returns and mask must be the same shape; got {tuple(values.shape)}, "
            f"{tuple(returns.shape)}, {tuple(mask.shape)}"
        )
    with torch.no_grad():
        var_r = masked_var(returns, mask, unbiased=False)
        if var_r == 0:
            return torch.tensor(float("nan"), dtype=returns.dtype, device=returns.device)
        return 1 - masked_var(returns - values, mask, unbiased=False) / var_r
