"""Answer verification as a grader sees it: an answer counts only where the completion states it
at the start of a line, the whole statement parses as one value of the task's type, and nothing
after it states another. Otherwise the verifier abstains (``unparsed``, ``ambiguous``): never
correct, reward 0.

The policy is told (see :meth:`rlhf_workbench.tasks.task.Task.prompt`) to end with a line
``Answer: <...>``. :func:`verify` reads the final answer and compares it with the task's key,
giving a :class:`Verification` with a :class:`Verdict` and a :attr:`Verification.reward` (1.0
or 0.0) that the loop trains on.

Verdicts
--------
``correct``  one value, stated cleanly, equal to the key.
``wrong``    one value, stated cleanly, not the key.
``ambiguous`` a hedge, negation, range or alternative in the statement (``42 or 41``,
             ``about 42``, ``not B``, ``yes/no``), a second value of the type in it
             (``85 (or 86)``, ``B (Right coronary artery) or C``), a question mark (``85?``),
             or, after the final answer, a correction or retraction (``wait``, ``actually``,
             ``hmm``, ``I added wrong``, ``should be``), a hedge or qualification (``most
             likely``, ``I think``, ``≈``, ``-ish``, ``no evidence``, ``if you count``, ``but``,
             ``however``, ``unless``, a sentence starting with ``Or``, a ``?``) or another value
             of the type (another marker or ``\\boxed{}`` anywhere, ``it is 19``, any other
             number, any other option letter or option text, ``No.``).
``unparsed`` a marker, but text left over that the grammar cannot read as a harmless tail
             (``Answer: 17 days from Monday`` when the question never says "days"), or no value
             of the type at all (``Answer: none of them``, a letter that is not an option). The
             leftover text is quoted in ``reason``.
``no_answer`` no marker at the start of any line.
``no_key``   an open task (nothing to verify; ranked by feedback).

``Verification.why`` names the class of an ``ambiguous``/``unparsed`` verdict: ``hedge``,
``second_value``, ``leftover_text``, ``no_value``, ``correction_after_answer``,
``hedge_after_answer``, ``other_value_after_answer``, ``second_answer_after_final``,
``option_text_mismatch``.

Rule 1: markers only at the start of a line
-------------------------------------------
A marker is a label at the start of a line, after optional indentation, a list bullet
(``-``, ``*``, ``1.``), a quote ``>`` or heading ``#``, optional markdown emphasis (``**``,
``__``) and an optional connective (``So,``/``Therefore``/``Thus``/``Hence``): ``Answer``,
``Final answer``, ``The (final) answer``, ``My answer``, ``Answer choice``/``option``/``letter``,
followed by ``:``, ``-``/``–``/``—``, (with an article) ``is``, or nothing when the label is
alone on its line (``**Final Answer**`` then the value on a later line) — so ``**Answer:**``,
``**Answer**:``, ``ANSWER - B``, ``- Answer choice: B``, ``So the answer is 17``. A line that
starts with ``\\boxed{}`` (after ``$``, ``\\[``) is a marker too, and so is a line ending in
``..., final answer.``. A label inside a sentence or a tag (``... so the correct answer is C``,
``<note>Answer: 17</note>``, ``\\boxed{}`` inside a note) is not a marker, nor is a line-start
label inside a fenced code block or a pseudo-tag block (``<note>\\nAnswer: 17\\n</note>``): quoted,
not stated (a later one still makes the final answer ambiguous); ``"6 * 7 = 42"`` has no answer. ``Answer:`` alone on its line takes the next non-empty line; an empty label (``Answer:`` at the
end, ``\\boxed{}``) is no marker.

Rule 2: the last marker is the final answer, and the whole completion is read
---------------------------------------------------------------------------
Earlier markers are superseded (``Answer: 84`` ... ``Answer: 85`` gives 85). Everything after
the final statement (the rest of its line after a sentence end, ``;`` or an explanation word,
and all later lines) is scanned, strictly, since the policy is told to end with the answer
line: a correction or retraction phrase, a hedge or qualification, or a different value makes
the verdict ``ambiguous``. For numbers that is any other number, except arithmetic whose value
or result is the answer (``It follows from 40 + 45.``, ``Check: 48 + 24 = 72.``) and list
numbers (``1.``); for choices any other option letter or option text; for yes/no/maybe another
label on the answer line, or a later sentence that starts with one (``No.``) or ``so no``; for
text another marker. A restatement of the same value and explanations without a value are
fine (``Answer: no. There is no effect on mortality.``).

Rule 3: the statement parses whole, or the verifier abstains
------------------------------------------------------------
The grammar (:mod:`.grammar`) reads ``lead? value tail* (boundary rest)?``:

* lead: words from the question or a closed set (``the total is``, ``she needs``); a hedge
  word is never a lead. ``x =`` or an arithmetic left-hand side equal to the value
  (``40 + 45 = 85``) are leads; any other text before ``=`` is left over (``x = 3 or x = -3``
  is ambiguous).
* value: number, option, label or free text (below).
* tails (closed set): a unit or noun the question uses (stemmed: ``apples``, ``cm`` when the
  question says centimetres, exponents ``m^2``), ``$``, ``in total``, the option text of the
  stated letter (``C. Pneumonia``, ``B - Right coronary artery``), ``is correct``/``is the most
  likely <word>`` after a letter, a bracketed restatement (``85 (40 + 45)``, ``85 (eighty-five)``),
  ``= 85``, ``out of N <units>``, punctuation and markdown.
* boundary: a sentence end, ``;``, ``:``, a dash, an explanation word (``because``, ``since``,
  ``as``, ``which``, ``given``, ``so``) and, for yes/no/maybe, a comma. The rest is read by
  rule 2 — so ``Answer: 17. Or 18 if you count the first day.`` is ambiguous, and ``Answer: B.
  Pneumonia`` (option text of another letter) is too.

Anything else left over: ``ambiguous`` when it holds a hedge, negation, range or alternative
word or a second value of the type, else ``unparsed``.

Rule 4: numbers mean what they say
----------------------------------
* Separators: ``1,234,567.5``; ``1.234.567`` and ``1.234,5`` (dot groups are thousands only
  when unambiguous: two or more groups, or followed by a decimal comma; ``1.234`` is a decimal);
  thin/no-break-space groups ``1 234 567``; ``3,5`` is not a number (read as two).
* Signs: ``-``, ``+``, the typographic minus and other dashes used as minus (U+2212, U+2010,
  U+2011, U+2012, U+FE63, U+FF0D), ``minus``/``negative``; ``-$5``; an en dash between
  numbers is a range (``85–90``: ambiguous).
* Forms: ``3/4``, mixed ``2 1/2``, vulgar fractions (``½``, ``2½``), ``1.2e5``,
  ``1.2 × 10^5`` (superscripts ``10⁵`` read as powers, never as digits), multiplier words
  (``3 million``, ``2.5k``, ``1 bn``), number words (``twenty-one``, ``two and a half``; read by
  the ``text2num`` library), zero-width characters dropped, closed-form LaTeX
  (``2\\sqrt{2}``, ``\\frac{\\pi}{2}``) through ``math_verify``.
* Percent: ``45%`` is 0.45, unless the question asks for a percentage (``%``/"percent" in it),
  where it is 45.
* Comparison: an integer key needs exact equality (``2000001.9`` is not ``2000000``); a key
  written with ``d`` decimals matches a value that has no exact decimal form (``1/3``,
  ``\\sqrt{2}``) when it rounds half-up to the key at ``d`` places (``1/3`` against ``0.333``);
  other non-integer keys use a relative tolerance of 1e-6; closed forms go through
  ``math_verify``.

Rule 5: labels and free text
----------------------------
* choice: a letter of the task's options (``B``, ``(B)``, ``option B``, ``b`` alone), or the
  exact text of one option; an article ``A``/pronoun ``I`` before a lower-case word is not a
  letter; a letter that is not an option is ``unparsed``.
* yes/no/maybe: the label first (after ``the answer is``); ``no, it does not help`` is a clean
  ``no`` (the comma is a boundary).
* text: the clause compared whole after normalisation (case, punctuation, hyphens,
  possessives, the articles a/an/the): equal to the key or one of its aliases (``verify(...,
  aliases=...)``, or ``answer_aliases`` on the task or in its metadata). A hedge or
  alternative word is ambiguous unless the clause is a key word for word (``rock or roll``).

The lenient reading (a separate metric, opt-in as the reward)
-------------------------------------------------------------
``Verification.lenient_correct`` is what a last-number grader would say: the last marker
anywhere whose content parses, with no ambiguity check, else a fallback (number: the last
number in the text; choice: the last letter written ``(C)`` or after "option"/"answer";
yes/no/maybe: the last such word; text: none). It is reported beside strict accuracy and
becomes the reward only with ``verify(..., lenient=True)`` (the run setting ``verifier:
lenient``): measured on the demo, rewarding it made the policy drop the answer line (format
rate 1.6 % -> 0 %).

``math_verify`` guards itself with ``signal.alarm``, which only works in the main thread; off
it, its timeouts are disabled and this package keeps what it hands over small (200 characters,
no huge powers or factorials) so that it cannot hang.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from rlhf_workbench.tasks.task import ANSWER_TYPES, Task

from .grammar import Statement, label_statement, number_statement, scan_after, text_statement
from .labels import last_choice, last_ynm, parse_choice, parse_ynm
from .markers import line_markers, markers, normalise_free_text
from .numbers import Num, clean_unicode, last_number, numbers_equal, parse_number

__all__ = ["NO_KEY_REASON", "Verdict", "Verification", "extract_answer", "verify"]

NO_KEY_REASON = "no key: open-ended task, ranked by feedback (never verified)"
_NO_ANSWER_REASON = "no explicit answer (an 'Answer:' line or \\boxed{})"


class Verdict(str, Enum):
    """The strict verdict on one completion (module docstring, "Verdicts")."""

    CORRECT = "correct"
    WRONG = "wrong"
    AMBIGUOUS = "ambiguous"
    UNPARSED = "unparsed"
    NO_ANSWER = "no_answer"
    NO_KEY = "no_key"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Verification:
    """The verdict on one completion.

    Attributes:
        correct: the verdict the reward uses. Strict (default): an explicit, unambiguous, fully
            parsed final answer equal to the ground truth. With ``lenient=True``:
            ``lenient_correct``.
        extracted: the normalised final answer, or ``None`` if none was stated, or it is
            ambiguous or unparsed (strict), or none was found at all (lenient).
        format_ok: the completion states its answer with a line-start marker (``Answer: X``,
            ``\\boxed{X}``), whatever its verdict.
        reason: a short explanation for experts, e.g. ``"correct: extracted 85 from 'Answer:'
            line"``, ``"wrong: extracted 84 from 'Answer:' line, expected 85"``,
            ``"ambiguous: ..."``, ``"unparsed: extracted 17, but left over: 'days later'"``.
        ambiguous: the final answer is hedged, multiple or self-contradicting.
        lenient_correct: the lenient reading (module docstring) equals the ground truth; a
            separate metric, never the default reward.
        verdict: the :class:`Verdict`; when not given (old callers), derived from the fields
            above (``unparsed`` cannot be derived: pass it).
        why: the class of an ``ambiguous``/``unparsed`` verdict (module docstring), else ``""``.
    """

    correct: bool
    extracted: str | None
    format_ok: bool
    reason: str
    ambiguous: bool = False
    lenient_correct: bool = False
    verdict: Verdict | None = None
    why: str = ""

    def __post_init__(self) -> None:
        if self.verdict is None:
            derived = (Verdict.CORRECT if self.correct else Verdict.AMBIGUOUS if self.ambiguous
                       else Verdict.NO_KEY if self.reason == NO_KEY_REASON
                       else Verdict.WRONG if self.format_ok else Verdict.NO_ANSWER)
            object.__setattr__(self, "verdict", derived)
        elif not isinstance(self.verdict, Verdict):
            object.__setattr__(self, "verdict", Verdict(self.verdict))

    @property
    def reward(self) -> float:
        """1.0 if the answer is correct, else 0.0."""
        return 1.0 if self.correct else 0.0


@dataclass(frozen=True)
class _Extraction:
    text: str | None  # normalised answer (None when ambiguous or unparsed)
    format_ok: bool
    source: str  # where it came from, for the reason string
    num: Num | None = None  # set for number answers
    verdict: str | None = None  # "ambiguous" or "unparsed"
    why: str = ""
    detail: str = ""


def _check_type(answer_type: str, task_id: str | None = None) -> None:
    if answer_type not in ANSWER_TYPES:
        where = f"task {task_id!r}: " if task_id is not None else ""
        raise ValueError(f"{where}unknown answer_type {answer_type!r} (expected one of {', '.join(ANSWER_TYPES)})")


def _parse_content(content: str, answer_type: str, choices: dict[str, str] | None) -> tuple[str, Num | None] | None:
    """Lenient parse of one piece of marker content (and of keys): (normalised text, number) or None."""
    if answer_type == "number":
        num = parse_number(content)
        return (num.text, num) if num is not None else None
    if answer_type == "choice":
        letter = parse_choice(content, choices)
        return (letter, None) if letter is not None else None
    if answer_type == "yes_no_maybe":
        word = parse_ynm(content)
        return (word, None) if word is not None else None
    text = normalise_free_text(content)
    return (text, None) if text else None


def _statement(content: str, answer_type: str, choices: dict[str, str] | None, question: str,
               keys: list[str]) -> Statement:
    if answer_type == "number":
        return number_statement(content, question)
    if answer_type in ("choice", "yes_no_maybe"):
        return label_statement(content, answer_type, choices)
    return text_statement(content, keys)


def _option_mismatch(st: Statement, choices: dict[str, str] | None) -> Statement | None:
    """``B. Pneumonia`` where Pneumonia is option C: the letter's text names another option."""
    first = re.split(r"(?<=[.!?;])\s", st.rest.strip(), maxsplit=1)[0]
    named = normalise_free_text(first)
    for k, v in (choices or {}).items():
        if named and normalise_free_text(v) == named and k.strip().upper() != st.text:
            return Statement(None, verdict="ambiguous", why="option_text_mismatch",
                             detail=f"letter {st.text} with the text of option {k.strip().upper()} ({first.strip()!r})")
    return None


def _extract_strict(text: str, answer_type: str, choices: dict[str, str] | None, question: str = "",
                    keys: list[str] | None = None) -> _Extraction | None:
    """The final line-start answer, parsed whole and checked against the rest of the completion."""
    text = clean_unicode(text)
    found = line_markers(text)
    if not found:
        return None
    final = found[-1]
    st = _statement(final.content, answer_type, choices, question, keys or [])
    if st.verdict is None and answer_type == "choice":
        st = _option_mismatch(st, choices) or st
    if st.verdict is None:
        after = scan_after(st.rest + "\n" + text[final.end:], answer_type, st, choices, question)
        st = after or st
    if st.verdict is not None:
        return _Extraction(None, True, final.label, None, st.verdict, st.why, st.detail)
    if st.text is None:
        return _Extraction(None, True, final.label, None, "unparsed", "no_value", "no answer")
    return _Extraction(st.text, True, final.label, st.num)


def _extract_lenient(text: str, answer_type: str, choices: dict[str, str] | None) -> _Extraction | None:
    """The last marker anywhere whose content parses, else the type's fallback; no ambiguity check."""
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
                   lenient: bool = False, question: str = "") -> tuple[str | None, bool]:
    """Extract the final answer from a completion.

    Args:
        text: the completion.
        answer_type: one of ``"number"``, ``"choice"``, ``"yes_no_maybe"``, ``"text"``.
        choices: for ``"choice"``: the options, letter -> text. Restricts the valid letters and
            lets option text be mapped to its letter. Ignored for other types.
        lenient: use the lenient reading (last parsable marker anywhere, else a fallback, no
            ambiguity check) instead of the strict rules of the module docstring.
        question: the question (its words are the units a number answer may carry).

    Returns:
        ``(answer, format_ok)``: the normalised answer (``"1234"``, ``"3.5"``, ``"3/4"``,
        ``"C"``, ``"maybe"``, ``"paris"``), or ``None`` when there is none (strict: also when
        it is ambiguous or unparsed), and whether the completion has a line-start marker.

    Raises:
        ValueError: ``answer_type`` is not one of the known types.
    """
    _check_type(answer_type)
    if lenient:
        ex = _extract_lenient(text, answer_type, choices)
    else:
        ex = _extract_strict(text, answer_type, choices, question)
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


def _matches(ex: _Extraction, gold_text: str, gold_num: Num | None, task: Task, keys: list[str]) -> bool:
    if ex.text is None:
        return False
    if task.answer_type == "number":
        pq = bool(re.search(r"%|percent", task.question, re.IGNORECASE))
        return ex.num is not None and gold_num is not None and numbers_equal(ex.num, gold_num, pq)
    if task.answer_type == "text":
        return ex.text in {normalise_free_text(k) for k in keys}
    return ex.text == gold_text


def _keys(task: Task, aliases: Iterable[str] | None) -> list[str]:
    """The key and its aliases: ``aliases``, ``task.answer_aliases`` (if the Task has it) and
    ``task.metadata["answer_aliases"]``."""
    keys = [task.answer, *(aliases or ())]
    keys += list(getattr(task, "answer_aliases", None) or ())
    meta = (task.metadata or {}).get("answer_aliases") or ()
    keys += [meta] if isinstance(meta, str) else list(meta)
    return [k for k in keys if isinstance(k, str) and k.strip()]


def verify(completion: str, task: Task, lenient: bool = False, aliases: Iterable[str] | None = None) -> Verification:
    """Check a completion's final answer against the task's ground truth (rules in the module
    docstring).

    Args:
        completion: the model's completion text.
        task: the task; its ``answer_type`` selects extraction and comparison, its question
            the units a number may carry.
        lenient: reward the lenient reading instead of the strict verdict (opt-in run setting
            ``verifier: lenient``); ``lenient_correct`` is computed either way.
        aliases: other accepted forms of a free-text key (``"MI"`` for ``"myocardial
            infarction"``), compared after the same normalisation; added to
            ``task.answer_aliases``/``task.metadata["answer_aliases"]`` where those exist.

    Returns:
        A :class:`Verification`. Strict: ``correct`` only for a line-start, fully parsed,
        unambiguous final answer equal to the key; ``extracted`` is ``None`` without one. An
        open task (``answer_type="open"``, no key) gets ``correct=False``, verdict ``no_key``
        and reason :data:`NO_KEY_REASON` (the loop ranks such traces all the same).

    Raises:
        ValueError: ``task.answer_type`` is unknown (the message names it and the task id), or
            ``task.answer`` cannot be read as an answer of that type.
    """
    if task.answer_type == "open":  # nothing to verify: neither correct nor wrong, ranked by feedback
        return Verification(False, None, False, NO_KEY_REASON, False, False, Verdict.NO_KEY)
    _check_type(task.answer_type, task.id)
    gold_text, gold_num = _gold(task)
    keys = _keys(task, aliases)
    t = task.answer_type
    loose = _extract_lenient(completion, t, task.choices)
    lenient_correct = loose is not None and _matches(loose, gold_text, gold_num, task, keys)
    if lenient:
        if loose is None:
            return Verification(False, None, False, "no answer found", False, False, Verdict.NO_ANSWER)
        verdict = Verdict.CORRECT if lenient_correct else Verdict.WRONG
        tail = "" if lenient_correct else f", expected {gold_text}"
        return Verification(lenient_correct, loose.text, loose.format_ok,
                            f"{verdict} (lenient): extracted {loose.text} from {loose.source}{tail}", False,
                            lenient_correct, verdict)
    ex = _extract_strict(completion, t, task.choices, task.question, keys)
    if ex is None:
        reason = _NO_ANSWER_REASON
        if loose is not None:
            reason += f"; a lenient reading finds {loose.text}"
        return Verification(False, None, False, reason, False, lenient_correct, Verdict.NO_ANSWER)
    if ex.verdict == "ambiguous":
        return Verification(False, None, True, f"ambiguous: {ex.detail}", True, lenient_correct,
                            Verdict.AMBIGUOUS, ex.why)
    if ex.verdict == "unparsed":
        return Verification(False, None, True, f"unparsed: {ex.detail} (from {ex.source})", False, lenient_correct,
                            Verdict.UNPARSED, ex.why)
    if _matches(ex, gold_text, gold_num, task, keys):
        return Verification(True, ex.text, True, f"correct: extracted {ex.text} from {ex.source}", False,
                            lenient_correct, Verdict.CORRECT)
    return Verification(False, ex.text, True, f"wrong: extracted {ex.text} from {ex.source}, expected {gold_text}",
                        False, lenient_correct, Verdict.WRONG)
