#!/usr/bin/env python
"""The strict verifier's verdicts on real stored completions (issue 22).

    python benchmarks/verifier_verdicts.py runs/demo runs/pubmedqa

For each run directory, reads its ``workbench.db`` (SQLite, read-only: the ``completions`` table
joined with ``tasks``), re-verifies every stored completion with the current
:func:`rlhf_workbench.verify.verify` and counts the verdicts: correct / wrong / ambiguous /
unparsed / no_answer (and no_key for open tasks), each ``ambiguous`` and ``unparsed`` reason class
(``Verification.why``: hedge, second_value, leftover_text, no_value, correction_after_answer,
hedge_after_answer, second_answer_after_final, option_text_mismatch), by answer type and by
round, with a few examples of each class. Where the run stored the verdicts of the verifier it
ran with (``verifications`` table), the changes are counted too (stored correct -> now
not correct, and the reverse), so the effect of the new rules on the reward is visible.

Nothing is sampled or trained. Written to ``benchmarks/results/verifier_verdicts.json``
(``--out``), with the processor, the load average and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # for `import _common`
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

from rlhf_workbench.tasks.task import Task  # noqa: E402
from rlhf_workbench.verify import Verdict, verify  # noqa: E402

OUT = _common.RESULTS / "verifier_verdicts.json"
EXAMPLES_PER_CLASS = 3


def _json(value: str | None, default):
    if value is None:
        return default
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return default


def load_rows(db: Path) -> list[dict]:
    """Every stored completion with its task (and the stored verdict, where there is one)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        stored = "verifications" in tables
        sql = ("SELECT c.id AS cid, c.text, c.task_id, r.round, t.question, t.answer, t.answer_type, t.context, "
               "t.choices, t.metadata"
               + (", v.correct AS stored_correct, v.ambiguous AS stored_ambiguous" if stored else "")
               + " FROM completions c JOIN tasks t ON t.id = c.task_id LEFT JOIN rollouts r ON r.id = c.rollout_id"
               + (" LEFT JOIN verifications v ON v.completion_id = c.id" if stored else "") + " ORDER BY c.id")
        return [dict(r) for r in con.execute(sql)]
    finally:
        con.close()


def _task(row: dict) -> Task:
    return Task(id=row["task_id"], question=row["question"] or "", answer=row["answer"] or "",
                answer_type=row["answer_type"], context=row["context"], choices=_json(row["choices"], None),
                metadata=_json(row["metadata"], {}) or {})


def summarise(rows: list[dict]) -> dict:
    """Verdict counts, reason classes, per type and round, changes against the stored verdicts."""
    verdicts, classes = Counter(), Counter()
    by_type: dict[str, Counter] = defaultdict(Counter)
    by_round: dict[str, Counter] = defaultdict(Counter)
    changes, examples = Counter(), defaultdict(list)
    errors = 0
    for row in rows:
        try:
            v = verify(row["text"], _task(row))
        except ValueError as e:  # a task whose key the verifier cannot read
            errors += 1
            if len(examples["error"]) < EXAMPLES_PER_CLASS:
                examples["error"].append({"completion_id": row["cid"], "error": str(e)[:200]})
            continue
        verdict = str(v.verdict)
        verdicts[verdict] += 1
        by_type[row["answer_type"]][verdict] += 1
        by_round[str(row["round"])][verdict] += 1
        if v.verdict in (Verdict.AMBIGUOUS, Verdict.UNPARSED):
            key = f"{verdict}:{v.why}"
            classes[key] += 1
            if len(examples[key]) < EXAMPLES_PER_CLASS:
                examples[key].append({"completion_id": row["cid"], "task_id": row["task_id"],
                                      "tail": row["text"][-240:], "reason": v.reason})
        if row.get("stored_correct") is not None:
            was = bool(row["stored_correct"])
            if was != v.correct:
                changes["stored_correct_now_" + verdict if was else "stored_not_correct_now_correct"] += 1
    n = sum(verdicts.values())
    return {"completions": n, "errors": errors, "verdicts": dict(verdicts),
            "rates": {k: round(c / n, 4) for k, c in verdicts.items()} if n else {},
            "reason_classes": dict(classes.most_common()), "by_answer_type": {k: dict(c) for k, c in by_type.items()},
            "by_round": {k: dict(c) for k, c in sorted(by_round.items())}, "changes_vs_stored": dict(changes),
            "examples": dict(examples)}


def main(argv: list[str] | None = None) -> dict:
    """Re-verify the completions of each run directory and write the verdict distribution."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("runs", nargs="+", type=Path, help="run directories (each with a workbench.db)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    load_before = list(os.getloadavg())
    start = time.perf_counter()
    per_run, all_rows = {}, []
    for run in args.runs:
        db = run / "workbench.db" if run.is_dir() else run
        if not db.is_file():
            raise SystemExit(f"no workbench.db in {run}")
        rows = load_rows(db)
        all_rows += rows
        per_run[_common.portable_path(str(run.resolve()))] = summarise(rows)
    total = summarise(all_rows)
    command = "python benchmarks/verifier_verdicts.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"command": command,
              "total": total, "runs": per_run, "seconds": round(time.perf_counter() - start, 2),
              "load_average_before": load_before, "load_average_after": list(os.getloadavg())}
    out = _common.write_result(result, args.out)
    _common.print_table("verdicts on stored completions", ["verdict", "count", "rate"],
                        [[k, c, total["rates"].get(k, 0.0)] for k, c in sorted(total["verdicts"].items())])
    _common.print_table("ambiguous / unparsed classes", ["class", "count"],
                        [[k, c] for k, c in total["reason_classes"].items()])
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
