"""Feedback: turn verified traces into a ranking per prompt, rewards and preference pairs.

The verifier decides correct vs wrong; a pluggable ranker orders the *correct* traces of a
prompt. :func:`make_ranker` mixes the configured sources with weights,
``score = Σ_s w_s · score_s``: rule rewards (format, length, verifier; in [0, 1]), a trained
reward model (z-scored within the prompt's correct traces) and an LLM judge (win rate in
[0, 1], :mod:`rlhf_workbench.feedback.judge`); the expert web page ranks in its own way
(:mod:`rlhf_workbench.human.annotation`). Wrong traces are never ranked above a correct one, never
get a positive reward and are never chosen.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch

from rlhf_workbench.config import FeedbackConfig, FeedbackSource
from rlhf_workbench.feedback.judge import JudgeRanker, LocalChat, OpenAIChat, PairwiseJudge
from rlhf_workbench.model.rollout import Completion
from rlhf_workbench.tasks.task import Task
from rlhf_workbench.train.reward_model import RewardModelRanker, load_reward_model
from rlhf_workbench.verify import Verification

RULE_SOURCES = ("format", "length", "verifier")


class Ranker(Protocol):
    """Scores the traces of one prompt; higher is better. Only correct traces' scores are used.

    ``task`` is the prompt's :class:`~rlhf_workbench.tasks.task.Task` (the question and ground truth);
    rankers that only look at the traces ignore it, model-based ones (the judge) need it.
    """

    def __call__(self, completions: Sequence[Completion], verifications: Sequence[Verification],
                 task: Task | None = None) -> list[float]: ...


def rule_score(source: FeedbackSource, completion: Completion, verification: Verification, max_tokens: int) -> float:
    """One rule reward in [0, 1].

    - ``format``: 1.0 when the answer came from an explicit ``Answer:`` line or ``\\boxed{}``.
    - ``length``: ``1 - n/max_tokens`` (shorter is better), or ``max(0, 1 - |n - target|/target)``.
    - ``verifier``: 1.0 if correct.

    Raises:
        ValueError: unknown source name.
    """
    n = len(completion.token_ids)
    if source.name == "format":
        return float(verification.format_ok)
    if source.name == "length":
        if source.target_tokens:
            return max(0.0, 1.0 - abs(n - source.target_tokens) / source.target_tokens)
        return max(0.0, 1.0 - n / max(1, max_tokens))
    if source.name == "verifier":
        return float(verification.correct)
    raise ValueError(f"unknown feedback source {source.name!r}")


@dataclass
class RuleRanker:
    """Weighted mix of rule rewards: ``score = Σ_s w_s · rule_s``."""

    sources: list[FeedbackSource]
    max_tokens: int

    def __call__(self, completions, verifications, task: Task | None = None) -> list[float]:
        """One score per trace; ``task`` is not needed (accepted for the :class:`Ranker` protocol)."""
        return [
            sum(s.weight * rule_score(s, c, v, self.max_tokens) for s in self.sources)
            for c, v in zip(completions, verifications)
        ]


def rankable(correct: bool, flagged: bool, open_task: bool) -> bool:
    """Whether a trace takes part in ranking: not flagged by the safety filter, and verified
    correct for a task with an answer key; every unflagged trace of an open task (no key).

    Args:
        correct: the verifier's verdict (always False for an open task: "no key").
        flagged: the safety filter flagged the trace.
        open_task: the task has no answer key (``answer_type="open"``).

    Returns:
        True when the trace is ranked (and can be chosen in a pair).
    """
    return not flagged and (open_task or bool(correct))


def rank_group(eligible: Sequence[bool], scores: Sequence[float]) -> list[int | None]:
    """Dense ranks (0 = best, ties share a rank) of the eligible traces; the others get None.

    Args:
        eligible: one per trace of a prompt: :func:`rankable` (verified correct, or any trace of
            an open task; not flagged).
        scores: ranker scores, same length (higher is better).

    Returns:
        ``ranks[i]`` for each trace.
    """
    levels = sorted({round(s, 9) for s, ok in zip(scores, eligible) if ok}, reverse=True)
    return [levels.index(round(s, 9)) if ok else None for s, ok in zip(scores, eligible)]


def rank_rewards(ranks: Sequence[int | None]) -> list[float]:
    """Map ranks to rewards: best 1.0, worst 0.0, linear in between (a lone rank gets 1.0);
    unranked (wrong) traces get 0.0."""
    present = [r for r in ranks if r is not None]
    worst = max(present, default=0)
    return [0.0 if r is None else (1.0 if worst == 0 else 1.0 - r / worst) for r in ranks]


def completion_rewards(ranks: Sequence[int | None], ranking_weight: float) -> list[float]:
    """GRPO reward per trace: ``1 + ranking_weight · rank_reward`` if ranked, else 0.

    Correctness dominates; the ranking only orders correct traces among themselves, so a wrong
    trace always scores below every correct one. For an open task every unflagged trace is ranked
    (:func:`rankable`), so the ranking alone spreads the rewards and a flagged trace gets 0.
    """
    return [0.0 if r is None else 1.0 + ranking_weight * rr for r, rr in zip(ranks, rank_rewards(ranks))]


def length_penalized(rewards: Sequence[float], ranks: Sequence[int | None], lengths: Sequence[int],
                     penalty: float, max_tokens: int) -> list[float]:
    """``rewards`` of ranked traces minus ``penalty · length / max_tokens``; unranked traces keep
    theirs (0).

    A guard against length hacking (a reward model or a judge that likes longer answers teaches
    the policy to fill its token budget: Singhal et al. 2023, "A long way to go: investigating
    length correlations in RLHF"); the penalty is linear in the completion's tokens, as the
    length penalty of Park et al. 2024 ("Disentangling length from quality in DPO") is in the
    implicit reward. With ``penalty < 1`` a ranked trace (reward >= 1) still scores above an
    unranked one.

    Args:
        rewards, ranks, lengths: per trace, same length (lengths in tokens).
        penalty: the coefficient (0: rewards unchanged).
        max_tokens: the rollout's token cap (the length's unit).

    Raises:
        ValueError: the sequences differ in length.
    """
    if not len(rewards) == len(ranks) == len(lengths):
        raise ValueError(f"length_penalized: {len(rewards)} rewards, {len(ranks)} ranks, {len(lengths)} lengths")
    if penalty == 0:
        return list(rewards)
    return [x if r is None else x - penalty * n / max_tokens for x, r, n in zip(rewards, ranks, lengths)]


def build_pairs(
    ranks: Sequence[int | None], pairing: str = "best_vs_wrong", max_pairs: int = 2, flagged: Sequence[bool] | None = None
) -> list[tuple[int, int]]:
    """Preference pairs ``(chosen_index, rejected_index)`` within one prompt's traces.

    The chosen trace is always correct (ranked) and not flagged. Pairings:

    - ``best_vs_wrong``: a best-ranked trace against each wrong trace.
    - ``best_vs_worst``: best against wrong traces, else against the worst strictly lower-ranked correct trace.
    - ``all_correct_vs_wrong``: every correct trace against every wrong one, best first.

    Returns:
        Up to ``max_pairs`` index pairs; empty when no valid pair exists.

    Raises:
        ValueError: unknown pairing.
    """
    flagged = flagged or [False] * len(ranks)
    correct = sorted((i for i, r in enumerate(ranks) if r is not None and not flagged[i]), key=lambda i: ranks[i])
    wrong = [i for i, r in enumerate(ranks) if r is None]
    if not correct:
        return []
    best = correct[0]
    if pairing == "best_vs_wrong":
        pairs = [(best, j) for j in wrong]
    elif pairing == "best_vs_worst":
        lower = [i for i in correct if ranks[i] > ranks[best]]
        pairs = [(best, j) for j in wrong] or ([(best, lower[-1])] if lower else [])
    elif pairing == "all_correct_vs_wrong":
        pairs = [(i, j) for i in correct for j in wrong]
    else:
        raise ValueError(f"unknown pairing {pairing!r}")
    return pairs[:max_pairs]


def _eligible(verifications: Sequence) -> list[bool]:
    """Traces a model-based source scores: verified correct (a None verification counts as correct)."""
    return [v is None or bool(v.correct) for v in verifications]


def zscore(values: Sequence[float]) -> list[float]:
    """``(x - mean) / std`` with the population std; all zeros when fewer than two values or std 0."""
    n = len(values)
    if n < 2:
        return [0.0] * n
    mean = sum(values) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in values) / n)
    return [0.0] * n if std < 1e-12 else [(x - mean) / std for x in values]


@dataclass
class StandardizedRanker:
    """Runs ``inner`` on a prompt's verified-correct traces only and z-scores its scores over them.

    Used for the reward model, whose raw scalar has an arbitrary offset and scale (Bradley–Terry
    is shift-invariant): within a group the standardised score has mean 0 and std 1 (population
    std, over the correct traces), so its weight is comparable to the [0, 1] rule and judge
    scores. Wrong traces are not scored and get 0.0 (they are never ranked anyway); a group with
    fewer than two correct traces, or equal raw scores, gets all zeros.
    """

    inner: Ranker

    def __call__(self, completions, verifications, task: Task | None = None) -> list[float]:
        """Standardised scores, one per trace."""
        idx = [i for i, ok in enumerate(_eligible(verifications)) if ok]
        out = [0.0] * len(completions)
        if not idx:
            return out
        raw = self.inner([completions[i] for i in idx], [verifications[i] for i in idx], task=task)
        for i, z in zip(idx, zscore(raw)):
            out[i] = z
        return out


@dataclass
class MixedRanker:
    """Weighted sum of sources: ``score = Σ_s w_s · score_s``.

    Attributes:
        parts: ``(weight, name, ranker)``; each ranker returns its source's unweighted score.
            A part with weight 0 is skipped (:func:`make_ranker` leaves such sources out).
    """

    parts: list[tuple[float, str, Ranker]] = field(default_factory=list)

    def __call__(self, completions, verifications, task: Task | None = None) -> list[float]:
        """Mixed scores, one per trace.

        Raises:
            ValueError: a model-based part needs ``task`` and it is None (the judge).
        """
        total = [0.0] * len(completions)
        for weight, _, ranker in self.parts:
            if weight == 0:
                continue
            for i, s in enumerate(ranker(completions, verifications, task=task)):
                total[i] += weight * s
        return total

    def stats(self) -> dict[str, float]:
        """Counters of the model-based parts for logging (the judge's ``judge/calls``,
        ``judge/consistency_rate``, ...); empty when there are none."""
        out: dict[str, float] = {}
        for _, name, ranker in self.parts:
            st = getattr(ranker, "stats", None)
            if st is not None and hasattr(st, "as_dict"):
                out.update(st.as_dict(f"{name}/"))
        return out


@functools.lru_cache(maxsize=4)
def _reward_model(path: str):
    """A trained reward model and tokenizer, loaded once per process (GPU when available)."""
    model, tokenizer = load_reward_model(path)
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval(), tokenizer


@functools.lru_cache(maxsize=4)
def _local_judge(name: str) -> LocalChat:
    """A local judge model, loaded once per process."""
    return LocalChat.load(name)


def judge_backend(source: FeedbackSource) -> OpenAIChat | LocalChat:
    """The chat backend of a ``judge`` source: an :class:`~rlhf_workbench.feedback.judge.OpenAIChat`
    on ``source.url`` (a new client each call: close it when done), else the local model
    ``source.model`` as a :class:`~rlhf_workbench.feedback.judge.LocalChat`, loaded once per process.

    Raises:
        OSError: the local judge model cannot be loaded.
        rlhf_workbench.feedback.judge.JudgeError: the endpoint's key variable is unset, or without
            ``source.api_model`` its ``/models`` cannot be reached or lists no model.
    """
    if source.url is not None:
        return OpenAIChat(source.url, source.api_model, source.api_key_env, source.timeout)
    return _local_judge(source.model)


def make_source_ranker(source: FeedbackSource, max_tokens: int, seed: int = 0) -> Ranker:
    """The unweighted ranker of one source.

    - rule sources: :class:`RuleRanker` of that source alone, weight 1, in [0, 1];
    - ``reward_model``: :class:`~rlhf_workbench.train.reward_model.RewardModelRanker` on
      ``source.path`` (loaded with :func:`~rlhf_workbench.train.reward_model.load_reward_model`,
      cached per process), wrapped in :class:`StandardizedRanker`;
    - ``judge``: :class:`~rlhf_workbench.feedback.judge.JudgeRanker` over an
      :class:`~rlhf_workbench.feedback.judge.OpenAIChat` (``source.url``) or a cached
      :class:`~rlhf_workbench.feedback.judge.LocalChat` (``source.model``), win rate in [0, 1].

    Raises:
        ValueError: unknown source name.
        OSError: the reward model or local judge cannot be loaded.
        rlhf_workbench.feedback.judge.JudgeError: the judge endpoint cannot be reached or its key is unset.
    """
    if source.name in RULE_SOURCES:
        return RuleRanker([source.model_copy(update={"weight": 1.0})], max_tokens)
    if source.name == "reward_model":
        model, tokenizer = _reward_model(source.path)
        return StandardizedRanker(RewardModelRanker(model, tokenizer))
    if source.name == "judge":
        return JudgeRanker(PairwiseJudge(judge_backend(source)), max_pairs=source.max_pairs, seed=seed)
    raise ValueError(f"unknown feedback source {source.name!r}")


def make_ranker(cfg: FeedbackConfig, max_tokens: int, seed: int = 0) -> Ranker:
    """The ranker a config describes: ``Σ_s w_s · score_s`` over ``cfg.sources``.

    With only rule sources this is a :class:`RuleRanker`; otherwise a :class:`MixedRanker` whose
    rule sources form one part and each reward model or judge one more (see
    :func:`make_source_ranker`). Building it loads the models (cached per process) and, for a
    judge given by ``url`` without ``api_model``, asks the endpoint for its model list.

    Args:
        cfg: feedback settings.
        max_tokens: the rollout's completion cap (the ``length`` rule's scale).
        seed: seed of the judge's pair subsets (``max_pairs``).
    """
    rules = [s for s in cfg.sources if s.name in RULE_SOURCES]
    others = [s for s in cfg.sources if s.name not in RULE_SOURCES]
    if not others:
        return RuleRanker(rules, max_tokens)
    parts: list[tuple[float, str, Ranker]] = [(1.0, "rules", RuleRanker(rules, max_tokens))] if rules else []
    for k, s in enumerate(others):
        if s.weight == 0:  # not loaded, not called
            continue
        name = s.name if sum(o.name == s.name for o in others) == 1 else f"{s.name}{k}"
        parts.append((s.weight, name, make_source_ranker(s, max_tokens, seed)))
    return MixedRanker(parts)
