"""benchmarks/verifier_verdicts.py on a small hand-made workbench.db (issue 22)."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import verifier_verdicts  # noqa: E402

ROWS = [  # (text, task id, stored correct)
    ("Answer: 17", "n", 1),
    ("Answer: 17. Or 18 if you count the first day.", "n", 1),
    ("Answer: 17 zorbles", "n", 1),
    ("so 17", "n", 0),
    ("Answer: 16", "n", 0),
    ("Answer: B\nWait, it is (C).", "c", 1),
    ("Answer: yes", "y", 1),
]


def _db(path: Path) -> None:
    con = sqlite3.connect(path)
    con.executescript("""
        CREATE TABLE tasks (id TEXT PRIMARY KEY, question TEXT, answer TEXT, answer_type TEXT, context TEXT,
                            choices JSON, metadata JSON, split TEXT);
        CREATE TABLE rollouts (id INTEGER PRIMARY KEY, round INTEGER);
        CREATE TABLE completions (id INTEGER PRIMARY KEY, rollout_id INTEGER, task_id TEXT, text TEXT);
        CREATE TABLE verifications (completion_id INTEGER PRIMARY KEY, correct BOOLEAN, ambiguous BOOLEAN);
    """)
    con.execute("INSERT INTO tasks VALUES ('n', 'How many apples?', '17', 'number', NULL, NULL, '{}', 'train')")
    con.execute("INSERT INTO tasks VALUES ('c', 'Which?', 'B', 'choice', NULL, ?, '{}', 'train')",
                (json.dumps({"A": "Asthma", "B": "Bronchitis", "C": "Pneumonia"}),))
    con.execute("INSERT INTO tasks VALUES ('y', 'Does it?', 'yes', 'yes_no_maybe', NULL, NULL, '{}', 'train')")
    con.execute("INSERT INTO rollouts VALUES (1, 0)")
    for i, (text, task, stored) in enumerate(ROWS, start=1):
        con.execute("INSERT INTO completions VALUES (?, 1, ?, ?)", (i, task, text))
        con.execute("INSERT INTO verifications VALUES (?, ?, 0)", (i, stored))
    con.commit()
    con.close()


def test_verdict_distribution_of_a_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    _db(run / "workbench.db")
    out = tmp_path / "verdicts.json"
    result = verifier_verdicts.main([str(run), "--out", str(out)])
    total = result["total"]
    assert total["completions"] == len(ROWS)
    assert total["verdicts"] == {"correct": 2, "ambiguous": 2, "unparsed": 1, "no_answer": 1, "wrong": 1}
    assert total["reason_classes"]["unparsed:leftover_text"] == 1
    assert total["changes_vs_stored"] == {"stored_correct_now_ambiguous": 2, "stored_correct_now_unparsed": 1}
    written = json.loads(out.read_text())
    assert written["processor"]["cores"] and written["command"].startswith("python benchmarks/verifier_verdicts.py")
