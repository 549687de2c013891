"""Feedback: turn verified traces into a ranking per prompt, rewards and preference pairs.

The verifier decides correct vs wrong; a pluggable ranker orders the *correct* traces of a
prompt (here: rule rewards such as format and length, mixed with weights; the expert web
page and model-based sources plug in as other rankers). Wrong traces are never ranked
above a correct one, never get a positive reward and are never chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from .config import FeedbackConfig, FeedbackSource
from .rollout import Completion
from .verify import Verification


class Ranker(Protocol):
    """Scores the traces of one prompt; higher is better. Only correct traces' scores are used."""

    def __call__(self, completions: Sequence[Completion], verifications: Sequence[Verification]) -> list[float]: ...


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

    def __call__(self, completions, verifications) -> list[float]:
        return [
            sum(s.weight * rule_score(s, c, v, self.max_tokens) for s in self.sources)
            for c, v in zip(completions, verifications)
        ]


def rank_group(eligible: Sequence[bool], scores: Sequence[float]) -> list[int | None]:
    """Dense ranks (0 = best, ties share a rank) of the eligible traces; the others get None.

    Args:
        eligible: one per trace of a prompt: verified correct (and not flagged).
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
    """GRPO reward per trace: ``1 + ranking_weight · rank_reward`` if correct, else 0.

    Correctness dominates; the ranking only orders correct traces among themselves, so a wrong
    trace always scores below every correct one.
    """
    return [0.0 if r is None else 1.0 + ranking_weight * rr for r, rr in zip(ranks, rank_rewards(ranks))]


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


def make_ranker(cfg: FeedbackConfig, max_tokens: int) -> Ranker:
    """The ranker a config describes (rule sources mixed with weights)."""
    return RuleRanker(cfg.sources, max_tokens)
