"""The answer grammar of the strict reading: an answer statement is one value plus only
harmless tails, and nothing after the final answer may state another one.

:func:`read_statement` consumes the statement after a marker: an optional lead (``the total
is``, ``x =``, an arithmetic left-hand side equal to the value), the value, then tails from a
closed set (a unit the question uses, the option text of the stated letter, a restatement of
the same value in brackets, ``out of N ...``, punctuation). What follows a sentence end, ``;``
or an explanation word (``because``, ``since``, ``which``; for yes/no/maybe also a comma) is
not part of the statement: it is read with the rest of the completion by :func:`scan_after`.
Anything else left over is classified by :func:`classify_leftover`: ``ambiguous`` when it holds
a hedge, negation or alternative word or a second value of the type, else ``unparsed``.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from fractions import Fraction

from .labels import choice_head, choice_letters_in, ynm_head
from .markers import clean_words, markers, normalise_free_text
from .numbers import (ANY_NUMBER_RE, LATEXISH_RE, NUMBER_SEARCH_RE, NUMBER_WORD_RE, Num, clean_math, latex_number,
                      match_value, numbers_equal,
                      parse_number)


@dataclass(frozen=True)
class Statement:
    """What an answer statement says: ``text``/``num`` the normalised value (None when there is
    none), ``verdict`` None (clean), ``"ambiguous"`` or ``"unparsed"``, with ``why`` (the reason
    class, e.g. ``"hedge"``) and ``detail`` (shown to experts); ``rest`` is the text after the
    statement's boundary on the same line."""

    text: str | None
    num: Num | None = None
    verdict: str | None = None
    why: str = ""
    detail: str = ""
    rest: str = ""


HEDGE_RE = re.compile(
    r"\b(?:approx(?:imately|\.)?|about|around|roughly|nearly|almost|close to|at least|at most|more than|less than|"
    r"fewer than|over|under|between|up to|or so|or more|or less|not|never|neither|nor|except|either|or|and|vs|"
    r"versus|plus or minus|perhaps|probably|possibly|maybe|likely|most likely|unlikely|unsure|uncertain|unclear|"
    r"unknown|i think|i guess|i believe|not sure|could be|might be|may be|estimated?|guess|if|unless|depend(?:s|ing)|"
    r"no evidence|cannot be determined|can'?t|don'?t know|none|ish|otherwise|instead|rather)\b|n't\b|~|≈|±|\\pm|"
    r"\\mp|\\approx|≥|≤|<|>|-ish\b",
    re.IGNORECASE,
)
CORRECTION_RE = re.compile(
    r"\b(?:wait|actually|hmm+|oops|sorry|correction|scratch that|on (?:second thought|reflection)|i made an? "
    r"(?:mistake|error)|my mistake|i was wrong|(?:added|counted|calculated|computed|read) (?:it )?wrong|"
    r"let me re-?(?:check|calculate|compute|do|think|consider)|re-?calculat\w*|miscalculat\w*|should (?:be|have been)|"
    r"instead|retract|not (?:correct|right)|is (?:incorrect|wrong)|that'?s wrong|no,? (?:it|the answer) is)\b",
    re.IGNORECASE,
)
POST_HEDGE_RE = re.compile(
    r"\b(?:not sure|unsure|uncertain|i think|i guess|i believe|probably|possibly|perhaps|might be|could be|"
    r"or so|approximately|roughly|most likely|no evidence|if you count|depending on|it depends|alternatively|"
    r"or maybe|or perhaps)\b|≈|~\s*\d|\d-ish\b",
    re.IGNORECASE,
)
QUALIFIER_RE = re.compile(
    r"\b(?:but|however|although|though|yet|unless|except|only (?:if|in|when|for)|also (?:possible|defensible|"
    r"correct|acceptable|plausible|reasonable)|some (?:might|would|could) (?:argue|say)|arguably|caveats?|"
    r"in some|partially|partly|not always|depending|or else|otherwise)\b|\?|(?:^|[.!;]\s+)[ \t*_]*or\b",
    re.IGNORECASE | re.MULTILINE,
)
_BOUNDARY_RE = re.compile(r"^\s*(?:[.!?](?:\s|$)|;|:\s|\s*[-–—]\s"
                          r"|,?\s*(?:because|since|as|which|given|due to|so)\b)",
                          re.IGNORECASE)
_YNM_BOUNDARY_RE = re.compile(r"^\s*(?:,|[-–—:]\s)")
_PUNCT_ONLY_RE = re.compile(r"^[\s.,!;:*_\"'`)\]]*$")
_UNIT_ABBREV = {"cm": "centimeter", "mm": "millimeter", "m": "meter", "km": "kilometer", "kg": "kilogram",
                "g": "gram", "mg": "milligram", "ml": "milliliter", "l": "liter", "h": "hour", "hr": "hour",
                "hrs": "hour", "min": "minute", "mins": "minute", "s": "second", "sec": "second", "secs": "second",
                "yr": "year", "yrs": "year", "wk": "week", "wks": "week", "lb": "pound", "lbs": "pound",
                "oz": "ounce", "ft": "foot", "in": "inch", "mi": "mile", "mph": "mile", "usd": "dollar",
                "$": "dollar", "¢": "cent", "bpm": "beat", "mmhg": "mmhg"}
_TAIL_WORDS = {"in", "total", "altogether", "overall", "all", "each", "per", "a", "an", "the", "of", "square",
               "sq", "cubic", "combined"}
_STOP = {"or", "and", "not", "no", "either", "between", "to", "about", "around", "approximately", "roughly",
         "nearly", "almost", "over", "under", "least", "most", "more", "less", "than", "up", "maybe", "probably"}
_LEAD_WORDS = {"the", "a", "an", "final", "answer", "total", "result", "it", "its", "is", "are", "was", "were",
               "will", "be", "so", "thus", "therefore", "hence", "we", "get", "there", "that", "this", "equals",
               "makes", "comes", "in", "all", "of", "number", "value", "amount", "sum", "she", "he", "they",
               "has", "have", "had", "needs", "need", "paid", "pays", "costs", "cost"}
_WORD_RE = re.compile(r"[A-Za-z$¢][A-Za-z]*(?:\^\{?\d\}?)?|\$")


def _stem(w: str) -> str:
    w = w.lower()
    for suffix in ("ies", "es", "s"):
        if len(w) > 3 and w.endswith(suffix):
            return w[: -len(suffix)] + ("y" if suffix == "ies" else "")
    return w


def question_vocab(question: str) -> frozenset[str]:
    """The words a question uses (stemmed, lower case), minus hedge, negation and range words:
    the units and nouns a number answer may carry."""
    words = {_stem(w) for w in re.findall(r"[A-Za-z]+", question)}
    words |= {w.lower() for w in re.findall(r"[A-Za-z]+", question)}
    if "$" in question:
        words |= {"dollar", "$"}
    return frozenset(w for w in words - _STOP if not HEDGE_RE.fullmatch(w))


def _is_unit(word: str, vocab: frozenset[str]) -> bool:
    w = re.sub(r"\^\{?\d\}?$", "", word).lower()
    if w in _TAIL_WORDS or w in ("$", "usd"):
        return True
    return _stem(w) in vocab or w in vocab or _UNIT_ABBREV.get(w, "\x00") in vocab or \
        (_UNIT_ABBREV.get(w) is not None and _stem(_UNIT_ABBREV[w]) in vocab)


# --------------------------------------------------------------------------------------
# Arithmetic restatements
# --------------------------------------------------------------------------------------


def _eval_node(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Expression):
        return _eval_node(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return Fraction(str(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval_node(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        a, b = _eval_node(node.left), _eval_node(node.right)
        ops = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b, ast.Div: lambda: a / b}
        return ops[type(node.op)]()
    raise ValueError("not arithmetic")


def arithmetic(s: str, vocab: frozenset[str]) -> Fraction | None:
    """The value of a plain arithmetic expression (``40 + 45``, ``$3 × 4``, ``12 apples / 4``;
    units the question uses are ignored), or None."""
    words = [w for w in _WORD_RE.findall(s) if w not in ("x", "X")]
    if any(not _is_unit(w, vocab) for w in words):
        return None
    expr = _WORD_RE.sub(lambda m: m.group(0) if m.group(0) in ("x", "X") else " ", s)
    expr = re.sub(r"(?<=\d),(?=\d{3})", "", expr).replace("×", "*").replace("÷", "/")
    expr = expr.replace("x", "*").replace("X", "*")
    expr = expr.strip(" .")
    if not expr or not re.fullmatch(r"[\d\s.+\-*/()]+", expr) or len(expr) > 120 or "**" in expr:
        return None
    try:
        return _eval_node(ast.parse(expr, mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, TypeError, RecursionError):
        return None


# --------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------


def _number_tails(s: str, pos: int, num: Num, vocab: frozenset[str]) -> int:
    """Consume harmless tails after a number from ``pos``; returns the new position."""
    units = 0
    while pos < len(s):
        m = re.compile(r"\s*(?:\^\{?\d\}?|/\s*(?=[A-Za-z]))").match(s, pos)
        if m and m.end() > pos and units:
            pos = m.end()
            continue
        m = re.compile(r"\s*([A-Za-z$¢][A-Za-z]*(?:\^\{?\d\}?)?)").match(s, pos)
        if m and units < 6 and _is_unit(m.group(1), vocab):
            pos, units = m.end(), units + 1
            continue
        m = re.compile(r"\s*[(\[]([^()\[\]]*)[)\]]").match(s, pos)
        if m and _harmless_bracket(m.group(1), num, vocab):
            pos = m.end()
            continue
        m = re.compile(r"\s*(?:out of|of)\s+").match(s, pos)
        if m and match_value(s[m.end():]) is not None:
            got = match_value(s[m.end():])
            pos, units = m.end() + got[1], 1
            continue
        m = re.compile(r"\s*=\s*").match(s, pos)
        if m and _same_value_at(s[m.end():], num) is not None:
            pos = m.end() + _same_value_at(s[m.end():], num)
            continue
        break
    return pos


def _same_value_at(s: str, num: Num) -> int | None:
    got = match_value(s)
    if got is not None and num.value is not None and got[0].value == num.value and got[0].percent == num.percent:
        return got[1]
    return None


def _harmless_bracket(inner: str, num: Num, vocab: frozenset[str]) -> bool:
    inner = re.sub(r"^(?:=|i\.?e\.?,?)\s*", "", inner.strip())
    if not inner:
        return True
    if all(_is_unit(w, vocab) for w in re.findall(r"\S+", inner)) and not ANY_NUMBER_RE.search(inner):
        return True
    if _same_value_at(inner, num) == len(inner):
        return True
    parts = inner.split("=")
    value = arithmetic(parts[0], vocab)
    return value is not None and num.value is not None and value == num.value and all(
        (arithmetic(p, vocab) == num.value) for p in parts[1:])


def _lead_end(s: str, vocab: frozenset[str]) -> int:
    """End of a lead (``The total is``, ``She needs``): words of the question or of a closed set."""
    pos, end = 0, 0
    for m in re.finditer(r"\s*([A-Za-z']+|:)", s):
        if m.start() != pos:
            break
        w = m.group(1).lower().strip("'")
        if w != ":" and (w not in _LEAD_WORDS and (_stem(w) not in vocab or HEDGE_RE.fullmatch(w))
                         or NUMBER_WORD_RE.fullmatch(w)):
            break
        pos = end = m.end()
    return end


def _lhs_ok(parts: list[str], value: Fraction | None, vocab: frozenset[str]) -> str | None:
    """The first left-hand side part of ``... = value`` that is neither a name (``x``, ``the
    total``) nor arithmetic equal to the value; None when all are fine."""
    for p in parts:
        words = p.strip(" :")
        if re.fullmatch(r"[A-Za-z]\w{0,2}", words) or (words and _lead_end(words, vocab) == len(words)):
            continue
        if value is not None and arithmetic(words, vocab) == value:
            continue
        return p
    return None


def number_statement(content: str, question: str) -> Statement:
    """Read a number answer statement (module docstring)."""
    vocab = question_vocab(question)
    s = clean_math(content).strip()
    s = re.sub(r"^[\s*_:\"'`]+", "", s)
    boundary = _first_boundary(s)
    clause = s[:boundary]
    lhs: list[str] = []
    if "≈" in clause:
        return Statement(None, verdict="ambiguous", why="hedge", detail="approximately equal (≈) on the answer line")
    masked = re.sub(r"\([^()]*\)|\[[^\[\]]*\]", lambda m: "#" * len(m.group(0)), clause)  # "=" in brackets
    if "=" in masked:
        cut = masked.rindex("=")
        lhs = [clause[a:b] for a, b in _spans(masked[:cut])]
        s = s[cut + 1:].lstrip()
    pos = _lead_end(s, vocab)
    plain = _plain_number(s, pos, lhs, vocab)
    if plain.verdict is not None and LATEXISH_RE.search(s[pos:pos + _first_boundary(s[pos:])]):
        latex = _latex_or_nothing(s[pos:], s, lhs, vocab)
        if latex.verdict is None:
            return latex
    return plain


def _spans(masked: str) -> list[tuple[int, int]]:
    """Start and end of each ``=``-separated part of ``masked``."""
    out, start = [], 0
    for i, ch in enumerate(masked):
        if ch == "=":
            out.append((start, i))
            start = i + 1
    return out + [(start, len(masked))]


def _plain_number(s: str, pos: int, lhs: list[str], vocab: frozenset[str]) -> Statement:
    got = match_value(s[pos:])
    if got is None:
        return classify_leftover(s[pos:], "number", None, None, None)
    num, end = got
    pos = _number_tails(s, pos + end, num, vocab)
    bad = _lhs_ok(lhs, num.value, vocab)
    if bad is not None:
        return classify_leftover(bad + " = ", "number", None, num.text, num)
    return _finish(s, pos, num.text, num, "number", None)


def _latex_or_nothing(body: str, s: str, lhs: list[str], vocab: frozenset[str]) -> Statement:
    clause = body[:_first_boundary(body)].strip(" .")
    if LATEXISH_RE.search(clause) and not re.search(r"\b(?:or|and)\b|,|;|\\pm", clause):
        stripped = re.sub(r"(?:\s+[A-Za-z]+)+\s*$", lambda m: m.group(0) if not all(
            _is_unit(w, vocab) for w in m.group(0).split()) else "", clause)
        num = latex_number(stripped)
        if num is not None and _lhs_ok(lhs, num.value, vocab) is None:
            return _finish(s, len(s) - len(body) + len(clause), num.text, num, "number", None)
    return classify_leftover(body, "number", None, None, None)


def _first_boundary(s: str, answer_type: str = "number") -> int:
    for i in range(len(s)):
        if s[i] in ".!?;,:-–—" or s[i].isspace():
            if _BOUNDARY_RE.match(s[i:]) or (answer_type == "yes_no_maybe" and _YNM_BOUNDARY_RE.match(s[i:])):
                return i
    return len(s)


def _finish(s: str, pos: int, text: str, num: Num | None, answer_type: str,
            choices: dict[str, str] | None) -> Statement:
    """After the value and its tails: the end, a boundary (the rest is read by scan_after) or a leftover."""
    left = s[pos:]
    if _PUNCT_ONLY_RE.match(left):
        return Statement(text, num)
    if left.lstrip(" *_").startswith("?"):
        return Statement(None, verdict="ambiguous", why="hedge", detail=f"a question mark after the answer ({text}?)")
    b = _BOUNDARY_RE.match(left) or (answer_type == "yes_no_maybe" and _YNM_BOUNDARY_RE.match(left))
    if b:
        return Statement(text, num, rest=left[b.end():])
    return classify_leftover(left, answer_type, choices, text, num)


def classify_leftover(left: str, answer_type: str, choices: dict[str, str] | None, text: str | None,
                      num: Num | None) -> Statement:
    """Text the grammar could not consume: ``ambiguous`` (hedge, negation or alternative word;
    a second value of the type) or ``unparsed``; the leftover is quoted in the detail."""
    shown = " ".join(left.split())[:80]
    hedge = HEDGE_RE.search(left)
    if hedge:
        return Statement(None, verdict="ambiguous", why="hedge",
                         detail=f"hedged, range, negation or alternative ({hedge.group(0).strip()!r}) "
                                f"on the answer line: {shown!r}")
    if _second_value(left, answer_type, choices):
        detail = (f"a second answer on the answer line ({text}, then {shown!r})" if text is not None
                  else f"an answer inside text the grammar cannot read: {shown!r}")
        return Statement(None, verdict="ambiguous", why="second_value", detail=detail)
    if text is None:
        return Statement(None, verdict="unparsed", why="no_value",
                         detail=f"no {answer_type.replace('_', '/')} answer in {shown!r}")
    return Statement(None, verdict="unparsed", why="leftover_text",
                     detail=f"extracted {text}, but left over: {shown!r}")


def _second_value(left: str, answer_type: str, choices: dict[str, str] | None) -> bool:
    if answer_type == "number":
        return bool(ANY_NUMBER_RE.search(left))
    if answer_type == "choice":
        return bool(choice_letters_in(left, choices))
    if answer_type == "yes_no_maybe":
        return bool(re.search(r"\b(?:yes|no|maybe)\b", left, re.IGNORECASE))
    return False


# --------------------------------------------------------------------------------------
# Labels and text
# --------------------------------------------------------------------------------------


def label_statement(content: str, answer_type: str, choices: dict[str, str] | None) -> Statement:
    """Read a choice or yes/no/maybe answer statement (module docstring)."""
    s = re.sub(r"^[\s*_:\"'`]+", "", clean_words(content))
    head = choice_head if answer_type == "choice" else ynm_head
    got = head(s, choices)
    if got is None:
        return classify_leftover(s, answer_type, choices, None, None)
    value, pos = got
    st = _finish(s, pos, value, None, answer_type, choices)
    if st.verdict is not None and answer_type == "yes_no_maybe":  # "no evidence of benefit": read it whole
        return classify_leftover(s, answer_type, choices, value, None)
    return st


def text_statement(content: str, keys: list[str]) -> Statement:
    """A free-text statement: the clause up to a sentence end, ``;`` or an explanation word,
    compared whole after :func:`normalise_free_text`; a key or alias matched word for word wins
    over the hedge check (``rock or roll``)."""
    s = clean_words(content)
    b = _first_boundary(s, "text")
    clause, rest = s[:b], s[b:]
    br = _BOUNDARY_RE.match(rest)
    norm = normalise_free_text(clause)
    if not norm:
        return Statement(None, verdict="unparsed", why="no_value", detail="empty answer")
    if norm in {normalise_free_text(k) for k in keys}:
        return Statement(norm, rest=rest[br.end():] if br else rest)
    hedge = HEDGE_RE.search(clause)
    if hedge:
        return Statement(None, verdict="ambiguous", why="hedge",
                         detail=f"hedged, negated or several answers ({hedge.group(0).strip()!r})")
    return Statement(norm, rest=rest[br.end():] if br else rest)


# --------------------------------------------------------------------------------------
# After the final answer
# --------------------------------------------------------------------------------------

_NUMBER_CLAIM_RE = re.compile(r"\b(?:is|are|was|=|equals|be|gives?|get|got|makes?|comes to|totals?|so|or|answer)\s+"
                              r"(?=[-$\d])|^\s*(?=[-$]?\d[\d,.]*\s*$)|=\s*(?=[-$\d])", re.IGNORECASE | re.MULTILINE)
_YNM_CLAIM_RE = re.compile(r"(?:^|[.!?]\s+|\bso,?\s+|\banswer (?:is|should be)\s+)(yes|no|maybe)\b(?=\s*(?:[.,!;:]|$))"
                           r"|^[ \t*_>-]*(yes|no|maybe)\b", re.IGNORECASE | re.MULTILINE)


def scan_after(after: str, answer_type: str, stmt: Statement, choices: dict[str, str] | None,
               question: str) -> Statement | None:
    """An ambiguity in the text after the final answer statement (the rest of its line and all
    later lines), or None: a correction or retraction phrase, a hedge, another marker with a
    different value, or an answer-like statement of a different value (``it is 19``, ``(C)``,
    ``No.``)."""
    if not after.strip():
        return None
    c = CORRECTION_RE.search(after)
    if c:
        return Statement(None, verdict="ambiguous", why="correction_after_answer",
                         detail=f"a correction after the final answer ({c.group(0)!r})")
    h = POST_HEDGE_RE.search(after) or QUALIFIER_RE.search(after)
    if h:
        return Statement(None, verdict="ambiguous", why="hedge_after_answer",
                         detail=f"a hedge or qualification after the final answer ({h.group(0)!r})")
    stray = _stray_value(after, answer_type, stmt, choices, question)
    if stray is not None:
        return Statement(None, verdict="ambiguous", why="other_value_after_answer",
                         detail=f"another value after the final answer ({stmt.text}, then {stray!r})")
    for other in _claims_after(after, answer_type, choices, question):
        if not _same(other, stmt, answer_type, question):
            return Statement(None, verdict="ambiguous", why="second_answer_after_final",
                             detail=f"another answer after the final one ({stmt.text}, then {other[0]})")
    return None


_ARITH_SPAN_RE = re.compile(r"\$?-?\d[\d,.]*(?:\s*[-+*/×÷x]\s*\$?\d[\d,.]*)+(?:\s*=\s*\$?-?\d[\d,.]*)?")
_LIST_NUMBER_RE = re.compile(r"^[ \t]*\d{1,2}[.)][ \t]", re.MULTILINE)


def _stray_value(after: str, answer_type: str, stmt: Statement, choices: dict[str, str] | None,
                 question: str) -> str | None:
    """A value of the type after the final answer that differs from it: any other number (not
    counting arithmetic that equals the answer, ``40 + 45`` or ``... = 85``, and list numbers),
    or any other option letter or option text; None for labels and text (their claims are read
    by :func:`_claims_after`)."""
    if answer_type == "choice":
        others = [x for x in choice_letters_in(after, choices) if x != stmt.text]
        return others[0] if others else None
    if answer_type == "yes_no_maybe":  # on the answer line itself ("yes; no effect in men")
        line = after.split("\n", 1)[0]
        others = [x.lower() for x in re.findall(r"\b(?:yes|no|maybe)\b", line, re.IGNORECASE) if x.lower() != stmt.text]
        return others[0] if others else None
    if answer_type != "number" or stmt.num is None:
        return None
    vocab = question_vocab(question)
    pq = bool(re.search(r"%|percent", question, re.IGNORECASE))

    def equal(n: Num) -> bool:
        return numbers_equal(n, stmt.num, pq) or (stmt.num.value is not None and n.value == stmt.num.value)

    def drop(m: re.Match[str]) -> str:
        parts = m.group(0).split("=")
        rhs = match_value(parts[-1].strip()) if len(parts) > 1 else None
        if (rhs is not None and equal(rhs[0])) or arithmetic(parts[0], vocab) == stmt.num.value:
            return " "
        return m.group(0)

    s = _ARITH_SPAN_RE.sub(drop, _LIST_NUMBER_RE.sub(" ", "\n".join(clean_math(x) for x in after.split("\n"))))
    for m in NUMBER_SEARCH_RE.finditer(s):
        got = match_value(m.group(0))
        if got is not None and not equal(got[0]):
            return m.group(0)
    for m in NUMBER_WORD_RE.finditer(s):  # "P.S. six" ("one" is too common a word to count)
        got = match_value(s[m.start():])
        if m.group(0).lower() != "one" and got is not None and not equal(got[0]):
            return m.group(0)
    return None


def _claims_after(after: str, answer_type: str, choices: dict[str, str] | None,
                  question: str) -> list[tuple[str, Num | None]]:
    out: list[tuple[str, Num | None]] = []
    for content, _, _ in markers(after):
        if answer_type == "number":
            num = parse_number(content)
            if num is not None:
                out.append((num.text, num))
        elif answer_type == "text":
            out.append((normalise_free_text(content), None))
        else:
            st = label_statement(content, answer_type, choices)
            if st.text is not None:
                out.append((st.text, None))
    if answer_type == "number":
        cleaned = clean_math(after) if "\n" not in after else "\n".join(clean_math(x) for x in after.split("\n"))
        for m in _NUMBER_CLAIM_RE.finditer(cleaned):
            got = match_value(cleaned[m.end():])
            if got is not None:
                out.append((got[0].text, got[0]))
    elif answer_type == "choice":
        out += [(letter, None) for letter in choice_letters_in(after, choices, explicit_only=True)]
    elif answer_type == "yes_no_maybe":
        out += [((m.group(1) or m.group(2)).lower(), None) for m in _YNM_CLAIM_RE.finditer(after)]
    return out


def _same(other: tuple[str, Num | None], stmt: Statement, answer_type: str, question: str) -> bool:
    if answer_type == "number" and other[1] is not None and stmt.num is not None:
        pq = bool(re.search(r"%|percent", question, re.IGNORECASE))
        return numbers_equal(other[1], stmt.num, pq) and numbers_equal(stmt.num, other[1], pq)
    return other[0] == stmt.text
