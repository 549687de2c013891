"""Numbers in answers: the value grammar (digits with separators, decimals, fractions, mixed
numbers, scientific notation, multiplier words, percent, number words, LaTeX via
``math_verify``) and comparison (exact, or at the key's own stated precision).

The lenient reading's helpers (:func:`parse_number`, :func:`last_number`) keep the old
"first number in the text" behaviour; the strict reading uses :func:`match_value`, which reads
one value at the start of a string and says where it ends, so that the caller can check that
nothing but harmless tails follows.
"""

from __future__ import annotations

import math
import os
import re
import threading
import unicodedata
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from fractions import Fraction
from typing import Any

import sympy
from math_verify import parse as mv_parse
from math_verify import verify as mv_verify
from math_verify.errors import TimeoutException
from text_to_num import text2num

from .markers import unwrap_commands


@dataclass(frozen=True)
class Num:
    """A parsed number: an exact value, or a sympy expression from math_verify.

    ``percent``: written with ``%``/"percent" (``value`` is the number as written, 45 for 45 %).
    ``decimals``: decimal places as written for a plain decimal literal (``"0.333"`` -> 3), else
    None. ``exact``: the value is exactly what was written (False for a closed form such as
    ``\\sqrt{2}``, whose value is only approximated)."""

    text: str  # canonical string
    value: Fraction | None = None
    expr: Any = None  # sympy expression when value is None
    percent: bool = False
    decimals: int | None = None


# --------------------------------------------------------------------------------------
# Cleaning
# --------------------------------------------------------------------------------------

_SUPERSCRIPT = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁻⁺", "0123456789-+")
_SUPERSCRIPT_RE = re.compile(r"[⁰¹²³⁴⁵⁶⁷⁸⁹⁻⁺]+")
_VULGAR = {"½": "1/2", "⅓": "1/3", "⅔": "2/3", "¼": "1/4", "¾": "3/4", "⅕": "1/5", "⅖": "2/5", "⅗": "3/5",
           "⅘": "4/5", "⅙": "1/6", "⅚": "5/6", "⅛": "1/8", "⅜": "3/8", "⅝": "5/8", "⅞": "7/8",
           "⅐": "1/7",
           "⅑": "1/9", "⅒": "1/10"}
_VULGAR_RE = re.compile(r"(\d?)\s?([" + "".join(_VULGAR) + "])")
_THIN_GROUPS_RE = re.compile(r"(?<!\d)\d{1,3}(?:[\u2009\u202f\u00a0\u2007]\d{3})+(?!\d)")
_MINUS_SIGNS = "\u2212\u2012\u2010\u2011\ufe63\uff0d"
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad\u200e\u200f"), None)


def clean_unicode(s: str) -> str:
    """Unicode that changes what a number says, made plain before NFKC (which would turn
    ``10⁵`` into ``105`` and ``½`` into ``1⁄2``): zero-width characters dropped, superscripts
    -> ``^n``, vulgar fractions -> ``n/d`` (``2½`` -> ``2 1/2``), thin-space thousands groups
    joined, every minus sign -> ``-``; then NFKC."""
    s = s.translate(_INVISIBLE)
    s = _THIN_GROUPS_RE.sub(lambda m: re.sub(r"\D", "", m.group(0)), s)
    s = _SUPERSCRIPT_RE.sub(lambda m: "^" + m.group(0).translate(_SUPERSCRIPT), s)
    s = _VULGAR_RE.sub(lambda m: (m.group(1) + " " if m.group(1) else "") + _VULGAR[m.group(2)], s)
    for ch in _MINUS_SIGNS:
        s = s.replace(ch, "-")
    return unicodedata.normalize("NFKC", s)


_SIMPLE_NUM = r"\s*[-+]?(?:\d+(?:\.\d+)?|\.\d+)\s*"
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{(" + _SIMPLE_NUM + r")\}\s*\{(" + _SIMPLE_NUM + r")\}")
_FRAC_SHORT_RE = re.compile(r"\\[dt]?frac\s*(\d)\s*(\d)")


def clean_math(s: str) -> str:
    """Normalise a number-ish string: :func:`clean_unicode`, LaTeX wrappers and spacing, $
    signs kept as ``$``, simple ``\\frac{a}{b}`` -> ``a/b``, markdown emphasis dropped."""
    s = clean_unicode(s)
    s = unwrap_commands(s)
    s = re.sub(r"\\[()\[\]]", " ", s)
    s = s.replace("\\$", "\x00")
    s = s.replace("$", " ").replace("\x00", "$").replace("*", " ")
    s = s.replace("{,}", ",").replace("\\%", "%")
    s = re.sub(r"\\[,!;: ]", "", s)
    s = re.sub(r"\\(?:left|right)\b", "", s)
    s = re.sub(r"\^\s*\{?\\circ\}?|°", "", s)
    s = re.sub(r"\\(?:times|cdot)", "×", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _FRAC_RE.sub(lambda m: f"{m.group(1).strip()}/{m.group(2).strip()}", s)
    s = _FRAC_SHORT_RE.sub(r"\1/\2", s)
    return " ".join(s.split())


# --------------------------------------------------------------------------------------
# The value grammar
# --------------------------------------------------------------------------------------

_LIT = (r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d,]\d)"   # 1,234,567.5 (English)
        r"|\d{1,3}(?:\.\d{3}){2,}(?:,\d+)?(?![\d.]\d)"  # 1.234.567 (dot groups: unambiguous when 2+)
        r"|\d{1,3}(?:\.\d{3})+,\d+(?!\d)"               # 1.234,5 (dot groups + decimal comma)
        r"|\d+(?:\.\d+)?|\.\d+)")
_VALUE_RE = re.compile(
    rf"""(?P<paren>[(\[]\s*)?
    (?P<sign>[-+]\s*|minus\s+|negative\s+)?
    (?P<cur>\$|£|€|US\$|USD\s?)?\s*
    (?P<sign2>-)?
    (?P<lit>{_LIT})
    (?:(?P<mixed>\s+(?P<mn>\d+)\s*/\s*(?P<md>\d+)(?![\d.]))
      |(?:\s*/\s*(?P<den>{_LIT})(?![\d.]))
      |(?:\s?[eE](?P<exp>[-+]?\d+))
      |(?:\s*[×x*]\s*10\s*\^\s*\{{?\s*(?P<exp2>[-+]?\d+)\s*\}}?))?
    (?P<mult>\s*(?:thousand|million|billion|trillion)\b|(?<=\d)(?:k|K|bn)\b)?
    (?P<pct>\s*(?:%|percent\b|per\s+cent\b))?
    (?(paren)\s*[)\]])""",
    re.VERBOSE | re.IGNORECASE,
)
_MULTIPLIERS = {"thousand": 10**3, "k": 10**3, "million": 10**6, "billion": 10**9, "bn": 10**9, "trillion": 10**12}
_NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
                 "sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety "
                 "hundred thousand million billion").split()
_WORD_RUN_RE = re.compile(
    r"(?P<wsign>(?:minus|negative)\s+)?(?P<words>(?:(?:" + "|".join(_NUMBER_WORDS) + r")(?:[\s-]+(?:and\s+)?|\b))+)"
    r"(?P<half>and\s+(?:a|one)\s+(?:half|quarter)\b)?(?P<wpct>\s*(?:%|percent\b|per\s+cent\b))?",
    re.IGNORECASE,
)
_AND_HALF_RE = re.compile(r"\s+and\s+(?:a|one)\s+(half|quarter)\b", re.IGNORECASE)
NUMBER_WORD_RE = re.compile(r"\b(?:" + "|".join(_NUMBER_WORDS[:28]) + r")\b", re.IGNORECASE)
ANY_NUMBER_RE = re.compile(r"\d|" + NUMBER_WORD_RE.pattern, re.IGNORECASE)


def literal_value(lit: str) -> tuple[Fraction, int | None]:
    """The value of a digits literal with separators, and its decimal places (None for an integer)."""
    if "," in lit and "." in lit and lit.index(".") < lit.index(","):  # 1.234,5
        lit = lit.replace(".", "").replace(",", ".")
    elif lit.count(".") >= 2:  # 1.234.567
        lit = lit.replace(".", "")
    else:
        lit = lit.replace(",", "")
    decimals = len(lit.split(".")[1]) if "." in lit else None
    return Fraction(Decimal(lit)), decimals


def canonical(value: Fraction, as_decimal: bool) -> str:
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


def _value_from_match(m: re.Match[str]) -> Num | None:
    try:
        value, decimals = literal_value(m.group("lit"))
        as_decimal = decimals is not None
        if m.group("mn"):
            den = int(m.group("md"))
            if den == 0 or decimals is not None:
                return None
            value = value + Fraction(int(m.group("mn")), den)
            as_decimal, decimals = False, None
        elif m.group("den"):
            den = literal_value(m.group("den"))[0]
            if den == 0:
                return None
            value, as_decimal, decimals = value / den, False, None
        exp = m.group("exp") or m.group("exp2")
        if exp is not None:
            if abs(int(exp)) > 300:
                return None
            value, decimals = value * Fraction(10) ** int(exp), None
        if m.group("mult"):
            value, decimals = value * _MULTIPLIERS[m.group("mult").strip().lower()], None
    except (InvalidOperation, ValueError, ZeroDivisionError):
        return None
    if (m.group("sign") or "").strip().lower() in ("-", "minus", "negative") or m.group("sign2"):
        value = -value
    return Num(canonical(value, as_decimal), value=value, percent=bool(m.group("pct")), decimals=decimals)


def _words_value(m: re.Match[str]) -> Num | None:
    words = re.sub(r"[\s-]+", " ", m.group("words")).strip()
    words = re.sub(r"\s+and$", "", words)
    try:
        value = Fraction(text2num(words, "en"))
    except (ValueError, TypeError):
        return None
    if m.group("half"):
        value += Fraction(1, 2) if "half" in m.group("half").lower() else Fraction(1, 4)
    if m.group("wsign"):
        value = -value
    return Num(canonical(value, True), value=value, percent=bool(m.group("wpct")))


def match_value(s: str) -> tuple[Num, int] | None:
    """One number at the start of ``s`` (already :func:`clean_math`-ed): ``(number, end)``, or
    None. Digits (``1,234.5``, ``1.234.567``, ``1 234`` with thin spaces), ``3/4``, mixed
    ``2 1/2``, ``1.2e5`` and ``1.2 × 10^5``, multiplier words (``3 million``, ``2.5k``), percent,
    signs and currency (``-$5``, ``minus 3``) and number words (``twenty-one``, ``two and a half``)."""
    m = _VALUE_RE.match(s)
    if m is not None:
        num = _value_from_match(m)
        if num is None:
            return None
        half = _AND_HALF_RE.match(s, m.end())
        if half is not None and num.value is not None and num.value.denominator == 1 and not num.percent:
            extra = Fraction(1, 2) if half.group(1).lower() == "half" else Fraction(1, 4)
            value = num.value + (extra if num.value >= 0 else -extra)
            return Num(canonical(value, True), value=value), half.end()
        return num, m.end()
    w = _WORD_RUN_RE.match(s)
    if w is not None and w.group("words").strip():
        num = _words_value(w)
        if num is not None:
            end = w.end()
            while end > 0 and s[end - 1] in " -":
                end -= 1
            return num, end
    return None


# --------------------------------------------------------------------------------------
# LaTeX through math_verify
# --------------------------------------------------------------------------------------

_MV_TIMEOUT_S = 3
_MV_MAX_CHARS = 200
_MAX_EXPONENT = 10_000
LATEXISH_RE = re.compile(r"\\[A-Za-z]|\^|√|π")


def _mv_timeout() -> int | None:
    """math_verify's signal-based timeout only works in the main thread."""
    if os.name == "posix" and threading.current_thread() is threading.main_thread():
        return _MV_TIMEOUT_S
    return None


def _is_tame(expr: Any) -> bool:
    """False for expressions that sympy could take forever on (huge powers, factorials)."""
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
        return list(mv_parse(f"${latex}$", parsing_timeout=_mv_timeout()))
    except (Exception, TimeoutException):
        return []


def latex_number(s: str) -> Num | None:
    """A closed-form LaTeX number (``2\\sqrt{2}``, ``\\frac{\\pi}{2}``, ``10^5``) read whole by
    math_verify, or None (free symbols, untamed size, nothing parsed)."""
    parsed = _mv_parse(s.strip())
    if not parsed:
        return None
    expr = parsed[0]
    try:
        if not isinstance(expr, sympy.Expr) or expr.free_symbols or not expr.is_number or not _is_tame(expr):
            return None
        if isinstance(expr, sympy.Rational):
            value = Fraction(int(expr.p), int(expr.q))
            return Num(canonical(value, False), value=value)
        if isinstance(expr, sympy.Float):
            value = Fraction(Decimal(str(expr)))
            return Num(canonical(value, True), value=value)
    except Exception:
        return None
    text = next((p for p in parsed[1:] if isinstance(p, str)), None) or str(expr)
    return Num(" ".join(text.split()), expr=expr)


# --------------------------------------------------------------------------------------
# Lenient helpers and the ground truth
# --------------------------------------------------------------------------------------

NUMBER_SEARCH_RE = re.compile(rf"(?<![\w.])[-+]?(?:{_LIT})(?:\s*/\s*[-+]?{_LIT}(?![\d.]*\d))?")


def _first_plain(s: str) -> Num | None:
    for m in NUMBER_SEARCH_RE.finditer(s):
        got = match_value(m.group(0))
        if got is not None:
            return got[0]
    return None


def parse_number(content: str) -> Num | None:
    """Lenient reading of marker content: text after the last ``=``, closed-form LaTeX whole,
    else its first number. Also reads a ground-truth key."""
    s = re.split(r"=|≈|\\approx", clean_math(content))[-1].strip(" .")
    whole = match_value(s)
    if whole is not None and whole[1] == len(s):
        return whole[0]
    if LATEXISH_RE.search(s):
        num = latex_number(s)
        if num is not None:
            return num
    return whole[0] if whole is not None else _first_plain(s)


def last_number(text: str) -> Num | None:
    """The last plain number in ``text`` (the lenient fallback)."""
    s = clean_math(text)
    for m in reversed(list(NUMBER_SEARCH_RE.finditer(s))):
        got = match_value(m.group(0))
        if got is not None:
            return got[0]
    return None


# --------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------


def _as_expr(n: Num) -> Any:
    if n.value is not None:
        return sympy.Rational(n.value.numerator, n.value.denominator)
    return n.expr


def _to_float(num: Num) -> float | None:
    try:
        if num.value is not None:
            return float(num.value)
        f = complex(num.expr.evalf(30))
        return f.real if abs(f.imag) < 1e-12 else None
    except Exception:
        return None


def _terminates(value: Fraction) -> bool:
    q = value.denominator
    for p in (2, 5):
        while q % p == 0:
            q //= p
    return q == 1


def _at_precision(pred: Num, gold_value: Fraction, decimals: int) -> bool:
    """``pred`` rounded half-up to the key's stated decimals equals the key."""
    try:
        if pred.value is not None:
            d = Decimal(pred.value.numerator) / Decimal(pred.value.denominator)
        else:
            d = Decimal(repr(_to_float(pred)))
        q = d.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP)
    except (InvalidOperation, TypeError, ValueError):
        return False
    return Fraction(q) == gold_value


def _values_equal(pred: Num, gold: Num, p_scale: Fraction, g_scale: Fraction) -> bool:
    if pred.value is not None and gold.value is not None:
        a, b = pred.value * p_scale, gold.value * g_scale
        if a == b:
            return True
        if b.denominator == 1 and g_scale == 1:
            return False  # an integer key needs exact equality (2000001.9 is not 2000000)
        if gold.decimals and not _terminates(a):
            return _at_precision(Num("", value=a), b, gold.decimals)  # 1/3 against a key of 0.333
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=0.0)
    return None  # type: ignore[return-value]


def numbers_equal(pred: Num, gold: Num, percent_question: bool = False) -> bool:
    """Is ``pred`` the key ``gold``?

    Exact fractions compare exactly; an integer key needs exact equality. A key written as a
    decimal with ``d`` places matches a value that cannot be written exactly as a decimal
    (``1/3``, ``\\sqrt{2}``) when that value rounds (half up) to the key at ``d`` places; other
    non-integer keys use a relative tolerance of 1e-6. A percent (``45%``) is 0.45, unless the
    question asks for a percentage (``percent_question``), where it is 45 (so is a key of 45).
    Closed forms go through math_verify, then numerically.
    """
    p_scale = Fraction(1, 100) if pred.percent and not percent_question else Fraction(1)
    g_scale = Fraction(1, 100) if gold.percent and not percent_question else Fraction(1)
    exact = _values_equal(pred, gold, p_scale, g_scale)
    if exact is not None:
        return exact
    p_expr, g_expr = _as_expr(pred) * _sym(p_scale), _as_expr(gold) * _sym(g_scale)
    try:
        if mv_verify([g_expr], [p_expr], timeout_seconds=_mv_timeout()):
            return True
    except (Exception, TimeoutException):
        pass
    if gold.value is not None and gold.value.denominator == 1 and pred.value is None:
        return False  # an integer key is never matched by an approximate irrational value
    fa, fb = _to_float(Num("", expr=p_expr)), _to_float(Num("", expr=g_expr))
    if fa is None or fb is None or not (math.isfinite(fa) and math.isfinite(fb)):
        return False
    if gold.decimals and gold.value is not None:
        return _at_precision(Num("", expr=p_expr), gold.value * g_scale, gold.decimals)
    return math.isclose(fa, fb, rel_tol=1e-6, abs_tol=0.0)


def _sym(f: Fraction) -> Any:
    return sympy.Rational(f.numerator, f.denominator)
