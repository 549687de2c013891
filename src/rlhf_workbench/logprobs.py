"""Per-token log-probabilities of given tokens under a causal LM, from a forward pass.

This is the one place where the workbench turns a model and token ids into ``logps``:
rollout records them for the sampling policy, DPO and GRPO recompute them for the policy
being trained and for the reference, evaluation uses them for the KL to the reference.
"""

from __future__ import annotations

import torch


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[..., index]`` without materialising the full log-softmax.

    Computed row by row as ``logit[index] - logsumexp(logits)`` in float32, so memory stays at
    one ``[T, V]`` slice while the result matches ``torch.log_softmax(...).gather(...)``.

    Args:
        logits: ``[B, T, V]`` unnormalised scores (any float dtype).
        index: ``[B, T]`` token ids.

    Returns:
        ``[B, T]`` float32 log-probabilities (nats).
    """
    out = []
    for row_logits, row_index in zip(logits, index):
        row_logits = row_logits.float()
        picked = row_logits.gather(-1, row_index.unsqueeze(-1)).squeeze(-1)
        out.append(picked - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(out)


def completion_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log-probs of the last ``logits_to_keep`` tokens of each row, given everything before them.

    Rows are ``prompt + completion``, left-padded prompts followed by right-padded completions
    (the layout :mod:`rlhf_workbench.rollout` produces), so the completion occupies the last
    ``logits_to_keep`` columns of every row. Position ids follow the attention mask, so padding
    does not shift positions.

    Args:
        model: a causal LM (``transformers`` or PEFT-wrapped) returning ``.logits``.
        input_ids: ``[B, P + T]`` token ids.
        attention_mask: ``[B, P + T]`` 1 for real tokens, 0 for padding.
        logits_to_keep: ``T``, the completion length.
        temperature: logits are divided by it first, so logps are those of the sampling
            distribution (TRL does the same); 1.0 gives the model's own distribution.

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
    logits = logits[:, :-1, :]
    if temperature != 1.0:
        logits = logits / temperature
    return selective_log_softmax(logits, input_ids[:, -logits_to_keep:])


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
    The LM head runs only from the prompt's last position on, and the log-softmax is taken once
    per position (``logit[token] - logsumexp``), so the memory is one ``[U, L - P + 1, V]`` logits
    tensor.

    Args:
        model: a causal LM (``transformers``, PEFT- or DDP-wrapped) that accepts a 4-D boolean
            ``attention_mask`` (True = may attend) with explicit ``position_ids``.
        prompts: ``B`` prompt token-id lists (rows with equal lists share a row).
        completions: ``B`` completion token-id lists.
        pad_id: the padding token id.
        temperature: logits are divided by it first (the sampling distribution's log-probs).
        device: where to put the inputs (default: CPU tensors as built).
        return_argmax: also return whether each completion token is the model's argmax.

    Returns:
        ``(logps [B, T] float32 nats, completion_mask [B, T] long)`` with ``T`` the longest
        completion (at least 1), zeros past each completion's end; with ``return_argmax`` a third
        ``[B, T]`` bool tensor (False past the end).

    Raises:
        ValueError: ``prompts`` and ``completions`` differ in length, or are empty.
    """
    if len(prompts) != len(completions) or not prompts:
        raise ValueError(f"packed_logps: {len(prompts)} prompts for {len(completions)} completions (need ≥ 1, equal)")
    input_ids, position_ids, allowed, index = _pack(prompts, completions, pad_id)
    P = max(len(p) for p in prompts)
    if device is not None:
        input_ids, position_ids, allowed = input_ids.to(device), position_ids.to(device), allowed.to(device)
    logits = model(input_ids=input_ids, attention_mask=allowed, position_ids=position_ids, use_cache=False,
                   logits_to_keep=input_ids.shape[1] - P + 1).logits  # [U, L - P + 1, V]: positions P-1 ..
    if temperature != 1.0:
        logits = logits / temperature
    B, T = len(completions), max(1, max(len(c) for c in completions))
    rows_i, cols_i, toks, out_b, out_t = [], [], [], [], []
    for b, (c, (u, start)) in enumerate(zip(completions, index)):
        for t, tok in enumerate(c):
            rows_i.append(u)
            cols_i.append(0 if t == 0 else start + t - 1 - (P - 1))  # the position that predicts token t
            toks.append(tok)
            out_b.append(b)
            out_t.append(t)
    dev = logits.device
    rows_t, cols_t = torch.tensor(rows_i, device=dev), torch.tensor(cols_i, device=dev)
    toks_t = torch.tensor(toks, device=dev)
    picked = logits[rows_t, cols_t, toks_t].float()
    lse = torch.logsumexp(logits.float(), dim=-1)  # [U, L - P + 1]
    logps = torch.zeros((B, T), dtype=torch.float32, device=dev)
    cmask = torch.zeros((B, T), dtype=torch.long, device=dev)
    where = (torch.tensor(out_b, device=dev), torch.tensor(out_t, device=dev))
    logps = logps.index_put(where, picked - lse[rows_t, cols_t])
    cmask[where] = 1
    if not return_argmax:
        return logps, cmask
    hits = torch.zeros((B, T), dtype=torch.bool, device=dev)
    hits[where] = logits.argmax(-1)[rows_t, cols_t] == toks_t
    return logps, cmask, hits
