"""Store round trip: what is written reads back unchanged, from a second connection; on SQLite
and on PostgreSQL (the ``db_url`` fixture, tests/conftest.py)."""

import pytest
from sqlalchemy import select

from rlhf_workbench.config import RunConfig
from rlhf_workbench.run.loop import _record_rankings, _round_batch, _rule_scores, store_rollout
from rlhf_workbench.model.rollout import Completion
from rlhf_workbench.store import RankingRow, Store
from rlhf_workbench.tasks.task import Task

TASKS = [Task(id="t1", question="What is 2 + 2?", answer="4"),
         Task(id="t2", question="Pick one", answer="B", answer_type="choice", choices={"A": "x", "B": "y"},
              metadata={"topic": "demo"})]


def test_round_trip(db_url):
    url = db_url
    store = Store(url)
    store.add_tasks(TASKS[:1], "train")
    store.add_tasks(TASKS[1:], "heldout")
    store.add_tasks(TASKS[:1], "train")  # idempotent
    with pytest.raises(ValueError, match="t1"):
        store.add_tasks([Task(id="t1", question="other", answer="5")], "train")
    store.publish_version(0, None, "base", None, {"eval/accuracy": 0.25}, round=0)
    store.set_meta("config", {"a": [1, 2]})

    cfg = RunConfig()
    cfg.rollout.num_generations = 2
    comps = [Completion("t1", 0, [1, 2], [5, 6, 7], [-0.5, -1.25, -0.125], "2 + 2 = 4\nAnswer: 4", True),
             Completion("t1", 1, [1, 2], [8], [-2.0], "Answer: 5", True)]
    rid = store_rollout(store, 1, 0, {"temperature": 0.7}, {"t1": TASKS[0]}, comps)
    _record_rankings(store, store.rollout_for_round(1), "rules", _rule_scores(store.rollout_for_round(1), cfg)[0], set(), cfg)

    again = Store(url)  # a fresh engine: everything came from the database
    assert again.tasks("train") == TASKS[:1] and again.tasks("heldout") == TASKS[1:]
    assert again.tasks("heldout")[0].choices == {"A": "x", "B": "y"}
    assert again.tasks("heldout")[0].metadata == {"topic": "demo"}
    assert [(v.id, v.algorithm, v.metrics) for v in again.versions()] == [(0, "base", {"eval/accuracy": 0.25})]
    assert again.metrics() == {"eval/accuracy": [(0, 0.25)]}
    assert again.get_meta("config") == {"a": [1, 2]} and again.get_meta("missing", 7) == 7
    rollout = again.rollout_for_round(1)
    assert rollout.id == rid and rollout.settings == {"temperature": 0.7} and rollout.policy_version_id == 0
    stored = [(c.token_ids, c.logps, c.text, c.verification.correct, c.verification.format_ok)
              for c in rollout.completions]
    assert stored == [([5, 6, 7], [-0.5, -1.25, -0.125], "2 + 2 = 4\nAnswer: 4", True, True),
                      ([8], [-2.0], "Answer: 5", False, True)]
    with again.session() as s:
        ranking = s.scalars(select(RankingRow)).one()
    ids = [str(c.id) for c in rollout.completions]
    assert ranking.ranks == {ids[0]: 0, ids[1]: None} and ranking.rewards[ids[1]] == 0.0
    pairs = again.pairs_for_rollout(rid)
    assert [(p.chosen_id, p.rejected_id) for p in pairs] == [(rollout.completions[0].id, rollout.completions[1].id)]
    samples, stats = _round_batch(again, rollout, cfg)
    assert stats["acceptance_rate"] == 0.5
    assert samples[0].advantage > 0 > samples[1].advantage
    assert samples[0].old_logps == [-0.5, -1.25, -0.125]


def test_verdicts_are_stored_and_counted(db_url):
    """Each verification row keeps its verdict and abstention class (issue 22), on SQLite and
    PostgreSQL, and the round's ``unparsed_rate`` counts the unparsed traces."""
    store = Store(db_url)
    store.add_tasks(TASKS[:1], "train")
    store.publish_version(0, None, "base", None, {}, round=0)
    cfg = RunConfig()
    cfg.rollout.num_generations = 2
    comps = [Completion("t1", 0, [1, 2], [5], [-0.5], "Answer: 4", True),
             Completion("t1", 1, [1, 2], [8], [-2.0], "Answer: 4 days from Monday", True)]
    store_rollout(store, 1, 0, {}, {"t1": TASKS[0]}, comps)
    rollout = Store(db_url).rollout_for_round(1)
    assert [(c.verification.verdict, c.verification.correct) for c in rollout.completions] == [
        ("correct", True), ("unparsed", False)]
    assert rollout.completions[1].verification.why and "days from Monday" in rollout.completions[1].verification.reason
    _record_rankings(store, rollout, "rules", _rule_scores(rollout, cfg)[0], set(), cfg)
    _, stats = _round_batch(store, store.rollout_for_round(1), cfg)
    assert stats["unparsed_rate"] == 0.5 and stats["acceptance_rate"] == 0.5


def test_values_too_long_for_a_column_are_refused_alike(db_url, tmp_path):
    """A 150-character username or a 250-character task id was an uncaught DataError on PostgreSQL
    and stored by SQLite; now both refuse it with the field and its limit named, storing nothing."""
    from rlhf_workbench.human.accounts import create_user
    from rlhf_workbench.human.annotation import save_annotation
    from rlhf_workbench.human.errors import AnnotationError
    from rlhf_workbench.store import FieldTooLong, User
    from rlhf_workbench.tasks.loading import load_tasks
    from rlhf_workbench.tasks.task import TaskFormatError

    store = Store(db_url)
    with pytest.raises(FieldTooLong, match=r"users\.username: 150 characters long; at most 100 are allowed"):
        create_user(store, "u" * 150, "long enough password")
    assert create_user(store, "u" * 100, "long enough password")  # the limit itself fits
    with pytest.raises(FieldTooLong, match=r"tasks\.id: 250 characters long; at most 200 are allowed"):
        store.add_tasks([TASKS[0], Task(id="t" * 250, question="q", answer="1")], "train")
    assert store.tasks("train") == []  # the whole batch was refused
    with store.session() as s:
        assert [u.username for u in s.scalars(select(User))] == ["u" * 100]

    # A task file with such an id stops at loading, naming the line, before any database is touched.
    path = tmp_path / "long.jsonl"
    path.write_text('{"id": "a", "question": "q", "answer": "1"}\n' + f'{{"id": "{"x" * 201}", "question": "q", "answer": "1"}}\n')
    with pytest.raises(TaskFormatError, match=r"long\.jsonl: line 2: field 'id': 201 characters long; at most 200"):
        load_tasks(path)

    # An annotation naming a task id longer than any stored one is an AnnotationError, not a DataError.
    store.add_tasks(TASKS[:1], "train")
    store.publish_version(0, None, "base", None, {}, round=0)
    comps = [Completion("t1", 0, [1, 2], [5], [-0.5], "Answer: 4", True),
             Completion("t1", 1, [1, 2], [8], [-2.0], "Answer: 4", True)]
    rid = store_rollout(store, 1, 0, {}, {"t1": TASKS[0]}, comps)
    uid = create_user(store, "ann", "long enough password")
    with pytest.raises(AnnotationError):
        save_annotation(store, uid, rid, "t" * 250, "submitted", {})


def test_a_round_has_one_rollout(db_url):
    """rollouts.round is unique: a second rollout of a stored round is refused by the database and
    leaves nothing behind (two concurrent runs used to store round 1 twice)."""
    from sqlalchemy.exc import IntegrityError

    from rlhf_workbench.store import CompletionRow, Rollout

    store = Store(db_url)
    store.add_tasks(TASKS[:1], "train")
    store.publish_version(0, None, "base", None, {}, round=0)
    comps = [Completion("t1", 0, [1, 2], [5], [-0.5], "Answer: 4", True)]
    store_rollout(store, 1, 0, {}, {"t1": TASKS[0]}, comps)
    with pytest.raises(IntegrityError):
        store_rollout(store, 1, 0, {}, {"t1": TASKS[0]}, comps)
    with store.session() as s:
        assert len(list(s.scalars(select(Rollout)))) == 1 and len(list(s.scalars(select(CompletionRow)))) == 1


def test_unique_round_index_added_to_an_old_database(tmp_path):
    """A database written before rounds were unique gets the index when opened; one that already
    holds a duplicate round (the corruption the lock prevents) still opens, with a warning."""
    import sqlite3

    url = f"sqlite:///{tmp_path / 'old.db'}"
    Store(url)
    con = sqlite3.connect(tmp_path / "old.db")
    con.execute("DROP INDEX uq_rollouts_round")
    con.execute("INSERT INTO policy_versions (id, algorithm, metrics, created_at) VALUES (0, 'base', '{}', '2026-01-01')")
    for _ in range(2):
        con.execute("INSERT INTO rollouts (round, policy_version_id, settings, created_at) VALUES (1, 0, '{}', '2026-01-01')")
    con.commit()
    with pytest.warns(UserWarning, match=r"rollouts holds duplicate \(round\) rows"):
        Store(url)
    con.execute("DELETE FROM rollouts WHERE id = 2")
    con.commit()
    Store(url)
    assert con.execute("SELECT name FROM sqlite_master WHERE name = 'uq_rollouts_round'").fetchone()
    con.close()
