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
    m = _YNM_RE.search(clean_words(content))
    return m.group(1).lower() if m else None


def last_ynm(text: str) -> str | None:
    found = None
    for m in _YNM_RE.finditer(text):
        found = m.group(1).lower()
    return found


# --------------------------------------------------------------------------------------
# Ambiguity
# --------------------------------------------------------------------------------------

_LABEL_CLAUSE_END_RE = re.compile(r"\.(?=\s|$)|;|\n|\s(?:because|since|as|given|which)\s", re.IGNORECASE)
_UNSURE = (r"either|perhaps|probably|possibly|(?<!most )likely|unlikely|unsure|uncertain|unclear|unknown|i think|i guess|"
           r"i believe|not sure|not certain|not clear|cannot be determined|cannot say|cant say|cant tell|could be|"
           r"might be|may be")
_NEGATION_OR_ALTERNATIVE = r"not|never|neither|nor|except|or|and|cannot|cant|isnt|doesnt|dont"
_WORD_HEDGE_RE = re.compile(rf"\b(?:{_UNSURE}|{_NEGATION_OR_ALTERNATIVE}|maybe)\b")
# yes/no explanations negate naturally ("no, it does not reduce mortality"): only a negated label
# or an unsure word makes a yes/no/maybe answer ambiguous.
_YNM_HEDGE_RE = re.compile(rf"\b(?:{_UNSURE}|not (?:a )?(?:yes|no|maybe))\b")
_LETTER_TOKEN_RE = re.compile(r"(?<![A-Za-z0-9'])\(?([A-Z])\)?(?![A-Za-z0-9'])")


def label_clause(content: str) -> str:
    """The answering clause of an answer line: up to the first sentence end, ``;`` or
    explanation ("because", "since", ...); the whole content if that would leave nothing."""
    m = _LABEL_CLAUSE_END_RE.search(content)
    return content[: m.start()] if m and content[: m.start()].strip(" *:") else content


def choice_ambiguity(content: str, choices: dict[str, str] | None) -> str | None:
    """Why the choice stated in ``content`` is ambiguous, or None.

    Ambiguous: two different option letters (``B or D``, ``B and C``, ``B, not C``), the texts
    of two different options, or a hedge or negation (``not``, ``either``, ``or``, ``probably``,
    ``I think``) in the answering clause once the options' own texts are removed from it.
    """
    clause = clean_words(label_clause(content))
    valid = _valid_letters(choices)
    letters = []
    for m in _LETTER_TOKEN_RE.finditer(clause):
        ch = m.group(1)
        if ch in ("A", "I") and re.match(r"\s+[a-z]", clause[m.end():]):
            continue  # the article "A patient..." or the pronoun "I think"
        if ch in valid and ch not in letters:
            letters.append(ch)
    norm = f" {normalise_text(clause)} "
    options = {k.strip().upper(): normalise_text(v) for k, v in (choices or {}).items() if normalise_text(v)}
    named = [k for k, v in options.items() if f" {v} " in norm
             and not any(v != w and f" {v} " in f" {w} " and f" {w} " in norm for w in options.values())]
    for k in named:
        if k not in letters:
            letters.append(k)
    if len(set(letters)) > 1:
        return f"{len(set(letters))} options on the answer line ({', '.join(letters)})"
    for v in sorted(options.values(), key=len, reverse=True):
        norm = norm.replace(f" {v} ", " ")
    hedge = _WORD_HEDGE_RE.search(norm)
    if hedge:
        return f"hedged or negated answer line ({hedge.group(0)!r})"
    return None


def ynm_ambiguity(content: str) -> str | None:
    """Why the yes/no/maybe label in ``content`` is ambiguous, or None: two different labels in
    the answering clause (``yes or no``; ``no difference..., so yes``), or a hedge or negation
    (``not``, ``either``, ``probably``, ``I think``)."""
    norm = " ".join(re.sub(r"[^\w\s]", " ", clean_words(label_clause(content)).lower()).split())  # yes/no -> yes no
    labels = sorted(set(_YNM_RE.findall(norm)))
    if len(labels) > 1:
        return f"{len(labels)} labels on the answer line ({', '.join(labels)})"
    hedge = _YNM_HEDGE_RE.search(norm)
    if hedge:
        return f"hedged or negated answer line ({hedge.group(0)!r})"
    return None


def text_ambiguity(content: str) -> str | None:
    """Why a free-text answer is ambiguous, or None: alternatives, hedges or negations
    (``or``, ``either``, ``not``, ``probably``, ``maybe``) on the answer line."""
    hedge = _WORD_HEDGE_RE.search(normalise_text(content))
    return f"hedged, negated or several answers ({hedge.group(0)!r})" if hedge else None
