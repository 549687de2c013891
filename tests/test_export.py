"""Preference-dataset export: rule and expert rankings to plain and conversational pairs."""

import json

import pytest

from rlhf_workbench.human.accounts import create_user
from rlhf_workbench.human.annotation import claim_item, human_scores, save_annotation
from rlhf_workbench.config import RunConfig
from rlhf_workbench.human.export import export_preferences, preference_rows
from rlhf_workbench.run.loop import _record_rankings, _rule_scores, store_rollout
from rlhf_workbench.model.rollout import Completion
from rlhf_workbench.store import Store, VerificationRow
from rlhf_workbench.tasks.task import Task

INSTRUCTION = "Reply with the result only, as 'Answer: <number>'."
T1 = Task(id="t1", question="What is 2 + 2?", answer="4")
T2 = Task(id="t2", question="What is 3 + 5?", answer="8")


def build_store(tmp_path, db_url=None):
    """Round 1 ranked by the rules (task t1), round 2 by two experts (task t2); in SQLite in the run
    directory, or the database ``db_url``."""
    store = Store(db_url, tmp_path / "run")
    cfg = RunConfig.model_validate({"tasks": {"instruction": INSTRUCTION}})
    store.set_meta("config", cfg.model_dump(mode="json"))
    store.add_tasks([T1, T2], "train")
    store.publish_version(0, None, "base", None, {}, round=0)
    c1 = [Completion("t1", 0, [1], [5, 6, 7], [-0.1] * 3, "2 + 2 = 4\nAnswer: 4", True),
          Completion("t1", 1, [1], [8], [-0.2], "Answer: 5", True),
          Completion("t1", 2, [1], [9], [-0.3], "4", True)]
    store_rollout(store, 1, 0, {}, {"t1": T1}, c1)
    r1 = store.rollout_for_round(1)
    _record_rankings(store, r1, "rules", _rule_scores(r1, cfg)[0], set(), cfg)
    store.publish_version(1, 0, "dpo", None, {}, round=1)

    c2 = [Completion("t2", 0, [1], [5, 6, 7], [-0.1] * 3, "3 + 5 = 8\nAnswer: 8", True),
          Completion("t2", 1, [1], [8], [-0.2], "Answer: 8", True),
          Completion("t2", 2, [1], [9], [-0.3], "Answer: 9", True)]
    rid2 = store_rollout(store, 2, 1, {}, {"t2": T2}, c2)
    a_id, b_id, wrong = (c.id for c in store.rollout_for_round(2).completions)
    ann = create_user(store, "ann", "password-1")
    bob = create_user(store, "bob", "password-2")
    for user in (ann, bob):
        claim_item(store, user, rid2, "t2", annotators_per_item=2)  # served to both, as the app does
    save_annotation(store, ann, rid2, "t2", "submitted", {b_id: 0, a_id: 1}, rationale="short and right")
    save_annotation(store, bob, rid2, "t2", "submitted", {b_id: 0, a_id: 0}, rationale="both fine")
    r2 = store.rollout_for_round(2)
    scores, flagged, n = human_scores(store, r2)  # what the worker does with the submissions
    assert n == 2
    _record_rankings(store, r2, "human", scores, flagged, cfg)
    ids1 = [c.id for c in r1.completions]
    return store, ids1, (a_id, b_id, wrong)


SAMPLED = {"chosen_origin": "sample", "rejected_origin": "sample"}  # both traces the policy's own samples


def expected_rows(ids1, ids2):
    a_id, b_id, wrong = ids2
    return [
        {"prompt": f"What is 2 + 2?\n\n{INSTRUCTION}", "chosen": "2 + 2 = 4\nAnswer: 4", "rejected": "Answer: 5",
         "task_id": "t1", "source": "rules", "annotator": None, "policy_version": 0, "round": 1,
         "rationale": None, "chosen_id": ids1[0], "rejected_id": ids1[1], **SAMPLED},
        # "4" without an answer line is no answer for the strict verifier: wrong, so rejected too.
        {"prompt": f"What is 2 + 2?\n\n{INSTRUCTION}", "chosen": "2 + 2 = 4\nAnswer: 4", "rejected": "4",
         "task_id": "t1", "source": "rules", "annotator": None, "policy_version": 0, "round": 1,
         "rationale": None, "chosen_id": ids1[0], "rejected_id": ids1[2], **SAMPLED},
        {"prompt": f"What is 3 + 5?\n\n{INSTRUCTION}", "chosen": "Answer: 8", "rejected": "Answer: 9",
         "task_id": "t2", "source": "human", "annotator": "ann,bob", "policy_version": 1, "round": 2,
         "rationale": "short and right\n\nboth fine", "chosen_id": b_id, "rejected_id": wrong, **SAMPLED},
    ]


def test_export_writes_both_forms_and_dataset(tmp_path, db_url):
    """Annotation, the worker's use of the submissions and the export, on SQLite and PostgreSQL."""
    import datasets

    store, ids1, ids2 = build_store(tmp_path, db_url)
    out = tmp_path / "export"
    info = export_preferences(store, out)
    assert info["pairs"] == 3 and info["by_source"] == {"rules": 2, "human": 1}
    want = expected_rows(ids1, ids2)
    plain = [json.loads(x) for x in (out / "preferences.jsonl").read_text().splitlines()]
    assert plain == want
    conv = [json.loads(x) for x in (out / "preferences_conversational.jsonl").read_text().splitlines()]
    assert len(conv) == 3
    for p, c in zip(plain, conv):
        assert c["prompt"] == [{"role": "user", "content": p["prompt"]}]
        assert c["chosen"] == [{"role": "assistant", "content": p["chosen"]}]
        assert c["rejected"] == [{"role": "assistant", "content": p["rejected"]}]
        assert {k: v for k, v in c.items() if k not in ("prompt", "chosen", "rejected")} == \
               {k: v for k, v in p.items() if k not in ("prompt", "chosen", "rejected")}
    ds = datasets.load_from_disk(str(out / "dataset"))
    assert ds.column_names == ["prompt", "chosen", "rejected", "task_id", "source", "annotator", "policy_version",
                               "round", "rationale", "chosen_id", "rejected_id", "chosen_origin",
                               "rejected_origin"]
    assert ds.to_list() == want
    # Chosen traces are verified correct in the database; rejected ones are exactly as stored.
    with store.session() as s:
        for row in plain:
            assert s.get(VerificationRow, row["chosen_id"]).correct
            assert not s.get(VerificationRow, row["rejected_id"]).correct
    # Exporting again into the same directory replaces the previous export.
    assert export_preferences(store, out, source="human")["pairs"] == 1
    assert datasets.load_from_disk(str(out / "dataset")).to_list() == want[2:]
    assert [json.loads(x) for x in (out / "preferences.jsonl").read_text().splitlines()] == want[2:]


def test_source_filter(tmp_path):
    store, ids1, ids2 = build_store(tmp_path)
    want = expected_rows(ids1, ids2)
    assert preference_rows(store, "rules") == want[:2]
    assert preference_rows(store, "human") == want[2:]
    assert preference_rows(store, "all") == want
    with pytest.raises(ValueError, match="source"):
        preference_rows(store, "crowd")


def test_prompt_without_instruction_override(tmp_path):
    store, *_ = build_store(tmp_path)
    store.set_meta("config", RunConfig().model_dump(mode="json"))  # no tasks.instruction
    assert preference_rows(store, "rules")[0]["prompt"] == T1.prompt()
    assert T1.prompt().endswith("Think step by step, then end with a line 'Answer: <number>'.")
