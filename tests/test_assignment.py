"""Who may submit what (issue 13, items 1 and 5): only an item of the open round that was served
to the annotator, an empty ranking never counts toward ``min_rankings``, and the per-item
annotator cap holds in the database: across processes, on SQLite and PostgreSQL, with claims that
expire and return an abandoned item to the pool."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
from sqlalchemy import func, select, update

from rlhf_workbench.human.accounts import create_user
from rlhf_workbench.human.annotation import (claim_item, consume_human_rankings, human_scores, next_item,
                                             save_annotation, wait_for_human_rankings)
from rlhf_workbench.human.errors import AnnotationError
from rlhf_workbench.config import RunConfig
from rlhf_workbench.run.loop import _record_rankings, store_rollout
from rlhf_workbench.model.rollout import Completion
from rlhf_workbench.store import Annotation, CompletionRow, ItemClaim, Store, VerificationRow
from rlhf_workbench.tasks.task import Task


def seed(url: str, n_tasks: int, n_users: int, round: int = 1, wrong_only: tuple[str, ...] = ()) -> dict:
    """A store with tasks ``t00..``, two held-out tasks, and one rollout of ``round``: per task two
    verified traces and one rejected (all rejected for the tasks in ``wrong_only``)."""
    store = Store(url)
    tasks = [Task(id=f"t{i:02d}", question=f"What is {i} + 1?", answer=str(i + 1)) for i in range(n_tasks)]
    held = [Task(id=f"h{i}", question=f"What is {i} + 50?", answer=str(i + 50)) for i in range(2)]
    store.add_tasks(tasks, "train")
    store.add_tasks(held, "heldout")
    if store.latest_version() is None:
        store.publish_version(0, None, "base", None, {}, round=0)
    comps = []
    for t in tasks:
        good = f"Answer: {t.answer}" if t.id not in wrong_only else "Answer: -1"
        comps += [Completion(t.id, 0, [1], [5], [-0.1], good, True),
                  Completion(t.id, 1, [1], [6], [-0.1], f"{t.question[8:-1]} = {t.answer}\n{good}", True),
                  Completion(t.id, 2, [1], [7], [-0.1], "Answer: -1", True)]
    rid = store_rollout(store, round, round - 1, {}, {t.id: t for t in tasks}, comps)
    users = [create_user(store, f"user{i}", "password-123") for i in range(n_users)]
    return {"store": store, "rid": rid, "tasks": [t.id for t in tasks], "users": users}


def verified_ids(store: Store, rid: int, task_id: str) -> list[int]:
    with store.session() as s:
        return list(s.scalars(select(CompletionRow.id).join(VerificationRow).where(
            CompletionRow.rollout_id == rid, CompletionRow.task_id == task_id, VerificationRow.correct.is_(True))))


def n_annotations(store: Store) -> int:
    with store.session() as s:
        return s.scalar(select(func.count()).select_from(Annotation))


def record_with(cfg: RunConfig, store: Store, rollout):
    """The worker's record step, as loop.run passes it to consume_human_rankings."""
    return lambda s, scores, flagged: _record_rankings(store, rollout, "human", scores, flagged, cfg, session=s)


# --- item 1: only a served item of the open round ---------------------------------------------------------
def test_items_outside_the_open_round_or_not_served_are_refused_and_not_counted(tmp_path):
    d = seed(f"sqlite:///{tmp_path / 'db.sqlite'}", 2, 2)
    store, rid, (alice, bob) = d["store"], d["rid"], d["users"]
    rollout = store.rollout_for_round(1)
    # The audit's case: held-out task ids (tasks that exist, with no traces in the round) submitted
    # with an empty ranking; before, each was acknowledged and counted toward min_rankings.
    for task_id in ("h0", "h1", "no-such-task"):
        with pytest.raises(AnnotationError, match="not served to you|no item"):
            save_annotation(store, alice, rid, task_id, "submitted", {})
        with pytest.raises(AnnotationError, match="no traces|no item"):
            claim_item(store, alice, rid, task_id)
    # A task of the round that was never served to this annotator.
    with pytest.raises(AnnotationError, match="not served to you"):
        save_annotation(store, alice, rid, "t00", "submitted", {c: 0 for c in verified_ids(store, rid, "t00")})
    assert n_annotations(store) == 0 and human_scores(store, rollout)[2] == 0

    item = next_item(store, alice)  # served: now it can be submitted
    save_annotation(store, alice, rid, item.task.id, "submitted", {t.completion_id: 0 for t in item.verified})
    assert human_scores(store, rollout)[2] == 1

    # The round is trained on; round 2 opens. Round 1's items are closed, even one served before.
    other = next_item(store, bob)
    cfg = RunConfig()
    assert consume_human_rankings(store, rollout, record_with(cfg, store, rollout)) == 1
    with pytest.raises(AnnotationError, match="already used for training"):
        save_annotation(store, bob, rid, other.task.id, "submitted", {t.completion_id: 0 for t in other.verified})
    store.publish_version(1, 0, "grpo", None, {}, round=1)
    comps = [Completion("t00", k, [1], [5], [-0.1], "Answer: 1", True) for k in range(2)]
    rid2 = store_rollout(store, 2, 1, {}, {"t00": Task(id="t00", question="What is 0 + 1?", answer="1")}, comps)
    with pytest.raises(AnnotationError, match="already used for training"):
        claim_item(store, bob, rid, "t01")
    # An older rollout without rankings (as a crashed or duplicate run can leave) is not open.
    orphan = store_rollout(store, 0, 0, {}, {"t00": Task(id="t00", question="What is 0 + 1?", answer="1")}, comps)
    with pytest.raises(AnnotationError, match="not open for annotation; the open round is 2"):
        claim_item(store, bob, orphan, "t00")
    assert next_item(store, bob).rollout_id == rid2
    assert n_annotations(store) == 1


def test_an_empty_ranking_does_not_count_toward_min_rankings(tmp_path):
    d = seed(f"sqlite:///{tmp_path / 'db.sqlite'}", 2, 1, wrong_only=("t00", "t01"))
    store, rid, (alice,) = d["store"], d["rid"], d["users"]
    rollout = store.rollout_for_round(1)
    item = next_item(store, alice, min_verified=0)  # no verified trace: can be confirmed, not ranked
    assert item.verified == []
    save_annotation(store, alice, rid, item.task.id, "submitted", {})
    assert n_annotations(store) == 1 and human_scores(store, rollout)[2] == 0
    # Nothing in this round can be ranked: the worker does not wait for rankings that cannot come.
    cfg = RunConfig.model_validate({"feedback": {"source": "human", "min_rankings": 3, "min_verified": 0,
                                                 "poll_seconds": 0.01}})
    wait_for_human_rankings(store, rollout, cfg, timeout=0.0)
    assert store.get_meta("status")["need"] == 0


def test_min_rankings_counts_only_rankings(tmp_path):
    d = seed(f"sqlite:///{tmp_path / 'db.sqlite'}", 3, 1, wrong_only=("t02",))
    store, rid, (alice,) = d["store"], d["rid"], d["users"]
    rollout = store.rollout_for_round(1)
    cfg = RunConfig.model_validate({"feedback": {"source": "human", "min_rankings": 3, "min_verified": 0,
                                                 "poll_seconds": 0.01}})
    claim_item(store, alice, rid, "t02")
    save_annotation(store, alice, rid, "t02", "submitted", {})  # confirms "nothing to rank"
    with pytest.raises(TimeoutError, match="only 0 of 2"):  # two items can be ranked; none is yet
        wait_for_human_rankings(store, rollout, cfg, timeout=0.0)


# --- item 5: the cap in the database ------------------------------------------------------------------------
def test_claims_hold_the_cap_and_expire_back_to_the_pool(tmp_path):
    d = seed(f"sqlite:///{tmp_path / 'db.sqlite'}", 2, 3)
    store, rid, (alice, bob, carol) = d["store"], d["rid"], d["users"]
    a = next_item(store, alice, annotators_per_item=1, claim_seconds=60)
    b = next_item(store, bob, annotators_per_item=1, claim_seconds=60)
    assert {a.task.id, b.task.id} == {"t00", "t01"}
    assert next_item(store, carol, annotators_per_item=1) is None  # both held
    assert next_item(store, alice, annotators_per_item=1).task.id == a.task.id  # a reload shows the same item
    with pytest.raises(AnnotationError, match="enough"):
        claim_item(store, carol, rid, a.task.id, annotators_per_item=1)

    # alice abandons her item: once her claim expires it goes to carol, and alice's late
    # submission is refused (the place is carol's now).
    with store.session() as s, s.begin():
        s.execute(update(ItemClaim).where(ItemClaim.user_id == alice).values(expires_at=time.time() - 1))
    c = next_item(store, carol, annotators_per_item=1)
    assert c.task.id == a.task.id
    with pytest.raises(AnnotationError, match="not served to you"):
        save_annotation(store, alice, rid, a.task.id, "submitted", {t.completion_id: 0 for t in a.verified},
                        annotators_per_item=1)
    save_annotation(store, carol, rid, c.task.id, "submitted", {t.completion_id: 0 for t in c.verified},
                    annotators_per_item=1)

    # An expired claim nobody needed still lets its annotator submit (the place was free).
    with store.session() as s, s.begin():
        s.execute(update(ItemClaim).where(ItemClaim.user_id == bob).values(expires_at=time.time() - 1))
    save_annotation(store, bob, rid, b.task.id, "skipped", annotators_per_item=1)
    with store.session() as s:
        kept = {(r.user_id, r.task_id): r.expires_at for r in s.scalars(select(ItemClaim))}
    assert kept == {(carol, a.task.id): None, (bob, b.task.id): None}  # submitted / skipped: kept for good
    assert next_item(store, alice, annotators_per_item=1) is None


def _annotator_process(url: str, user: int, task_ids: list[str], cap: int, mode: str, start, out) -> None:
    """One app process: ``claim`` asks for every item in the same order as the other process
    (served only if the cap allows, then submitted); ``serve`` loops next_item -> submit."""
    store = Store(url)
    acked = []
    start.wait(60)
    if mode == "claim":
        for task_id in task_ids:
            try:
                claim_item(store, user, _rid(store), task_id, annotators_per_item=cap)
                ranks = {c: 0 for c in verified_ids(store, _rid(store), task_id)}
                save_annotation(store, user, _rid(store), task_id, "submitted", ranks, annotators_per_item=cap)
                acked.append(task_id)
            except AnnotationError:
                pass
    else:
        while (item := next_item(store, user, annotators_per_item=cap)) is not None:
            save_annotation(store, user, item.rollout_id, item.task.id, "submitted",
                            {t.completion_id: 0 for t in item.verified}, annotators_per_item=cap)
            acked.append(item.task.id)
    store.engine.dispose()
    out.put((user, acked))


def _rid(store: Store) -> int:
    return store.rollout_for_round(1).id


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    """An empty database: a SQLite file, or a fresh database on the temporary PostgreSQL server of
    tests/conftest.py (skipped where it cannot be started)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db.sqlite'}"
    try:
        return request.getfixturevalue("postgres_url")
    except pytest.FixtureLookupError:
        pytest.skip("no postgres_url fixture in tests/conftest.py")


@pytest.mark.parametrize("mode", ["claim", "serve"])
def test_two_processes_never_exceed_the_cap(url, mode):
    n_items, cap = 25, 1
    d = seed(url, n_items, 2)
    d["store"].engine.dispose()
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_annotator_process, args=(url, user, d["tasks"], cap, mode, start, out))
             for user in d["users"]]
    for p in procs:
        p.start()
    time.sleep(1.5)  # both imported and waiting
    start.set()
    acked = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    store = Store(url)
    with store.session() as s:
        rows = s.execute(select(Annotation.task_id, Annotation.user_id).where(Annotation.status == "submitted")).all()
    per_item: dict[str, int] = {}
    for task_id, _ in rows:
        per_item[task_id] = per_item.get(task_id, 0) + 1
    assert max(per_item.values()) <= cap, per_item  # before: 25 of 25 items had 2 submissions
    assert sorted((u, t) for t, u in rows) == sorted((u, t) for u, ts in acked.items() for t in ts)  # acked = stored
    assert len(rows) == n_items * cap  # and every item got its annotator
