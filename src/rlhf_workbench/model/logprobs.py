"""Per-token log-probabilities of given tokens under a causal LM, from a forward pass.

This is the one place where the workbench turns logits into ``logps``: :func:`token_logps`
(float32 first, then the temperature, then ``logit[token] - logsumexp``). The rollout records
the sampled tokens' log-probs with it, PPO, GRPO, RLOO, DPO and KTO recompute them with it for
the policy being trained and for the reference, so that under bf16 autocast both sides round the
same way and a ratio ``exp(logp - logp_old)`` of an unchanged policy is 1 up to the forward
passes' own bf16 rounding (tests/test_logprobs_bf16.py; issue 12). That rounding is not small on
a real model: decode steps and one training forward of SmolLM2-135M under bf16 autocast still
differ by ~0.03 nats per token on average (benchmarks/results/bf16_ratio.json).
:func:`scale_logits` is the shared first step for callers that need the whole scaled distribution
(sampling, entropy, the exact KL of the evaluation).
"""

from __future__ import annotations

import torch


def scale_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``logits.float() / temperature``: the sampling distribution's logits, in float32.

    The cast comes first. Under bf16 autocast the LM head returns bfloat16 logits; dividing
    those by ``temperature`` before the cast would round the quotient to bfloat16 again (8
    significant bits: at a scaled logit of ~30 an error of up to 0.06), an error the decoding
    side, which casts first, does not make. At SmolLM2's vocabulary size (49k) and T = 0.7 that
    mismatch was ~0.02 nats per token on average (issue 12), enough to push PPO/RLOO ratios out
    of their clip range before any update. Every log-prob, entropy and sampling distribution in
    the workbench goes through here (:func:`token_logps`, ``rollout._pick``, ``ppo._policy_forward``).

    Args:
        logits: ``[..., V]`` unnormalised scores, any float dtype.
        temperature: positive divisor; 1.0 returns the float32 logits (no copy when already float32).

    Returns:
        ``[..., V]`` float32.

    Raises:
        ValueError: ``temperature`` is not a positive finite number, or ``logits`` is not floating point.
    """
    if not (0.0 < temperature < float("inf")):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


def token_logps(logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs (nats) of the tokens ``index`` under ``softmax(logits / temperature)``.

    The one function that turns logits into per-token log-probs: the rollout records its
    log-probs with it, and every training and evaluation forward pass recomputes them with it, so
    both sides round the same way. Computed as ``z[index] - logsumexp(z)`` with
    ``z = logits.float() / temperature`` (:func:`scale_logits`: float32 first, then the
    division), without materialising the full log-softmax; a 3-D or larger ``logits`` is taken
    one leading slice at a time, so the float32 copy held at once is one ``[T, V]`` slice (the
    backward pass still keeps every slice).

    Args:
        logits: ``[..., V]`` unnormalised scores, any float dtype (bf16 under autocast).
        index: long token ids, either ``[...]`` (one token per position: returns ``[...]``) or
            ``[..., K]`` (``K`` tokens per position, e.g. the first tokens of several
            completions that share a prompt: returns ``[..., K]``).
        temperature: positive; 1.0 gives the model's own distribution.

    Returns:
        float32 log-probs, shaped like ``index``; ``<= 0``.

    Raises:
        ValueError: ``index``'s leading shape is not ``logits.shape[:-1]``, or as :func:`scale_logits`.
        RuntimeError: an id outside ``[0, V)`` (from ``torch.gather``).
    """
    one = index.dim() == logits.dim() - 1
    if not one and index.dim() != logits.dim():
        raise ValueError(f"token_logps: index {tuple(index.shape)} does not fit logits {tuple(logits.shape)}")
    picks = index.unsqueeze(-1) if one else index
    if picks.shape[:-1] != logits.shape[:-1]:
        raise ValueError(f"token_logps: index {tuple(index.shape)} does not fit logits {tuple(logits.shape)}")
    if logits.dim() >= 3:
        out = torch.stack([_token_logps(row, row_picks, temperature) for row, row_picks in zip(logits, picks)])
    else:
        out = _token_logps(logits, picks, temperature)
    return out.squeeze(-1) if one else out


def _token_logps(logits: torch.Tensor, picks: torch.Tensor, temperature: float) -> torch.Tensor:
    z = scale_logits(logits, temperature)
    return z.gather(-1, picks) - torch.logsumexp(z, dim=-1, keepdim=True)


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """TRL's name for :func:`token_logps` at temperature 1: ``log_softmax(logits.float())`` at
    ``index`` (``[B, T, V]``, ``[B, T]`` -> ``[B, T]`` float32 nats)."""
    return token_logps(logits, index)


def completion_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log-probs of the last ``logits_to_keep`` tokens of each row, given everything before them.

    Rows are ``prompt + completion``, left-padded prompts followed by right-padded completions
    (the layout :mod:`rlhf_workbench.model.rollout` produces), so the completion occupies the last
    ``logits_to_keep`` columns of every row. Position ids follow the attention mask, so padding
    does not shift positions.

    Args:
        model: a causal LM (``transformers`` or PEFT-wrapped) returning ``.logits``.
        input_ids: ``[B, P + T]`` token ids.
        attention_mask: ``[B, P + T]`` 1 for real tokens, 0 for padding.
        logits_to_keep: ``T``, the completion length.
        temperature: the float32 logits are divided by it (:func:`scale_logits`), so logps are
            those of the sampling distribution (TRL does the same); 1.0 gives the model's own.

    Returns:
        ``[B, T]`` float32 per-token log-probs; values at padded positions are meaningless and
        must be masked by the caller.
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        logits_to_keep=logits_to_keep + 1,
    ).logits
    return token_logps(logits[:, :-1, :], input_ids[:, -logits_to_keep:], temperature)


def _pack(prompts: list[list[int]], completions: list[list[int]], pad_id: int):
    """Lay out rows for :func:`packed_logps`: one row per distinct prompt, the prompt left-padded
    to the longest prompt ``P``, then that prompt's completions back to back without padding.

    Returns ``(input_ids [U, L], position_ids [U, L], allowed [U, 1, L, L] bool, index)`` where
    ``index[i] = (row, start)`` locates completion ``i``.
    """
    rows: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(prompts):
        rows.setdefault(tuple(p), []).append(i)
    P = max(len(p) for p in rows)
    L = P + max(sum(len(completions[i]) for i in members) for members in rows.values())
    U = len(rows)
    input_ids = torch.full((U, L), pad_id, dtype=torch.long)
    position_ids = torch.zeros((U, L), dtype=torch.long)
    allowed = torch.eye(L, dtype=torch.bool).repeat(U, 1, 1)  # padding attends to itself only (no NaN)
    index: list[tuple[int, int]] = [(0, 0)] * len(prompts)

    def causal(n: int) -> torch.Tensor:
        return torch.ones((n, n), dtype=torch.bool).tril()

    for u, (prompt, members) in enumerate(rows.items()):
        p0, n_p = P - len(prompt), len(prompt)
        input_ids[u, p0:P] = torch.tensor(prompt, dtype=torch.long)
        position_ids[u, p0:P] = torch.arange(n_p)
        allowed[u, p0:P, p0:P] = causal(n_p)
        start = P
        for i in members:
            n = len(completions[i])
            index[i] = (u, start)
            if n:
                input_ids[u, start : start + n] = torch.tensor(completions[i], dtype=torch.long)
                position_ids[u, start : start + n] = torch.arange(n_p, n_p + n)
                allowed[u, start : start + n, p0:P] = True
                allowed[u, start : start + n, start : start + n] = causal(n)
            start += n
    return input_ids, position_ids, allowed.unsqueeze(1), index


def packed_logps(
    model: torch.nn.Module,
    prompts: list[list[int]],
    completions: list[list[int]],
    pad_id: int,
    temperature: float = 1.0,
    device: torch.device | None = None,
    return_argmax: bool = False,
):
    """Per-token log-probs of completions, sharing each prompt's forward pass among the
    completions that continue it (prefix sharing) and packing those completions without padding.

    Completions with the same prompt (a GRPO group's K samples, a DPO pair's chosen and rejected)
    go into one row: ``[left padding][prompt][completion 1][completion 2]...``. A 4-D boolean
    attention mask lets every completion see the prompt and its own earlier tokens only, and
    position ids restart after the prompt for every completion, so each completion's log-probs
    are those of the plain layout ``prompt + completion`` (:func:`completion_logps`), up to float
    rounding, while the prompt is run once per row instead of once per completion. Gradients of
    the shared prompt positions collect every completion's contribution, as autograd sums them.
    The LM head runs only from the prompt's last position on, and the log-probs come from
    :func:`token_logps` (float32 first, then the temperature, then ``logit[token] - logsumexp``,
    one row at a time), so the memory is one ``[U, L - P + 1, V]`` logits tensor plus a float32
    copy per row.

    Args:
        model: a causal LM (``transformers``, PEFT- or DDP-wrapped) that accepts a 4-D boolean
            ``attention_mask`` (True = may attend) with explicit ``position_ids``.
        prompts: ``B`` prompt token-id lists (rows with equal lists share a row).
        completions: ``B`` completion token-id lists.
        pad_id: the padding token id.
        temperature: the float32 logits are divided by it (the sampling distribution's log-probs;
            :func:`scale_logits`).
        device: where to put the inputs (default: CPU tensors as built).
        return_argmax: also return whether each completion token is the model's argmax.

    Returns:
        ``(logps [B, T] float32 nats, completion_mask [B, T] long)`` with ``T`` the longest
        completion (at least 1), zeros past each completion's end; with ``return_argmax`` a third
        ``[B, T]`` bool tensor (False past the end).

    Raises:
        ValueError: ``prompts`` and ``completions`` differ in length, or are empty; a bad
            ``temperature`` (:func:`scale_logits`).
    """
    if len(prompts) != len(completions) or not prompts:
        raise ValueError(f"packed_logps: {len(prompts)} prompts for {len(completions)} completions (need ≥ 1, equal)")
    input_ids, position_ids, allowed, index = _pack(prompts, completions, pad_id)
    P = max(len(p) for p in prompts)
    if device is not None:
        input_ids, position_ids, allowed = input_ids.to(device), position_ids.to(device), allowed.to(device)
    logits = model(input_ids=input_ids, attention_mask=allowed, position_ids=position_ids, use_cache=False,
                   logits_to_keep=input_ids.shape[1] - P + 1).logits  # [U, L - P + 1, V]: positions P-1 ..
    U, C = logits.shape[0], logits.shape[1]
    dev = logits.device
    # Column c (input position P-1+c) predicts the row's next token, which is token t >= 1 of the
    # completion it sits in; every completion's token 0 is predicted by column 0 (the prompt's
    # last position), so those are picked there, up to K per row (K: the largest group).
    next_ids = torch.cat([input_ids[:, P:], input_ids.new_zeros((U, 1))], dim=1)
    members, first_ids = _first_tokens(completions, index, U)
    K = first_ids.shape[1]
    flat = torch.cat([token_logps(logits, next_ids, temperature).flatten(),
                      token_logps(logits[:, 0], first_ids.to(dev), temperature).flatten()])  # U·C + U·K
    B, T = len(completions), max(1, max(len(c) for c in completions))
    rows_i, cols_i, toks, src, out_b, out_t = _token_slots(completions, index, members, P, U, C, K)
    logps = torch.zeros((B, T), dtype=torch.float32, device=dev)
    cmask = torch.zeros((B, T), dtype=torch.long, device=dev)
    where = (torch.tensor(out_b, dtype=torch.long, device=dev), torch.tensor(out_t, dtype=torch.long, device=dev))
    logps = logps.index_put(where, flat[torch.tensor(src, dtype=torch.long, device=dev)])
    cmask[where] = 1
    if not return_argmax:
        return logps, cmask
    rows_t = torch.tensor(rows_i, dtype=torch.long, device=dev)
    cols_t = torch.tensor(cols_i, dtype=torch.long, device=dev)
    hits = torch.zeros((B, T), dtype=torch.bool, device=dev)
    hits[where] = logits.argmax(-1)[rows_t, cols_t] == torch.tensor(toks, dtype=torch.long, device=dev)
    return logps, cmask, hits


def _first_tokens(completions: list[list[int]], index: list[tuple[int, int]], U: int):
    """``(members, first_ids)``: completion ``b`` is the ``members[b]``-th of its row, and
    ``first_ids [U, K]`` (K: the most completions in one row) holds each completion's token 0 at
    ``[row, members[b]]`` (0 for an empty completion or an unused slot)."""
    members: list[int] = []
    seen: dict[int, int] = {}
    for u, _ in index:
        members.append(seen.get(u, 0))
        seen[u] = members[-1] + 1
    first_ids = torch.zeros((U, max(seen.values())), dtype=torch.long)
    for b, (c, (u, _)) in enumerate(zip(completions, index)):
        if c:
            first_ids[u, members[b]] = c[0]
    return members, first_ids


def _token_slots(completions: list[list[int]], index: list[tuple[int, int]], members: list[int],
                 P: int, U: int, C: int, K: int):
    """Where each completion token's log-prob sits, one entry per token: ``(rows, cols, toks, src,
    out_b, out_t)`` with the logits' row and column that predict it, the token id, its position in
    :func:`packed_logps`' flat ``U·C + U·K`` vector (next-token log-probs, then first-token ones)
    and its ``[b, t]`` in the output."""
    rows_i, cols_i, toks, src, out_b, out_t = [], [], [], [], [], []
    for b, (c, (u, start)) in enumerate(zip(completions, index)):
        for t, tok in enumerate(c):
            col = 0 if t == 0 else start + t - 1 - (P - 1)  # the position that predicts token t
            rows_i.append(u)
            cols_i.append(col)
            toks.append(tok)
            src.append(U * C + u * K + members[b] if t == 0 else u * C + col)
            out_b.append(b)
            out_t.append(t)
    return rows_i, cols_i, toks, src, out_b, out_t
