"""Adjudication: disputed items go to an admin, and only the adjudicated ranking trains."""

import pytest
from sqlalchemy import select

from rlhf_workbench.human.adjudication import (ADJUDICATED, adjudicate, disputes, is_disputed, item_agreement,
                                         pair_tau)
from rlhf_workbench.human.accounts import create_user
from rlhf_workbench.human.annotation import claim_item, consume_human_rankings, human_scores, save_annotation
from rlhf_workbench.human.errors import AnnotationError
from rlhf_workbench.config import ModelConfig, RunConfig
from rlhf_workbench.model.loading import load_policy
from rlhf_workbench.store import Annotation, RankingRow, Store
from rlhf_workbench.tasks.task import Task

from conftest import seed_rollout


def test_pair_tau_by_hand():
    # 3 traces, one swap of the last two: 2 concordant, 1 discordant pair -> (2 - 1) / 3
    assert pair_tau({1: 0, 2: 1, 3: 2}, {1: 0, 2: 2, 3: 1}) == pytest.approx(1 / 3)
    assert pair_tau({1: 0, 2: 1}, {1: 1, 2: 0}) == -1.0  # opposite pairwise choices
    assert pair_tau({1: 0, 2: 1}, {1: 0, 2: 1}) == 1.0
    assert pair_tau({1: 0, 2: 1}, {1: 0, 2: 0}) == 0.0  # "A better" against "tie"
    assert pair_tau({1: 0, 2: 0}, {1: 0, 2: 0}) == 1.0  # both tie everything
    assert pair_tau({1: 0, 2: 1}, {3: 0, 4: 1}) is None  # different pairs: not comparable
    # tau-b with a tie in one ranking: n_c = 2, n_d = 0, n_0 = 3, n_1 = 1, n_2 = 0 -> 2 / sqrt(2 * 3)
    assert pair_tau({1: 0, 2: 0, 3: 1}, {1: 0, 2: 1, 3: 2}) == pytest.approx(2 / 6 ** 0.5)


def test_item_agreement_and_threshold():
    three = {"a": {1: 0, 2: 1, 3: 2}, "b": {1: 2, 2: 1, 3: 0}, "c": {1: 0, 2: 1, 3: 2}}
    assert item_agreement(three) == pytest.approx((-1 - 1 + 1) / 3)  # a-b, b-c reversed, a-c equal
    assert item_agreement({"a": {1: 0, 2: 1}}) is None
    assert is_disputed(-1.0, 0.0) and not is_disputed(0.0, 0.0) and not is_disputed(-1.0, None)
    assert not is_disputed(None, 0.5)


@pytest.fixture()
def seeded(tiny_model_dir, tmp_path):
    store = Store(run_dir=tmp_path)
    store.add_tasks([Task(id="q1", question="What is 1 + 1?", answer="2"),
                     Task(id="q2", question="What is 2 + 2?", answer="4")], "train")
    store.publish_version(0, None, "base", None, {}, 0)
    pair = load_policy(ModelConfig(name=str(tiny_model_dir), mixed_precision="no"))
    rid = seed_rollout(store, pair, {"q1": ["1 + 1 = 2\nAnswer: 2", "Answer: 2", "So:\nAnswer: 2", "Answer: 3"],
                                     "q2": ["2 + 2 = 4\nAnswer: 4", "Answer: 4", "Answer: 5"]})
    alice, bob = (create_user(store, n, "correct horse") for n in ("alice", "bob"))
    admin = create_user(store, "root", "correct horse", role="admin")
    for u in (alice, bob):
        for t in ("q1", "q2"):
            claim_item(store, u, rid, t, annotators_per_item=2)
    ids = {t: [c.id for c in store.rollout_for_round(1).completions if c.task_id == t] for t in ("q1", "q2")}
    return store, rid, alice, bob, admin, ids


def _submit(store, user, rid, task, ranks):
    save_annotation(store, user, rid, task, "submitted", ranks, annotators_per_item=2)


def test_disputed_item_trains_only_on_the_adjudicated_ranking(seeded):
    store, rid, alice, bob, admin, ids = seeded
    x, y, z, _wrong = ids["q1"]
    _submit(store, alice, rid, "q1", {x: 0, y: 1, z: 2})
    _submit(store, bob, rid, "q1", {x: 2, y: 1, z: 0})  # reversed: tau = -1
    u, v, _ = ids["q2"]
    _submit(store, alice, rid, "q2", {u: 0, v: 1})
    _submit(store, bob, rid, "q2", {u: 0, v: 1})  # agree: tau = 1
    waiting = disputes(store, 0.0)
    assert [(d.task_id, d.agreement) for d in waiting] == [("q1", -1.0)]
    assert waiting[0].rankings == {"alice": {x: 0, y: 1, z: 2}, "bob": {x: 2, y: 1, z: 0}}
    assert disputes(store, None) == []
    rollout = store.rollout_for_round(1)
    # while it waits, the disputed item gives no human signal: its traces score 0 (tie), q2 counts twice
    scores, _, have = human_scores(store, rollout, 0.0)
    assert scores["q1"] == {} and have == 2 and scores["q2"] == {u: 0.0, v: -1.0}
    # an annotator of the item is a party to the dispute, not its judge; a partial ranking is refused
    with pytest.raises(AnnotationError, match="every trace"):
        adjudicate(store, admin, rid, "q1", {x: 0, y: 1}, 0.0)
    with pytest.raises(AnnotationError, match="not disputed"):
        adjudicate(store, admin, rid, "q2", {u: 0, v: 1}, 0.0)
    row = adjudicate(store, admin, rid, "q1", {x: 1, y: 0, z: 2}, 0.0, rationale="y states the sum")
    assert row.status == ADJUDICATED
    with pytest.raises(AnnotationError, match="already adjudicated"):
        adjudicate(store, admin, rid, "q1", {x: 1, y: 0, z: 2}, 0.0)
    assert disputes(store, 0.0) == [] and disputes(store, 0.0, include_adjudicated=True)[0].adjudicated_by == "root"
    seen = {}

    def record(s, scores, flagged):
        seen.update(scores)
        s.add(RankingRow(rollout_id=rid, task_id="q1", source="human", ranks={}, rewards={}))

    assert consume_human_rankings(store, rollout, record, 0.0) == 3  # q2's two + the adjudication
    assert seen["q1"] == {x: -1.0, y: -0.0, z: -2.0}  # the admin's order, not a mean with the annotators'
    assert seen["q2"] == {u: 0.0, v: -1.0}
    with store.session() as s:
        consumed = {(a.user_id, a.task_id): a.consumed_round for a in s.scalars(select(Annotation))}
    assert consumed[(admin, "q1")] == 1 and consumed[(alice, "q2")] == 1
    assert consumed[(alice, "q1")] is None and consumed[(bob, "q1")] is None  # overruled, never trained
    with pytest.raises(AnnotationError, match="already used for training"):
        adjudicate(store, admin, rid, "q2", {u: 0, v: 1}, 0.0)


def test_an_annotator_of_the_item_cannot_adjudicate_it(seeded):
    store, rid, alice, bob, admin, ids = seeded
    u, v, _ = ids["q2"]
    other_admin = create_user(store, "chief", "correct horse", role="admin")
    claim_item(store, other_admin, rid, "q2", annotators_per_item=3)
    _submit(store, alice, rid, "q2", {u: 0, v: 1})
    save_annotation(store, other_admin, rid, "q2", "submitted", {u: 1, v: 0}, annotators_per_item=3)
    with pytest.raises(AnnotationError, match="another admin"):
        adjudicate(store, other_admin, rid, "q2", {u: 0, v: 1}, 0.0)
    adjudicate(store, admin, rid, "q2", {u: 0, v: 0}, 0.0)
    scores, _, have = human_scores(store, store.rollout_for_round(1), 0.0)
    assert scores["q2"] == {u: 0.0, v: 0.0} and have == 1


def test_without_threshold_nothing_changes(seeded):
    store, rid, alice, bob, admin, ids = seeded
    x, y, z, _ = ids["q1"]
    _submit(store, alice, rid, "q1", {x: 0, y: 1, z: 2})
    _submit(store, bob, rid, "q1", {x: 2, y: 1, z: 0})
    scores, _, have = human_scores(store, store.rollout_for_round(1))
    assert have == 2 and scores["q1"] == {x: -1.0, y: -1.0, z: -1.0}  # the mean of the two rankings
    assert RunConfig().feedback.adjudication_threshold is None


def test_clinical_annotate_config_loads():
    from pathlib import Path

    from rlhf_workbench.config import load_config
    from rlhf_workbench.human.guidelines import load_guidelines
    from rlhf_workbench.tasks.loading import load_tasks

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "clinical_annotate.yaml")
    assert cfg.feedback.source == "human" and cfg.feedback.annotators_per_item == 2
    assert cfg.feedback.adjudication_threshold == 0.0
    g = load_guidelines(cfg.feedback.guidelines)
    assert g.text.startswith("# Guidelines for ranking clinical reasoning") and len(g.sha256) == 64
    tasks = load_tasks(cfg.tasks.path)
    assert len(tasks) == 120 and {t.answer_type for t in tasks} == {"choice"}
