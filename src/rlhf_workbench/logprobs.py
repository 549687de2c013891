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
