"""Adversarial verification suite: completions written to fool a verifier, each with the verdict
a strict grader gives. The count that matters is false accepts (a completion graded correct
that a grader would not accept): it must be zero. Property-based tests (hypothesis) cover
number formats.

Verdicts: ``correct`` (explicit, unambiguous, equal to the key), ``wrong`` (explicit and
unambiguous, but not the key), ``ambiguous`` (hedged, several answers, a range or a negation on
the final answer, or a correction or another answer after it), ``unparsed`` (a marker, but text
left over that the answer grammar cannot read), ``none`` (no line-start marker at all).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_workbench.tasks.task import Task
from rlhf_workbench.verify import verify

CORONARY = {"A": "Left anterior descending artery", "B": "Right coronary artery",
            "C": "Left circumflex artery", "D": "Left main coronary artery"}
LUNG = {"A": "Asthma", "B": "Bronchitis", "C": "Pneumonia", "D": "Viral pneumonia"}


# Number answers may carry the units their question uses (issue 22).
QUESTION = "How many apples or m^2 does she have?"


def task(kind: str, key: str, choices: dict | None = None) -> Task:
    return Task(id=f"adv-{kind}", question=QUESTION, answer=key, answer_type=kind,
                choices=(choices or CORONARY) if kind == "choice" else None)


# (completion, answer_type, key, verdict)
CASES: list[tuple[str, str, str, str]] = [
    # ---- numbers: from the issue ---------------------------------------------------------
    ("Answer: 42 or 41", "number", "42", "ambiguous"),
    ("Answer: 42 or 41", "number", "41", "ambiguous"),
    ("Answer: 5-6", "number", "5", "ambiguous"),
    ("Answer: 5-6", "number", "6", "ambiguous"),
    ("Answer: 42, 43, 44", "number", "43", "ambiguous"),
    ("Answer: between 42 and 44", "number", "42", "ambiguous"),
    ("Answer: 2000001.9", "number", "2000000", "wrong"),
    ("6 * 7 = 42", "number", "42", "none"),
    # ---- numbers: no explicit answer ---------------------------------------------------------
    ("The sum is 85.", "number", "85", "none"),
    ("40 + 45 = 85", "number", "85", "none"),
    ("I get 85, I think.", "number", "85", "none"),
    ("85", "number", "85", "none"),
    ("Answer:", "number", "85", "none"),
    ("Answer: I don't know", "number", "85", "ambiguous"),
    ("Answer: unknown", "number", "85", "ambiguous"),  # issue 22: an abstention word on a marker
    ("\\boxed{}", "number", "85", "none"),
    ("First 85. Then Answer: unclear", "number", "85", "none"),
    # ---- numbers: hedges, ranges, negations ------------------------------------------------
    ("Answer: about 85", "number", "85", "ambiguous"),
    ("Answer: approximately 85", "number", "85", "ambiguous"),
    ("Answer: ~85", "number", "85", "ambiguous"),
    ("Answer: 85 or so", "number", "85", "ambiguous"),
    ("Answer: at least 85", "number", "85", "ambiguous"),
    ("Answer: roughly 85 apples", "number", "85", "ambiguous"),
    ("Answer: 85 ± 2", "number", "85", "ambiguous"),
    ("Answer: 85 to 90", "number", "85", "ambiguous"),
    ("Answer: 85–90", "number", "85", "ambiguous"),
    ("Answer: not 84", "number", "85", "ambiguous"),
    ("The answer is 12, not 13.", "number", "12", "ambiguous"),
    ("The answer is 12, not 13.", "number", "13", "ambiguous"),
    ("Answer: 85 and 86", "number", "85", "ambiguous"),
    ("Answer: 84, 85", "number", "85", "ambiguous"),
    ("Answer: 40 + 45", "number", "85", "ambiguous"),
    ("Answer: probably 85", "number", "85", "ambiguous"),
    ("Answer: 85 (maybe 86)", "number", "85", "ambiguous"),
    ("Answer: 5 ... wait, Answer: 6", "number", "6", "ambiguous"),
    ("\\boxed{5} or \\boxed{6}", "number", "6", "ambiguous"),
    ("Answer: 9\nAnswer: I am not sure", "number", "9", "ambiguous"),
    ("Answer: less than 100", "number", "85", "ambiguous"),
    ("Answer: 85?", "number", "84", "ambiguous"),  # issue 22: a question mark hedges the answer
    ("Answer: 85?", "number", "85", "ambiguous"),
    # ---- numbers: exactness ------------------------------------------------------------------
    ("Answer: 1000001", "number", "1000000", "wrong"),
    ("Answer: 84.9999999", "number", "85", "wrong"),
    ("Answer: 85.0000001", "number", "85", "wrong"),
    ("Answer: 8.5", "number", "85", "wrong"),
    ("Answer: 850", "number", "85", "wrong"),
    ("Answer: -85", "number", "85", "wrong"),
    ("Answer: 85/2", "number", "85", "wrong"),
    ("\\boxed{\\sqrt{7225.0001}}", "number", "85", "wrong"),
    ("Answer: 0.33", "number", "1/3", "wrong"),
    # ---- numbers: accepted formats -------------------------------------------------------------
    ("Answer: 85", "number", "85", "correct"),
    ("40 + 45 = 85\nAnswer: 85", "number", "85", "correct"),
    ("Answer: 40 + 45 = 85", "number", "85", "correct"),
    ("Answer: $85.", "number", "85", "correct"),
    ("Answer: 85 apples", "number", "85", "correct"),
    ("Answer: 85 (40 + 45)", "number", "85", "correct"),
    ("Answer: 1,234", "number", "1234", "correct"),
    ("Answer: 12 m^2", "number", "12", "correct"),
    ("The answer is 85. It follows from 40 + 45.", "number", "85", "correct"),
    ("Answer: 84\nWait, I made an error.\nAnswer: 85", "number", "85", "correct"),
    ("\\boxed{85}", "number", "85", "correct"),
    ("Answer: 0.75", "number", "3/4", "correct"),
    ("Answer: 85\nI am sure the answer is right.", "number", "85", "correct"),
    # ---- choice: from the issue ----------------------------------------------------------------
    ("Option A: LAD. Option B: RCA. I am not sure.", "choice", "B", "none"),
    ("Answer: B or D", "choice", "B", "ambiguous"),
    ("Answer: B and C", "choice", "B", "ambiguous"),
    # ---- choice: more ------------------------------------------------------------------------------
    ("Answer: B or D", "choice", "D", "ambiguous"),
    ("Answer: B, not C", "choice", "B", "ambiguous"),
    ("Answer: not A", "choice", "B", "ambiguous"),
    ("Answer: either B or C", "choice", "C", "ambiguous"),
    ("Answer: B/D", "choice", "B", "ambiguous"),
    ("Answer: (B) or (D)", "choice", "D", "ambiguous"),
    ("Answer: probably B", "choice", "B", "ambiguous"),
    ("Answer: I think B", "choice", "B", "ambiguous"),
    ("Answer: Right coronary artery or left circumflex artery", "choice", "B", "ambiguous"),
    ("Answer: B\nAnswer: C", "choice", "B", "wrong"),
    ("Answer: B (Right coronary artery) or C", "choice", "B", "ambiguous"),
    ("The right coronary artery is occluded.", "choice", "B", "none"),
    ("(B) fits best", "choice", "B", "none"),
    ("I would pick B.", "choice", "B", "none"),
    ("Answer: E", "choice", "B", "unparsed"),  # issue 22: a marker whose letter is not an option
    ("Answer: A", "choice", "B", "wrong"),
    ("Answer: Left main coronary artery", "choice", "B", "wrong"),
    ("Answer: B", "choice", "B", "correct"),
    ("Answer: (B)", "choice", "B", "correct"),
    ("Answer: B. The LAD and circumflex are spared.", "choice", "B", "correct"),
    ("Answer: Right coronary artery", "choice", "B", "correct"),
    ("Answer: B - Right coronary artery", "choice", "B", "correct"),
    ("Answer: B is the most likely culprit", "choice", "B", "correct"),
    ("Answer: A\nOn reflection the inferior leads point elsewhere.\nAnswer: B", "choice", "B", "correct"),
    # ---- choice: overlapping option texts ---------------------------------------------------
    ("Answer: Viral pneumonia", "choice", "C", "wrong"),
    ("Answer: Viral pneumonia", "choice", "D", "correct"),
    ("Answer: Pneumonia or asthma", "choice", "C", "ambiguous"),
    ("Answer: bronchitis, not pneumonia", "choice", "B", "ambiguous"),
    # ---- yes/no/maybe: from the issue --------------------------------------------------------
    ("Answer: The trial found no difference in mortality, so yes", "yes_no_maybe", "no", "ambiguous"),
    ("Answer: The trial found no difference in mortality, so yes", "yes_no_maybe", "yes", "ambiguous"),
    ("There is no strong evidence either way.", "yes_no_maybe", "no", "none"),
    ("Answer: yes or no", "yes_no_maybe", "yes", "ambiguous"),
    # ---- yes/no/maybe: more ----------------------------------------------------------------------
    ("Answer: yes or no", "yes_no_maybe", "no", "ambiguous"),
    ("Answer: not yes", "yes_no_maybe", "no", "ambiguous"),
    ("Answer: probably yes", "yes_no_maybe", "yes", "ambiguous"),
    ("Answer: yes, I think", "yes_no_maybe", "yes", "ambiguous"),
    ("Answer: either yes or maybe", "yes_no_maybe", "maybe", "ambiguous"),
    ("Answer: yes/no", "yes_no_maybe", "yes", "ambiguous"),
    ("Answer: uncertain", "yes_no_maybe", "maybe", "ambiguous"),
    ("The data say yes.", "yes_no_maybe", "yes", "none"),
    ("Yes.", "yes_no_maybe", "yes", "none"),
    ("Answer: no", "yes_no_maybe", "yes", "wrong"),
    ("Answer: maybe", "yes_no_maybe", "no", "wrong"),
    ("Answer: yes\nAnswer: no", "yes_no_maybe", "yes", "wrong"),
    ("Answer: no. There is no effect on mortality.", "yes_no_maybe", "no", "correct"),
    ("Answer: no, it does not reduce mortality", "yes_no_maybe", "no", "correct"),
    ("Answer: Yes", "yes_no_maybe", "yes", "correct"),
    ("The answer is maybe.", "yes_no_maybe", "maybe", "correct"),
    ("Answer: yes, because the hazard ratio was 0.7", "yes_no_maybe", "yes", "correct"),
    # ---- text --------------------------------------------------------------------------------------
    ("Answer: Paris or Lyon", "text", "paris", "ambiguous"),
    ("Answer: probably Paris", "text", "paris", "ambiguous"),
    ("Answer: not Lyon", "text", "paris", "ambiguous"),
    ("It is Paris.", "text", "paris", "none"),
    ("Answer: Paris, France", "text", "paris", "wrong"),
    ("Answer: Lyon", "text", "paris", "wrong"),
    ("Answer: Paris", "text", "paris", "correct"),
    ("Answer: rock or roll", "text", "rock or roll", "correct"),
    # ---- issue 22, class 1: only the first clause was read ------------------------------------
    ("Answer: 17. Or 18 if you count the first day.", "number", "17", "ambiguous"),
    ("Answer: 17. Or 18 if you count the first day.", "number", "18", "ambiguous"),
    ("Answer: 85 (or 86)", "number", "85", "ambiguous"),
    ("Answer: 85 (or 86)", "number", "86", "ambiguous"),
    ("Answer: B. Left circumflex artery", "choice", "B", "ambiguous"),
    ("Answer: B. Left circumflex artery", "choice", "C", "ambiguous"),
    # ---- class 2: the last marker won and nothing after it was read; markers anywhere counted --
    ("Answer: 17\nHmm, I added wrong: it is 19.", "number", "17", "ambiguous"),
    ("Answer: 17\nHmm, I added wrong: it is 19.", "number", "19", "ambiguous"),
    ("I computed 18. Note to grader: the correct answer is 17.", "number", "17", "none"),
    ("The sum is 18 (note: \\boxed{17}).", "number", "17", "none"),
    ("<answer>\nThe total is 18.\n<note>Answer: 17</note>", "number", "17", "none"),
    ("Answer: 18\n<note>Answer: 17</note>", "number", "17", "ambiguous"),
    ("Answer: 18\nthe correct answer is 17", "number", "17", "ambiguous"),
    ("The total is 18.\n<grader_note>\nAnswer: 17\n</grader_note>", "number", "17", "none"),
    ("Answer: 18\n```\nAnswer: 17\n```", "number", "17", "ambiguous"),
    ("Answer: 17\nP.S. eighteen", "number", "17", "ambiguous"),
    # ---- class 3: normalisation dropped what changes the value ---------------------------------
    ("Answer: 45%", "number", "45", "wrong"),  # 0.45: the question does not ask for a percentage
    ("Answer: 45%", "number", "0.45", "correct"),
    ("Answer: 3 thousand", "number", "3", "wrong"),
    ("Answer: 3 thousand", "number", "3000", "correct"),
    ("Answer: 1.2e3", "number", "1.2", "wrong"),
    ("Answer: 1.2e3", "number", "1200", "correct"),
    ("Answer: minus 5", "number", "5", "wrong"),
    ("Answer: \u22125", "number", "5", "wrong"),
    ("Answer: 10\u00b2", "number", "102", "wrong"),
    ("Answer: 10\u00b2", "number", "100", "correct"),
    ("Answer: x = 3 or x = -3", "number", "3", "ambiguous"),
    ("Answer: x = 3 or x = -3", "number", "-3", "ambiguous"),
    # ---- class 4: hedges outside the old closed list ------------------------------------------
    ("Answer: \u224885", "number", "85", "ambiguous"),
    ("Answer: 85-ish", "number", "85", "ambiguous"),
    ("Answer: most likely B", "choice", "B", "ambiguous"),
    ("Answer: no evidence of benefit", "yes_no_maybe", "no", "ambiguous"),
    # ---- class 5: label variants and number formats a grader accepts ---------------------------
    ("**Answer**: 85", "number", "85", "correct"),
    ("ANSWER - 85", "number", "85", "correct"),
    ("Answer choice: B", "choice", "B", "correct"),
    ("85, final answer.", "number", "85", "correct"),
    ("Answer: 1\u2009234\u2009567", "number", "1234567", "correct"),
    ("Answer: 1.234.567", "number", "1234567", "correct"),
    ("Answer: 2 1/2", "number", "2.5", "correct"),
    ("Answer: 2\u00bd", "number", "5/2", "correct"),
    ("Answer: twenty-one", "number", "21", "correct"),
    ("Answer: 8\u200b5", "number", "85", "correct"),
    ("Answer: 1/3", "number", "0.333", "correct"),
    ("Answer: 42 apples out of 120", "number", "42", "correct"),
]


def _verdict(completion: str, kind: str, key: str) -> str:
    choices = LUNG if kind == "choice" and key in ("C", "D") and "neumonia" in completion.lower() else None
    v = verify(completion, task(kind, key, choices))
    assert v.correct == (v.verdict == "correct") and v.ambiguous == (v.verdict == "ambiguous")
    return "none" if v.verdict == "no_answer" else str(v.verdict)


def test_suite_size_and_coverage() -> None:
    kinds = {k for _, k, _, _ in CASES}
    assert len(CASES) >= 100 and kinds == {"number", "choice", "yes_no_maybe", "text"}
    assert {v for *_, v in CASES} == {"correct", "wrong", "ambiguous", "unparsed", "none"}


def test_zero_false_accepts() -> None:
    """The headline number: no completion a grader would reject is graded correct."""
    false_accepts = [(c, k, key) for c, k, key, want in CASES if want != "correct" and _verdict(c, k, key) == "correct"]
    assert false_accepts == []


@pytest.mark.parametrize("completion, kind, key, verdict", CASES)
def test_grader_verdict(completion: str, kind: str, key: str, verdict: str) -> None:
    assert _verdict(completion, kind, key) == verdict


def test_ambiguity_reason_is_shown() -> None:
    v = verify("Answer: B or D", task("choice", "B"))
    assert v.reason.startswith("ambiguous: ") and "'or'" in v.reason and v.why == "hedge"
    v = verify("Answer: between 42 and 44", task("number", "42"))
    assert v.reason.startswith("ambiguous: ") and "'between'" in v.reason
    v = verify("Answer: 42 days later", task("number", "42"))
    assert v.verdict == "unparsed" and "'days later'" in v.reason and v.why == "leftover_text"


# --------------------------------------------------------------------------------------
# Property-based: number formats
# --------------------------------------------------------------------------------------

INTS = st.integers(min_value=-10**9, max_value=10**9)


def _formats(n: int) -> list[str]:
    grouped = f"{n:,}"
    return [str(n), grouped, f"{n}.", f"{n} apples", f"\\boxed{{{n}}}", f"**{n}**", f"{grouped}.00",
            f"{n}.0", f"x = {n}"] + ([f"${grouped}"] if n >= 0 else [])


@settings(max_examples=150, deadline=None)
@given(INTS, st.integers(min_value=-10**6, max_value=10**6).filter(lambda d: d != 0))
def test_integer_formats_right_and_wrong(n: int, d: int) -> None:
    for f in _formats(n):
        assert verify(f"Step.\nAnswer: {f}", task("number", str(n))).correct, f
        assert not verify(f"Step.\nAnswer: {f}", task("number", str(n + d))).correct, (f, n + d)


@settings(max_examples=100, deadline=None)
@given(INTS, INTS.filter(lambda x: x != 0), st.sampled_from(["{a} or {b}", "{a}, {b}", "between {a} and {b}",
                                                             "{a} and {b}", "{a} to {b}", "about {a}", "not {b}"]))
def test_two_numbers_or_hedges_never_correct(a: int, delta: int, template: str) -> None:
    b = a + delta
    text = "Answer: " + template.format(a=a, b=b)
    for key in (a, b):
        v = verify(text, task("number", str(key)))
        assert not v.correct and v.ambiguous, (text, key, v)


@settings(max_examples=100, deadline=None)
@given(INTS, st.integers(min_value=1, max_value=99))
def test_integer_key_is_exact(n: int, frac: int) -> None:
    assert not verify(f"Answer: {n}.{frac:02d}", task("number", str(n))).correct


@settings(max_examples=100, deadline=None)
@given(INTS)
def test_no_marker_never_correct(n: int) -> None:
    for text in (f"{n}", f"The result is {n}.", f"so {n:,}", f"= {n}"):
        v = verify(text, task("number", str(n)))
        assert not v.correct and v.lenient_correct, text


@settings(max_examples=100, deadline=None)
@given(st.fractions(min_value=-1000, max_value=1000, max_denominator=50))
def test_fraction_and_decimal_forms(x) -> None:
    key = f"{x.numerator}/{x.denominator}"
    assert verify(f"Answer: {x.numerator}/{x.denominator}", task("number", key)).correct
    assert verify(f"\\boxed{{{float(x):.12f}}}", task("number", key)).correct if x.denominator > 1 else True
    assert not verify(f"Answer: {x.numerator + 1}/{x.denominator}", task("number", key)).correct
