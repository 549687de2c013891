"""Experts audit the verifier: a verified trace marked "actually wrong" is never chosen, gets
reward 0, and counts as a false accept in the verifier's audited precision."""

import pytest
from sqlalchemy import null, select, update

from rlhf_workbench.human.accounts import create_user
from rlhf_workbench.human.annotation import claim_item, human_scores, next_item, save_annotation, verifier_audit
from rlhf_workbench.human.errors import AnnotationError
from rlhf_workbench.config import RunConfig
from rlhf_workbench.app.dashboard import audit_md
from rlhf_workbench.run.loop import _record_rankings, store_rollout
from rlhf_workbench.model.rollout import Completion
from rlhf_workbench.stats import wilson_interval
from rlhf_workbench.store import Annotation, PreferencePair, Store
from rlhf_workbench.tasks.task import Task

T1 = Task(id="t1", question="What is 2 + 2?", answer="4")
T2 = Task(id="t2", question="What is 3 + 5?", answer="8")
TEXTS = {"t1": ["2 + 2 = 4\nAnswer: 4", "Answer: 4", "Answer: 5"],
         "t2": ["3 + 5 = 8\nAnswer: 8", "Answer: 8", "Answer: 9"]}


@pytest.fixture()
def seeded(tmp_path):
    """One rollout: per task two verified traces and one rejected; two annotators, each served both items."""
    store = Store(run_dir=tmp_path / "run")
    store.add_tasks([T1, T2], "train")
    store.publish_version(0, None, "base", None, {}, round=0)
    comps = [Completion(t, k, [1], [5 + k], [-0.1], text, True) for t, texts in TEXTS.items()
             for k, text in enumerate(texts)]
    rid = store_rollout(store, 1, 0, {}, {"t1": T1, "t2": T2}, comps)
    ids = {}
    for c in store.rollout_for_round(1).completions:
        ids.setdefault(c.task_id, []).append(c.id)
    verdicts = [c.verification.correct for c in store.rollout_for_round(1).completions]
    assert verdicts == [True, True, False] * 2  # the premise: two verified traces, one rejected, per task
    ann, bob = create_user(store, "ann", "password-1"), create_user(store, "bob", "password-2")
    for user in (ann, bob):  # both items served to both annotators, as the app would
        for task_id in ids:
            claim_item(store, user, rid, task_id, annotators_per_item=2)
    return store, rid, ids, ann, bob


def _annotations(store):
    with store.session() as s:
        return [(a.user_id, a.task_id, a.status, a.verifier_wrong) for a in s.scalars(select(Annotation))]


def test_marked_wrong_is_stored_flagged_reward_zero_and_never_chosen(seeded):
    store, rid, ids, ann, _ = seeded
    best, second, rejected = ids["t1"]
    # ann ranks `best` first but finds its answer actually wrong: without the mark it would be chosen.
    save_annotation(store, ann, rid, "t1", "submitted", {best: 0, second: 1}, verifier_wrong=[best])
    assert _annotations(store) == [(ann, "t1", "submitted", [best])]
    scores, flagged, n = human_scores(store, store.rollout_for_round(1))
    assert n == 1 and flagged == {best} and scores["t1"] == {best: 0.0, second: -1.0}

    cfg = RunConfig.model_validate({"dpo": {"pairing": "all_correct_vs_wrong", "max_pairs_per_prompt": 8}})
    rollout = store.rollout_for_round(1)
    _record_rankings(store, rollout, "human", scores, flagged, cfg)
    ranking = next(r for r in store.rankings_for_rollout(rid) if r.task_id == "t1")
    assert ranking.ranks[str(best)] is None and ranking.rewards[str(best)] == 0.0
    assert ranking.ranks[str(second)] == 0 and ranking.rewards[str(second)] >= 1.0
    pairs = [(p.chosen_id, p.rejected_id) for p in store.pairs_for_rollout(rid)]
    t1_pairs = [p for p in pairs if p[0] in ids["t1"]]
    assert t1_pairs and all(chosen != best for chosen, _ in pairs)
    assert set(t1_pairs) == {(second, best), (second, rejected)}  # the marked trace is now a rejected one


def test_marking_a_rejected_or_foreign_trace_is_refused_and_stores_nothing(seeded):
    store, rid, ids, ann, _ = seeded
    best, second, rejected = ids["t1"]
    ranks = {best: 0, second: 1}
    with pytest.raises(AnnotationError, match=rf"trace ids \[{rejected}\] cannot be marked .*only verified traces"):
        save_annotation(store, ann, rid, "t1", "submitted", ranks, verifier_wrong=[rejected])
    with pytest.raises(AnnotationError, match=rf"trace ids \[{ids['t2'][0]}\] cannot be marked"):
        save_annotation(store, ann, rid, "t1", "submitted", ranks, verifier_wrong=[ids["t2"][0]])  # another item
    with pytest.raises(AnnotationError, match="cannot be marked"):
        save_annotation(store, ann, rid, "t1", "draft", ranks, verifier_wrong=[10_000])  # no such trace
    with pytest.raises(AnnotationError, match="must be completion ids"):
        save_annotation(store, ann, rid, "t1", "submitted", ranks, verifier_wrong=["first"])
    assert _annotations(store) == []
    assert verifier_audit(store) == {"audited": 0, "wrong": 0, "precision": None, "ci_low": None, "ci_high": None}


def test_draft_keeps_the_marks(seeded):
    store, rid, ids, ann, _ = seeded
    item = next_item(store, ann)
    v = [t.completion_id for t in item.verified]
    assert all(t.reason for t in item.verified)  # the page shows the verifier's reason for each
    save_annotation(store, ann, rid, item.task.id, "draft", {v[0]: 0}, verifier_wrong=[v[1]])
    assert next_item(store, ann).draft.verifier_wrong == [v[1]]
    assert verifier_audit(store)["audited"] == 0  # a draft audits nothing


def test_verifier_audit_counts_precision_and_wilson_interval(seeded):
    store, rid, ids, ann, bob = seeded
    assert "no audits yet" in audit_md(store)
    (a1, b1, _), (a2, b2, _) = ids["t1"], ids["t2"]
    save_annotation(store, ann, rid, "t1", "submitted", {a1: 0, b1: 1}, verifier_wrong=[b1])
    save_annotation(store, bob, rid, "t1", "submitted", {a1: 0, b1: 0})  # a second review of the same traces
    save_annotation(store, ann, rid, "t2", "submitted", {a2: 1, b2: 0}, flagged=[a2])  # unsafe, not a false accept
    save_annotation(store, bob, rid, "t2", "skipped", verifier_wrong=[a2])  # a skip audits nothing
    audit = verifier_audit(store)
    # 3 submitted annotations x 2 verified traces = 6 reviews, 1 marked wrong.
    assert (audit["audited"], audit["wrong"]) == (6, 1)
    assert audit["precision"] == pytest.approx(5 / 6)
    assert (audit["ci_low"], audit["ci_high"]) == pytest.approx(wilson_interval(5, 6))
    # By hand: p = 5/6, n = 6, z = 1.96: centre (p + z²/2n) / (1 + z²/n) = 0.70322, half-width
    # z·sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n) = 0.26673.
    assert audit["ci_low"] == pytest.approx(0.43649, abs=5e-5) and audit["ci_high"] == pytest.approx(0.96995, abs=5e-5)
    assert audit_md(store) == ("**Verifier audited precision: 83.3 %** (95 % CI 43.6–97.0 %, 6 traces audited, "
                               "1 marked wrong)")
    # Rows of an older database (column added later, NULL) count as audited without marks.
    with store.session() as s, s.begin():
        s.execute(update(Annotation).where(Annotation.user_id == ann, Annotation.task_id == "t1")
                  .values(verifier_wrong=null()))
    assert (verifier_audit(store)["audited"], verifier_audit(store)["wrong"]) == (6, 0)
    assert human_scores(store, store.rollout_for_round(1))[1] == {a2}  # only ann's unsafe flag is left


def test_wilson_bounds_of_the_documented_example():
    """The README's example line: 78 of 80 audited traces not marked wrong."""
    low, high = wilson_interval(78, 80)
    assert (round(100 * low, 1), round(100 * high, 1)) == (91.3, 99.3)
