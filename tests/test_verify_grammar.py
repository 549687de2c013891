"""Hypothesis properties of the strict answer grammar (issue 22): what the grammar accepts is
one value plus harmless tails; anything else it meets makes it abstain, never accept."""

from __future__ import annotations

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from rlhf_workbench.tasks.task import Task
from rlhf_workbench.verify import Verdict, Verification, verify

QUESTION = "How many apples does she have?"
CHOICES = {"A": "Asthma", "B": "Bronchitis", "C": "Pneumonia", "D": "Viral pneumonia"}
INTS = st.integers(min_value=-10**7, max_value=10**7)
# Words that are never a harmless tail: not in the question, not a unit, not a number word.
NOISE_WORDS = st.text(alphabet="bcdfghjklmnpqrstvwxz", min_size=3, max_size=9)
CORRECTIONS = ["Wait,", "Actually", "Hmm,", "Oops,", "Correction:", "On second thought,", "I made a mistake:",
               "Let me recheck:", "Sorry,"]
HEDGES = ["about", "approximately", "around", "roughly", "nearly", "at least", "at most", "probably", "maybe",
          "perhaps", "possibly", "most likely", "I think", "~", "≈", "between 1 and", "not", "up to", "over"]


def ntask(key: int | str) -> Task:
    return Task(id="g", question=QUESTION, answer=str(key), answer_type="number")


def _consistent(v: Verification) -> None:
    assert v.correct == (v.verdict is Verdict.CORRECT)
    assert v.ambiguous == (v.verdict is Verdict.AMBIGUOUS)
    assert v.reward == (1.0 if v.correct else 0.0)
    if v.verdict in (Verdict.AMBIGUOUS, Verdict.UNPARSED, Verdict.NO_ANSWER):
        assert v.extracted is None
    if v.verdict in (Verdict.AMBIGUOUS, Verdict.UNPARSED):
        assert v.why and v.reason.startswith(str(v.verdict))


FORMATS = ["{n}", "{n:,}", "{n}.", "{n} apples", "**{n}**", "\\boxed{{{n}}}", "${n}$", "x = {n}", "{n}.0",
           "({n})", "{n} apples in total", "{n} (= {n})"]


@settings(max_examples=120, deadline=None)
@given(INTS, st.sampled_from(FORMATS), st.integers(min_value=1, max_value=10**4))
def test_harmless_forms_are_read_and_compared(n: int, fmt: str, d: int) -> None:
    text = "Step by step.\nAnswer: " + fmt.format(n=n)
    assert verify(text, ntask(n)).correct, text
    v = verify(text, ntask(n + d))
    assert v.verdict is Verdict.WRONG, (text, v)


@settings(max_examples=120, deadline=None)
@given(INTS, st.lists(NOISE_WORDS, min_size=1, max_size=4))
def test_leftover_words_abstain(n: int, noise: list[str]) -> None:
    text = f"Answer: {n} {' '.join(noise)}"
    v = verify(text, ntask(n))
    _consistent(v)
    assert v.verdict in (Verdict.UNPARSED, Verdict.AMBIGUOUS), (text, v)
    assert v.verdict is Verdict.AMBIGUOUS or " ".join(noise)[:20] in v.reason


@settings(max_examples=120, deadline=None)
@given(INTS, INTS, st.sampled_from(["or", "and", ",", "/", "(or", "to", "vs", "then"]))
def test_a_second_number_on_the_line_is_never_correct(n: int, m: int, joiner: str) -> None:
    assume(m != n)
    text = f"Answer: {n} {joiner} {m}"
    for key in (n, m):
        v = verify(text, ntask(key))
        _consistent(v)
        assert not v.correct, (text, key, v)


@settings(max_examples=120, deadline=None)
@given(INTS, INTS, st.sampled_from(CORRECTIONS), st.sampled_from(["\n", " ", "\n\n"]))
def test_a_correction_after_the_answer_is_ambiguous(n: int, m: int, phrase: str, sep: str) -> None:
    text = f"Answer: {n}.{sep}{phrase} it is {m}."
    for key in (n, m):
        v = verify(text, ntask(key))
        assert v.verdict is Verdict.AMBIGUOUS, (text, v)


@settings(max_examples=120, deadline=None)
@given(INTS, st.sampled_from(HEDGES))
def test_hedges_are_ambiguous(n: int, hedge: str) -> None:
    text = f"Answer: {hedge} {n}"
    v = verify(text, ntask(n))
    assert v.verdict is Verdict.AMBIGUOUS, (text, v)


@settings(max_examples=120, deadline=None)
@given(INTS, st.lists(NOISE_WORDS, min_size=1, max_size=5),
       st.sampled_from(["the answer is", "Answer:", "final answer:", "\\boxed{{{n}}} is", "the correct answer is"]))
def test_markers_inside_a_sentence_do_not_count(n: int, words: list[str], marker: str) -> None:
    text = f"{' '.join(words)} {marker.format(n=n)} {n}."
    v = verify(text, ntask(n))
    assert v.verdict is Verdict.NO_ANSWER and not v.format_ok, (text, v)


@settings(max_examples=80, deadline=None)
@given(st.integers(min_value=0, max_value=10**6), st.integers(min_value=1, max_value=4))
def test_rounded_decimal_keys_match_at_their_own_precision(numerator: int, places: int) -> None:
    den = 7  # never a terminating decimal unless it divides the numerator
    assume(numerator % den)
    exact = numerator / den
    key = f"{exact:.{places}f}"
    assert verify(f"Answer: {numerator}/{den}", ntask(key)).correct, key
    off = f"{float(key) + 2 * 10 ** -places:.{places}f}"
    assert not verify(f"Answer: {numerator}/{den}", ntask(off)).correct, off


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=120))
def test_any_text_gets_a_consistent_verdict(text: str) -> None:
    for task in (ntask(5), Task(id="c", question="?", answer="C", answer_type="choice", choices=CHOICES),
                 Task(id="y", question="?", answer="yes", answer_type="yes_no_maybe")):
        _consistent(verify(text, task))
        _consistent(verify("Answer: " + text, task))


@settings(max_examples=100, deadline=None)
@given(st.sampled_from("ABCD"), st.sampled_from("ABCD"), st.sampled_from(["{k} or {j}", "{k}/{j}", "{k}, not {j}",
                                                                             "{k} (or {j})", "either {k} or {j}"]))
def test_two_options_are_never_correct(k: str, j: str, template: str) -> None:
    assume(k != j)
    text = "Answer: " + template.format(k=k, j=j)
    for key in (k, j):
        v = verify(text, Task(id="c", question="?", answer=key, answer_type="choice", choices=CHOICES))
        assert v.verdict is Verdict.AMBIGUOUS, (text, v)


def test_old_callers_get_a_derived_verdict() -> None:
    assert Verification(True, "1", True, "correct").verdict is Verdict.CORRECT
    assert Verification(False, None, False, "no explicit answer").verdict is Verdict.NO_ANSWER
    assert Verification(False, None, True, "ambiguous: x", ambiguous=True).verdict is Verdict.AMBIGUOUS
    assert Verification(False, "2", True, "wrong").verdict == "wrong"
    assert Verification(False, None, True, "unparsed: x", verdict="unparsed").verdict is Verdict.UNPARSED


def test_free_text_normalisation_and_aliases() -> None:
    task = Task(id="t", question="Diagnosis?", answer="Graves' disease", answer_type="text")
    for text in ("Answer: graves disease", "Answer: Graves's Disease.", "Answer: the Graves disease"):
        assert verify(text, task).correct, text
    assert not verify("Answer: Hashimoto's thyroiditis", task).correct
    mi = Task(id="t2", question="Diagnosis?", answer="myocardial infarction", answer_type="text",
              metadata={"answer_aliases": ["heart attack"]})
    assert verify("Answer: MI", mi, aliases=["MI", "STEMI"]).correct
    assert verify("Answer: a heart attack", mi).correct
    assert not verify("Answer: MI", mi).correct
    assert verify("Answer: MI or angina", mi, aliases=["MI"]).verdict is Verdict.AMBIGUOUS


def test_percent_reads_as_the_question_asks() -> None:
    pct = Task(id="p", question="What percentage of the apples are red?", answer="45", answer_type="number")
    assert verify("Answer: 45%", pct).correct
    assert verify("Answer: 45 percent", pct).correct
    assert not verify("Answer: 45%", ntask(45)).correct
    assert verify("Answer: 45%", ntask("0.45")).correct
