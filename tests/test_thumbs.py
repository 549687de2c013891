"""Thumbs from deployment (rlhf_workbench.feedback.thumbs): ``rlhf serve-model`` stores every served answer
and takes ``POST /v1/feedback`` on it, tagged with the policy version served; the next KTO
round trains on the thumbs (playground and served) exactly once. Tiny random model and the real
SmolLM2 tokenizer (tests/conftest.py); the store tests run on SQLite and PostgreSQL."""

from __future__ import annotations

import sqlite3

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from rlhf_workbench.human.annotation import record_binary_feedback
from rlhf_workbench.config import RunConfig
from rlhf_workbench.run.loop import _record_rankings, _round_batch, _rule_scores, store_rollout
from rlhf_workbench.model.rollout import Completion, render_prompt
from rlhf_workbench.app.serve_model import ServeLimits, make_app
from rlhf_workbench.model.chat import load_served_model
from rlhf_workbench.store import BinaryFeedback, ServedCompletion, Store
from rlhf_workbench.tasks.task import Task
from rlhf_workbench.feedback.thumbs import FeedbackStore, record_served_feedback, served_version

QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_served_model(str(tiny_model_dir))


def _store_with_versions(url: str, run_dir=None, versions: int = 1) -> Store:
    store = Store(url, run_dir)
    store.publish_version(0, None, "base", None, {}, round=0)
    for v in range(1, versions + 1):
        store.publish_version(v, v - 1, "kto", f"checkpoints/v{v}", {}, round=v)
    return store


def _count(store: Store, table) -> int:
    with store.session() as s:
        return s.scalar(select(func.count()).select_from(table))


def test_feedback_on_a_served_answer_is_stored_with_the_policy_version(tiny, db_url):
    model, tok = tiny
    store = _store_with_versions(db_url)
    c = TestClient(make_app(model, tok, "tiny", feedback=FeedbackStore(store, 1)))
    r = c.post("/v1/chat/completions", json={"messages": QUESTION, "n": 2, "temperature": 1.0, "seed": 3,
                                             "max_tokens": 5})
    assert r.status_code == 200, r.text
    resp = r.json()
    with store.session() as s:
        served = list(s.scalars(select(ServedCompletion).order_by(ServedCompletion.index)))
    assert [(x.response_id, x.index, x.completion, x.policy_version_id, x.messages) for x in served] == [
        (resp["id"], i, ch["message"]["content"], 1, QUESTION) for i, ch in enumerate(resp["choices"])]
    assert [x.finish_reason for x in served] == [ch["finish_reason"] for ch in resp["choices"]]
    assert served[0].rendered_prompt.endswith("assistant\n") and "What is 2 + 3?" in served[0].rendered_prompt

    up = c.post("/v1/feedback", json={"id": resp["id"], "label": True})
    down = c.post("/v1/feedback", json={"id": resp["id"], "index": 1, "thumbs": "down"})
    assert up.status_code == 200 and down.status_code == 200, (up.text, down.text)
    assert up.json()["label"] is True and up.json()["policy_version"] == 1 and down.json()["label"] is False
    with store.session() as s:
        rows = list(s.scalars(select(BinaryFeedback).order_by(BinaryFeedback.id)))
    assert [(b.label, b.policy_version_id, b.served_id, b.completion, b.prompt, b.user_id, b.consumed_round)
            for b in rows] == [
        (True, 1, served[0].id, served[0].completion, "What is 2 + 3?", None, None),
        (False, 1, served[1].id, served[1].completion, "What is 2 + 3?", None, None)]
    # a second vote on the same answer replaces the first while no round has trained on it
    assert c.post("/v1/feedback", json={"id": resp["id"], "thumbs": "down"}).json()["feedback_id"] == rows[0].id
    with store.session() as s:
        assert s.get(BinaryFeedback, rows[0].id).label is False
    assert _count(store, BinaryFeedback) == 2


@pytest.mark.parametrize("body,status,param,text", [
    ({"id": "chatcmpl-nope", "label": True}, 404, "id", "no chat completion 'chatcmpl-nope' was served"),
    ({"id": "RID", "index": 5, "label": True}, 404, "index", "has choices [0], not 5"),
    ({"id": "RID", "label": "maybe"}, 400, "label", "valid boolean"),
    ({"id": "RID", "label": 1}, 400, "label", "valid boolean"),
    ({"id": "RID", "thumbs": "sideways"}, 400, "thumbs", "'up' or 'down'"),
    ({"id": "RID"}, 400, "body", "exactly one of label"),
    ({"id": "RID", "label": True, "thumbs": "up"}, 400, "body", "exactly one of label"),
])
def test_bad_feedback_is_refused_and_stores_nothing(tiny, tmp_path, body, status, param, text):
    model, tok = tiny
    store = _store_with_versions(f"sqlite:///{tmp_path / 'w.db'}")
    c = TestClient(make_app(model, tok, "tiny", feedback=FeedbackStore(store, 1)))
    rid = c.post("/v1/chat/completions", json={"messages": QUESTION, "temperature": 0, "max_tokens": 3}).json()["id"]
    r = c.post("/v1/feedback", json={k: rid if v == "RID" else v for k, v in body.items()})
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param and text in r.json()["error"]["message"], r.json()
    assert _count(store, BinaryFeedback) == 0 and _count(store, ServedCompletion) == 1


def test_feedback_needs_a_store_and_the_api_key(tiny, tmp_path):
    model, tok = tiny
    plain = TestClient(make_app(model, tok, "tiny"))
    rid = plain.post("/v1/chat/completions", json={"messages": QUESTION, "temperature": 0, "max_tokens": 2}).json()["id"]
    r = plain.post("/v1/feedback", json={"id": rid, "label": True})
    assert r.status_code == 400 and "--run RUNDIR or --db URL" in r.json()["error"]["message"]
    store = _store_with_versions(f"sqlite:///{tmp_path / 'w.db'}")
    keyed = TestClient(make_app(model, tok, "tiny", ServeLimits(api_key="k3y"), FeedbackStore(store, None)))
    ok = {"Authorization": "Bearer k3y"}
    rid = keyed.post("/v1/chat/completions", json={"messages": QUESTION, "temperature": 0, "max_tokens": 2},
                     headers=ok).json()["id"]
    assert keyed.post("/v1/feedback", json={"id": rid, "label": True}).status_code == 401
    assert _count(store, BinaryFeedback) == 0
    r = keyed.post("/v1/feedback", json={"id": rid, "label": True}, headers=ok)
    assert r.status_code == 200 and r.json()["policy_version"] is None
    with store.session() as s:
        assert s.scalars(select(BinaryFeedback)).one().policy_version_id is None


def test_served_version_of_run_paths(tmp_path):
    from rlhf_workbench.cli import _serve_feedback

    run = tmp_path / "run"
    store = _store_with_versions(None, run, versions=2)
    (run / "checkpoints" / "v2").mkdir(parents=True)
    (run / "policy").mkdir()
    assert served_version(store, run, run / "checkpoints" / "v1") == 1
    assert served_version(store, run, run / "checkpoints" / "v7") is None  # not published
    assert served_version(store, run, run / "policy") is None  # run not finished: policy/ may be older
    store.set_meta("status", {"state": "done", "round": 2})
    assert served_version(store, run, run / "policy") == 2
    assert served_version(store, run, tmp_path / "elsewhere") is None and served_version(store, None, run) is None
    sink, model = _serve_feedback(run, None, None)  # --run alone: the latest version's checkpoint
    assert model == str(run / "checkpoints" / "v2") and sink.policy_version == 2
    sink, model = _serve_feedback(run, None, "smollm2-135m")
    assert model == "smollm2-135m" and sink.policy_version is None
    with pytest.raises(ValueError, match="no run database here"):
        _serve_feedback(tmp_path / "nothing", None, None)


def test_cli_serve_model_run_passes_the_feedback_store(tmp_path, tiny_model_dir, monkeypatch):
    """``rlhf serve-model --run RUN`` on a run at v0 serves the run's base model, tagged v0."""
    from typer.testing import CliRunner

    import rlhf_workbench.app.serve_model as sm
    from rlhf_workbench.cli import app as cli_app

    run = tmp_path / "run"
    store = _store_with_versions(None, run, versions=0)
    store.set_meta("config", {"model": {"name": str(tiny_model_dir)}})
    served = {}
    monkeypatch.setattr(sm, "serve", lambda *a, **kw: served.update(args=a, kw=kw))
    r = CliRunner().invoke(cli_app, ["serve-model", "--run", str(run)])
    assert r.exit_code == 0, r.output
    assert served["args"][2] == str(tiny_model_dir) and served["kw"]["feedback"].policy_version == 0
    assert served["kw"]["feedback"].store.url == f"sqlite:///{run / 'workbench.db'}"
    assert "feedback; policy version 0" in " ".join(r.output.split())


def _kto_round(store: Store, round: int, cfg: RunConfig, task: Task):
    comps = [Completion(task.id, 0, [1, 2], [5, 6], [-0.5, -1.0], f"Round {round}.\nAnswer: 5", True),
             Completion(task.id, 1, [1, 2], [8], [-2.0], "Answer: 6", True)]
    store_rollout(store, round, round - 1, {"seeded": True}, {task.id: task}, comps)
    rollout = store.rollout_for_round(round)
    _record_rankings(store, rollout, "rules", _rule_scores(rollout, cfg)[0], set(), cfg)
    return store.rollout_for_round(round)


def test_next_kto_round_trains_on_thumbs_once(db_url, tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = RunConfig.model_validate({"algorithm": "kto", "rollout": {"num_generations": 2},
                                    "eval": {"max_new_tokens": 64}})
    task = Task(id="t1", question="What is 2 + 3?", answer="5")
    store = _store_with_versions(db_url, versions=3)
    store.add_tasks([task], "train")
    # a playground thumbs up on v1's answer, a served answer thumbed down (cut by max_tokens: no EOS)
    pg_text = "2 + 3 = 5.\nAnswer: 5"
    record_binary_feedback(store, None, 1, task.prompt(), pg_text, True)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
    with store.session() as s, s.begin():
        s.add(ServedCompletion(response_id="chatcmpl-1", index=0, model="tiny", messages=messages, rendered_prompt="",
                               completion=" It is Lyon", finish_reason="length", policy_version_id=1))
    record_served_feedback(store, "chatcmpl-1", 0, False)

    r1 = _kto_round(store, 1, cfg, task)
    grpo, _ = _round_batch(store, r1, cfg, "grpo", tok)  # other algorithms leave thumbs stored
    assert len(grpo) == 2 and all(s.label is None for s in grpo)
    with store.session() as s:
        assert s.scalar(select(func.count()).where(BinaryFeedback.consumed_round.is_not(None))) == 0
    batch, stats = _round_batch(store, r1, cfg, "kto", tok)
    assert stats["desirable"] == 1 and stats["undesirable"] == 1  # the rollout's own traces
    assert stats["thumbs_desirable"] == 1 and stats["thumbs_undesirable"] == 1
    thumbs = batch[2:]
    assert [(s.label, tok.decode(s.token_ids, skip_special_tokens=True)) for s in thumbs] == [
        (True, pg_text), (False, " It is Lyon")]
    assert thumbs[0].token_ids[-1] == tok.eos_token_id and thumbs[1].token_ids[-1] != tok.eos_token_id
    assert thumbs[0].prompt_ids == render_prompt(tok, task)  # as the loop renders the task
    expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert thumbs[1].prompt_ids == list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    with store.session() as s:
        assert [b.consumed_round for b in s.scalars(select(BinaryFeedback))] == [1, 1]

    # the round is rebuilt after a crash (fresh engine): the same thumbs, nothing lost or doubled
    again = Store(db_url)
    batch_again, _ = _round_batch(again, again.rollout_for_round(1), cfg, "kto", tok)
    assert [(s.label, s.token_ids) for s in batch_again[2:]] == [(s.label, s.token_ids) for s in thumbs]
    # a consumed vote can no longer change
    with pytest.raises(Exception, match="already trained on in round 1"):
        record_served_feedback(again, "chatcmpl-1", 0, True)
    # round 2 takes only the thumbs given since
    record_binary_feedback(again, None, 1, task.prompt(), "Answer: 4", False)
    batch2, stats2 = _round_batch(again, _kto_round(again, 2, cfg, task), cfg, "kto", tok)
    assert stats2["thumbs_desirable"] == 0 and stats2["thumbs_undesirable"] == 1
    assert [(s.label, tok.decode(s.token_ids, skip_special_tokens=True)) for s in batch2[2:]] == [(False, "Answer: 4")]
    off = RunConfig.model_validate({**cfg.model_dump(), "feedback": {**cfg.feedback.model_dump(), "thumbs": False}})
    record_binary_feedback(again, None, 1, task.prompt(), "Answer: 5", True)
    batch3, stats3 = _round_batch(again, _kto_round(again, 3, cfg, task), off, "kto", tok)
    assert len(batch3) == 2 and "thumbs_desirable" not in stats3


def test_old_database_gains_the_thumbs_columns(tmp_path, tokenizer_dir):
    """A run written before thumbs trained: its binary_feedback table lacks served_id and
    consumed_round; opening it adds them and its stored thumbs train in the next KTO round."""
    from transformers import AutoTokenizer

    from rlhf_workbench.feedback.thumbs import thumbs_batch

    db = tmp_path / "workbench.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE binary_feedback (id INTEGER PRIMARY KEY, user_id INTEGER, policy_version_id INTEGER, "
                "prompt TEXT NOT NULL, completion TEXT NOT NULL, label BOOLEAN NOT NULL, created_at DATETIME)")
    con.execute("INSERT INTO binary_feedback VALUES (1, NULL, NULL, 'Hi?', 'Hello!', 1, '2026-01-01 00:00:00')")
    con.commit()
    con.close()
    store = Store(f"sqlite:///{db}")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    samples, stats = thumbs_batch(store, tok, 4, 256)
    assert stats == {"thumbs_desirable": 1.0, "thumbs_undesirable": 0.0}
    assert tok.decode(samples[0].token_ids, skip_special_tokens=True) == "Hello!" and samples[0].label is True
    with store.session() as s:
        assert s.get(BinaryFeedback, 1).consumed_round == 4


# --- one vote per answer (issue 24, finding 3): a unique index, an upsert ---------------------------
def _served(store: Store, rid: str = "chatcmpl-race") -> None:
    with store.session() as s, s.begin():
        s.add(ServedCompletion(response_id=rid, index=0, model="tiny", messages=QUESTION, rendered_prompt="p",
                               completion="Answer: 5", finish_reason="stop", policy_version_id=1))


def _race(fn, n: int = 10) -> list:
    """Run ``fn(i)`` on ``n`` threads released at the same moment; their results (or exceptions)."""
    import threading

    barrier, out = threading.Barrier(n), [None] * n

    def run(i):
        barrier.wait()
        try:
            out[i] = fn(i)
        except Exception as e:  # noqa: BLE001 - reported by the assertion
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_concurrent_first_votes_on_a_served_answer_store_one_row(db_url):
    """Ten concurrent first thumbs on one served answer stored 1-5 rows with contradictory labels;
    now exactly one row, every caller gets its id, and its label is one of the votes."""
    store = _store_with_versions(db_url)
    _served(store)
    ids = _race(lambda i: record_served_feedback(store, "chatcmpl-race", 0, i % 2 == 0))
    assert all(isinstance(x, int) for x in ids), ids
    with store.session() as s:
        rows = list(s.scalars(select(BinaryFeedback)))
    assert len(rows) == 1 and set(ids) == {rows[0].id}


def test_repeated_playground_clicks_store_one_row_per_user_and_answer(db_url):
    """Twenty clicks on one Playground answer stored twenty rows (KTO trained on each); now one per
    user and answer, holding the last label, while another user's or another answer's vote is its own."""
    from rlhf_workbench.human.accounts import create_user

    store = _store_with_versions(db_url)
    a = create_user(store, "pg-a", "long-password-1", "playground")
    b = create_user(store, "pg-b", "long-password-2", "playground")
    out = _race(lambda i: record_binary_feedback(store, a, 1, "What is 2 + 3?", "Answer: 5", True), 10)
    assert all(isinstance(x, int) for x in out) and len(set(out)) == 1, out
    for label in (False, True, False):
        record_binary_feedback(store, a, 1, "What is 2 + 3?", "Answer: 5", label)
    record_binary_feedback(store, b, 1, "What is 2 + 3?", "Answer: 5", True)
    record_binary_feedback(store, a, 0, "What is 2 + 3?", "Answer: 5", True)  # the reference's answer
    with store.session() as s:
        rows = sorted((r.user_id, r.policy_version_id, r.label) for r in s.scalars(select(BinaryFeedback)))
    assert rows == sorted([(a, 1, False), (b, 1, True), (a, 0, True)])
