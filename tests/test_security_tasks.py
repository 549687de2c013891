"""Hostile task files get a clear refusal before anything is written (issue 24, finding 9).

The same character and size rules hold on every database (``tasks.task.check_record_text``): a
NUL character (which PostgreSQL refuses in text and SQLite stored), a lone surrogate and a text
over ``MAX_TEXT_CHARS`` are refused with ``file: line N: field ...`` when the file is loaded, so
``rlhf run`` leaves no run directory, no tables, no ``run_meta`` row and no lock behind, on SQLite
and on PostgreSQL alike. A prompt longer than the model's positions is refused by name
(``run.setup.check_prompt_length``). Bidirectional-control characters are kept, as the verifier
reads them, and shown as visible marks. Add a case to BAD_RECORDS to cover a new rule.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect
from typer.testing import CliRunner

from rlhf_workbench.tasks.loading import load_tasks
from rlhf_workbench.tasks.task import MAX_TEXT_CHARS, TaskFormatError

GOOD = [{"id": "q1", "question": "What is 1 + 1?", "answer": "2"},
        {"id": "q2", "question": "What is 2 + 2?", "answer": "4"}]
# (name, the record written on line 3, the field the error names, what the error says)
BAD_RECORDS = [
    ("nul_question", {"id": "q3", "question": "What is\u0000 3 + 3?", "answer": "6"}, "question", "NUL character"),
    ("nul_context", {"id": "q3", "question": "3 + 3?", "context": "x\u0000", "answer": "6"}, "context", "NUL"),
    ("nul_choice", {"id": "q3", "question": "Pick", "choices": {"A": "six", "B": "se\u0000ven"}, "answer": "A"},
     "choices.B", "NUL"),
    ("nul_metadata", {"id": "q3", "question": "3 + 3?", "answer": "6", "metadata": {"notes": ["ok", "\u0000"]}},
     "metadata.notes[1]", "NUL"),
    ("nul_key", {"id": "q3", "question": "3 + 3?", "answer": "6", "metadata": {"a\u0000": 1}}, "metadata.a\u0000", "NUL"),
    ("nul_open_messages", {"id": "q3", "messages": [{"role": "user", "content": "hi\u0000"}]},
     "messages[0].content", "NUL"),
    ("lone_surrogate", {"id": "q3", "question": "3 + 3?\ud800", "answer": "6"}, "question", "lone surrogate"),
    ("huge_question", {"id": "q3", "question": "x" * (MAX_TEXT_CHARS + 1), "answer": "6"}, "question",
     f"{MAX_TEXT_CHARS + 1:,} characters long; at most {MAX_TEXT_CHARS:,}"),
    ("huge_choice", {"id": "q3", "question": "Pick", "choices": ["a", "b" * (MAX_TEXT_CHARS + 1)], "answer": "A"},
     "choices[1]", "characters long"),
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    """``records`` as JSON lines (escapes kept as JSON writes them: ``\\u0000``, ``\\ud800``)."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("name,record,field,problem", BAD_RECORDS, ids=[b[0] for b in BAD_RECORDS])
def test_a_bad_text_on_line_3_is_refused_naming_file_line_and_field(tmp_path, name, record, field, problem):
    path = write_jsonl(tmp_path / "tasks.jsonl", [*GOOD, record])
    with pytest.raises(TaskFormatError) as e:
        load_tasks(path)
    assert str(e.value).startswith(f"{path}: line 3: field '{field}': "), str(e.value)[:300]
    assert problem in str(e.value)


def test_the_size_limit_is_inclusive_and_bidi_controls_are_kept_and_shown(tmp_path):
    from rlhf_workbench.app.render import task_md

    rtl = "The answer is 12\u202e34"
    path = write_jsonl(tmp_path / "tasks.jsonl", [*GOOD, {"id": "q3", "question": "x" * MAX_TEXT_CHARS, "answer": "6"},
                                                   {"id": "q4", "question": rtl, "answer": "7"}])
    tasks = load_tasks(path)
    assert len(tasks[2].question) == MAX_TEXT_CHARS and tasks[3].question == rtl  # kept as the verifier reads it
    shown = task_md(tasks[3])
    assert "12[U+202E]34" in shown and "\u202e" not in shown  # annotators see the mark, not reversed text


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_rlhf_run_on_a_nul_task_file_writes_nothing(tmp_path, db_url, tiny_model_dir):
    """``rlhf run`` (the CLI entry) on a file with a NUL on line 3: exit code 2 and the
    ``file: line 3: field`` message; no run directory, and the database (SQLite file or
    PostgreSQL database) holds no table, so no run_meta row and no lock either. Before issue 24,
    SQLite stored the NUL and PostgreSQL failed only after tables, run_meta and the lock existed."""
    from rlhf_workbench.cli import app

    tasks = write_jsonl(tmp_path / "tasks.jsonl", [*GOOD, BAD_RECORDS[0][1], {"id": "q4", "question": "5?", "answer": "5"}])
    config = tmp_path / "exp.yaml"
    config.write_text(f"rounds: 1\nmodel:\n  name: {tiny_model_dir}\n  mixed_precision: 'no'\n"
                      f"tasks:\n  path: {tasks}\ndb_url: {db_url}\n")
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["run", "--config", str(config), "--out", str(out)])
    text = " ".join(r.output.split())
    assert r.exit_code == 2, r.output
    assert f"line 3: field 'question': contains a NUL character" in text, text
    assert not out.exists()
    if db_url.startswith("sqlite"):
        assert not Path(db_url.removeprefix("sqlite:///")).exists()
    else:
        engine = create_engine(db_url)
        try:
            assert inspect(engine).get_table_names() == []
        finally:
            engine.dispose()


def test_a_prompt_longer_than_the_models_positions_is_refused_by_name(tmp_path, tiny_model_dir):
    """The tiny model reads 512 positions; a ~4,000-token question ran on it without a word. Now
    ``loop.run`` refuses it, naming the task, before the run directory exists; a task set that
    fits still loads."""
    from rlhf_workbench.config import RunConfig
    from rlhf_workbench.run.loop import run
    from rlhf_workbench.run.setup import load_run_tasks

    long_question = "What is " + " + ".join(["12"] * 1300) + "?"
    records = [*GOOD, {"id": "too-long", "question": long_question, "answer": str(12 * 1300)},
               {"id": "q4", "question": "What is 3 + 4?", "answer": "7"}]
    cfg = RunConfig.model_validate({"rounds": 1, "model": {"name": str(tiny_model_dir), "mixed_precision": "no"},
                                    "tasks": {"path": str(write_jsonl(tmp_path / "tasks.jsonl", records))}})
    out = tmp_path / "run"
    with pytest.raises(TaskFormatError) as e:
        run(cfg, out)
    msg = str(e.value)
    assert "task 'too-long' (" in msg and "exceeds the model's 512 positions" in msg, msg
    assert "q4" not in msg and not out.exists()
    cfg.tasks.path = str(write_jsonl(tmp_path / "fits.jsonl", [r for r in records if r["id"] != "too-long"]))
    train, heldout = load_run_tasks(cfg)
    assert sorted(t.id for t in train + heldout) == ["q1", "q2", "q4"]
