"""Finding explicit answer markers (``Answer: X``, ``the answer is X``, ``\\boxed{X}``) in a
completion, and the text cleaning shared by all answer types."""

from __future__ import annotations

import re
import unicodedata

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
    """All explicit markers in order of position, as ``(content, source label, line number)``;
    the line number (0-based) is that of the marker itself."""
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


