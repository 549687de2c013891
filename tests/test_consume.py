"""An acknowledged submission is never left out of training (issue 13, item 3).

The worker reads the round's submissions and records its rankings in one transaction under the
round's lock (``consume_human_rankings``), marking each submission it read; a submission racing
with it either lands before (and is trained on) or waits for the lock and is refused because the
round was used for training. The racy order of the audit (worker reads, annotator 2 submits and
is acknowledged, worker records without it) is replayed deterministically: annotator 2 submits
from another thread while the worker is between reading and recording.
"""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import select

from rlhf_workbench.human.annotation import claim_item, consume_human_rankings, save_annotation
from rlhf_workbench.human.errors import AnnotationError
from rlhf_workbench.config import RunConfig
from rlhf_workbench.store import Annotation
from test_assignment import record_with, seed, url, verified_ids  # noqa: F401 - url is a fixture

CFG = RunConfig.model_validate({"feedback": {"source": "human"}})


def _setup(url: str):
    d = seed(url, 1, 2)
    store, rid, (ann1, ann2) = d["store"], d["rid"], d["users"]
    cids = verified_ids(store, rid, "t00")  # its two verified traces
    for user in (ann1, ann2):
        claim_item(store, user, rid, "t00", annotators_per_item=2)
    return store, rid, ann1, ann2, cids


def _consumed(store, rid):
    with store.session() as s:
        return {a.user_id: a.consumed_round for a in s.scalars(select(Annotation).where(Annotation.rollout_id == rid))}


def test_a_submission_during_consumption_waits_and_is_refused(url):
    store, rid, ann1, ann2, (a, b) = _setup(url)
    save_annotation(store, ann1, rid, "t00", "submitted", {a: 0, b: 0})  # annotator 1: a tie
    rollout = store.rollout_for_round(1)
    record = record_with(CFG, store, rollout)
    late: dict = {}

    def annotator_2():
        try:
            late["ack"] = save_annotation(store, ann2, rid, "t00", "submitted", {a: 1, b: 0})
        except AnnotationError as e:
            late["refused"] = str(e)

    def record_while_annotator_2_submits(s, scores, flagged):
        assert scores["t00"] == {a: 0.0, b: 0.0}  # read: annotator 1 only
        t = threading.Thread(target=annotator_2)
        t.start()
        t.join(1.0)
        assert t.is_alive()  # blocked on the round's lock: cannot be acknowledged now
        late["thread"] = t
        record(s, scores, flagged)

    assert consume_human_rankings(store, rollout, record_while_annotator_2_submits) == 1
    late["thread"].join(60)
    assert "ack" not in late and "already used for training" in late["refused"]
    assert _consumed(store, rid) == {ann1: 1}  # annotator 2 stored nothing
    ranking = store.rankings_for_rollout(rid)[0]
    assert ranking.ranks[str(a)] == ranking.ranks[str(b)] == 0  # trained on what was read: the tie


def test_a_submission_before_consumption_is_trained_on(url):
    store, rid, ann1, ann2, (a, b) = _setup(url)
    save_annotation(store, ann1, rid, "t00", "submitted", {a: 0, b: 0})
    rollout = store.rollout_for_round(1)
    # Annotator 2 is acknowledged before the worker takes the lock: the worker must see it.
    save_annotation(store, ann2, rid, "t00", "submitted", {a: 1, b: 0})
    assert consume_human_rankings(store, rollout, record_with(CFG, store, rollout)) == 2
    assert _consumed(store, rid) == {ann1: 1, ann2: 1}
    ranking = store.rankings_for_rollout(rid)[0]
    assert ranking.ranks[str(b)] == 0 and ranking.ranks[str(a)] == 1  # mean ranks b 0, a 0.5: not a tie
    # Consuming again (a resumed worker) changes nothing.
    assert consume_human_rankings(store, rollout, lambda *args: pytest.fail("recorded twice")) is None


def test_a_failed_record_consumes_nothing(url):
    store, rid, ann1, _, (a, b) = _setup(url)
    save_annotation(store, ann1, rid, "t00", "submitted", {a: 0, b: 1})
    rollout = store.rollout_for_round(1)

    def crash(s, scores, flagged):
        record_with(CFG, store, rollout)(s, scores, flagged)
        raise RuntimeError("worker killed while recording")

    with pytest.raises(RuntimeError):
        consume_human_rankings(store, rollout, crash)
    assert store.rankings_for_rollout(rid) == [] and _consumed(store, rid) == {ann1: None}
    assert consume_human_rankings(store, rollout, record_with(CFG, store, rollout)) == 1  # the retry takes it
