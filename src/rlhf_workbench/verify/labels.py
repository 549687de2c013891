"""Label answers: multiple-choice letters (option text mapped to its letter), yes/no/maybe and
free text; parsing, the lenient fallbacks, and what makes a label answer ambiguous."""

from __future__ import annotations

import re

from .markers import clean_words, normalise_text

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
    norm_body = normalise_text(body)
    if not norm_body:
        return None
    options = {
        k.strip().upper(): normalise_text(v)
        for k, v in choices.items()
        if k.strip().upper() in valid and normalise_text(v)
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


def parse_choice(content: str, choices: dict[str, str] | None) -> str | None:
    """Read a choice letter from marker content."""
    valid = _valid_letters(choices)
    s = clean_words(content)
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
                elif choices and ch in choices and normalise_text(rest).startswith(
                    normalise_text(choices[ch])
                ):
                    letter = ch
    if letter is not None and letter in valid:
        return letter
    return _option_letter(body, choices, valid)


def last_choice(text: str, choices: dict[str, str] | None) -> str | None:
    """The last choice letter written ``(C)`` or after "option"/"answer" (the lenient fallback)."""
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


def parse_ynm(content: str) -> str | None:
    """The first yes/no/maybe in marker content (lenient reading; also reads keys)."""
    m = _YNM_RE.search(clean_words(content))
    return m.group(1).lower() if m else None


def last_ynm(text: str) -> str | None:
    """The last yes/no/maybe in the text (the lenient fallback)."""
    found = None
    for m in _YNM_RE.finditer(text):
        found = m.group(1).lower()
    return found


# --------------------------------------------------------------------------------------
# The strict grammar's heads: the value at the start of a statement
# --------------------------------------------------------------------------------------

_TOKEN_RE = re.compile(r"[A-Za-z0-9]+")
_CHOICE_LEAD = {"the", "correct", "best", "right", "final", "option", "choice", "answer", "letter", "is", "my", "it",
                "s", "its"}
_QUALIFIERS = (("correct",), ("right",), ("best",), ("most", "likely"), ("most", "probable"), ("most", "appropriate"))


def _tokens(s: str) -> list[tuple[str, int, int]]:
    return [(m.group(0), m.start(), m.end()) for m in _TOKEN_RE.finditer(s)]


def _words(s: str) -> list[str]:
    return [w.lower() for w in _TOKEN_RE.findall(clean_words(s))]


def _is_tail(low: list[str], j: int) -> int:
    """After a letter: ``is correct``, ``is the answer``, ``is the most likely cause``; the new index."""
    if j >= len(low) or low[j] != "is":
        return j
    k = j + 1 + (j + 1 < len(low) and low[j + 1] == "the")
    for q in _QUALIFIERS:
        if tuple(low[k:k + len(q)]) == q:
            k += len(q)
            return k + (len(low) == k + 1)  # one more word: "the most likely culprit"
    if k < len(low) and low[k] in ("answer", "option", "choice", "one") and k + 1 == len(low):
        return k + 1
    return j


def choice_head(s: str, choices: dict[str, str] | None) -> tuple[str, int] | None:
    """The option at the start of ``s`` and where its statement ends: a letter (``B``, ``(B)``,
    ``option B``), optionally followed by that option's own text or ``is correct``/``is the most
    likely X``; or an option's text alone. None if ``s`` does not start with one."""
    toks = _tokens(s)
    low = [t[0].lower() for t in toks]
    valid = _valid_letters(choices)
    i = 0
    while i < len(toks) - 1 and low[i] in _CHOICE_LEAD:
        i += 1
    options = {k.strip().upper(): _words(v) for k, v in (choices or {}).items() if _words(v)}
    if i < len(toks) and len(toks[i][0]) == 1 and toks[i][0].upper() in valid:
        letter, raw, j = toks[i][0].upper(), toks[i][0], i + 1
        opt = options.get(letter, [])
        skip = 1 if j < len(low) and low[j] == "the" else 0  # "B, the right coronary artery"
        if opt and low[j + skip:j + skip + len(opt)] == opt:
            j += skip + len(opt)
        nxt = s[toks[i][2]:toks[j][1]] if j < len(toks) and j == i + 1 else ""
        if j == i + 1 and j < len(toks):
            if raw.islower() and not re.match(r"^\s*[).\]:,;\-\u2013\u2014]", nxt):
                return _option_text_head(toks, low, i, options)
            if (raw in "AI" and toks[j][0][:1].islower() and low[j] not in ("is", "was")
                    and not re.match(r"^\s*[).\]:,;\-\u2013\u2014]", nxt)):
                return _option_text_head(toks, low, i, options)
        j = _is_tail(low, j)
        return letter, toks[j - 1][2]
    for start in range(i + 1):  # "Right coronary artery": the lead words may begin the option text
        got = _option_text_head(toks, low, start, options)
        if got is not None:
            return got
    return None


def _option_text_head(toks, low, i, options) -> tuple[str, int] | None:
    best = None
    for k, words in options.items():
        if low[i:i + len(words)] == words and (best is None or len(words) > len(options[best])):
            best = k
    if best is None:
        return None
    j = i + len(options[best])
    j += 1 if j < len(low) and low[j] == best.lower() else 0  # "Right coronary artery (B)"
    j = _is_tail(low, j)
    return best, toks[j - 1][2]


def ynm_head(s: str, choices: dict[str, str] | None = None) -> tuple[str, int] | None:
    """``yes``/``no``/``maybe`` at the start of ``s`` (after ``the answer is``) and its end."""
    m = re.match(r"\s*(?:(?:the\s+)?(?:final\s+)?answer\s+is\s+|it\s+is\s+)?(yes|no|maybe)\b", s, re.IGNORECASE)
    return (m.group(1).lower(), m.end()) if m else None


_LETTER_TOKEN_RE = re.compile(r"(?<![A-Za-z0-9'])\(?([A-Z])\)?(?![A-Za-z0-9'])")
_EXPLICIT_LETTER_RE = re.compile(
    r"\(([A-Z])\)|\b(?i:option|choice|answer|letter)\s+(?i:is\s+)?\(?([A-Z])\b(?!\s+[a-z])"
    r"|^[ \t*]*\(?([A-Z])\)?[.)]?[ \t*]*$|\b([A-Z])\s+is\s+(?:the\s+)?(?:correct|right|best|answer)\b",
    re.MULTILINE,
)


def choice_letters_in(text: str, choices: dict[str, str] | None, explicit_only: bool = False) -> list[str]:
    """Options named in ``text``: letters (an article ``A`` or pronoun ``I`` before a lower-case
    word does not count) and option texts (the longest when one contains another); with
    ``explicit_only``, only answer-like letters (``(C)``, ``option C``, ``C is correct``, a
    line holding only a letter)."""
    valid = _valid_letters(choices)
    found: list[str] = []
    if explicit_only:
        for m in _EXPLICIT_LETTER_RE.finditer(text):
            ch = next(g for g in m.groups() if g)
            if ch in valid and ch not in found:
                found.append(ch)
        return found
    clause = clean_words(text)
    for m in _LETTER_TOKEN_RE.finditer(clause):
        ch = m.group(1)
        if ch in ("A", "I") and re.match(r"\s+[a-z]", clause[m.end():]):
            continue
        if ch in valid and ch not in found:
            found.append(ch)
    norm = " " + " ".join(_words(clause)) + " "
    options = {k.strip().upper(): " ".join(_words(v)) for k, v in (choices or {}).items() if _words(v)}
    for k, v in options.items():
        if f" {v} " in norm and not any(v != w and f" {v} " in f" {w} " and f" {w} " in norm for w in options.values()):
            if k not in found:
                found.append(k)
    return found
