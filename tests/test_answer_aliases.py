"""Free-text keys with ``answer_aliases`` (issue 22): read from the task file, stored with the
task, and accepted by the verifier after normalisation; bad values are refused with file:line:field."""

import json

import pytest

from rlhf_workbench.store import Store
from rlhf_workbench.tasks.loading import load_tasks
from rlhf_workbench.tasks.task import TaskFormatError
from rlhf_workbench.verify import verify


def _write(tmp_path, record):
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps({"id": "t0", "question": "Spell it.", "answer": "x", "answer_type": "text"}) + "\n"
                    + json.dumps(record) + "\n")
    return path


def test_aliases_verify_and_survive_the_store(tmp_path):
    rec = {"id": "dx", "question": "Which diagnosis fits the ECG?", "answer": "myocardial infarction",
           "answer_type": "text", "answer_aliases": ["MI", "heart attack"]}
    task = load_tasks(_write(tmp_path, rec))[1]
    assert task.metadata["answer_aliases"] == ["MI", "heart attack"]
    assert verify("The ST elevation says it.\nAnswer: MI", task).correct
    assert verify("Answer: a heart attack.", task).correct
    assert not verify("Answer: angina", task).correct
    # the same answer without the alias list is not verified
    plain = load_tasks(_write(tmp_path, {k: v for k, v in rec.items() if k != "answer_aliases"}))[1]
    assert not verify("Answer: MI", plain).correct
    # stored and read back by the loop's store, the aliases still count
    store = Store(None, run_dir=tmp_path / "run")
    store.add_tasks([task], "train")
    back = {t.id: t for t in store.tasks("train")}["dx"]
    assert verify("Answer: MI", back).correct


@pytest.mark.parametrize("bad", [3, [""], ["MI", 4], {"a": "b"}])
def test_bad_aliases_name_line_and_field(tmp_path, bad):
    rec = {"id": "dx", "question": "q", "answer": "myocardial infarction", "answer_type": "text", "answer_aliases": bad}
    with pytest.raises(TaskFormatError, match=r"tasks\.jsonl: line 2: field .answer_aliases."):
        load_tasks(_write(tmp_path, rec))
