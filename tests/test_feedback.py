"""Ranking, rank rewards and preference pairs: a wrong trace is never preferred."""

from rlhf_workbench.config import FeedbackSource
from rlhf_workbench.feedback import RuleRanker, build_pairs, completion_rewards, rank_group, rank_rewards
from rlhf_workbench.rollout import Completion
from rlhf_workbench.verify import Verification


def V(correct, fmt=True):
    return Verification(correct=correct, extracted="1", format_ok=fmt, reason="")


def C(n):
    return Completion("t", 0, [1], list(range(n)), [0.0] * n, "x", True)


def test_rank_rewards_best_middle_worst():
    assert rank_rewards([0, 1, 2]) == [1.0, 0.5, 0.0]
    assert rank_rewards([0]) == [1.0]
    assert rank_rewards([None, 0, 1]) == [0.0, 1.0, 0.0]


def test_rank_group_ties_and_wrong():
    ranks = rank_group([True, False, True, True], [0.5, 9.0, 0.5, 0.7])
    assert ranks == [1, None, 1, 0]  # the wrong trace's high score does not rank it


def test_completion_rewards_wrong_below_every_correct():
    rewards = completion_rewards([None, 0, 1, None], ranking_weight=0.2)
    assert rewards == [0.0, 1.2, 1.0, 0.0]
    assert min(r for r, k in zip(rewards, [None, 0, 1, None]) if k is not None) > max(
        r for r, k in zip(rewards, [None, 0, 1, None]) if k is None)


def test_pairs_never_choose_wrong_or_flagged():
    ranks = [None, 1, 0, None]
    assert build_pairs(ranks, "best_vs_wrong", 5) == [(2, 0), (2, 3)]
    assert build_pairs(ranks, "all_correct_vs_wrong", 5) == [(2, 0), (2, 3), (1, 0), (1, 3)]
    assert build_pairs([1, 0], "best_vs_worst", 5) == [(1, 0)]
    assert build_pairs([None, None], "best_vs_wrong", 5) == []
    assert build_pairs(ranks, "best_vs_wrong", 5, flagged=[False, False, True, False]) == [(1, 0), (1, 3)]
    for pairing in ("best_vs_wrong", "best_vs_worst", "all_correct_vs_wrong"):
        for chosen, rejected in build_pairs(ranks, pairing, 10):
            assert ranks[chosen] is not None


def test_rule_ranker_prefers_format_then_short():
    ranker = RuleRanker([FeedbackSource(name="format", weight=1.0), FeedbackSource(name="length", weight=0.1)], 64)
    scores = ranker([C(10), C(40), C(10)], [V(True, True), V(True, True), V(True, False)])
    assert scores[0] > scores[1] > scores[2]
    assert rank_group([True] * 3, scores) == [0, 1, 2]
