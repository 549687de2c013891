"""A scalar reward model trained on preference pairs with the Bradley–Terry loss.

The reward model is a sequence-classification head (``num_labels=1``) on a causal LM
backbone; the reward of ``prompt + completion`` is the head's output at the last non-pad
token (the model's own pooling, which needs right padding and ``config.pad_token_id``).
Training mirrors TRL's ``RewardTrainer``: the text of a pair is ``prompt + completion + eos``,
chosen and rejected rows go through the model in one batch (chosen first), and the loss is
:func:`rlhf_workbench.train.rm_loss.bradley_terry_loss`.

Pairs come from the run's rankings (:func:`pairs_from_rankings`) or from preference files
such as Anthropic HH-RLHF (:func:`load_preference_file`). :class:`RewardModelRanker` scores a
prompt's traces so that a trained reward model can later serve as a feedback source (it
satisfies :class:`rlhf_workbench.feedback.sources.Ranker`; it is not wired into the loop).
"""

from __future__ import annotations

import gzip
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from sqlalchemy import select
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from rlhf_workbench.model.loading import DTYPES, resolve_model_path
from rlhf_workbench.store import CompletionRow, RankingRow
from rlhf_workbench.train.rm_features import (PooledRewardModel, is_pooled_dir, load_pooled_reward_model,
                                              new_pooled_reward_model, train_reward_head)
from rlhf_workbench.train.rm_inputs import encode_texts, right_pad
from rlhf_workbench.train.rm_loss import bradley_terry_loss

HH_ASSISTANT = "\n\nAssistant:"


@dataclass(frozen=True)
class RewardPair:
    """One preference: ``prompt + chosen`` is preferred to ``prompt + rejected``.

    Attributes:
        prompt: text shared by both sides; it is concatenated with the completion as is, so it
            carries its own separator (e.g. ends with ``"\\n\\n"`` or ``"\\n\\nAssistant:"``).
        chosen, rejected: the completions' texts.
        margin: required reward gap for the Llama 2 margin loss (rank distance), or None.
        task_id, chosen_id, rejected_id: provenance when the pair comes from the store.
    """

    prompt: str
    chosen: str
    rejected: str
    margin: float | None = None
    task_id: str | None = None
    chosen_id: int | None = None
    rejected_id: int | None = None


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------


def load_reward_model(
    name_or_path: str, dtype: torch.dtype | str = torch.float32, tokenizer: PreTrainedTokenizerBase | None = None,
    pooling: str | None = None, layer: int = -1, max_tokens: int | None = 128, mixed_precision: str = "auto",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM backbone with a fresh scalar head (``AutoModelForSequenceClassification``, ``num_labels=1``),
    a frozen backbone with a pooled head (``pooling`` given), or a saved reward model of either kind.

    A directory saved by :meth:`rlhf_workbench.train.rm_features.PooledRewardModel.save_pretrained`
    (it has ``reward_head.json``) loads as that trained frozen-backbone model, whatever the other
    arguments say; its tokenizer comes from the directory. With ``pooling`` (``"last"``,
    ``"mean"``, ``"mean_last"``) a new :class:`~rlhf_workbench.train.rm_features.PooledRewardModel` is
    built on the frozen ``name_or_path`` with a zero head (``layer``, ``max_tokens``,
    ``mixed_precision`` as there); train it with :func:`train_reward_model` (cached features).

    Args:
        name_or_path: preset short name (e.g. the bundled ``smollm2-135m``, converted from its
            GGUF on first use), hub id or local directory; resolved by
            :func:`rlhf_workbench.model.loading.resolve_model_path`.
        dtype: a torch dtype or one of ``"fp32"``, ``"bf16"``.
        tokenizer: a tokenizer to use instead of loading one from the model directory.

    Returns:
        ``(model, tokenizer)``: the head is randomly initialised (seed torch first for
        reproducibility); the tokenizer pads on the right and ``model.config.pad_token_id`` is
        its pad id (the eos token when it has none), which the model's pooling needs to find
        the last real token.
    """
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    pooled_dir = is_pooled_dir(name_or_path)
    path = name_or_path if pooled_dir else resolve_model_path(name_or_path)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if pooled_dir:
        model = load_pooled_reward_model(path)
    elif pooling is not None:
        model = new_pooled_reward_model(name_or_path, pooling, layer, max_tokens, mixed_precision)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def sequence_rewards(model: PreTrainedModel, rows: list[list[int]], pad_id: int) -> torch.Tensor:
    """``[len(rows)]`` rewards: right-padded forward, head output at the last non-pad token."""
    device = next(model.parameters()).device
    ids, mask = right_pad(rows, pad_id, device)
    return model(input_ids=ids, attention_mask=mask, use_cache=False).logits.squeeze(-1).float()


def score_texts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                completions: Sequence[str], batch_size: int = 8, max_length: int | None = 512) -> list[float]:
    """Rewards of ``prompt + completion`` for each pair of texts (eval mode, no gradients)."""
    rows = encode_texts(tokenizer, prompts, completions, max_length)
    was_training = model.training
    model.eval()
    out: list[float] = []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            out += sequence_rewards(model, rows[i: i + batch_size], tokenizer.pad_token_id).tolist()
    model.train(was_training)
    return out


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def pairs_from_rankings(store, source: str | None = None, with_margin: bool = False) -> list[RewardPair]:
    """Every preference a stored ranking implies.

    Within one ranking (one prompt's traces): a lower rank beats a higher rank; a ranked
    (verified-correct, unflagged) trace beats every unranked (wrong or flagged) one; equal
    ranks and two unranked traces are ties and give no pair.

    Args:
        store: a :class:`rlhf_workbench.store.Store`.
        source: only rankings from this source (``"rules"``, ``"human"``, ...); None takes all,
            so a rollout ranked by two sources contributes its pairs twice.
        with_margin: set ``margin`` to the rank distance; an unranked trace counts as one rank
            below the ranking's worst ranked trace.

    Returns:
        Pairs ordered by ranking id, then chosen (rank, id), then rejected (rank, id). The
        prompt is the user message the task was shown with in the run (:meth:`Store.prompts`,
        the run's ``tasks.instruction`` applied) + ``"\\n\\n"``; the completions are the traces'
        decoded texts.
    """
    pairs: list[RewardPair] = []
    with store.session() as s:
        q = select(RankingRow).order_by(RankingRow.id)
        if source is not None:
            q = q.where(RankingRow.source == source)
        rankings = list(s.scalars(q))
        ids = {int(k) for r in rankings for k in r.ranks}
        texts = {c.id: c.text for c in s.scalars(select(CompletionRow).where(CompletionRow.id.in_(ids)))}
    prompts = {k: v + "\n\n" for k, v in store.prompts({r.task_id for r in rankings}).items()}
    for r in rankings:
        ranks = {int(k): v for k, v in r.ranks.items()}
        present = [v for v in ranks.values() if v is not None]
        below_worst = max(present, default=0) + 1
        order = sorted(ranks, key=lambda c: (math.inf if ranks[c] is None else ranks[c], c))
        for i, a in enumerate(order):
            if ranks[a] is None:
                break  # unranked traces are never chosen
            for b in order[i + 1:]:
                rb = below_worst if ranks[b] is None else ranks[b]
                if rb <= ranks[a]:
                    continue  # tie
                pairs.append(RewardPair(prompt=prompts[r.task_id], chosen=texts[a], rejected=texts[b],
                                        margin=float(rb - ranks[a]) if with_margin else None,
                                        task_id=r.task_id, chosen_id=a, rejected_id=b))
    return pairs


def split_hh_dialogue(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """Split two HH-RLHF dialogues into ``(prompt, chosen, rejected)``.

    The prompt is the shared prefix up to and including its last ``"\\n\\nAssistant:"``; the
    completions are the rest of each dialogue (usually the final assistant turn, starting
    with a space). Returns None when the two share no assistant turn or do not differ.
    """
    n = 0
    for x, y in zip(chosen, rejected):
        if x != y:
            break
        n += 1
    cut = chosen.rfind(HH_ASSISTANT, 0, n)  # the whole marker lies inside the shared prefix
    if cut < 0:
        return None
    end = cut + len(HH_ASSISTANT)
    c, r = chosen[end:], rejected[end:]
    if c == r:
        return None
    return chosen[:end], c, r


def load_preference_file(path: str | Path, limit: int | None = None, offset: int = 0) -> list[RewardPair]:
    """Preference pairs from a jsonl (or ``.jsonl.gz``) file.

    Records either have ``prompt``/``chosen``/``rejected`` (and optionally ``margin``), or,
    as Anthropic HH-RLHF (Bai et al. 2022), only ``chosen``/``rejected`` full dialogues
    (``"\\n\\nHuman: ... \\n\\nAssistant: ..."``), split by :func:`split_hh_dialogue`;
    HH records that cannot be split (identical or no shared assistant turn) are skipped.

    Args:
        path: the file.
        limit: at most this many pairs (None: all).
        offset: skip this many usable pairs first (for disjoint train/held-out slices).

    Raises:
        ValueError: a record lacks ``chosen`` or ``rejected``.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    out: list[RewardPair] = []
    seen = 0
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and len(out) >= limit:
                break
            rec = json.loads(line)
            if "chosen" not in rec or "rejected" not in rec:
                raise ValueError(f"{path}:{line_no}: record needs 'chosen' and 'rejected'")
            if "prompt" in rec:
                pair = RewardPair(rec["prompt"], rec["chosen"], rec["rejected"], rec.get("margin"))
            else:
                split = split_hh_dialogue(rec["chosen"], rec["rejected"])
                if split is None:
                    continue
                pair = RewardPair(*split)
            seen += 1
            if seen > offset:
                out.append(pair)
    return out


# --------------------------------------------------------------------------------------------
# training and evaluation
# --------------------------------------------------------------------------------------------


def train_reward_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[RewardPair],
    lr: float = 1e-5,
    epochs: int = 1,
    batch_size: int = 8,
    max_length: int | None = 512,
    seed: int = 0,
    max_grad_norm: float | None = 1.0,
    weight_decay: float = 0.0,
    head_epochs: int = 30,
    head_lr: float = 3e-3,
    head_weight_decay: float = 0.1,
    head_batch_size: int = 64,
    eval_pairs: Sequence[RewardPair] | None = None,
) -> list[dict[str, float]]:
    """Fit the reward model on preference pairs with the Bradley–Terry loss.

    A frozen-backbone :class:`~rlhf_workbench.train.rm_features.PooledRewardModel` (from
    ``load_reward_model(..., pooling=...)``) is trained instead by
    :func:`rlhf_workbench.train.rm_features.train_reward_head`: one no-grad forward per distinct text
    (``batch_size`` texts per forward), then ``head_epochs`` epochs of AdamW (``head_lr``,
    ``head_weight_decay``, cosine schedule, ``head_batch_size`` pairs per step) on the cached
    features; it returns one record per *epoch* (``epoch``, ``pairs_seen``, ``loss``,
    ``accuracy``, ``margin``, ``learning_rate``, ``eval_accuracy`` on ``eval_pairs``), and
    ``lr``, ``epochs``, ``max_length``, ``max_grad_norm`` and ``weight_decay`` are unused (its
    window is the model's ``max_tokens``).

    For a full sequence-classification model:

    AdamW at a constant learning rate (``weight_decay`` and gradient clipping at
    ``max_grad_norm`` as TRL's defaults); each step runs the batch's chosen rows then its
    rejected rows as one right-padded forward pass and minimises
    :func:`~rlhf_workbench.train.rm_loss.bradley_terry_loss` (with the pairs' margins when every pair
    of the batch has one). Pairs are shuffled every epoch with ``seed``.

    Args:
        model: a ``num_labels=1`` sequence-classification model (:func:`load_reward_model`).
        tokenizer: its tokenizer (``pad_token_id`` must equal ``model.config.pad_token_id``).
        pairs: training pairs.
        lr: learning rate.
        epochs: passes over ``pairs``.
        batch_size: pairs per step (``2 * batch_size`` sequences per forward).
        max_length: token cap per sequence (left-truncated, see :func:`encode_texts`).
        seed: shuffling seed.
        max_grad_norm: clip the global gradient norm to this (None: no clipping).
        weight_decay: AdamW decoupled weight decay.

    Returns:
        One dict per step: ``step``, ``epoch``, ``loss`` (nats), ``grad_norm`` and the
        loss's stats (``accuracy``, ``margin``, ``min_reward``, ``mean_reward``, ``max_reward``).

    Raises:
        ValueError: no pairs, or the model's pad token differs from the tokenizer's.
    """
    if not pairs:
        raise ValueError("train_reward_model: no pairs")
    if model.config.pad_token_id != tokenizer.pad_token_id:
        raise ValueError("train_reward_model: model.config.pad_token_id must equal tokenizer.pad_token_id")
    if isinstance(model, PooledRewardModel):
        return train_reward_head(model, tokenizer, pairs, head_epochs, head_lr, head_weight_decay, head_batch_size,
                                 seed, batch_size, eval_pairs)
    return _fit_full(model, tokenizer, pairs, lr, epochs, batch_size, max_length, seed, max_grad_norm, weight_decay)


def _fit_full(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[RewardPair], lr: float,
              epochs: int, batch_size: int, max_length: int | None, seed: int, max_grad_norm: float | None,
              weight_decay: float) -> list[dict[str, float]]:
    """:func:`train_reward_model` for a full sequence-classification model (its arguments and return)."""
    chosen = encode_texts(tokenizer, [p.prompt for p in pairs], [p.chosen for p in pairs], max_length)
    rejected = encode_texts(tokenizer, [p.prompt for p in pairs], [p.rejected for p in pairs], max_length)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    rng = random.Random(seed)
    model.train()
    metrics: list[dict[str, float]] = []
    step = 0
    for epoch in range(epochs):
        order = list(range(len(pairs)))
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            idx = order[i: i + batch_size]
            rewards = sequence_rewards(model, [chosen[j] for j in idx] + [rejected[j] for j in idx], tokenizer.pad_token_id)
            r_c, r_r = rewards.chunk(2)
            margins = [pairs[j].margin for j in idx]
            margin = None if any(m is None for m in margins) else torch.tensor(margins, device=rewards.device)
            loss, stats = bradley_terry_loss(r_c, r_r, margin)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
            else:
                grad_norm = float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None)))
            optimizer.step()
            step += 1
            metrics.append({"step": step, "epoch": epoch, "loss": loss.item(), "grad_norm": grad_norm,
                            **{k: v.item() for k, v in stats.items()}})
    model.eval()
    return metrics


def pairwise_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[RewardPair],
                      batch_size: int = 8, max_length: int | None = 512) -> float:
    """Fraction of pairs whose chosen side gets a strictly higher reward (ties count as wrong).

    Raises:
        ValueError: no pairs.
    """
    if not pairs:
        raise ValueError("pairwise_accuracy: no pairs")
    prompts = [p.prompt for p in pairs]
    r_c = score_texts(model, tokenizer, prompts, [p.chosen for p in pairs], batch_size, max_length)
    r_r = score_texts(model, tokenizer, prompts, [p.rejected for p in pairs], batch_size, max_length)
    return sum(c > r for c, r in zip(r_c, r_r)) / len(pairs)


# --------------------------------------------------------------------------------------------
# as a feedback source
# --------------------------------------------------------------------------------------------


@dataclass
class RewardModelRanker:
    """Scores one prompt's traces with a reward model (a :class:`rlhf_workbench.feedback.sources.Ranker`).

    The text scored is ``task.transcript() + "\\n\\n" + completion.text`` (``transcript`` is
    ``prompt()`` except for a multi-turn open task), the format of
    :func:`pairs_from_rankings`, when the call's ``task`` is given or ``tasks`` knows the
    completion's task; otherwise the decoded ``prompt_ids`` (chat template included) followed by
    the text. Verifications are ignored: the feedback code already keeps wrong traces below
    correct ones. Scores are the raw scalars (:class:`rlhf_workbench.feedback.sources.StandardizedRanker`
    z-scores them within a group when the reward model is a mixed feedback source).
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    tasks: Mapping[str, object] | None = None
    batch_size: int = 8
    max_length: int | None = 512

    def __call__(self, completions, verifications, task=None) -> list[float]:
        """Raw rewards, one per completion; ``task`` (a :class:`~rlhf_workbench.tasks.task.Task`) is the
        prompt's task, used for every completion when given."""
        prompts = []
        for c in completions:
            t = task if task is not None else (self.tasks or {}).get(c.task_id)
            prompts.append(t.transcript() + "\n\n" if t is not None
                           else self.tokenizer.decode(c.prompt_ids, skip_special_tokens=False))
        return score_texts(self.model, self.tokenizer, prompts, [c.text for c in completions],
                           self.batch_size, self.max_length)
