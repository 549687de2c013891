"""Active selection (issue 15, ``feedback.selection``): hand-computed informativeness scores, the
score stored with the round, the order in which the app serves claims, and a seeded random order."""

from __future__ import annotations

import math

import pytest

from rlhf_workbench.human.accounts import create_user
from rlhf_workbench.human.annotation import next_item, save_annotation
from rlhf_workbench.config import RunConfig
from rlhf_workbench.run.loop import store_rollout
from rlhf_workbench.model.rollout import Completion
from rlhf_workbench.human.selection import (item_score, pair_uncertainty, queue_md, random_score, score_rollout, serve_order,
                                      why_served)
from rlhf_workbench.store import Rollout, Store
from rlhf_workbench.tasks.task import Task


def test_pair_uncertainty_by_hand():
    assert pair_uncertainty(-3.0, -3.0) == 1.0
    p = 1 / (1 + math.exp(-2.0))  # margin 2 nats
    assert pair_uncertainty(-1.0, -3.0) == pytest.approx(4 * p * (1 - p))  # 0.4200
    assert pair_uncertainty(-1.0, -3.0) == pytest.approx(0.419974, abs=1e-6)
    assert pair_uncertainty(0.0, -1000.0) == 0.0


def test_item_score_by_hand():
    # one distinct text (copies differ only in whitespace): nothing to separate
    s = item_score(["1 + 1 = 2\nAnswer: 2", "1 + 1 = 2\n\nAnswer:  2 "], [[-1.0], [-5.0]])
    assert s.score == 0.0 and "1 distinct trace (×2 identical)" in s.reason
    # two distinct texts, equal sequence log-probs (-1.5 each): (2 - 1) * 1
    s = item_score(["a", "b"], [[-1.0, -0.5], [-1.5]])
    assert s.score == pytest.approx(1.0)
    # three distinct: seq log-probs -1, -1, -3 (the copy of "c" averages -2 and -4) -> pairs 1, u2, u2
    u2 = pair_uncertainty(-1.0, -3.0)
    s = item_score(["a", "b", "c", "c"], [[-1.0], [-0.5, -0.5], [-2.0], [-4.0]])
    assert s.score == pytest.approx(2 * (1 + 2 * u2) / 3, abs=1e-6)
    assert s.reason.startswith("3 distinct traces")
    # a confident policy scores lower than an indifferent one with the same alternatives
    assert item_score(["a", "b"], [[-0.1], [-9.0]]).score < item_score(["a", "b"], [[-2.0], [-2.2]]).score
    # sources that order the two distinct traces oppositely add (d - 1) * 1
    s = item_score(["a", "b"], [[-1.0], [-1.0]], {"rm1": [1.0, 0.0], "rm2": [0.0, 1.0]})
    assert s.score == pytest.approx(2.0) and "disagree on 100 %" in s.reason
    with pytest.raises(ValueError, match="2 traces but 1"):
        item_score(["a", "b"], [[-1.0]])


def test_serve_order_modes():
    sel = {"mode": "uncertainty", "seed": 0, "items": {"a": {"score": 0.2, "random": 0.9},
                                                        "b": {"score": 1.5, "random": 0.1, "reason": "2 distinct"},
                                                        "c": {"score": 0.7, "random": 0.5}}}
    assert serve_order(sel, ["a", "b", "c"], {}, 1) == ["b", "c", "a"]
    assert serve_order(sel, ["a", "b", "c"], {"b": {7}}, 1) == ["c", "a", "b"]  # fewest holders first
    assert serve_order({**sel, "mode": "random"}, ["a", "b", "c"], {}, 1) == ["b", "c", "a"]
    assert "score 1.50" in why_served(sel, "b")
    assert why_served(None, "x") == "fewest: no score stored"


def test_random_is_seeded():
    draws = [random_score(3, 1, f"t{i}") for i in range(50)]
    assert draws == [random_score(3, 1, f"t{i}") for i in range(50)]
    assert draws != [random_score(4, 1, f"t{i}") for i in range(50)]
    assert all(0 <= x < 1 for x in draws) and 0.3 < sum(draws) / 50 < 0.7
    with pytest.raises(ValueError, match="feedback.selection"):
        score_rollout("best", 0, 1, {})


def _seed_store(url: str, mode: str) -> tuple[Store, int, int]:
    """Three tasks: t0 with one distinct verified trace, t1 with two the policy is sure between,
    t2 with two it is indifferent between; one rejected trace each."""
    store = Store(url)
    tasks = [Task(id=f"t{i}", question=f"What is {i} + 1?", answer=str(i + 1)) for i in range(3)]
    store.add_tasks(tasks, "train")
    store.publish_version(0, None, "base", None, {}, round=0)
    lp = {"t0": ([-1.0], [-1.0]), "t1": ([-0.2], [-8.0]), "t2": ([-2.0], [-2.1])}
    comps = []
    for t in tasks:
        a, b = lp[t.id]
        second = f"Answer: {t.answer}" if t.id == "t0" else f"{t.id[1]} + 1 = {t.answer}\nAnswer: {t.answer}"
        comps += [Completion(t.id, 0, [1], [5], a, f"Answer: {t.answer}", True),
                  Completion(t.id, 1, [1], [6], b, second, True),
                  Completion(t.id, 2, [1], [7], [-0.5], "Answer: -1", True)]
    rid = store_rollout(store, 1, 0, {}, {t.id: t for t in tasks}, comps, selection=mode, seed=5)
    uid = create_user(store, "ann", "password-123")
    return store, rid, uid


def _served(store: Store, rid: int, uid: int) -> list[str]:
    order = []
    while (item := next_item(store, uid)) is not None:
        order.append(item.task.id)
        save_annotation(store, uid, rid, item.task.id, "skipped")
    return order


def test_claims_follow_the_stored_score(db_url):
    store, rid, uid = _seed_store(db_url, "uncertainty")
    with store.session() as s:
        sel = s.get(Rollout, rid).selection
    assert sel["mode"] == "uncertainty" and sel["seed"] == 5
    assert sel["items"]["t0"]["score"] == 0.0  # one distinct verified trace
    assert sel["items"]["t1"]["score"] == pytest.approx(pair_uncertainty(-0.2, -8.0), abs=1e-6)
    assert sel["items"]["t2"]["score"] == pytest.approx(pair_uncertainty(-2.0, -2.1), abs=1e-6)
    md = queue_md(store)  # the dashboard's line: the queue in serving order, with why
    assert md.startswith("**Item selection: uncertainty** (round 1; first 3 of 3 items")
    assert md.index("| t2 | open | uncertainty: score 1.00") < md.index("| t1 |") < md.index("| t0 |")
    assert _served(store, rid, uid) == ["t2", "t1", "t0"]  # highest score first
    assert queue_md(store).count("| submitted |") == 0 and "| t0 | served |" in queue_md(store)  # skipped: held


def test_random_and_default_orders(tmp_path):
    store, rid, uid = _seed_store(f"sqlite:///{tmp_path}/r.db", "random")
    expect = sorted(["t0", "t1", "t2"], key=lambda t: random_score(5, 1, t))
    assert _served(store, rid, uid) == expect
    assert RunConfig().feedback.selection == "fewest"  # today's order stays the default


def test_benchmark_rankings_to_target_by_hand():
    """benchmarks/active_learning.py's ratio: interpolated rankings to a target on seed-mean curves."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import active_learning as al

    assert al.rankings_to_reach([0, 3, 6], [0.0, 0.2, 0.6], 0.4) == pytest.approx(4.5)
    assert al.rankings_to_reach([0, 3, 6], [0.0, 0.2, 0.6], 0.7) == float("inf")
    assert al.prefers("3 + 4 = 7\nThe answer is 7. ") and not al.prefers("3 + 4 = 7\n\nThe answer is 7")
    assert al.expert_ranks([5, 6, 7], ["x = 7", "The answer is 7.", "7."]) == {"5": 2, "6": 1, "7": 0}
    one = lambda xs, ys: {"rankings": xs, "score": ys}  # noqa: E731
    curves = {"random": [one([0, 3, 6, 9], [0.0, 0.1, 0.2, 0.4]), one([0, 3, 6, 9], [0.0, 0.1, 0.3, 0.4])],
              "uncertainty": [one([0, 3, 6, 9], [0.0, 0.3, 0.5, 0.6]), one([0, 3, 6, 9], [0.0, 0.1, 0.3, 0.6])]}
    r = al.ratio_at(curves, [0, 1], 0.2)  # means: random 0, .1, .25, .4; active 0, .2, .4, .6
    assert r["random"] == pytest.approx(3 + 3 * 0.1 / 0.15) and r["active"] == pytest.approx(3.0)
    assert r["ratio"] == pytest.approx(5.0 / 3.0) and r["bound"] is None
    c = al.ratio_at(curves, [0, 1], 0.5)  # random never reaches 0.5 in 9 rankings: ratio >= 9 / 7.5
    assert c["random"] is None and c["active"] == pytest.approx(6 + 3 * 0.1 / 0.2)
    assert c["bound"] == "lower" and c["ratio"] == pytest.approx(9 / 7.5)
    assert al.ratio_at(curves, [0, 1], 0.9)["ratio"] is None
    b = al.bootstrap_ratio(curves, 0.2, n_boot=200)
    assert b["ci_low"] <= r["ratio"] <= b["ci_high"]
