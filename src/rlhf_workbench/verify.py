"""Answer verification: extract the final answer from a completion and check it.

The policy is told (see :meth:`rlhf_workbench.tasks.Task.prompt`) to end with a line
``Answer: <...>``. :func:`extract_answer` reads the answer back out of a completion and
:func:`verify` compares it with the task's ground truth, giving a :class:`Verification`
whose :attr:`Verification.reward` is 1.0 or 0.0.

Strict versus lenient extraction
--------------------------------
Extraction first looks for an *explicit marker*: an ``Answer: X`` line or phrase
(case-insensitive; ``Final answer: X``, ``**Answer:** X`` and the phrase ``the answer is X``
also count) or ``\\boxed{X}``. When several markers appear the **last** one wins; when the
last one's content cannot be read as an answer of the task's type, the earlier markers are
tried, last to first. An answer read from a marker has ``format_ok=True``.

If no marker gives an answer, a *lenient fallback* is used and ``format_ok=False``:

* ``number``: the last number anywhere in the text;
* ``choice``: the last valid choice letter written as ``(C)`` or after the words
  ``option``/``choice``/``answer`` (a bare capital letter is never taken, so the article in
  "A patient presents..." is not read as choice A);
* ``yes_no_maybe``: the last whole word yes/no/maybe;
* ``text``: no fallback (free text cannot be guessed safely), so the answer is ``None``.

``Verification.correct`` is judged on the extracted answer **whether or not** ``format_ok``
holds; a caller that wants strict accuracy (the answer must come from a marker) checks
``v.correct and v.format_ok``.

Normalised forms
----------------
* ``number``: thousands separators, ``$``/``%``/units, a leading ``+`` and trailing periods
  are dropped and the unicode minus ``−`` is read as ``-``. An integer becomes its decimal
  digits (``"1,234"`` -> ``"1234"``, ``"-0"`` -> ``"0"``), a decimal becomes its shortest
  decimal form (``"3.50"`` -> ``"3.5"``, ``"1,200.00"`` -> ``"1200"``), and a fraction
  (``"6/8"``, ``\\frac{6}{8}``) is kept as a reduced fraction (``"3/4"``; ``"4/2"`` ->
  ``"2"``). Other LaTeX (``2\\sqrt{2}``, ``\\frac{\\pi}{2}``) is parsed by ``math_verify``
  and shown in its normalised LaTeX form. Within a marker, text after the last ``=`` (or
  ``≈``) is used, so ``Answer: 3 + 4 = 7`` gives ``7``.
* ``choice``: the upper-case letter (``"C"``); option text (``Answer: Pneumonia``) is mapped
  to its letter when the task has ``choices``.
* ``yes_no_maybe``: ``"yes"``, ``"no"`` or ``"maybe"``.
* ``text``: lower case, punctuation removed, whitespace collapsed.

Comparison
----------
Numbers are compared exactly when both sides are integers, otherwise with a relative
tolerance of 1e-6. Where one side is not a plain number or fraction (LaTeX such as
``\\sqrt{2}``), the ``math_verify`` library decides mathematical equivalence, with a numeric
check as a second chance. ``math_verify`` guards itself with ``signal.alarm``, which only
works in the main thread; off the main thread it is called with its timeouts disabled, and
this module instead keeps what it hands over small (at most 200 characters, no huge powers or
factorials) so that it cannot hang. In the main thread the alarm it sets replaces any
``SIGALRM`` alarm the caller had pending.
"""

from __future__ import annotations

import math
import os
import re
import threading
import unicodedata
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any

from rlhf_workbench.tasks import ANSWER_TYPES, Task

__all__ = ["Verification", "extract_answer", "verify"]


@dataclass(frozen=True)
class Verification:
    """The verdict on one completion.

    Attributes:
        correct: the extracted answer equals the ground truth (judged whether or not
            ``format_ok``; require both for strict accuracy).
        extracted: the normalised extracted answer, or ``None`` if no answer was found.
        format_ok: the answer came from an explicit marker (``Answer: X``, ``the answer is X``
            or ``\\boxed{X}``) rather than from a lenient fallback.
        reason: a short human-readable explanation, e.g.
            ``"correct: extracted 85 from 'Answer:' line"``,
            ``"wrong: extracted 84 from 'Answer:' line, expected 85"`` or ``"no answer found"``.
    """

    correct: bool
    extracted: str | None
    format_ok: bool
    reason: str

    @property
    def reward(self) -> float:
        """1.0 if the answer is correct, else 0.0."""
        return 1.0 if self.correct else 0.0


# --------------------------------------------------------------------------------------
# Internal representations
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Num:
    """A parsed number: an exact value, or a sympy expression from math_verify."""

    text: str  # canonical string
    value: Fraction | None = None
    expr: Any = None  # sympy expression when value is None


@dataclass(frozen=True)
class _Extraction:
    text: str  # normalised answer
    format_ok: bool
    source: str  # where it came from, for the reason string
    num: _Num | None = None  # set for number answers


# --------------------------------------------------------------------------------------
# Marker finding
# --------------------------------------------------------------------------------------

_MARKER_RE = re.compile(
    r"(?P<boxed>\\boxed\s*\{)"
    r"|(?P<colon>\b(?:(?:the|my|our)\s+)?(?:(?:final|correct)\s+)?answer(?:\s+is)?\s*\**\s*[:：])"
    r"|(?P<phrase>\b(?:the|my|our)\s+(?:(?:final|correct|right|best)\s+)?answer\s+is\b)",
    re.IGNORECASE,
)


def _match_brace(s: str, open_idx: int) -> int | None:
    """Index of the ``}`` matching the ``{`` at ``open_idx`` (escaped braces ignored)."""
    depth = 0
    for i in range(open_idx, len(s)):
        c = s[i]
        if c in "{}" and i > 0 and s[i - 1] == "\\":
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def _markers(text: str) -> list[tuple[str, str]]:
    """All explicit markers in order of position, as (content, source label)."""
    matches = list(_MARKER_RE.finditer(text))
    out: list[tuple[str, str]] = []
    for k, m in enumerate(matches):
        next_start = matches[k + 1].start() if k + 1 < len(matches) else len(text)
        if m.group("boxed") is not None:
            open_idx = m.end() - 1
            close = _match_brace(text, open_idx)
            if close is None:
                continue
            out.append((text[open_idx + 1 : close], "\\boxed{}"))
            continue
        head = " ".join(m.group(0).replace("*", " ").split())
        label = f"'{head}' line" if m.group("colon") is not None else f"'{head}' phrase"
        line_end = text.find("\n", m.end())
        if line_end == -1:
            line_end = len(text)
        if next_start <= line_end:
            content = text[m.end() : next_start]
        else:
            content = text[m.end() : line_end]
            if not content.strip(" \t*$_:"):
                # "Answer:" alone on its line: the answer is on the next non-empty line.
                rest = text[line_end:next_start]
                for line in rest.split("\n"):
                    if line.strip(" \t*$_"):
                        content = line
                        break
        out.append((content, label))
    return out


# --------------------------------------------------------------------------------------
# Shared cleaning
# --------------------------------------------------------------------------------------

_UNWRAP_RE = re.compile(
    r"\\(?:boxed|fbox|text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{"
)


def _unwrap_commands(s: str) -> str:
    r"""Replace ``\boxed{X}``, ``\text{X}`` and similar by ``X`` (balanced braces)."""
    for _ in range(50):
        m = _UNWRAP_RE.search(s)
        if m is None:
            break
        close = _match_brace(s, m.end() - 1)
        if close is None:
            s = s[: m.start()] + s[m.end() :]
        else:
            s = s[: m.start()] + s[m.end() : close] + s[close + 1 :]
    return s


def _clean_words(s: str) -> str:
    """Content cleaned for word-like answers: LaTeX wrappers, $, * and quotes removed."""
    s = unicodedata.normalize("NFKC", s)
    s = _unwrap_commands(s)
    s = re.sub(r"\\[()\[\]]", " ", s)
    s = s.replace("$", " ").replace("*", " ").replace("`", " ")
    return " ".join(s.split())


def _normalise_text(s: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed."""
    s = _clean_words(s).lower()
    s = "".join(ch for ch in s if not unicodedata.category(ch).startswith("P"))
    return " ".join(s.split())


# --------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------

_INT = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)"
_NUM_RE = re.compile(
    rf"(?<![\w.])(?P<num>[-+]?(?:{_INT}(?:\.\d+)?|\.\d+))"
    rf"(?:\s*/\s*(?P<den>[-+]?{_INT}(?:\.\d+)?)(?![\d.]*\d))?"
)
_SIMPLE_NUM = r"\s*[-+]?(?:\d+(?:\.\d+)?|\.\d+)\s*"
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{(" + _SIMPLE_NUM + r")\}\s*\{(" + _SIMPLE_NUM + r")\}")
_FRAC_SHORT_RE = re.compile(r"\\[dt]?frac\s*(\d)\s*(\d)")
_EQ_SPLIT_RE = re.compile(r"=|≈|\\approx")
_LATEXISH_RE = re.compile(r"\\[A-Za-z]|\^|√|π")
_LEADING_WORDS_RE = re.compile(r"^(?:[A-Za-z]{2,}[\s,:]+)+")
_TRAILING_WORDS_RE = re.compile(r"(?:\s+[A-Za-z]{2,}[.,;:!?]?)+\s*$")


def _clean_math(s: str) -> str:
    """Normalise a number-ish string: unicode minus, LaTeX wrappers and spacing, $ signs,
    simple ``\\frac{a}{b}`` -> ``a/b``."""
    s = unicodedata.normalize("NFKC", s)
    s = s.replace("\u2212", "-")
    s = _unwrap_commands(s)
    s = re.sub(r"\\[()\[\]]", " ", s)
    s = s.replace("\\$", "$")
    s = re.sub(r"([-+])\s*\$", r"\1", s)  # "-$5" -> "-5"
    s = s.replace("$", " ").replace("*", " ")
    s = s.replace("{,}", ",").replace("\\%", "%")
    s = re.sub(r"\\[,!;: ]", "", s)
    s = re.sub(r"\\(?:left|right)\b", "", s)
    s = re.sub(r"\^\s*\{?\\circ\}?", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _FRAC_RE.sub(lambda m: f"{m.group(1).strip()}/{m.group(2).strip()}", s)
    s = _FRAC_SHORT_RE.sub(r"\1/\2", s)
    return s.strip()


def _canonical(value: Fraction, as_decimal: bool) -> str:
    """Canonical string: integer digits, shortest decimal, or reduced ``p/q``."""
    if value.denominator == 1:
        return str(value.numerator)
    if as_decimal:
        q = value.denominator
        while q % 2 == 0:
            q //= 2
        while q % 5 == 0:
            q //= 5
        if q == 1:  # terminating decimal
            d = Decimal(value.numerator) / Decimal(value.denominator)
            return format(d.normalize(), "f")
    return f"{value.numerator}/{value.denominator}"


def _num_from_match(m: re.Match[str]) -> _Num | None:
    num_s = m.group("num").replace(",", "")
    try:
        value = Fraction(Decimal(num_s))
        is_decimal = "." in num_s
        den_s = m.group("den")
        if den_s:
            den = Fraction(Decimal(den_s.replace(",", "")))
            if den != 0:
                value = value / den
                is_decimal = False
    except (InvalidOperation, ValueError, ZeroDivisionError):
        return None
    return _Num(_canonical(value, is_decimal), value=value)


def _mv_timeout() -> int | None:
    """math_verify's signal-based timeout only works in the main thread."""
    if os.name == "posix" and threading.current_thread() is threading.main_thread():
        return _MV_TIMEOUT_S
    return None


_MV_TIMEOUT_S = 3
_MV_MAX_CHARS = 200
_MAX_EXPONENT = 10_000


def _is_tame(expr: Any) -> bool:
    """False for expressions that sympy could take forever on (huge powers, factorials)."""
    import sympy

    try:
        for node in sympy.preorder_traversal(expr):
            if isinstance(node, sympy.Pow):
                size = node.exp
            elif isinstance(node, (sympy.factorial, sympy.factorial2, sympy.gamma)):
                size = node.args[0]
            else:
                continue
            if size.free_symbols:
                continue
            if not bool(abs(sympy.N(size, 15)) <= _MAX_EXPONENT):
                return False
    except Exception:
        return False
    return True


def _mv_parse(latex: str) -> list[Any]:
    """``math_verify.parse`` of ``$latex$``, never raising; [] on failure."""
    if not latex or len(latex) > _MV_MAX_CHARS:
        return []
    try:
        from math_verify import parse
        from math_verify.errors import TimeoutException
    except ImportError:  # pragma: no cover - math-verify is a declared dependency
        return []
    try:
        return list(parse(f"${latex}$", parsing_timeout=_mv_timeout()))
    except (Exception, TimeoutException):
        return []


def _mv_number(s: str) -> _Num | None:
    """Parse LaTeX-ish ``s`` with math_verify; a _Num if it is a tame closed-form number."""
    import sympy

    s = _TRAILING_WORDS_RE.sub("", _LEADING_WORDS_RE.sub("", s.strip())).strip(" .,;:")
    parsed = _mv_parse(s)
    if not parsed:
        return None
    expr = parsed[0]
    try:
        if not isinstance(expr, sympy.Expr) or expr.free_symbols or not expr.is_number:
            return None
        if not _is_tame(expr):
            return None
        if isinstance(expr, sympy.Rational):
            value = Fraction(int(expr.p), int(expr.q))
            return _Num(_canonical(value, False), value=value)
        if isinstance(expr, sympy.Float):
            value = Fraction(Decimal(str(expr)))
            return _Num(_canonical(value, True), value=value)
    except Exception:
        return None
    text = next((p for p in parsed[1:] if isinstance(p, str)), None) or str(expr)
    return _Num(" ".join(text.split()), expr=expr)


def _parse_number(content: str) -> _Num | None:
    """Read a number from marker content (text after the last '=' if any)."""
    s = _EQ_SPLIT_RE.split(_clean_math(content))[-1]
    if _LATEXISH_RE.search(s):
        num = _mv_number(s)
        if num is not None:
            return num
    m = _NUM_RE.search(s)
    return _num_from_match(m) if m else None


def _last_number(text: str) -> _Num | None:
    s = _clean_math(text)
    for m in reversed(list(_NUM_RE.finditer(s))):
        num = _num_from_match(m)
        if num is not None:
            return num
    return None


def _to_float(num: _Num) -> float | None:
    try:
        if num.value is not None:
            return float(num.value)
        f = complex(num.expr.evalf(30))
        return f.real if abs(f.imag) < 1e-12 else None
    except Exception:
        return None


def _numbers_equal(pred: _Num, gold: _Num) -> bool:
    if pred.value is not None and gold.value is not None:
        a, b = pred.value, gold.value
        if a == b:
            return True
        if a.denominator == 1 and b.denominator == 1:
            return False  # integers compare exactly (1000001 is not 1000000)
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=0.0)
    # At least one side is a symbolic expression: let math_verify decide, then numerically.
    import sympy

    def as_expr(n: _Num) -> Any:
        if n.value is not None:
            return sympy.Rational(n.value.numerator, n.value.denominator)
        return n.expr

    try:
        from math_verify import verify as mv_verify
        from math_verify.errors import TimeoutException

        try:
            if mv_verify([as_expr(gold)], [as_expr(pred)], timeout_seconds=_mv_timeout()):
                return True
        except (Exception, TimeoutException):
            pass
    except ImportError:  # pragma: no cover
        pass
    fa, fb = _to_float(pred), _to_float(gold)
    if fa is None or fb is None or not (math.isfinite(fa) and math.isfinite(fb)):
        return False
    return math.isclose(fa, fb, rel_tol=1e-6, abs_tol=0.0)


# --------------------------------------------------------------------------------------
# Choices
# --------------------------------------------------------------------------------------

_CHOICE_PREFIX_RE = re.compile(
    r"^(?:(?:the\s+)?(?:correct\s+|best\s+|right\s+)?(?:option|choice|answer)\s*(?:is\s*)?:?\s*)",
    re.IGNORECASE,
)
_BRACKETED_RE = re.compile(r"^[(\[]\s*([A-Za-z])\s*[)\]]")
_BARE_RE = re.compile(r"^([A-Za-z])(?![A-Za-z0-9])")
_CHOICE_FALLBACK_RE = re.compile(
    r"\(([A-Z])\)"
    r"|\b(?i:option|choice|answer)\s+(?i:is\s+)?\(?([A-Z])(?![A-Za-z0-9])"
)


def _valid_letters(choices: dict[str, str] | None) -> set[str]:
    if choices:
        return {k.strip().upper() for k in choices if len(k.strip()) == 1 and k.strip().isalpha()}
    return set("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _option_letter(body: str, choices: dict[str, str] | None, valid: set[str]) -> str | None:
    """Map option text to its letter (exact normalised match, else a unique contained one)."""
    if not choices:
        return None
    norm_body = _normalise_text(body)
    if not norm_body:
        return None
    options = {
        k.strip().upper(): _normalise_text(v)
        for k, v in choices.items()
        if k.strip().upper() in valid and _normalise_text(v)
    }
    exact = [k for k, v in options.items() if v == norm_body]
    if len(exact) == 1:
        return exact[0]
    padded = f" {norm_body} "
    contained = {k: v for k, v in options.items() if f" {v} " in padded}
    # Drop options whose text is part of a longer matching option ("pneumonia" vs
    # "viral pneumonia").
    maximal = [
        k for k, v in contained.items()
        if not any(v != w and f" {v} " in f" {w} " for w in contained.values())
    ]
    return maximal[0] if len(maximal) == 1 else None


def _parse_choice(content: str, choices: dict[str, str] | None) -> str | None:
    """Read a choice letter from marker content."""
    valid = _valid_letters(choices)
    s = _clean_words(content)
    body = _CHOICE_PREFIX_RE.sub("", s).strip()
    letter: str | None = None
    m = _BRACKETED_RE.match(body)
    if m:
        letter = m.group(1).upper()
    else:
        m = _BARE_RE.match(body)
        if m:
            ch = m.group(1)
            rest = body[1:]
            if not rest.strip() or re.match(r"^\s*[).\]:,;\-\u2013\u2014]", rest):
                letter = ch.upper()
            elif ch.isupper():
                next_word = rest.split()[0]
                if ch not in "AI" or not next_word[0].islower() or next_word in ("is", "was"):
                    letter = ch
                elif choices and ch in choices and _normalise_text(rest).startswith(
                    _normalise_text(choices[ch])
                ):
                    letter = ch
    if letter is not None and letter in valid:
        return letter
    return _option_letter(body, choices, valid)


def _last_choice(text: str, choices: dict[str, str] | None) -> str | None:
    valid = _valid_letters(choices)
    found = None
    for m in _CHOICE_FALLBACK_RE.finditer(text):
        letter = m.group(1) or m.group(2)
        if m.group(2) in ("A", "I") and re.match(r"\s+[a-z]", text[m.end() :]):
            continue  # "the answer is A patient..." / "option I think": English words
        if letter in valid:
            found = letter
    return found


# --------------------------------------------------------------------------------------
# yes / no / maybe and text
# --------------------------------------------------------------------------------------

_YNM_RE = re.compile(r"\b(yes|no|maybe)\b", re.IGNORECASE)


def _parse_ynm(content: str) -> str | None:
    m = _YNM_RE.search(_clean_words(content))
    return m.group(1).lower() if m else None


def _last_ynm(text: str) -> str | None:
    found = None
    for m in _YNM_RE.finditer(text):
        found = m.group(1).lower()
    return found


# --------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------


def _check_type(answer_type: str, task_id: str | None = None) -> None:
    if answer_type not in ANSWER_TYPES:
        where = f"task {task_id!r}: " if task_id is not None else ""
        raise ValueError(
            f"{where}unknown answer_type {answer_type!r} "
            f"(expected one of {', '.join(ANSWER_TYPES)})"
        )


def _parse_content(
    content: str, answer_type: str, choices: dict[str, str] | None
) -> tuple[str, _Num | None] | None:
    """Parse one piece of marker content for the type: (normalised text, number) or None."""
    if answer_type == "number":
        num = _parse_number(content)
        return (num.text, num) if num is not None else None
    if answer_type == "choice":
        letter = _parse_choice(content, choices)
        return (letter, None) if letter is not None else None
    if answer_type == "yes_no_maybe":
        word = _parse_ynm(content)
        return (word, None) if word is not None else None
    text = _normalise_text(content)
    return (text, None) if text else None


def _extract(text: str, answer_type: str, choices: dict[str, str] | None) -> _Extraction | None:
    """Full extraction with source information; None if no answer is found."""
    for content, label in reversed(_markers(text)):
        parsed = _parse_content(content, answer_type, choices)
        if parsed is not None:
            return _Extraction(parsed[0], True, label, parsed[1])
    if answer_type == "number":
        num = _last_number(text)
        if num is not None:
            return _Extraction(num.text, False, "fallback: last number in the text", num)
    elif answer_type == "choice":
        letter = _last_choice(text, choices)
        if letter is not None:
            return _Extraction(letter, False, "fallback: last choice letter in the text")
    elif answer_type == "yes_no_maybe":
        word = _last_ynm(text)
        if word is not None:
            return _Extraction(word, False, "fallback: last yes/no/maybe in the text")
    return None


def extract_answer(
    text: str, answer_type: str, choices: dict[str, str] | None = None
) -> tuple[str | None, bool]:
    """Extract the final answer from a completion.

    The last explicit marker (``Answer: X``, ``Final answer: X``, ``the answer is X``,
    ``\\boxed{X}``) whose content parses for ``answer_type`` wins; otherwise the lenient
    fallback for the type is used (see the module docstring).

    Args:
        text: the completion.
        answer_type: one of ``"number"``, ``"choice"``, ``"yes_no_maybe"``, ``"text"``.
        choices: for ``"choice"``: the options, letter -> text. Restricts the valid letters
            and lets option text be mapped to its letter. Ignored for other types.

    Returns:
        ``(answer, format_ok)``: the normalised answer (``"1234"``, ``"3.5"``, ``"3/4"``,
        ``"C"``, ``"maybe"``, ``"paris"``) or ``None`` if nothing was found, and whether it
        came from an explicit marker (``False`` for a fallback or when nothing was found).

    Raises:
        ValueError: ``answer_type`` is not one of the known types.
    """
    _check_type(answer_type)
    ex = _extract(text, answer_type, choices)
    if ex is None:
        return None, False
    return ex.text, ex.format_ok


def _gold(task: Task) -> tuple[str, _Num | None]:
    """The task's normalised ground truth; ValueError if it cannot be read."""
    parsed = _parse_content(task.answer, task.answer_type, task.choices)
    if parsed is None:
        raise ValueError(
            f"task {task.id!r}: ground-truth answer {task.answer!r} is not a valid "
            f"{task.answer_type!r} answer"
        )
    return parsed


def verify(completion: str, task: Task) -> Verification:
    """Check a completion's final answer against the task's ground truth.

    The answer is extracted as in :func:`extract_answer` and compared with ``task.answer``,
    normalised the same way: numbers numerically (integers exactly, otherwise relative
    tolerance 1e-6, ``math_verify`` for LaTeX expressions), choices by letter, yes/no/maybe
    by word, text after normalisation. ``correct`` does not depend on ``format_ok``.

    Args:
        completion: the model's completion text.
        task: the task; its ``answer_type`` selects extraction and comparison.

    Returns:
        A :class:`Verification`; ``extracted`` is ``None`` and ``correct`` is ``False`` when
        no answer is found.

    Raises:
        ValueError: ``task.answer_type`` is unknown (the message names it and the task id),
            or ``task.answer`` cannot be read as an answer of that type.
    """
    _check_type(task.answer_type, task.id)
    gold_text, gold_num = _gold(task)
    ex = _extract(completion, task.answer_type, task.choices)
    if ex is None:
        return Verification(False, None, False, "no answer found")
    if task.answer_type == "number":
        assert ex.num is not None and gold_num is not None
        correct = _numbers_equal(ex.num, gold_num)
    else:
        correct = ex.text == gold_text
    if correct:
        reason = f"correct: extracted {ex.text} from {ex.source}"
    else:
        reason = f"wrong: extracted {ex.text} from {ex.source}, expected {gold_text}"
    return Verification(correct, ex.text, ex.format_ok, reason)
