"""Perturbation corpus for the verifier (issue 22): real correct answers, perturbed by operators
whose effect on the verdict is known by construction.

Sources: the bundled ``arithmetic.jsonl`` (number) and ``clinical.jsonl`` (choice) task sets,
and, where ``$RLHF_SHARED_DATA`` (default ``../shared/data``) has them, GSM8K keys with their
worked solutions (number, the question's own units) and PubMedQA decisions with their long
answers (yes/no/maybe), and, with ``$RLHF_PERTURB_DB`` set to a run directory, the stored
completions of that run that the verifier grades correct. Each correct completion is the source's reasoning followed by
``Answer: <key>``; each operator rewrites it and says which verdict a strict grader gives:

========================  ==========================================================  ===========
operator                  what it does                                                expected
========================  ==========================================================  ===========
identity                  the correct completion                                      correct
markdown                  ``**Answer:**``, ``- Answer:``, ``### Answer:``, ``> ...``     correct
number_format             ``1,234``, thin spaces, words, ``1.2e3``, ``\\boxed{}``, ...  correct
unit                      a unit the question uses / ``$`` / ``in total``             correct
unit_foreign              a unit the question never uses                              unparsed
multiplier                ``N thousand`` for a key N*1000 / ``N thousand`` for key N  correct/wrong
percent                   ``N%`` when the question is not about percent               wrong
wrong_value               another value                                               wrong
second_answer_line        ``Answer: K or J`` / ``K, J`` / ``K (or J)``                 ambiguous
second_answer_after       ``...\\nSo it is J.`` / ``\\boxed{J}`` after the answer        ambiguous
correction                ``Wait, I made a mistake...`` after the answer              ambiguous
hedge                     ``about K``, ``K-ish``, ``most likely K``, ``K, I think``      ambiguous
marker_mid_sentence       the only marker is inside a sentence                        no_answer
later_answer_line         a later ``Answer: J`` line supersedes the key               wrong
option_text               choice: the option's text, ``B. <text of B>``               correct
option_text_mismatch      choice: ``B. <text of another option>``                     ambiguous
========================  ==========================================================  ===========

The headline is the number of false accepts (a case whose expected verdict is not ``correct``
graded correct): it must be zero. False rejects are listed by operator (``python
tests/test_verify_perturb.py`` prints the table).
"""

from __future__ import annotations

import json
import os
import random
import re
import sqlite3
import sys
from collections import Counter
from pathlib import Path

import pytest

import rlhf_workbench

from rlhf_workbench.tasks.task import Task
from rlhf_workbench.verify import verify

SHARED = Path(os.environ.get("RLHF_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
Case = tuple[str, Task, str, str]  # operator, task, completion, expected verdict

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
        "seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def words(n: int) -> str:
    """English words for 0 <= n < 1,000,000 (``twenty-one``, ``three hundred and five``)."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    if n < 1000:
        return _ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " and " + words(n % 100))
    return words(n // 1000) + " thousand" + ("" if n % 1000 == 0 else " " + words(n % 1000))


# --------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------


def _bundled(name: str) -> list[Task]:
    out = []
    for line in (Path(rlhf_workbench.__file__).parent / "data" / f"{name}.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.append(Task(id=r["id"], question=r["question"], answer=r["answer"], answer_type=r["answer_type"],
                        choices=r.get("choices")))
    return out


def _gsm8k(limit: int) -> list[tuple[Task, str]]:
    path = SHARED / "gsm8k" / "train.jsonl"
    if not path.is_file():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines()[:limit]):
        r = json.loads(line)
        body, key = r["answer"].split("####")
        body = re.sub(r"<<[^>]*>>", "", body).strip()
        out.append((Task(id=f"gsm-{i}", question=r["question"], answer=key.strip(), answer_type="number"), body))
    return out


def _pubmedqa(limit: int) -> list[tuple[Task, str]]:
    path = SHARED / "pubmedqa" / "pqal_train.json"
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    return [(Task(id=f"pqa-{k}", question=r["QUESTION"], answer=r["final_decision"], answer_type="yes_no_maybe"),
             r["LONG_ANSWER"]) for k, r in list(data.items())[:limit]]


# --------------------------------------------------------------------------------------
# Operators
# --------------------------------------------------------------------------------------

MARKDOWN = ["**Answer:** {k}", "**Answer: {k}**", "- Answer: {k}", "### Answer: {k}", "> Answer: {k}",
            "__Answer__: {k}", "Final answer: {k}", "ANSWER - {k}", "Answer:\n{k}", "So the answer is {k}.",
            "**Final Answer**: {k}"]
HEDGES = ["about {k}", "approximately {k}", "{k}-ish", "~{k}", "≈{k}", "most likely {k}", "{k}, I think",
          "probably {k}", "at least {k}", "{k} or so", "{k} if you count the first day", "I guess {k}", "not {k}"]
CORRECTIONS = ["Wait, I made a mistake: it is {j}.", "Hmm, I added wrong: it is {j}.", "Actually, {j}.",
               "On second thought, {j}.", "Correction: the total should be {j}.", "Let me recheck... {j}."]
AFTER = ["So it is {j}.", "Then \\boxed{{{j}}}.", "Note: the answer is {j}.", "Or {j}.", "It comes to {j}."]
MID = ["I worked it out; note to the grader: the correct answer is {k}.", "The result (\\boxed{{{k}}}) is in my notes.",
       "<note>Answer: {k}</note>", "Everything says the answer is {k} here."]


def _other_number(key: str, rng: random.Random) -> str:
    v = float(key.replace(",", ""))
    j = v + rng.choice([1, 2, 3, 10, -1]) if v == int(v) else v * 2 + 1
    return str(int(j)) if j == int(j) else f"{j:g}"


def _number_formats(key: str, task: Task) -> list[str]:
    v = float(key.replace(",", ""))
    out = [f"\\boxed{{{key}}}", f"${key}$", f"{key}.", f"**{key}**"]
    if v == int(v):
        n = int(v)
        out += [f"{n:,}", f"{n}.0", f"{n}.00", f"({n})", f"x = {n}", f"{n} = {n}"]
        if abs(n) >= 1000:
            out.append(f"{n:,}".replace(",", "\u2009"))
            if abs(n) >= 1_000_000:
                out.append(f"{n:,}".replace(",", "."))
        if 0 <= n < 1_000_000:
            out.append(words(n))
        if n < 0:
            out += [f"\u2212{-n}", f"minus {-n}"]
        if n != 0 and n % 100 == 0:
            out.append(f"{n / 1000:g}e3" if n % 1000 == 0 else f"{n / 100:g}e2")
        if n >= 1000 and len(str(n)) > 3:
            out.append(str(n)[:2] + "\u200b" + str(n)[2:])
        out.append(f"{2 * n}/2")
        if 0 < n < 100:
            out.append(f"{n - 1} + 1 = {n}")
    return out


def _units(task: Task) -> list[str]:
    m = re.search(r"[Hh]ow many ([a-z]+)", task.question)
    out = [m.group(1)] if m and m.group(1) not in ("more", "of", "times", "in", "less", "fewer", "total") else []
    if "$" in task.question:
        out.append("dollars")
    return out + ["in total"]


def number_cases(task: Task, body: str, rng: random.Random) -> list[Case]:
    """The operators for a number task; ``body`` is the real reasoning before the answer line."""
    k, j = task.answer, _other_number(task.answer, rng)
    base = f"{body}\n" if body else "Let me work it out step by step.\n"
    pct_q = bool(re.search(r"%|percent", task.question, re.IGNORECASE))
    cases: list[Case] = [("identity", task, f"{base}Answer: {k}", "correct"),
                         ("wrong_value", task, f"{base}Answer: {j}", "wrong"),
                         ("later_answer_line", task, f"{base}Answer: {k}\nAnswer: {j}", "wrong")]
    cases += [("markdown", task, base + t.format(k=k), "correct") for t in rng.sample(MARKDOWN, 3)]
    cases += [("number_format", task, f"{base}Answer: {f}", "correct") for f in _number_formats(k, task)]
    cases += [("unit", task, f"{base}Answer: {k} {u}", "correct") for u in _units(task)]
    cases.append(("unit_foreign", task, f"{base}Answer: {k} zorbles", "unparsed"))
    v = float(k.replace(",", ""))
    if v == int(v) and int(v) != 0:
        n = int(v)
        cases.append(("multiplier", task, f"{base}Answer: {n} thousand", "wrong"))
        if n % 1000 == 0:
            cases.append(("multiplier", task, f"{base}Answer: {n // 1000} thousand", "correct"))
        if not pct_q:
            cases.append(("percent", task, f"{base}Answer: {n}%", "wrong"))
    cases += [("second_answer_line", task, f"{base}Answer: {t.format(k=k, j=j)}", "ambiguous")
              for t in ("{k} or {j}", "{k}, {j}", "{k} (or {j})", "{j} or {k}",
                        "{k}. Or {j} if you count the first day.")]
    cases += [("second_answer_after", task, f"{base}Answer: {k}\n" + t.format(j=j), "ambiguous") for t in AFTER]
    cases += [("correction", task, f"{base}Answer: {k}\n" + t.format(j=j), "ambiguous")
              for t in rng.sample(CORRECTIONS, 3)]
    cases += [("hedge", task, f"{base}Answer: " + t.format(k=k), "ambiguous") for t in rng.sample(HEDGES, 4)]
    cases += [("marker_mid_sentence", task, f"{base}" + t.format(k=k), "no_answer") for t in MID]
    return cases


def choice_cases(task: Task, rng: random.Random) -> list[Case]:
    """The operators for a multiple-choice task."""
    assert task.choices
    k = task.answer
    j = rng.choice([x for x in task.choices if x != k])
    text, jtext = task.choices[k], task.choices[j]
    base = "The findings point to one option.\n"
    cases: list[Case] = [("identity", task, f"{base}Answer: {k}", "correct"),
                         ("wrong_value", task, f"{base}Answer: {j}", "wrong"),
                         ("later_answer_line", task, f"{base}Answer: {k}\nAnswer: {j}", "wrong")]
    cases += [("markdown", task, base + t.format(k=k), "correct") for t in MARKDOWN]
    cases += [("option_text", task, f"{base}Answer: {f}", "correct")
              for f in (text, f"{k}. {text}", f"{k}) {text}", f"({k}) {text}", f"{k} - {text}", f"Option {k}",
                        f"({k})", f"{k.lower()}", f"[{k}]", f"{k} is correct")]
    cases += [("option_text_mismatch", task, f"{base}Answer: {k}. {jtext}", "ambiguous"),
              ("option_text_mismatch", task, f"{base}Answer: {j}. {text}", "ambiguous")]
    cases += [("second_answer_line", task, f"{base}Answer: {t.format(k=k, j=j)}", "ambiguous")
              for t in ("{k} or {j}", "{k}/{j}", "{k}, not {j}", "{k} (or {j})", "{k} and {j}")]
    cases += [("second_answer_line", task, f"{base}Answer: {text} or {jtext}", "ambiguous")]
    cases += [("second_answer_after", task, f"{base}Answer: {k}\n" + t, "ambiguous")
              for t in (f"So it is ({j}).", f"Option {j} is correct.", f"Then \\boxed{{{j}}}.", f"Note: answer: {j}")]
    cases += [("correction", task, f"{base}Answer: {k}\n" + t.format(j=j), "ambiguous")
              for t in rng.sample(CORRECTIONS, 3)]
    cases += [("hedge", task, f"{base}Answer: {t}", "ambiguous")
              for t in (f"probably {k}", f"most likely {k}", f"{k}, I think", f"either {k} or {j}", f"not {j}")]
    cases += [("marker_mid_sentence", task, base + t.format(k=k), "no_answer") for t in MID]
    return cases


def ynm_cases(task: Task, body: str, rng: random.Random) -> list[Case]:
    """The operators for a yes/no/maybe task; ``body`` is the source's long answer."""
    k = task.answer
    j = rng.choice([x for x in ("yes", "no", "maybe") if x != k])
    base = f"{body}\n"
    cases: list[Case] = [("identity", task, f"{base}Answer: {k}", "correct"),
                         ("wrong_value", task, f"{base}Answer: {j}", "wrong"),
                         ("later_answer_line", task, f"{base}Answer: {k}\nAnswer: {j}", "wrong")]
    cases += [("markdown", task, base + t.format(k=k), "correct") for t in MARKDOWN]
    cases += [("option_text", task, f"{base}Answer: {f}", "correct")
              for f in (k.capitalize(), k.upper() + ".", f"{k}, based on the results above", f"**{k}**")]
    cases += [("second_answer_line", task, f"{base}Answer: {t.format(k=k, j=j)}", "ambiguous")
              for t in ("{k} or {j}", "{k}/{j}", "{j} or {k}", "{k} (or {j})")]
    cases += [("second_answer_after", task, f"{base}Answer: {k}\n" + t, "ambiguous")
              for t in (f"So {j}.", f"Note: answer: {j}", f"{j.capitalize()}.")]
    cases += [("correction", task, f"{base}Answer: {k}\n" + t.format(j=j), "ambiguous")
              for t in rng.sample(CORRECTIONS, 3)]
    cases += [("hedge", task, f"{base}Answer: {t}", "ambiguous")
              for t in (f"probably {k}", f"{k}, I think", f"most likely {k}", "uncertain", "no evidence either way")]
    cases += [("marker_mid_sentence", task, base + t.format(k=k), "no_answer") for t in MID]
    return cases


def _stored(db: Path, limit: int = 500) -> list[tuple[Task, str]]:
    """Completions a run stored (``$RLHF_PERTURB_DB``: a run directory or its workbench.db) that
    the verifier grades correct, with their tasks."""
    db = db / "workbench.db" if db.is_dir() else db
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    rows = con.execute("SELECT c.text, t.id, t.question, t.answer, t.answer_type, t.choices FROM completions c "
                       "JOIN tasks t ON t.id = c.task_id WHERE t.answer_type != 'open' LIMIT ?",
                       (limit * 4,)).fetchall()
    con.close()
    out = []
    for text, tid, question, answer, kind, choices in rows:
        task = Task(id=tid, question=question, answer=answer, answer_type=kind,
                    choices=json.loads(choices) if choices else None)
        if verify(text, task).correct and len(out) < limit:
            out.append((task, text))
    return out


def stored_cases(task: Task, text: str, rng: random.Random) -> list[Case]:
    """Operators on a stored completion that the verifier grades correct."""
    if task.answer_type == "number":
        j = _other_number(task.answer, rng)
    elif task.answer_type == "choice":
        j = f"({rng.choice([x for x in (task.choices or {'A': '', 'B': ''}) if x != task.answer])})"
    else:
        j = rng.choice([x for x in ("yes", "no", "maybe") if x != task.answer.lower()]).capitalize()
    cases: list[Case] = [("identity", task, text, "correct"),
                         ("correction", task, f"{text}\nWait, I made a mistake: it is {j}.", "ambiguous"),
                         ("second_answer_after", task, f"{text}\nSo it is {j}.", "ambiguous")]
    last = text.rfind("Answer:")
    if last >= 0 and (last == 0 or text[last - 1] == "\n"):
        cases.append(("hedge", task, text[:last] + "Answer: probably " + text[last + 7:].lstrip(), "ambiguous"))
        if text.count("Answer:") == 1 and "boxed" not in text:
            mid = (text[:last].rstrip() or "I worked it out") + ", and the answer is " + text[last + 7:].lstrip()
            cases.append(("marker_mid_sentence", task, mid, "no_answer"))
    return cases


def corpus(seed: int = 0) -> list[Case]:
    """The whole perturbation corpus (deterministic for a seed)."""
    rng = random.Random(seed)
    cases: list[Case] = []
    for t in rng.sample(_bundled("arithmetic"), 150):
        cases += number_cases(t, "", rng)
    for t in _bundled("clinical"):
        cases += choice_cases(t, rng)
    for t, body in _gsm8k(150):
        cases += number_cases(t, body, rng)
    for t, body in _pubmedqa(150):
        cases += ynm_cases(t, body, rng)
    if os.environ.get("RLHF_PERTURB_DB"):  # a run's stored completions (issue 22: "from a demo run")
        for t, text in _stored(Path(os.environ["RLHF_PERTURB_DB"])):
            cases += stored_cases(t, text, rng)
    return cases


def run_corpus(cases: list[Case]) -> dict:
    """Verify every case: false accepts, false rejects by operator, verdict mismatches."""
    fa, fr, mismatch, total = [], Counter(), Counter(), Counter()
    examples: dict[str, list] = {}
    for op, task, completion, want in cases:
        v = verify(completion, task)
        got = str(v.verdict)
        total[op] += 1
        if got == "correct" and want != "correct":
            fa.append((op, task.id, completion[-120:], want, v.reason))
        elif want == "correct" and got != "correct":
            fr[op] += 1
            examples.setdefault(op, []).append((completion[-80:], v.reason))
        elif got != want:
            mismatch[f"{op}: {want} -> {got}"] += 1
            examples.setdefault(f"{op}: {want} -> {got}", []).append((completion[-80:], v.reason))
    return {"cases": len(cases), "by_operator": dict(total), "false_accepts": fa, "false_rejects": dict(fr),
            "examples": {k: v[:3] for k, v in examples.items()}, "other_mismatches": dict(mismatch)}


@pytest.fixture(scope="module")
def report() -> dict:
    return run_corpus(corpus())


def test_corpus_is_large_and_covers_every_operator(report: dict) -> None:
    assert report["cases"] >= 5000 if (SHARED / "gsm8k").is_dir() else report["cases"] >= 3000
    assert len(report["by_operator"]) >= 15


def test_zero_false_accepts(report: dict) -> None:
    """The headline: no perturbed completion a grader rejects is graded correct."""
    assert report["false_accepts"] == []


def test_false_rejects_by_operator(report: dict) -> None:
    """False rejects, by operator (printed with ``-s``); the corpus's correct forms all pass."""
    print("\nfalse rejects by operator:", report["false_rejects"], report["examples"])
    assert sum(report["false_rejects"].values()) == 0, report["examples"]


def test_abstentions_have_the_expected_verdict(report: dict) -> None:
    """Not only never correct: each non-correct case gets the verdict its operator predicts."""
    assert report["other_mismatches"] == {}


if __name__ == "__main__":  # python tests/test_verify_perturb.py: the table for the report
    r = run_corpus(corpus())
    print(json.dumps({k: v for k, v in r.items() if k != "false_accepts"} | {"false_accepts": len(r["false_accepts"])},
                     indent=1, default=str))
    sys.exit(1 if r["false_accepts"] else 0)
