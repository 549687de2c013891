"""Reading task and training files: bundled task sets, compressed and binary-safe line reading,
and the raw JSON records of a JSON-lines file or a ``.json`` array.

Errors are :class:`~rlhf_workbench.tasks.task.TaskFormatError` naming the file and the line;
turning records into tasks is :mod:`rlhf_workbench.tasks.loading`.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlhf_workbench.tasks.task import TaskFormatError

BUNDLED: tuple[str, ...] = ("clinical", "arithmetic")
DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def bundled_path(name: str) -> Path:
    """Path of a task file bundled with the package (``src/rlhf_workbench/data/<name>.jsonl``).

    Args:
        name: one of :data:`BUNDLED` (``"clinical"``, ``"arithmetic"``); a ``"bundled:"``
            prefix is accepted and ignored.

    Returns:
        The absolute path of the JSONL file.

    Raises:
        ValueError: ``name`` is not a bundled task set.
        FileNotFoundError: the package was installed without its data files.
    """
    name = name.removeprefix("bundled:")
    if name not in BUNDLED:
        raise ValueError(f"unknown bundled task set {name!r}; expected one of {', '.join(BUNDLED)}")
    path = DATA_DIR / f"{name}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"bundled task file missing: {path} (package data not installed?)")
    return path



def resolve_path(path: str | Path) -> Path:
    """``path`` as a :class:`~pathlib.Path`; ``"bundled:<name>"`` becomes :func:`bundled_path`'s file."""
    if isinstance(path, str) and path.startswith("bundled:"):
        return bundled_path(path)
    return Path(path)


def file_extension(path: Path) -> str:
    """The lower-cased suffix of ``path`` with a trailing ``.gz`` ignored (``"x.JSONL.gz"`` -> ``".jsonl"``)."""
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return Path(name).suffix


def _open_binary(path: Path):
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _decode(data: bytes, path: Path, line_no: int) -> str:
    """``data`` (starting at line ``line_no``, possibly spanning several lines) as UTF-8 text; a
    :class:`TaskFormatError` naming the file, line and column of the first bad byte if it is not
    (a binary file, or another encoding). A NUL byte, which no text file holds, counts as bad."""
    try:
        bad = data.index(b"\x00")
    except ValueError:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            bad = e.start
    line = line_no + data.count(b"\n", 0, bad)
    column = bad - (data.rfind(b"\n", 0, bad) + 1) + 1
    raise TaskFormatError(f"{path}: line {line}: not UTF-8 text (byte 0x{data[bad]:02x} at column {column}); "
                          "task files are UTF-8 JSON lines, JSON, CSV or parquet, not binary")


def _binary_lines(path: Path) -> Iterator[bytes]:
    """The file's raw lines; a truncated or corrupt ``.gz`` file is a :class:`TaskFormatError`."""
    try:
        with _open_binary(path) as f:
            yield from f
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise TaskFormatError(f"{path}: not a readable gzip file ({type(e).__name__}: {e})") from None


def read_text(path: Path) -> str:
    """The whole file as UTF-8 text (``.gz`` decompressed); errors name the file and line."""
    return _decode(b"".join(_binary_lines(path)), path, 1)


def parse_whole_json(path: Path) -> Any:
    """The parsed file, or ``None`` if it is not a single JSON document."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def looks_like_pubmedqa(data: dict) -> bool:
    """Whether a parsed JSON object is PubMedQA's ``{pmid: {"QUESTION", "final_decision", ...}}``."""
    first = next(iter(data.values()), None)
    return isinstance(first, dict) and "QUESTION" in first and "final_decision" in first


def iter_records(path: Path) -> Iterator[tuple[str, int, Any]]:
    """Yield ``(location, 1-based number, record)``: JSON lines (blank lines skipped), or the
    elements of a top-level JSON array in a ``.json`` file. ``location`` is ``"line N"`` or
    ``"record N"``, for error messages.

    Raises:
        TaskFormatError: malformed JSON, text that is not UTF-8, a corrupt ``.gz`` file, or a
            PubMedQA ``.json`` object (read with ``format="pubmedqa"``).
    """
    if file_extension(path) == ".json":
        data = parse_whole_json(path)
        if isinstance(data, list):
            for i, record in enumerate(data, 1):
                yield f"record {i}", i, record
            return
        if isinstance(data, dict) and looks_like_pubmedqa(data):
            raise TaskFormatError(f"{path}: line 1: this is a PubMedQA file; use format='pubmedqa'")
    for line_no, raw in enumerate(_binary_lines(path), 1):
        line = _decode(raw, path, line_no)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskFormatError(
                f"{path}: line {line_no}: malformed JSON: {e.msg} (column {e.colno})"
            ) from None
        yield f"line {line_no}", line_no, record
