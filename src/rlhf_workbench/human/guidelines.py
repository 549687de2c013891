"""Annotation guidelines: a markdown file shown before an annotator's first item and on demand.

``feedback.guidelines`` names the file: a path (relative paths are read from the current
directory, like ``tasks.path``), or ``bundled:<name>`` for ``src/rlhf_workbench/data/<name>.md``
(``bundled:clinical_guidelines`` ships with the clinical config). The web app shows it in a
Guidelines tab (always there, on demand) and opens that tab instead of an item until the
annotator clicks "Start annotating".

Acknowledgement is stored per user in the database (``guidelines_acks``), keyed by the SHA-256
of the guidelines text: a user acknowledges once per version of the guidelines, on any device or
app process; when the file changes (another hash), everyone is shown it again before their next
item. The gate is the page's: the HTTP API (``/next_item``, used by scripts) is not gated.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from rlhf_workbench.store import GuidelinesAck, Store

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
MAX_BYTES = 200_000  # a guidelines page, not a book


@dataclass(frozen=True)
class Guidelines:
    """The guidelines text, where it came from and its SHA-256 (hex, of the UTF-8 text)."""

    text: str
    source: str
    sha256: str


def guidelines_path(spec: str) -> Path:
    """The file ``feedback.guidelines`` names (``bundled:<name>`` -> the package's data/<name>.md).

    Raises:
        ValueError: an empty spec, or a bundled name with a path separator.
    """
    if not spec or not spec.strip():
        raise ValueError("feedback.guidelines: empty; give a markdown file or bundled:<name>, or leave it out")
    if spec.startswith("bundled:"):
        name = spec.removeprefix("bundled:")
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(f"feedback.guidelines: {spec!r} is not a bundled name (bundled:<name>)")
        return DATA_DIR / (name if name.endswith(".md") else f"{name}.md")
    return Path(spec).expanduser()


def load_guidelines(spec: str | None) -> Guidelines | None:
    """Read the guidelines ``feedback.guidelines`` names; None when it is None.

    Raises:
        FileNotFoundError: the file does not exist (the message names ``feedback.guidelines``).
        ValueError: the file is empty, not UTF-8, or larger than :data:`MAX_BYTES`.
    """
    if spec is None:
        return None
    path = guidelines_path(spec)
    if not path.is_file():
        bundled = sorted(p.stem for p in DATA_DIR.glob("*.md") if p.stem != "README")
        raise FileNotFoundError(f"feedback.guidelines: {path} not found (from {spec!r}; bundled ones: "
                                f"{', '.join('bundled:' + b for b in bundled)})")
    raw = path.read_bytes()
    if len(raw) > MAX_BYTES:
        raise ValueError(f"feedback.guidelines: {path} has {len(raw)} bytes; at most {MAX_BYTES} are shown")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"feedback.guidelines: {path} is not UTF-8 text (byte {e.start})") from e
    if not text.strip():
        raise ValueError(f"feedback.guidelines: {path} is empty")
    return Guidelines(text=text, source=str(path), sha256=hashlib.sha256(text.encode("utf-8")).hexdigest())


def has_acknowledged(store: Store, user_id: int, guidelines: Guidelines | None) -> bool:
    """Whether the user clicked "Start" on this version of the guidelines (True without guidelines)."""
    if guidelines is None:
        return True
    with store.session() as s:
        return s.scalar(select(GuidelinesAck.id).where(GuidelinesAck.user_id == user_id,
                                                       GuidelinesAck.sha256 == guidelines.sha256)) is not None


def acknowledge(store: Store, user_id: int, guidelines: Guidelines) -> None:
    """Record that the user read this version of the guidelines (idempotent: a second click, from
    another tab or process, changes nothing)."""
    if has_acknowledged(store, user_id, guidelines):
        return
    try:
        with store.session() as s, s.begin():
            s.add(GuidelinesAck(user_id=user_id, sha256=guidelines.sha256))
    except IntegrityError:  # the same acknowledgement written concurrently
        pass
