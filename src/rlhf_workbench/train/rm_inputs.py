"""The reward model's inputs: ``prompt + completion + eos`` texts as token rows, right-padded
(shared by the full reward model, :mod:`rlhf_workbench.train.reward_model`, and the frozen-backbone
one, :mod:`rlhf_workbench.train.rm_features`)."""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import PreTrainedTokenizerBase


def encode_texts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], completions: Sequence[str],
                 max_length: int | None = None) -> list[list[int]]:
    """Token ids of ``prompt + completion + eos`` (TRL's RewardTrainer format for plain text).

    Sequences longer than ``max_length`` keep their *last* ``max_length`` tokens, so the
    completion's end (where the reward is read) survives. (TRL drops such pairs instead.)
    """
    eos = tokenizer.eos_token or ""
    out = []
    for p, c in zip(prompts, completions):
        text = p + c
        if eos and not text.endswith(eos):
            text += eos
        ids = list(tokenizer(text)["input_ids"])
        if max_length is not None and len(ids) > max_length:
            ids = ids[-max_length:]
        out.append(ids)
    return out


def right_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``([N, L] long ids, [N, L] long attention mask)`` of token ``rows`` right-padded with ``pad_id``
    to the longest (``L``), on ``device``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)
