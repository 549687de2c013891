"""Pairwise judgments: stored as a partial ranking the worker consumes like a full one."""

import pytest
from sqlalchemy import select

from rlhf_workbench.human.accounts import create_user
from rlhf_workbench.human.annotation import claim_item, human_scores, verifier_audit
from rlhf_workbench.human.errors import AnnotationError
from rlhf_workbench.config import ModelConfig
from rlhf_workbench.model.loading import load_policy
from rlhf_workbench.human.pairwise import choose_pair, pair_ranks, save_pairwise
from rlhf_workbench.store import Annotation, Store
from rlhf_workbench.tasks.task import Task

from conftest import seed_rollout


@pytest.fixture()
def seeded(tiny_model_dir, tmp_path):
    store = Store(run_dir=tmp_path)
    store.add_tasks([Task(id="q1", question="What is 1 + 1?", answer="2")], "train")
    store.publish_version(0, None, "base", None, {}, 0)
    pair = load_policy(ModelConfig(name=str(tiny_model_dir), mixed_precision="no"))
    rid = seed_rollout(store, pair, {"q1": ["1 + 1 = 2\nAnswer: 2", "Answer: 2", "So:\nAnswer: 2",
                                            "Answer:  2", "Answer: 3"]})
    users = [create_user(store, name, "correct horse") for name in ("alice", "bob")]
    for u in users:
        claim_item(store, u, rid, "q1", annotators_per_item=2)
    return store, rid, users


def test_pair_ranks():
    assert pair_ranks([1], [2, 3], "a") == {1: 0, 2: 1, 3: 1}
    assert pair_ranks([1], [2], "b") == {1: 1, 2: 0} and pair_ranks([1], [2], "tie") == {1: 0, 2: 0}
    for bad in (([1], [2], "maybe"), ([1], [1], "a"), ([], [2], "a")):
        with pytest.raises(AnnotationError):
            pair_ranks(*bad)


def test_pairwise_judgment_is_a_partial_ranking(seeded):
    store, rid, (alice, bob) = seeded
    a, b = choose_pair(store, alice, rid, "q1")
    save_pairwise(store, alice, rid, "q1", a.completion_ids, b.completion_ids, "a")
    with store.session() as s:
        stored = {int(k): v for k, v in s.scalars(select(Annotation)).one().ranks.items()}
    assert stored == {**{c: 0 for c in a.completion_ids}, **{c: 1 for c in b.completion_ids}}
    # the next annotator gets a pair nobody judged yet
    a2, b2 = choose_pair(store, bob, rid, "q1")
    assert {a2.trace.completion_id, b2.trace.completion_id} != {a.trace.completion_id, b.trace.completion_id}
    # the worker's scores: A best, B worst, the traces nobody ranked in between (not best by accident)
    scores, flagged, n = human_scores(store, store.rollout_for_round(1))
    q = scores["q1"]
    others = [cid for cid in q if cid not in a.completion_ids + b.completion_ids]
    assert n == 1 and others and all(q[b.completion_ids[0]] < q[c] < q[a.completion_ids[0]] for c in others)
    assert verifier_audit(store)["audited"] == len(stored)  # only the traces shown were read
    with pytest.raises(AnnotationError, match="already submitted"):
        save_pairwise(store, alice, rid, "q1", a.completion_ids, b.completion_ids, "tie")


def test_tie_leaves_everything_tied(seeded):
    store, rid, (alice, _) = seeded
    a, b = choose_pair(store, alice, rid, "q1")
    save_pairwise(store, alice, rid, "q1", a.completion_ids, b.completion_ids, "tie")
    scores, _, _ = human_scores(store, store.rollout_for_round(1))
    assert len(set(scores["q1"].values())) == 1
