"""Finding explicit answer markers (``Answer: X``, ``the answer is X``, ``\\boxed{X}``) in a
completion, and the text cleaning shared by all answer types."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

# --------------------------------------------------------------------------------------
# Marker finding
# --------------------------------------------------------------------------------------

_MARKER_RE = re.compile(
    r"(?P<boxed>\\boxed\s*\{)"
    r"|(?P<colon>\b(?:(?:the|my|our)\s+)?(?:(?:final|correct)\s+)?answer(?:\s+is)?\s*\**\s*[:：])"
    r"|(?P<phrase>\b(?:the|my|our)\s+(?:(?:final|correct|right|best)\s+)?answer\s+is\b)",
    re.IGNORECASE,
)


def match_brace(s: str, open_idx: int) -> int | None:
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


def markers(text: str) -> list[tuple[str, str, int]]:
    """All explicit markers anywhere in the text, in order of position, as ``(content, source
    label, line number)``: the lenient reading's markers, and what the strict reading looks for
    after the final answer (a later answer anywhere makes it ambiguous)."""
    matches = list(_MARKER_RE.finditer(text))
    out: list[tuple[str, str, int]] = []
    for k, m in enumerate(matches):
        next_start = matches[k + 1].start() if k + 1 < len(matches) else len(text)
        if m.group("boxed") is not None:
            open_idx = m.end() - 1
            close = match_brace(text, open_idx)
            if close is None:
                continue
            out.append((text[open_idx + 1 : close], "\\boxed{}", text.count("\n", 0, m.start())))
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
        out.append((content, label, text.count("\n", 0, m.start())))
    return out


# A marker of the strict reading starts a line: optional list bullet, quote or heading, optional
# markdown emphasis, an optional connective ("So, "), then a label and a separator.
_LINE_MARKER_RE = re.compile(
    r"^[ \t]*(?:(?:[-*+•]|\d{1,2}[.)])[ \t]+|>[ \t]*|\#{1,6}[ \t]*)?"
    r"(?P<emph>[*_]{0,3})[ \t]*"
    r"(?:(?P<conn>so|therefore|thus|hence)[ \t]*,?[ \t]+)?"
    r"(?:(?P<label>(?:(?:the|my|our)[ \t]+)?(?:final[ \t]+)?answer(?:[ \t]+(?:choice|option|letter))?)"
    r"(?:[ \t]*[*_]{0,3}[ \t]*(?P<sep>[:：]|\s[-–—](?=\s)|-(?=\s))|[ \t]+(?P<is>is)\b"
    r"|(?P<alone>[ \t]*[*_]{0,3}[ \t]*(?=\n|$)))[ \t]*[*_]{0,3}"
    r"|(?P<boxed>(?:\$\$?|\\\[|\\\()?[ \t]*(?=\\boxed\s*\{)))",
    re.IGNORECASE | re.MULTILINE,
)
_SUFFIX_MARKER_RE = re.compile(r"^(?P<body>[^\n]*?),?[ \t]*(?:that'?s[ \t]+my[ \t]+|my[ \t]+)?"
                               r"final[ \t]+answer[ \t]*[.!]?[ \t]*$",
                               re.IGNORECASE | re.MULTILINE)


_QUOTED_RE = re.compile(r"```.*?(?:```|$)|~~~.*?(?:~~~|$)|<([A-Za-z][\w-]*)\b[^>\n]*>.*?</\1\s*>", re.DOTALL)


def quoted_spans(text: str) -> list[tuple[int, int]]:
    """Spans of text that a completion quotes rather than states: fenced code blocks and
    pseudo-tag blocks (``<note>...</note>``). A marker inside one is not a marker."""
    return [m.span() for m in _QUOTED_RE.finditer(text)]


_NEXT_LINE_RE = re.compile(r"(?:[ \t]*\n)+[ \t]*([^\n]*\S[^\n]*)")


@dataclass(frozen=True)
class Marker:
    """One line-start answer marker: ``content`` is the answer statement (the rest of the line,
    or the next non-empty line when the label stands alone), ``end`` the index in the text
    where that statement ends, ``label`` how it was marked (for reasons)."""

    content: str
    label: str
    line: int
    start: int
    end: int


def line_markers(text: str) -> list[Marker]:
    """The strict reading's markers, in order: labels at the start of a line only (``Answer:``,
    ``**Final Answer:**``, ``- Answer choice:``, ``ANSWER -``, ``So the answer is``, a line that
    starts with ``\\boxed{}``) and a line ending in ``..., final answer.``."""
    out: list[Marker] = []
    quoted = quoted_spans(text)
    for m in _LINE_MARKER_RE.finditer(text):
        if m.group("label") is None and m.group("boxed") is None:
            continue
        if any(a <= m.start() < b for a, b in quoted):
            continue  # inside a code block or a pseudo-tag: quoted, not stated
        if m.group("is") and m.group("label").lower().split()[0] not in ("the", "my", "our"):
            continue  # "Answer is ..." without an article reads as a sentence, not a label
        line_end = text.find("\n", m.end())
        line_end = len(text) if line_end == -1 else line_end
        content, end = text[m.end():line_end], line_end
        if not content.strip(" \t*_:$"):
            nxt = _NEXT_LINE_RE.match(text, line_end)
            if nxt is not None:
                content, end = nxt.group(1), nxt.end()
        if not content.strip(" \t*_:$") or re.fullmatch(r"\s*\\boxed\s*\{\s*\}[\s$.]*", content):
            continue  # an empty label ("Answer:" at the end, "\\boxed{}") states nothing
        if m.group("boxed") is not None:
            label = "\\boxed{}"
        else:
            label = f"'{' '.join(m.group('label').split()).capitalize()}{' is' if m.group('is') else ':'}' line"
        out.append(Marker(content, label, text.count("\n", 0, m.start()), m.start(), end))
    for m in _SUFFIX_MARKER_RE.finditer(text):
        if any(a <= m.start() < b for a, b in quoted):
            continue
        if m.group("body").strip() and not any(k.start <= m.start() < k.end for k in out):
            out.append(Marker(m.group("body"), "'..., final answer' line", text.count("\n", 0, m.start()),
                              m.start(), m.end()))
    return sorted(out, key=lambda k: k.start)


# --------------------------------------------------------------------------------------
# Shared cleaning
# --------------------------------------------------------------------------------------

_UNWRAP_RE = re.compile(
    r"\\(?:boxed|fbox|text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{"
)


def unwrap_commands(s: str) -> str:
    r"""Replace ``\boxed{X}``, ``\text{X}`` and similar by ``X`` (balanced braces)."""
    for _ in range(50):
        m = _UNWRAP_RE.search(s)
        if m is None:
            break
        close = match_brace(s, m.end() - 1)
        if close is None:
            s = s[: m.start()] + s[m.end() :]
        else:
            s = s[: m.start()] + s[m.end() : close] + s[close + 1 :]
    return s


def clean_words(s: str) -> str:
    """Content cleaned for word-like answers: LaTeX wrappers, $, * and quotes removed."""
    s = unicodedata.normalize("NFKC", s)
    s = unwrap_commands(s)
    s = re.sub(r"\\[()\[\]]", " ", s)
    s = s.replace("$", " ").replace("*", " ").replace("`", " ")
    return " ".join(s.split())


def normalise_text(s: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed."""
    s = clean_words(s).lower()
    s = "".join(ch for ch in s if not unicodedata.category(ch).startswith("P"))
    return " ".join(s.split())


_POSSESSIVE_RE = re.compile(r"(?<=\w)['’]s\b|(?<=s)['’](?=\s|$)")
_ARTICLES_RE = re.compile(r"\b(?:a|an|the)\b")


def normalise_free_text(s: str) -> str:
    """A free-text answer's comparison form: :func:`normalise_text` after dropping possessives
    (``Graves' disease`` and ``Graves's disease`` -> ``graves disease``) and the articles
    ``a``/``an``/``the``; hyphens become spaces."""
    s = clean_words(s).lower().replace("-", " ")
    s = _POSSESSIVE_RE.sub("", s)
    return " ".join(_ARTICLES_RE.sub(" ", normalise_text(s)).split())


