"""Answer verification as a grader sees it: an answer counts only where the completion states it
explicitly and unambiguously, and then only if it equals the ground truth.

The policy is told (see :meth:`rlhf_workbench.tasks.Task.prompt`) to end with a line
``Answer: <...>``. :func:`verify` reads the final answer out of a completion and compares it
with the task's ground truth, giving a :class:`Verification` whose :attr:`Verification.reward`
(1.0 or 0.0) is what the loop trains on.

The rules (strict, the default)
-------------------------------
1. **An answer exists only where it is stated.** Explicit markers are an ``Answer: X`` line
   or phrase (case-insensitive; ``Final answer: X``, ``**Answer:** X``, ``Answer:`` alone on
   its line with ``X`` on the next), the phrase ``the answer is X``, and ``\\boxed{X}``.
   Without one there is no answer: ``"6 * 7 = 42"`` and ``"There is no strong evidence either
   way."`` are never correct, whatever their last number or word.
2. **The last stated answer is the final one.** Markers are read last to first; a marker whose
   content holds no answer of the task's type (``... so the answer is correct.``) is passed
   over, so ``Answer: 5`` on one line and ``Answer: 6`` on a later line give ``6``. Markers on
   the *same* line must agree: ``Answer: 5 ... wait, Answer: 6`` and ``\\boxed{5} or
   \\boxed{6}`` are ambiguous.
3. **A hedged, multiple or self-contradicting answer is ambiguous, never correct**, and the
   reason is shown to experts (``"ambiguous: 2 different numbers on the answer line (42,
   41)"``). Only the answering clause counts (up to the first sentence end, ``;`` or an
   explanation such as "because"), so ``Answer: B. The LAD is spared.`` is a clean ``B``.

   * number: two different numbers (``42 or 41``, ``5-6``, ``42, 43, 44``), a range, hedge or
     negation word (``between 42 and 44``, ``about 42``, ``at least``, ``~42``, ``±``,
     ``12, not 13``). Text after the last ``=`` is the answer (``Answer: 40 + 45 = 85``);
     a parenthesis after the number (``85 (40 + 45)``) and unit exponents (``12 m^2``) are
     ignored.
   * choice: two option letters (``B or D``, ``B and C``, ``B, not C``), the texts of two
     options, or a hedge or negation (``not B``, ``either``, ``probably``, ``I think``).
     Option text is mapped to its letter (``Answer: Pneumonia`` -> ``C``).
   * yes/no/maybe: two different labels (``yes or no``; ``no difference in mortality, so
     yes``), a negated label (``not yes``) or an unsure word (``probably``, ``either``,
     ``I think``). Ordinary negation in an explanation stays clean (``no, it does not
     help``).
   * text: alternatives, hedges or negations (``Paris or Lyon``, ``probably Paris``), unless
     the content equals the key exactly.
4. **Comparison.** Integer keys need exact equality (``2000001.9`` is not ``2000000``;
   ``1000001`` is not ``1000000``). Other numbers: exact fractions, else relative tolerance
   1e-6, with ``math_verify`` deciding equivalence of LaTeX expressions (``2\\sqrt{2}``).
   Choices by letter, yes/no/maybe by word, text after normalisation.

Normalised forms
----------------
* number: thousands separators, ``$``/``%``/units, a leading ``+`` and trailing periods are
  dropped and ``−`` is read as ``-``; integers become their digits (``"1,234"`` -> ``"1234"``),
  decimals their shortest form (``"3.50"`` -> ``"3.5"``), fractions are reduced (``"6/8"`` ->
  ``"3/4"``), other LaTeX is shown in ``math_verify``'s normal form.
* choice: the upper-case letter; yes/no/maybe: the lower-case word; text: lower case,
  punctuation removed, whitespace collapsed.

The lenient reading (a separate metric, opt-in as the reward)
-------------------------------------------------------------
``Verification.lenient_correct`` is what a last-number grader would say: the last marker
whose content parses, with no ambiguity check, else a fallback (number: the last number in the
text; choice: the last letter written ``(C)`` or after "option"/"answer"; yes/no/maybe: the
last such word; text: none). It is reported beside strict accuracy and becomes the reward only
with ``verify(..., lenient=True)`` (the run setting ``verifier: lenient``): measured on the
demo, rewarding it made the policy drop the answer line (format rate 1.6 % -> 0 %).

``math_verify`` guards itself with ``signal.alarm``, which only works in the main thread; off
it, its timeouts are disabled and this package keeps what it hands over small (200 characters,
no huge powers or factorials) so that it cannot hang.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_workbench.tasks.task import ANSWER_TYPES, Task

from .labels import choice_ambiguity, label_clause, last_choice, last_ynm, parse_choice, parse_ynm, text_ambiguity, ynm_ambiguity
from .markers import markers, normalise_text
from .numbers import Num, last_number, number_ambiguity, number_clause, numbers_equal, parse_number

__all__ = ["NO_KEY_REASON", "Verification", "extract_answer", "verify"]

NO_KEY_REASON = "no key: open-ended task, ranked by feedback (never verified)"


@dataclass(frozen=True)
class Verification:
    """The verdict on one completion.

    Attributes:
        correct: the verdict the reward uses. Strict (default): an explicit, unambiguous final
            answer equal to the ground truth. With ``lenient=True``: ``lenient_correct``.
        extracted: the normalised final answer, or ``None`` if none was stated or it is
            ambiguous (strict), or none was found at all (lenient).
        format_ok: the completion states its answer with an explicit marker (``Answer: X``,
            ``the answer is X`` or ``\\boxed{X}``), ambiguous or not.
        reason: a short explanation for experts, e.g. ``"correct: extracted 85 from 'Answer:'
            line"``, ``"wrong: extracted 84 from 'Answer:' line, expected 85"``, ``"ambiguous:
            2 different numbers on the answer line (42, 41)"`` or ``"no explicit answer"``.
        ambiguous: the final answer is hedged, multiple or self-contradicting.
        lenient_correct: the lenient reading (module docstring) equals the ground truth; a
            separate metric, never the default reward.
    """

    correct: bool
    extracted: str | None
    format_ok: bool
    reason: str
    ambiguous: bool = False
    lenient_correct: bool = False

    @property
    def reward(self) -> float:
        """1.0 if the answer is correct, else 0.0."""
        return 1.0 if self.correct else 0.0


@dataclass(frozen=True)
class _Extraction:
    text: str | None  # normalised answer (None when ambiguous)
    format_ok: bool
    source: str  # where it came from, for the reason string
    num: Num | None = None  # set for number answers
    ambiguous: str | None = None  # why, when the final answer is ambiguous


def _check_type(answer_type: str, task_id: str | None = None) -> None:
    if answer_type not in ANSWER_TYPES:
        where = f"task {task_id!r}: " if task_id is not None else ""
        raise ValueError(f"{where}unknown answer_type {answer_type!r} (expected one of {', '.join(ANSWER_TYPES)})")


def _parse_content(content: str, answer_type: str, choices: dict[str, str] | None) -> tuple[str, Num | None] | None:
    """Parse one piece of marker content for the type: (normalised text, number) or None."""
    if answer_type == "number":
        num = parse_number(content)
        return (num.text, num) if num is not None else None
    if answer_type == "choice":
        letter = parse_choice(content, choices)
        return (letter, None) if letter is not None else None
    if answer_type == "yes_no_maybe":
        word = parse_ynm(content)
        return (word, None) if word is not None else None
    text = normalise_text(content)
    return (text, None) if text else None


def _parse_clause(content: str, answer_type: str, choices: dict[str, str] | None):
    """Strict parse: only the answering clause of the content counts."""
    if answer_type == "number":
        return _parse_content(number_clause(content), answer_type, choices)
    if answer_type in ("choice", "yes_no_maybe"):
        return _parse_content(label_clause(content), answer_type, choices)
    return _parse_content(content, answer_type, choices)


def _ambiguity(content: str, answer_type: str, choices: dict[str, str] | None) -> str | None:
    if answer_type == "number":
        return number_ambiguity(content)
    if answer_type == "choice":
        return choice_ambiguity(content, choices)
    if answer_type == "yes_no_maybe":
        return ynm_ambiguity(content)
    return text_ambiguity(content)


def _extract_strict(text: str, answer_type: str, choices: dict[str, str] | None) -> _Extraction | None:
    """The final explicit answer (rules 1-3 of the module docstring); None without a marker."""
    found = markers(text)
    if not found:
        return None
    for k in range(len(found) - 1, -1, -1):
        content, label, line = found[k]
        parsed = _parse_clause(content, answer_type, choices)
        why = _ambiguity(content, answer_type, choices)
        if parsed is None and why is None:
            continue  # no answer of this type here ("... the answer is correct."): an earlier marker
        if why is None:
            for other, _, other_line in found[:k]:
                if other_line != line:
                    continue
                p = _parse_clause(other, answer_type, choices)
                if p is not None and p[0] != parsed[0]:
                    why = f"different answers on one line ({p[0]}, then {parsed[0]})"
        if why is not None:
            return _Extraction(None, True, label, None, ambiguous=why)
        return _Extraction(parsed[0], True, label, parsed[1])
    return None  # markers, but none states an answer of this type ("Answer: none of them")


def _extract_lenient(text: str, answer_type: str, choices: dict[str, str] | None) -> _Extraction | None:
    """The last marker whose content parses, else the type's fallback; no ambiguity check."""
    for content, label, _ in reversed(markers(text)):
        parsed = _parse_content(content, answer_type, choices)
        if parsed is not None:
            return _Extraction(parsed[0], True, label, parsed[1])
    if answer_type == "number":
        num = last_number(text)
        if num is not None:
            return _Extraction(num.text, False, "fallback: last number in the text", num)
    elif answer_type == "choice":
        letter = last_choice(text, choices)
        if letter is not None:
            return _Extraction(letter, False, "fallback: last choice letter in the text")
    elif answer_type == "yes_no_maybe":
        word = last_ynm(text)
        if word is not None:
            return _Extraction(word, False, "fallback: last yes/no/maybe in the text")
    return None


def extract_answer(text: str, answer_type: str, choices: dict[str, str] | None = None,
                   lenient: bool = False) -> tuple[str | None, bool]:
    """Extract the final answer from a completion.

    Args:
        text: the completion.
        answer_type: one of ``"number"``, ``"choice"``, ``"yes_no_maybe"``, ``"text"``.
        choices: for ``"choice"``: the options, letter -> text. Restricts the valid letters and
            lets option text be mapped to its letter. Ignored for other types.
        lenient: use the lenient reading (last parsable marker, else a fallback, no ambiguity
            check) instead of the strict rules of the module docstring.

    Returns:
        ``(answer, format_ok)``: the normalised answer (``"1234"``, ``"3.5"``, ``"3/4"``,
        ``"C"``, ``"maybe"``, ``"paris"``), or ``None`` when there is none (strict: also when
        it is ambiguous), and whether the completion states an answer with an explicit marker.

    Raises:
        ValueError: ``answer_type`` is not one of the known types.
    """
    _check_type(answer_type)
    ex = (_extract_lenient if lenient else _extract_strict)(text, answer_type, choices)
    if ex is None:
        return None, False
    return ex.text, ex.format_ok


def _gold(task: Task) -> tuple[str, Num | None]:
    """The task's normalised ground truth; ValueError if it cannot be read."""
    parsed = _parse_content(task.answer, task.answer_type, task.choices)
    if parsed is None:
        raise ValueError(f"task {task.id!r}: ground-truth answer {task.answer!r} is not a valid "
                         f"{task.answer_type!r} answer")
    return parsed


def _matches(ex: _Extraction, gold_text: str, gold_num: Num | None, answer_type: str) -> bool:
    if ex.text is None:
        return False
    if answer_type == "number":
        return ex.num is not None and gold_num is not None and numbers_equal(ex.num, gold_num)
    return ex.text == gold_text


def verify(completion: str, task: Task, lenient: bool = False) -> Verification:
    """Check a completion's final answer against the task's ground truth (rules in the module
    docstring).

    Args:
        completion: the model's completion text.
        task: the task; its ``answer_type`` selects extraction and comparison.
        lenient: reward the lenient reading instead of the strict verdict (opt-in run setting
            ``verifier: lenient``); ``lenient_correct`` is computed either way.

    Returns:
        A :class:`Verification`. Strict: ``correct`` only for an explicit, unambiguous final
        answer equal to the key; ``extracted`` is ``None`` without one. An open task
        (``answer_type="open"``, no key) gets ``correct=False`` with reason
        :data:`NO_KEY_REASON`: "no key", not wrong (the loop ranks such traces all the same).

    Raises:
        ValueError: ``task.answer_type`` is unknown (the message names it and the task id), or
            ``task.answer`` cannot be read as an answer of that type.
    """
    if task.answer_type == "open":  # nothing to verify: neither correct nor wrong, ranked by feedback
        return Verification(False, None, False, NO_KEY_REASON, False, False)
    _check_type(task.answer_type, task.id)
    gold_text, gold_num = _gold(task)
    t = task.answer_type
    loose = _extract_lenient(completion, t, task.choices)
    lenient_correct = loose is not None and _matches(loose, gold_text, gold_num, t)
    if lenient:
        if loose is None:
            return Verification(False, None, False, "no answer found", False, False)
        verdict = "correct" if lenient_correct else "wrong"
        tail = "" if lenient_correct else f", expected {gold_text}"
        return Verification(lenient_correct, loose.text, loose.format_ok,
                            f"{verdict} (lenient): extracted {loose.text} from {loose.source}{tail}", False, lenient_correct)
    ex = _extract_strict(completion, t, task.choices)
    if t == "text" and ex is not None and ex.ambiguous and loose is not None and loose.format_ok and lenient_correct:
        ex = loose  # the content is the key itself, word for word ("rock or roll")
    if ex is None:
        reason = "no explicit answer (an 'Answer:' line or \\boxed{})"
        if loose is not None:
            reason += f"; a lenient reading finds {loose.text}"
        return Verification(False, None, False, reason, False, lenient_correct)
    if ex.ambiguous:
        return Verification(False, None, True, f"ambiguous: {ex.ambiguous}", True, lenient_correct)
    correct = _matches(ex, gold_text, gold_num, t)
    if correct:
        reason = f"correct: extracted {ex.text} from {ex.source}"
    else:
        reason = f"wrong: extracted {ex.text} from {ex.source}, expected {gold_text}"
    return Verification(correct, ex.text, True, reason, False, lenient_correct)
