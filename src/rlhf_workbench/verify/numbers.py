"""Numbers in answers: parsing (plain, thousands separators, decimals, fractions, LaTeX via
``math_verify``), comparison, and what makes a number answer ambiguous."""

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

from .markers import unwrap_commands


@dataclass(frozen=True)
class Num:
    """A parsed number: an exact value, or a sympy expression from math_verify."""

    text: str  # canonical string
    value: Fraction | None = None
    expr: Any = None  # sympy expression when value is None


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


def clean_math(s: str) -> str:
    """Normalise a number-ish string: unicode minus, LaTeX wrappers and spacing, $ signs,
    simple ``\\frac{a}{b}`` -> ``a/b``."""
    s = unicodedata.normalize("NFKC", s)
    s = s.replace("\u2212", "-")
    s = unwrap_commands(s)
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


def _num_from_match(m: re.Match[str]) -> Num | None:
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
    return Num(_canonical(value, is_decimal), value=value)


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


def _mv_number(s: str) -> Num | None:
    """Parse LaTeX-ish ``s`` with math_verify; a Num if it is a tame closed-form number."""
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
            return Num(_canonical(value, False), value=value)
        if isinstance(expr, sympy.Float):
            value = Fraction(Decimal(str(expr)))
            return Num(_canonical(value, True), value=value)
    except Exception:
        return None
    text = next((p for p in parsed[1:] if isinstance(p, str)), None) or str(expr)
    return Num(" ".join(text.split()), expr=expr)


def parse_number(content: str) -> Num | None:
    """Read a number from marker content (text after the last '=' if any)."""
    s = _EQ_SPLIT_RE.split(clean_math(content))[-1]
    if _LATEXISH_RE.search(s):
        num = _mv_number(s)
        if num is not None:
            return num
    m = _NUM_RE.search(s)
    return _num_from_match(m) if m else None


def last_number(text: str) -> Num | None:
    s = clean_math(text)
    for m in reversed(list(_NUM_RE.finditer(s))):
        num = _num_from_match(m)
        if num is not None:
            return num
    return None


def _to_float(num: Num) -> float | None:
    try:
        if num.value is not None:
            return float(num.value)
        f = complex(num.expr.evalf(30))
        return f.real if abs(f.imag) < 1e-12 else None
    except Exception:
        return None


def numbers_equal(pred: Num, gold: Num) -> bool:
    if pred.value is not None and gold.value is not None:
        a, b = pred.value, gold.value
        if a == b:
            return True
        if b.denominator == 1:
            return False  # an integer key needs exact equality (2000001.9 is not 2000000)
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=0.0)
    # At least one side is a symbolic expression: let math_verify decide, then numerically.
    import sympy

    def as_expr(n: Num) -> Any:
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
    if gold.value is not None and gold.value.denominator == 1 and pred.value is None:
        return False  # an integer key is never matched by an approximate irrational value
    fa, fb = _to_float(pred), _to_float(gold)
    if fa is None or fb is None or not (math.isfinite(fa) and math.isfinite(fb)):
        return False
    return math.isclose(fa, fb, rel_tol=1e-6, abs_tol=0.0)


# --------------------------------------------------------------------------------------
# Ambiguity
# --------------------------------------------------------------------------------------

_CLAUSE_END_RE = re.compile(r"\.(?=\s|$)|;|\n|\s(?:because|since|as|so that|which|where)\s", re.IGNORECASE)
_AFTER_NUMBER_PAREN_RE = re.compile(r"(?<=[\d%])(\s*[a-zA-Z%$]*)\s*\([^()]*\)")
_LATEX_ALTERNATIVES_RE = re.compile(r"\b(?:or|and)\b|,|;", re.IGNORECASE)
_EXPONENT_RE = re.compile(r"\^\s*\{?\s*[-+]?\d+\s*\}?")
_NUMBER_HEDGE_RE = re.compile(
    r"\b(?:approx(?:imately|\.)?|about|around|roughly|nearly|almost|close to|at least|at most|more than|"
    r"less than|fewer than|between|up to|or so|or more|or less|not|never|neither|nor|except|"
    r"plus or minus|perhaps|probably|possibly|maybe|likely|unsure|uncertain|i think|i guess)\b|n't\b|~|±|"
    r"\\pm|\\mp|\\approx|≈|≥|≤|<|>",
    re.IGNORECASE,
)


def number_clause(content: str) -> str:
    """The part of an answer line that states the number: up to the first sentence end, ``;``
    or explanation ("because", "since", ...), then after the last ``=`` in it (so ``Answer: 40
    + 45 = 85. Because...`` gives ``85``)."""
    m = _CLAUSE_END_RE.search(content)
    clause = content[: m.start()] if m and content[: m.start()].strip() else content
    return _EQ_SPLIT_RE.split(clean_math(clause))[-1]


def number_ambiguity(content: str) -> str | None:
    """Why the number stated in ``content`` (an answer marker's content) is ambiguous, or None.

    Ambiguous: two or more different numbers in the answering clause (``42 or 41``, ``5-6``,
    ``42, 43, 44``; a parenthesis after the number and exponents of units such as ``m^2`` are
    ignored), or a hedge, range or negation word (``about``, ``between``, ``at least``, ``or``,
    ``not``, ``~``, ``±``).
    """
    clause = number_clause(content)
    hedge = _NUMBER_HEDGE_RE.search(clause)
    if hedge:
        return f"hedged, range or negation ({hedge.group(0).strip()!r}) on the answer line"
    if _LATEXISH_RE.search(clause):  # a closed-form expression (2\\sqrt{2}): its digits are not answers,
        alt = _LATEX_ALTERNATIVES_RE.search(clause)  # but alternatives are
        return f"several answers ({alt.group(0).strip()!r}) on the answer line" if alt else None
    plain = _EXPONENT_RE.sub("", _AFTER_NUMBER_PAREN_RE.sub(r"\1", clause))
    values = []
    for m in _NUM_RE.finditer(plain):
        num = _num_from_match(m)
        if num is not None and num.value not in values:
            values.append(num.value)
    if len(values) > 1:
        shown = ", ".join(_canonical(v, True) for v in values[:4])
        return f"{len(values)} different numbers on the answer line ({shown})"
    return None
