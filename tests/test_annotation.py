"""Annotation rules: accounts, blind items, and submissions that are refused without changing anything."""

import pytest
from sqlalchemy import select

from rlhf_workbench.human.accounts import authenticate, check_password, create_user, hash_password
from rlhf_workbench.human.annotation import claim_item, human_scores, next_item, save_annotation
from rlhf_workbench.human.errors import AnnotationError
from rlhf_workbench.config import ModelConfig
from rlhf_workbench.model.loading import load_policy
from rlhf_workbench.store import Annotation, Store
from rlhf_workbench.tasks.task import Task

from conftest import seed_rollout

TASKS = [Task(id=f"q{i}", question=f"What is {i} + {i}?", answer=str(2 * i)) for i in range(1, 4)]


@pytest.fixture()
def seeded(tiny_model_dir, tmp_path):
    store = Store(run_dir=tmp_path)
    store.add_tasks(TASKS, "train")
    store.publish_version(0, None, "base", None, {}, 0)
    pair = load_policy(ModelConfig(name=str(tiny_model_dir), mixed_precision="no"))
    texts = {t.id: [f"Answer: {t.answer}", f"{t.answer_type}, so:\nAnswer: {t.answer}", "Answer: 999"] for t in TASKS}
    texts["q3"] = ["Answer: 6", "Answer: 7", "Answer: 8"]  # one verified trace: not worth ranking
    rid = seed_rollout(store, pair, texts)
    alice = create_user(store, "alice", "correct horse")
    bob = create_user(store, "bob", "battery staple")
    return store, rid, alice, bob


def test_passwords_are_salted_hashes():
    h1, h2 = hash_password("secret pw"), hash_password("secret pw")
    assert h1 != h2 and "secret" not in h1
    assert check_password("secret pw", h1) and not check_password("secret pX", h1)


def test_accounts(seeded):
    store, _, alice, _ = seeded
    assert authenticate(store, "alice", "correct horse").id == alice
    assert authenticate(store, "alice", "wrong") is None and authenticate(store, "nobody", "x") is None
    for bad in [("alice", "another pw1", "annotator"), ("carol", "short", "annotator"), ("dave", "long enough", "boss")]:
        with pytest.raises(AnnotationError):
            create_user(store, *bad)


def test_items_are_blind_and_need_two_verified_traces(seeded):
    store, rid, alice, bob = seeded
    item = next_item(store, alice)
    assert item.rollout_id == rid and item.policy_version == 0 and item.task.id in ("q1", "q2")
    assert len(item.verified) == 2 and len(item.rejected) == 1
    assert f"expected {item.task.answer}" in item.rejected[0].reason
    first = item.task.id
    second = "q2" if first == "q1" else "q1"
    save_annotation(store, alice, rid, first, "submitted", {t.completion_id: i for i, t in enumerate(item.verified)})
    assert next_item(store, bob).task.id == second  # one annotator per item: bob gets the other one
    with pytest.raises(AnnotationError, match="not served to you"):  # only what was served can be saved
        save_annotation(store, bob, rid, first, "skipped", annotators_per_item=1)
    with pytest.raises(AnnotationError, match="enough"):  # and alice's item is not to be had
        claim_item(store, bob, rid, first, annotators_per_item=1)
    save_annotation(store, bob, rid, second, "submitted",
                    {t.completion_id: 0 for t in next_item(store, bob).verified})
    assert next_item(store, alice) is None  # q3 has one verified trace only
    assert next_item(store, alice, annotators_per_item=2).task.id == second  # a second opinion on bob's item
    save_annotation(store, alice, rid, second, "skipped")
    assert next_item(store, alice, annotators_per_item=2) is None
    assert next_item(store, alice, min_verified=1).task.id == "q3"


def _count(store):
    with store.session() as s:
        return [(a.user_id, a.task_id, a.status, a.ranks, a.revision) for a in s.scalars(select(Annotation))]


def test_bad_submissions_change_nothing(seeded):
    store, rid, alice, bob = seeded
    item = next_item(store, alice)
    q, ids = item.task.id, [t.completion_id for t in item.verified]
    other = "q2" if q == "q1" else "q1"
    other_ids = [c.id for c in store.rollout_for_round(1).completions if c.task_id == other]
    bad = [
        dict(status="submitted", ranks={ids[0]: 0}),  # does not cover every trace
        dict(status="submitted", ranks={ids[0]: 0, other_ids[0]: 1}),  # a trace of another item
        dict(status="submitted", ranks={ids[0]: 0, ids[1]: -1}),  # negative rank
        dict(status="submitted", ranks={ids[0]: 0, ids[1]: 1}, flagged=[other_ids[0]]),
        dict(status="maybe"),
    ]
    for kwargs in bad:
        with pytest.raises(AnnotationError):
            save_annotation(store, alice, rid, q, **kwargs)
    assert _count(store) == []

    draft = save_annotation(store, alice, rid, q, "draft", {ids[0]: 1}, "first look")
    assert draft.revision == 0 and next_item(store, alice).draft.rationale == "first look"
    save_annotation(store, alice, rid, q, "draft", {ids[0]: 0}, "second", revision=0)
    with pytest.raises(AnnotationError, match="stale"):  # another tab still shows revision 0
        save_annotation(store, alice, rid, q, "submitted", {ids[0]: 0, ids[1]: 0}, revision=0)
    save_annotation(store, alice, rid, q, "submitted", {ids[0]: 0, ids[1]: 0}, "tie", [ids[1]], revision=1)
    with pytest.raises(AnnotationError, match="already submitted"):
        save_annotation(store, alice, rid, q, "submitted", {ids[0]: 1, ids[1]: 0}, revision=2)
    assert _count(store) == [(alice, q, "submitted", {str(ids[0]): 0, str(ids[1]): 0}, 2)]

    scores, flagged, n = human_scores(store, store.rollout_for_round(1))
    assert n == 1 and flagged == {ids[1]} and scores[q] == {ids[0]: 0.0, ids[1]: 0.0} and scores[other] == {}


def test_values_the_ui_blocks_are_refused_here_too(seeded):
    """Issue 13, item 6: the API path reaches save_annotation with whatever a client sends. A rank
    of 10**12 used to be stored (and dominated the mean rank), a flagged id 22.7 was truncated to
    a real trace id, and a 5 MB rationale was cut to 2,000 characters without a word."""
    store, rid, alice, _ = seeded
    item = next_item(store, alice)
    q, ids = item.task.id, [t.completion_id for t in item.verified]
    rejected = item.rejected[0].completion_id
    cases = [
        (dict(ranks={ids[0]: 0, ids[1]: 10**12}), r"ranks must be integers from 0 to 1 .*10{12}"),
        (dict(ranks={ids[0]: 0, ids[1]: 2}), r"from 0 to 1"),  # two verified traces: ranks 0 and 1 only
        (dict(ranks={ids[0]: 0, ids[1]: 1.0}), r"ranks must be integers"),
        (dict(ranks={ids[0]: 0, ids[1]: True}), r"ranks must be integers"),
        (dict(ranks={ids[0]: 0, str(ids[1]) + ".0": 1}), r"completion ids \(integers\)"),
        (dict(ranks={ids[0]: 0, ids[1]: 1}, flagged=[rejected + 0.7]), r"flagged traces must be completion ids"),
        (dict(ranks={ids[0]: 0, ids[1]: 1}, verifier_wrong=[ids[0] + 0.7]), r"marked wrong must be completion ids"),
        (dict(ranks={ids[0]: 0, ids[1]: 1}, flagged=[True]), r"flagged traces must be completion ids"),
        (dict(ranks={ids[0]: 0, ids[1]: 1}, rationale="x" * 5_000_000),
         r"the rationale has 5000000 characters; the limit is 2000"),
        (dict(ranks={ids[0]: 0, ids[1]: 1}, rationale=["not", "text"]), r"rationale must be text"),
    ]
    for kwargs, message in cases:
        with pytest.raises(AnnotationError, match=message):
            save_annotation(store, alice, rid, q, "submitted", **kwargs)
    assert _count(store) == []
    # What the UI sends still goes through: the limit itself, ids as JSON object keys (strings).
    save_annotation(store, alice, rid, q, "submitted", {str(ids[0]): 1, str(ids[1]): 0}, "y" * 2000,
                    [str(rejected)])
    with store.session() as s:
        a = s.scalars(select(Annotation)).one()
    assert a.ranks == {str(ids[0]): 1, str(ids[1]): 0} and len(a.rationale) == 2000 and a.flagged == [rejected]
