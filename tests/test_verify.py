"""Tests for rlhf_workbench.verify: answer extraction and verification."""

from __future__ import annotations

import threading
import time

import pytest

from rlhf_workbench.tasks.task import Task
from rlhf_workbench.verify import Verification, extract_answer, verify

CHOICES = {"A": "Asthma", "B": "Bronchitis", "C": "Pneumonia", "D": "Viral pneumonia"}


# The units a number answer may carry are those its question uses (issue 22): this question names
# the ones the cases below use.
UNITS_QUESTION = "How many apples, people or cm (m^2) are there?"


def num_task(answer: str, question: str = UNITS_QUESTION) -> Task:
    return Task(id="n1", question=question, answer=answer, answer_type="number")


def choice_task(answer: str, choices: dict[str, str] | None = CHOICES) -> Task:
    return Task(
        id="c1", question="Diagnosis?", answer=answer, answer_type="choice", choices=choices
    )


def ynm_task(answer: str) -> Task:
    return Task(id="y1", question="Does it?", answer=answer, answer_type="yes_no_maybe")


def text_task(answer: str) -> Task:
    return Task(id="t1", question="Capital?", answer=answer, answer_type="text")


# --------------------------------------------------------------------------------------
# numbers
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("Answer: 42", "42"),
        ("answer: 42", "42"),
        ("ANSWER:42", "42"),
        ("Answer: 42.", "42"),
        ("Answer: 1,234", "1234"),
        ("Answer: 1,234,567", "1234567"),
        ("Answer: $1,200.00", "1200"),
        ("Answer: \\$1,200", "1200"),
        ("Answer: 12 cm", "12"),
        ("Answer: 5 apples", "5"),
        ("Answer: -5", "-5"),
        ("Answer: -$5", "-5"),
        ("Answer: (-5)", "-5"),
        ("Answer: 2,000,000 people", "2000000"),
        ("Answer: +3", "3"),
        ("Answer: \u22125", "-5"),
        ("Answer: -0", "0"),
        ("Answer: 3.50", "3.5"),
        ("Answer: .5", "0.5"),
        ("Answer: 3/4", "3/4"),
        ("Answer: 6/8", "3/4"),
        ("Answer: 4/2", "2"),
        ("Answer: 3 / 4", "3/4"),
        ("Answer: x = 5", "5"),
        ("Answer: 3 + 4 = 7", "7"),
        ("Answer: 12 m^2", "12"),
        ("Answer: The total is $85.", "85"),
        ("Final answer: 17", "17"),
        ("Final Answer: 17", "17"),
        ("**Answer:** 17", "17"),
        ("**Answer: 17**", "17"),
        ("Answer:\n17", "17"),
        ("So the answer is 17.", "17"),
        ("The final answer is $\\boxed{17}$.", "17"),
        ("\\boxed{42}", "42"),
        ("\\boxed{1{,}234}", "1234"),
        ("\\boxed{\\frac{3}{4}}", "3/4"),
        ("\\boxed{\\dfrac{3}{4}}", "3/4"),
        ("\\boxed{-\\frac{1}{2}}", "-1/2"),
        ("\\boxed{\\frac12}", "1/2"),
        ("\\boxed{\\text{42 apples}}", "42"),
        ("Answer: $\\frac{3}{4}$", "3/4"),
        ("Answer: 90^\\circ", "90"),
    ],
)
def test_extract_number_with_marker(completion: str, expected: str) -> None:
    assert extract_answer(completion, "number", question=UNITS_QUESTION) == (expected, True)


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("Answer: 5\nAnswer: 6", "6"),
        ("Answer: 5\n\\boxed{7}", "7"),
        # The last marker has no number: the previous marker is used.
        ("Answer: 9\nI am sure the answer is right.", "9"),
        # "Answer:" with \boxed on the same line: the boxed content is used.
        # issue 22: another number after the final answer makes it ambiguous ("Thanks for asking 3
        # times." was read as 10 before); text without a value is fine
        ("Answer: \\boxed{10}\nThanks for asking.", "10"),
    ],
)
def test_last_marker_wins(completion: str, expected: str) -> None:
    assert extract_answer(completion, "number") == (expected, True)


@pytest.mark.parametrize(
    "completion",
    [
        "Answer: 5 ... wait, Answer: 6",  # two answers on one line
        "Answer: 5. Actually \\boxed{7}",
        "\\boxed{7} so Answer: 8",
        "Answer: 9\nAnswer: I am not sure",  # the final answer line withdraws the answer
        # issue 22: a marker inside a sentence is not a marker, but after the final answer a
        # correction ("Hmm, wait", "Actually") with another value makes it ambiguous
        "Answer: 5\nHmm, wait. Answer: 6",
        "Answer: 5\nActually \\boxed{7}",
    ],
)
def test_contradicting_final_answers_are_ambiguous(completion: str) -> None:
    assert extract_answer(completion, "number") == (None, True)
    for gold in ("5", "6", "7", "8", "9"):
        v = verify(completion, num_task(gold))
        assert not v.correct and v.ambiguous and v.reason.startswith("ambiguous"), v


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("She has 3 apples and buys 4 more, so 7 apples.", "7"),
        ("The total is $1,200.", "1200"),
        ("It drops to \u22127 degrees", "-7"),
        ("We get 3.50 dollars", "3.5"),
    ],
)
def test_number_fallback_is_lenient_only(completion: str, expected: str) -> None:
    assert extract_answer(completion, "number", lenient=True) == (expected, False)
    assert extract_answer(completion, "number") == (None, False)
    v = verify(completion, num_task(expected))
    assert not v.correct and v.lenient_correct and v.extracted is None
    assert v.reason.startswith("no explicit answer") and expected in v.reason
    lenient = verify(completion, num_task(expected), lenient=True)
    assert lenient.correct and lenient.extracted == expected and "fallback" in lenient.reason


@pytest.mark.parametrize(
    "completion", ["", "I don't know.", "Answer:", "\\boxed{}", "So 5. Answer: 5"]
)
def test_no_number_found(completion: str) -> None:
    assert extract_answer(completion, "number") == (None, False)
    if "5" not in completion:
        assert extract_answer(completion, "number", lenient=True) == (None, False)
    v = verify(completion, num_task("5"))
    if "5" not in completion:
        assert v == Verification(False, None, False, "no explicit answer (an 'Answer:' line or \\boxed{})")
    assert v.verdict == "no_answer" and v.reward == 0.0


@pytest.mark.parametrize("completion", ["Answer: none of them", "Answer: unknown\nBut I computed 12 earlier"])
def test_marker_without_a_number_is_never_correct(completion: str) -> None:
    """Issue 22: a marker whose statement holds no number is unparsed or ambiguous, never no answer."""
    assert extract_answer(completion, "number") == (None, True)
    v = verify(completion, num_task("12"))
    assert not v.correct and v.verdict in ("unparsed", "ambiguous") and v.format_ok


@pytest.mark.parametrize(
    "completion, gold",
    [
        ("Answer: 1,234", "1234"),
        ("Answer: 1234", "1,234"),
        ("Answer: $1,200.00", "1200"),
        ("Answer: -7", "\u22127"),
        ("Answer: \u22127", "-7"),
        ("Answer: 3.50", "3.5"),
        ("Answer: 3.5", "3.50"),
        ("Answer: 0.75", "3/4"),
        ("Answer: 3/4", "0.75"),
        ("\\boxed{\\frac{1}{2}}", "0.5"),
        ("\\boxed{0.5}", "\\frac{1}{2}"),
        ("Answer: 12 cm", "12"),
        ("Answer: 0.333333333", "1/3"),
        ("\\boxed{\\sqrt{2}}", "1.41"),  # issue 22: a rounded key matches at its own precision
        ("Answer: 1/3", "0.333"),
        ("Answer: 18", "18"),
        ("\\boxed{2\\sqrt{2}}", "2\\sqrt{2}"),
        ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}"),
        ("Answer: $\\frac{\\pi}{2}$", "\\pi/2"),
        ("\\boxed{2\\sqrt{2}}", "2.8284271"),
    ],
)
def test_number_equivalent_answers_are_correct(completion: str, gold: str) -> None:
    v = verify(completion, num_task(gold))
    assert v.correct, v
    assert v.reward == 1.0
    assert v.format_ok
    assert v.reason.startswith("correct")


@pytest.mark.parametrize(
    "completion, gold",
    [
        ("Answer: 84", "85"),
        ("Answer: -85", "85"),
        ("Answer: 1,235", "1234"),
        ("Answer: 1000001", "1000000"),  # integers compare exactly
        ("Answer: 3.51", "3.5"),
        ("Answer: 3/5", "0.75"),
        ("\\boxed{\\frac{1}{3}}", "0.5"),
        ("\\boxed{2\\sqrt{3}}", "2\\sqrt{2}"),
        ("\\boxed{\\sqrt{2}}", "1.42"),
        ("Answer: 2000001.9", "2000000"),  # an integer key needs exact equality
    ],
)
def test_wrong_number_is_never_correct(completion: str, gold: str) -> None:
    v = verify(completion, num_task(gold))
    assert not v.correct, v
    assert v.reward == 0.0
    assert v.reason.startswith("wrong")
    assert f"expected {verify('Answer: ' + gold, num_task(gold)).extracted}" in v.reason


def test_number_reason_strings() -> None:
    v = verify("Step: 40 + 45 = 85.\nAnswer: 85", num_task("85"))
    assert v == Verification(True, "85", True, "correct: extracted 85 from 'Answer:' line", lenient_correct=True)
    v = verify("Answer: 84", num_task("85"))
    assert v.reason == "wrong: extracted 84 from 'Answer:' line, expected 85"
    v = verify("so it is 85", num_task("85"))
    assert not v.correct and not v.format_ok and v.lenient_correct
    assert v.reason == "no explicit answer (an 'Answer:' line or \\boxed{}); a lenient reading finds 85"
    v = verify("Answer: 42 or 41", num_task("42"))
    assert v.ambiguous and v.verdict == "ambiguous" and v.why == "hedge" and v.lenient_correct  # lenient: first number
    assert v.reason.startswith("ambiguous: ") and "'or'" in v.reason


def test_fallback_answer_is_never_correct_by_default() -> None:
    v = verify("40 + 45 = 85", num_task("85"))
    assert not v.correct and not v.format_ok and v.extracted is None and v.lenient_correct
    v = verify("40 + 45 = 85", num_task("85"), lenient=True)
    assert v.correct and not v.format_ok and v.extracted == "85"


def test_huge_expression_does_not_hang() -> None:
    start = time.monotonic()
    v = verify("\\boxed{10^{10^{10}}}", num_task("5"))
    assert not v.correct
    assert time.monotonic() - start < 10


def test_math_verify_works_off_main_thread() -> None:
    results: dict[str, object] = {}

    def work() -> None:
        try:
            results["sqrt"] = verify(
                "\\boxed{\\frac{\\sqrt{2}}{2}}", num_task("\\frac{1}{\\sqrt{2}}")
            )
            results["wrong"] = verify("\\boxed{2\\sqrt{3}}", num_task("2\\sqrt{2}"))
            results["huge"] = verify("\\boxed{10^{10^{10}}}", num_task("5"))
            results["plain"] = verify("Answer: 1,234", num_task("1234"))
        except BaseException as e:  # pragma: no cover - reported below
            results["error"] = e

    t = threading.Thread(target=work)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive(), "verify hung in a worker thread"
    assert "error" not in results, results.get("error")
    assert results["sqrt"].correct  # type: ignore[attr-defined]
    assert not results["wrong"].correct  # type: ignore[attr-defined]
    assert not results["huge"].correct  # type: ignore[attr-defined]
    assert results["plain"].correct  # type: ignore[attr-defined]


@pytest.mark.parametrize("gold", ["", "abc", "not a number"])
def test_bad_number_ground_truth_raises(gold: str) -> None:
    with pytest.raises(ValueError, match="n1"):
        verify("Answer: 5", num_task(gold))


# --------------------------------------------------------------------------------------
# choices
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("Answer: C", "C"),
        ("Answer: (C)", "C"),
        ("Answer: C.", "C"),
        ("Answer: C) Pneumonia", "C"),
        ("Answer: C. Pneumonia", "C"),
        ("Answer: [C]", "C"),
        ("Answer: c", "C"),
        ("Answer: **C**", "C"),
        ("Answer: Option C", "C"),
        ("Answer: B is correct", "B"),
        ("Answer: Pneumonia", "C"),
        ("Answer: pneumonia.", "C"),
        ("Answer: viral pneumonia", "D"),
        ("\\boxed{C}", "C"),
        ("\\boxed{\\text{C}}", "C"),
        ("The answer is (D).", "D"),
        ("A patient presents with fever and cough.\nAnswer: (C)", "C"),
        ("Answer: A. Asthma", "A"),
        ("Answer: A Asthma", "A"),
        ("Answer: B\nAnswer: D", "D"),
    ],
)
def test_extract_choice_with_marker(completion: str, expected: str) -> None:
    assert extract_answer(completion, "choice", CHOICES) == (expected, True)


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("A patient presents with cough. I think (B) fits best.", "B"),
        ("Option A is unlikely; option C fits.", "C"),
        ("The correct choice is D", "D"),
        ("(A) no, (B) no, so (C).", "C"),
    ],
)
def test_choice_fallback_is_lenient_only(completion: str, expected: str) -> None:
    assert extract_answer(completion, "choice", CHOICES, lenient=True) == (expected, False)
    assert extract_answer(completion, "choice", CHOICES) == (None, False)
    assert not verify(completion, choice_task(expected)).correct


@pytest.mark.parametrize(
    "completion",
    [
        "A patient presents with fever. A diagnosis is needed.",
        "I think it is a viral thing. I am not sure.",
        "Option I think is unclear.",
        "(E) is the one",
        "A 45-year-old man. Answer: A",  # issue 22: a marker inside a sentence is not a marker
        "",
    ],
)
def test_choice_nothing_found(completion: str) -> None:
    if "Answer:" not in completion:
        assert extract_answer(completion, "choice", CHOICES, lenient=True) == (None, False)
    assert extract_answer(completion, "choice", CHOICES) == (None, False)
    v = verify(completion, choice_task("C"))
    assert not v.correct and v.extracted is None and "no explicit answer" in v.reason


@pytest.mark.parametrize(
    "completion, verdict",
    [
        ("Answer: a patient with fever", "unparsed"),
        ("Answer: A patient with fever", "unparsed"),
        ("The answer is A patient-specific plan.", "unparsed"),
        ("Answer: E", "unparsed"),  # not one of the options
        ("Answer: B\nAnswer: E", "unparsed"),  # the last marker is final, even when it names no option
        ("Answer: The patient most likely has bronchitis", "ambiguous"),  # "most likely" is a hedge
        ("Answer: B\nOn reflection, Answer: D", "ambiguous"),  # a correction after the final answer
        ("Answer: B. Pneumonia", "ambiguous"),  # the letter's text names another option
    ],
)
def test_choice_statement_not_parsed_whole(completion: str, verdict: str) -> None:
    """Issue 22: a marker whose statement is not one option plus harmless tails abstains."""
    assert extract_answer(completion, "choice", CHOICES) == (None, True)
    for gold in "ABCD":
        v = verify(completion, choice_task(gold))
        assert not v.correct and v.verdict == verdict, (gold, v)


def test_choice_letters_without_choices() -> None:
    assert extract_answer("Answer: E", "choice") == ("E", True)
    assert extract_answer("so (E) it is", "choice", lenient=True) == ("E", False)
    assert extract_answer("so (E) it is", "choice") == (None, False)
    assert extract_answer("A patient presents", "choice") == (None, False)


@pytest.mark.parametrize(
    "completion, gold, correct",
    [
        ("A patient presents with fever...\nAnswer: (C)", "C", True),
        ("A patient presents with fever... Answer: (C)", "C", False),  # not at the start of a line
        ("Answer: Pneumonia", "C", True),
        ("Answer: C", "c", True),
        ("Answer: C", "(C)", True),
        ("Answer: C", "Pneumonia", True),
        ("Answer: B", "C", False),
        ("Answer: Viral pneumonia", "C", False),
        ("Answer: C\nAnswer: A", "C", False),
        ("I pick (C)", "C", False),  # no explicit answer
        ("Answer: C or D", "C", False),
        ("Answer: not D", "C", False),
    ],
)
def test_verify_choice(completion: str, gold: str, correct: bool) -> None:
    v = verify(completion, choice_task(gold))
    assert v.correct is correct, v
    assert v.reward == (1.0 if correct else 0.0)


def test_choice_reason() -> None:
    v = verify("Answer: (C)", choice_task("C"))
    assert v == Verification(True, "C", True, "correct: extracted C from 'Answer:' line", lenient_correct=True)
    v = verify("Answer: B", choice_task("C"))
    assert v.reason == "wrong: extracted B from 'Answer:' line, expected C"


def test_bad_choice_ground_truth_raises() -> None:
    with pytest.raises(ValueError, match="c1"):
        verify("Answer: C", choice_task("Z"))


# --------------------------------------------------------------------------------------
# yes / no / maybe
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, expected, format_ok",
    [
        ("Answer: yes", "yes", True),
        ("Answer: Maybe.", "maybe", True),
        ("Answer: NO", "no", True),
        ("answer: **Yes**", "yes", True),
        ("The answer is no.", "no", True),
        ("Answer: yes\nAnswer: no", "no", True),
        ("Answer: yes\nWait. Answer: no", None, True),  # a correction after the final answer: ambiguous
        ("Final answer: maybe", "maybe", True),
        ("The trial was not conclusive.", None, False),
        ("Nobody knows, yesterday noted", None, False),
    ],
)
def test_extract_yes_no_maybe(completion: str, expected: str | None, format_ok: bool) -> None:
    assert extract_answer(completion, "yes_no_maybe") == (expected, format_ok)


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("The evidence is mixed, so maybe. Yes, I would say yes", "yes"),
        ("No clear effect was seen; I lean towards maybe", "maybe"),
        ("Answer: unclear\nPerhaps no.", "no"),
    ],
)
def test_yes_no_maybe_fallback_is_lenient_only(completion: str, expected: str) -> None:
    assert extract_answer(completion, "yes_no_maybe", lenient=True) == (expected, False)
    assert extract_answer(completion, "yes_no_maybe")[0] is None
    assert not verify(completion, ynm_task(expected)).correct


@pytest.mark.parametrize(
    "completion, gold, correct",
    [
        ("Answer: Maybe.", "maybe", True),
        ("Answer: yes", "Yes", True),
        ("Answer: no", "yes", False),
        ("Answer: maybe", "no", False),
        ("Answer: yes ... wait, Answer: no", "yes", False),
    ],
)
def test_verify_yes_no_maybe(completion: str, gold: str, correct: bool) -> None:
    assert verify(completion, ynm_task(gold)).correct is correct


# --------------------------------------------------------------------------------------
# text
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("Answer: Paris", "paris"),
        ("Answer:   New   York City.", "new york city"),
        ("answer: \\boxed{Paris}", "paris"),
        ("The final answer is Paris!", "paris"),
        ("Answer: Rome\nAnswer: Paris", "paris"),
    ],
)
def test_extract_text(completion: str, expected: str) -> None:
    assert extract_answer(completion, "text") == (expected, True)


def test_text_has_no_fallback() -> None:
    assert extract_answer("Paris", "text") == (None, False)
    v = verify("It is Paris.", text_task("Paris"))
    assert not v.correct and v.extracted is None and "no explicit answer" in v.reason


@pytest.mark.parametrize(
    "completion, gold, correct",
    [
        ("Answer: paris.", "Paris", True),
        ("Answer: New York", "new york", True),
        ("Answer: Lyon", "Paris", False),
        ("Answer: Paris, France", "Paris", False),
    ],
)
def test_verify_text(completion: str, gold: str, correct: bool) -> None:
    assert verify(completion, text_task(gold)).correct is correct


# --------------------------------------------------------------------------------------
# errors and the dataclass
# --------------------------------------------------------------------------------------


def test_unknown_answer_type_raises() -> None:
    task = Task(id="weird-7", question="?", answer="1", answer_type="date")  # type: ignore
    with pytest.raises(ValueError, match="date") as info:
        verify("Answer: 1", task)
    assert "weird-7" in str(info.value)
    with pytest.raises(ValueError, match="date"):
        extract_answer("Answer: 1", "date")


def test_verification_is_frozen_and_has_reward() -> None:
    v = Verification(True, "1", True, "correct")
    assert v.reward == 1.0
    assert Verification(False, "1", True, "wrong").reward == 0.0
    with pytest.raises(AttributeError):
        v.correct = False  # type: ignore[misc]


def test_verify_prompt_round_trip() -> None:
    task = Task(id="gsm-1", question="Q", answer="1,234", answer_type="number")
    completion = "Let me think. 1000 + 234 = 1234.\nAnswer: 1,234"
    assert verify(completion, task) == Verification(
        True, "1234", True, "correct: extracted 1234 from 'Answer:' line", lenient_correct=True
    )
