"""Inter-annotator agreement and throughput on small hand-computed examples."""

from datetime import datetime, timedelta

import pytest
from sqlalchemy import select, update

from rlhf_workbench.human.agreement import agreement_summary, rankings_per_hour
from rlhf_workbench.human.accounts import create_user
from rlhf_workbench.human.annotation import claim_item, save_annotation
from rlhf_workbench.run.loop import store_rollout
from rlhf_workbench.model.rollout import Completion
from rlhf_workbench.store import Annotation, CompletionRow, Store
from rlhf_workbench.tasks.task import Task


def make_store(tmp_path, n_tasks: int, traces_per_task: int, users: list[str]):
    """A store with one rollout of ``n_tasks`` tasks, each with ``traces_per_task`` correct
    traces; returns ``(store, rollout_id, {task_id: [completion ids]}, {username: user id})``."""
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    tasks = [Task(id=f"t{i:02d}", question=f"What is {i} + 1?", answer=str(i + 1)) for i in range(n_tasks)]
    store.add_tasks(tasks, "train")
    store.publish_version(0, None, "base", None, {}, round=0)
    comps = [Completion(t.id, k, [1], [2], [-0.5], f"{int(t.answer)}" + " ." * k + f"\nAnswer: {t.answer}", True)
             for t in tasks for k in range(traces_per_task)]
    rid = store_rollout(store, 1, 0, {}, {t.id: t for t in tasks}, comps)
    with store.session() as s:
        ids: dict[str, list[int]] = {}
        for c in s.scalars(select(CompletionRow).order_by(CompletionRow.id)):
            assert c.verification.correct
            ids.setdefault(c.task_id, []).append(c.id)
    uids = {u: create_user(store, u, "password-123") for u in users}
    return store, rid, ids, uids


def submit(store, uid, rid, task_id, cids, ranks, status="submitted"):
    claim_item(store, uid, rid, task_id, annotators_per_item=99)  # served to the annotator, as the app does
    save_annotation(store, uid, rid, task_id, status, dict(zip(cids, ranks)))


def insert_values(store, uid, rid, task_id, cids, values):
    """A submitted annotation written straight to the table: for published rating data whose
    values (1..5 on one trace) are no valid ranks (0 .. verified traces - 1) for save_annotation."""
    with store.session() as s, s.begin():
        s.add(Annotation(rollout_id=rid, task_id=task_id, user_id=uid, status="submitted",
                         ranks={str(c): v for c, v in zip(cids, values)}, rationale="", flagged=[], revision=0))


def test_identical_rankings_agree_fully(tmp_path):
    store, rid, ids, uids = make_store(tmp_path, 2, 3, ["ann", "bob"])
    for u in uids.values():
        submit(store, u, rid, "t00", ids["t00"], [0, 1, 2])
        submit(store, u, rid, "t01", ids["t01"], [2, 0, 1])
    s = agreement_summary(store)
    assert s["kendall_tau"] == pytest.approx(1.0)
    assert s["krippendorff_alpha"] == pytest.approx(1.0)
    assert (s["n_items"], s["n_annotations"], s["n_tau_pairs"]) == (2, 4, 2)


def test_reversed_rankings_hand_computed(tmp_path):
    store, rid, ids, uids = make_store(tmp_path, 1, 3, ["ann", "bob"])
    submit(store, uids["ann"], rid, "t00", ids["t00"], [0, 1, 2])
    submit(store, uids["bob"], rid, "t00", ids["t00"], [2, 1, 0])
    s = agreement_summary(store)
    assert s["kendall_tau"] == pytest.approx(-1.0)
    # By hand: coincidences o_02 = o_20 = o_11 = 2, n_0 = n_1 = n_2 = 2, n = 6; ordinal
    # delta2_01 = delta2_12 = (4 - 2)^2 = 4, delta2_02 = (6 - 2)^2 = 16.
    # D_o = (2*16 + 2*16) / 6 = 64/6; D_e = 2 * (4*4 + 4*16 + 4*4) / (6*5) = 192/30;
    # alpha = 1 - (64/6) / (192/30) = -2/3.
    assert s["krippendorff_alpha"] == pytest.approx(-2 / 3)


def test_tau_b_with_ties_and_mean_over_pairs(tmp_path):
    store, rid, ids, uids = make_store(tmp_path, 2, 4, ["ann", "bob", "cy"])
    # Item t00, ann vs bob: one swapped pair out of six -> (5 - 1) / 6 = 2/3.
    submit(store, uids["ann"], rid, "t00", ids["t00"], [0, 1, 2, 3])
    submit(store, uids["bob"], rid, "t00", ids["t00"], [0, 2, 1, 3])
    # Item t01: ann [0,0,1,1] vs bob [0,1,2,3]: n_c = 4, n_d = 0, ties in ann n_1 = 2, n_0 = 6
    # -> 4 / sqrt(4 * 6) = 0.8165; cy ranks all tied (constant) -> its pairs are skipped.
    submit(store, uids["ann"], rid, "t01", ids["t01"], [0, 0, 1, 1])
    submit(store, uids["bob"], rid, "t01", ids["t01"], [0, 1, 2, 3])
    submit(store, uids["cy"], rid, "t01", ids["t01"], [0, 0, 0, 0])
    s = agreement_summary(store)
    assert s["n_tau_pairs"] == 2
    assert s["kendall_tau"] == pytest.approx((2 / 3 + 4 / 24 ** 0.5) / 2)
    assert (s["n_items"], s["n_annotations"]) == (2, 5)


def test_alpha_matches_krippendorff_2011_example(tmp_path):
    # Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: 4 observers,
    # 12 units, values 1..5, missing data; published ordinal alpha = 0.815 (nominal 0.743).
    data = {"A": [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
            "B": [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
            "C": [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
            "D": [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None]}
    store, rid, ids, uids = make_store(tmp_path, 12, 1, list(data))
    for user, values in data.items():
        for unit, v in enumerate(values):
            if v is not None:
                insert_values(store, uids[user], rid, f"t{unit:02d}", ids[f"t{unit:02d}"], [v])
    s = agreement_summary(store)
    assert s["krippendorff_alpha"] == pytest.approx(0.815, abs=5e-4)
    assert s["n_items"] == 11  # unit 12 has a single observer
    assert s["kendall_tau"] is None  # one trace per item: every ranking is constant


def test_no_multi_annotated_items(tmp_path):
    store, rid, ids, uids = make_store(tmp_path, 2, 2, ["ann", "bob"])
    submit(store, uids["ann"], rid, "t00", ids["t00"], [0, 1])
    submit(store, uids["bob"], rid, "t00", ids["t00"][:1], [1], "draft")  # drafts do not count
    submit(store, uids["bob"], rid, "t01", ids["t01"], [1, 0])
    assert agreement_summary(store) == {"kendall_tau": None, "krippendorff_alpha": None, "n_items": 0,
                                        "n_annotations": 0, "n_tau_pairs": 0}


def test_rankings_per_hour(tmp_path):
    store, rid, ids, uids = make_store(tmp_path, 4, 2, ["ann", "bob", "cy"])
    for t in ("t00", "t01", "t02"):
        submit(store, uids["ann"], rid, t, ids[t], [0, 1])
    submit(store, uids["bob"], rid, "t00", ids["t00"], [1, 0])
    submit(store, uids["cy"], rid, "t00", [], [], "draft")  # no submission: not listed
    t0 = datetime(2025, 1, 1, 12, 0, 0)
    with store.session() as s, s.begin():
        for i, a in enumerate(s.scalars(select(Annotation).where(Annotation.user_id == uids["ann"])
                                        .order_by(Annotation.id))):
            s.execute(update(Annotation).where(Annotation.id == a.id).values(
                created_at=t0 + timedelta(minutes=15 * i), updated_at=t0 + timedelta(minutes=15 * i + 1)))
    rates = rankings_per_hour(store)
    assert set(rates) == {"ann", "bob"}
    assert rates["ann"] == pytest.approx(3 / (31 / 60))  # 12:00 -> 12:31, three submissions
    assert rates["bob"] == pytest.approx(12.0)  # one submission over the 5-minute floor
