"""Task items: a question with a known answer, and loaders for task files.

A :class:`Task` is what the loop samples reasoning traces for and what the verifier
checks them against. Loaders turn JSONL files, GSM8K, PubMedQA, multiple-choice files
and anything ``datasets`` reads from local files into tasks; bad input raises
:class:`TaskFormatError` naming the file, line and field, before anything is stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

AnswerType = Literal["number", "choice", "yes_no_maybe", "text", "open"]
MAX_TASK_ID_LENGTH = 200  # characters; the size of the database's task id column (store.TaskRow.id)
ANSWER_TYPES: tuple[str, ...] = ("number", "choice", "yes_no_maybe", "text", "open")


class TaskFormatError(ValueError):
    """Bad task input. The message names the file, the 1-based line (or record) and the field."""


@dataclass(frozen=True)
class Task:
    """One question with a ground-truth answer.

    Attributes:
        id: stable identifier, unique within a task set (used as the database key).
        question: the question text shown to the policy.
        answer: ground truth: a number ("1,234.5"), a choice letter ("C"), "yes"/"no"/"maybe",
            or free text compared after normalisation; ``""`` for an open task.
        answer_type: how the verifier extracts and compares the answer; ``"open"``: no answer
            key, nothing to verify (see :mod:`rlhf_workbench.open_tasks`).
        context: optional passage (e.g. PubMedQA abstract) shown before the question.
        choices: optional multiple-choice options, letter -> option text, in display order.
        metadata: free-form extra fields kept from the source record (open tasks: ``messages``,
            a multi-turn prompt; HH-RLHF: also ``chosen``/``rejected`` final replies).
        instruction: overrides the answer-type's default final-answer instruction in :meth:`prompt`
            (set from the run config's ``tasks.instruction``).
    """

    id: str
    question: str
    answer: str
    answer_type: AnswerType = "number"
    context: str | None = None
    choices: dict[str, str] | None = None
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    instruction: str | None = None

    def prompt(self) -> str:
        """The user message sent to the policy: context, question, options and the
        instruction for the final answer line (``Answer: <...>``) that the verifier reads."""
        parts = []
        if self.context:
            parts.append(f"Context: {self.context}")
        parts.append(self.question if not self.context else f"Question: {self.question}")
        if self.choices:
            parts.append("\n".join(f"{k}. {v}" for k, v in self.choices.items()))
        # an open task has no final answer to ask for: the run's final-answer instruction is not added
        instruction = "" if self.answer_type == "open" else self.instruction or ANSWER_INSTRUCTIONS[self.answer_type]
        if instruction:
            parts.append(instruction)
        return "\n\n".join(parts)

    @property
    def is_open(self) -> bool:
        """True for an open-ended task (no answer key: ranked, never verified)."""
        return self.answer_type == "open"

    def chat_messages(self) -> list[dict[str, str]]:
        """The conversation the policy continues as the assistant: ``metadata["messages"]`` as
        given for a multi-turn open task, else one user turn holding :meth:`prompt`."""
        messages = self.metadata.get("messages")
        if messages:
            return [dict(m) for m in messages]
        return [{"role": "user", "content": self.prompt()}]

    def transcript(self) -> str:
        """The prompt as plain text for scorers (reward model, LLM judge, exports): :meth:`prompt`
        for a single user turn; a multi-turn conversation as ``"User: ...\n\nAssistant: ..."``
        turns (``System:`` too), ending with the user's last turn."""
        messages = self.metadata.get("messages")
        if not messages:
            return self.prompt()
        return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


ANSWER_INSTRUCTIONS: dict[str, str] = {
    "number": "Think step by step, then end with a line 'Answer: <number>'.",
    "choice": "Think step by step, then end with a line 'Answer: <letter>'.",
    "yes_no_maybe": "Think step by step, then end with a line 'Answer: yes', 'Answer: no' or 'Answer: maybe'.",
    "text": "Think step by step, then end with a line 'Answer: <answer>'.",
    "open": "",
}


# --------------------------------------------------------------------------------------
# Loaders, splitting and the bundled task sets
# --------------------------------------------------------------------------------------

import csv  # noqa: E402
import gzip  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import string  # noqa: E402
import tempfile  # noqa: E402
import zlib  # noqa: E402
from collections.abc import Iterable, Iterator, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

FORMATS: tuple[str, ...] = ("auto", "jsonl", "gsm8k", "pubmedqa", "mcq", "hf", "hh")
BUNDLED: tuple[str, ...] = ("clinical", "arithmetic")
DATA_DIR = Path(__file__).resolve().parent / "data"
YES_NO_MAYBE: tuple[str, ...] = ("yes", "no", "maybe")

_LETTERS = string.ascii_uppercase
_NUMBER_RE = re.compile(r"^[+-]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)$")
_FRACTION_RE = re.compile(r"^[+-]?\d+/\d+$")
_HF_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


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


def load_tasks(path: str | Path, format: str = "auto", limit: int | None = None) -> list[Task]:
    """Load and validate tasks from a file.

    Formats:
        ``"jsonl"``: one JSON object per line in this project's schema: ``id``, ``question``
        (alias ``prompt``) and ``answer`` required; ``answer_type`` (default ``"choice"``
        when ``choices`` is given, else ``"number"``), ``context``, ``choices`` (dict
        letter -> text, or a list of texts lettered A, B, C, ...) and ``metadata`` optional.
        A ``.json`` file holding a JSON array of such objects is read too.
        ``"gsm8k"``: records ``{"question", "answer"}`` whose final answer follows ``####``;
        ids are ``gsm8k-<line>``, the worked solution goes to ``metadata["solution"]``.
        ``"pubmedqa"``: the PubMedQA labelled JSON object (PMID -> record with ``QUESTION``,
        ``CONTEXTS``, ``final_decision``); ids are ``pubmedqa-<pmid>``.
        ``"mcq"``: records with ``question``, ``options`` (or ``choices``; list or dict) and
        ``answer`` given as a letter, a 0-based index or the option text; ids are the
        record's ``id`` or ``mcq-<line>``.
        ``"hf"``: local csv/tsv/json/jsonl/parquet read with ``datasets.load_dataset``, rows
        mapped with the jsonl schema (``choices``/``metadata``/``messages`` cells may hold JSON text).
        ``"hh"``: HH-RLHF pairs (``chosen``/``rejected`` transcripts) as open multi-turn prompts.
        Open tasks (no answer key): a jsonl/hf record with ``answer_type: "open"``, or with
        ``prompt``/``messages`` and no ``answer`` (see :mod:`rlhf_workbench.open_tasks`).
        ``"auto"``: picks one of the above by looking at the file (see :func:`detect_format`).

    Number answers are returned in canonical form (thousands separators removed, so
    ``"1,234"`` becomes ``"1234"``); yes/no/maybe answers are lower-cased.

    Args:
        path: the file (``.gz`` compressed files are read transparently), or
            ``"bundled:<name>"`` for a bundled task set (see :func:`bundled_path`).
        format: one of :data:`FORMATS`.
        limit: keep only the first ``limit`` tasks (records after them are not read).

    Returns:
        The tasks, in file order, all validated (unique ids, known answer types, answers
        consistent with their type).

    Raises:
        TaskFormatError: malformed JSON, a missing or invalid field, an answer that does not
            fit its type, a duplicate id, or no tasks at all; the message names the file,
            the 1-based line (``record '<pmid>'`` for PubMedQA, ``row N`` for ``hf``) and
            the field.
        FileNotFoundError: the file does not exist.
        ValueError: unknown ``format`` or a ``limit`` below 1.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown task format {format!r}; expected one of {', '.join(FORMATS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    path = _resolve(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path}")
    if format == "auto":
        format = detect_format(path)

    if format == "pubmedqa":
        tasks = _load_pubmedqa(path, limit)
    elif format == "hf":
        tasks = _load_hf(path, limit)
    else:
        from .open_tasks import hh_task_from_record

        convert = {"jsonl": _from_schema, "gsm8k": _from_gsm8k, "mcq": _from_mcq, "hh": hh_task_from_record}[format]
        tasks = []
        seen: dict[str, str] = {}
        for loc, line_no, record in _iter_records(path):
            task = convert(record, path, loc, line_no)
            _check_unique(task, seen, path, loc)
            tasks.append(task)
            if limit is not None and len(tasks) >= limit:
                break
    if not tasks:
        raise TaskFormatError(f"{path}: no tasks found (empty file)")
    return tasks


def detect_format(path: str | Path) -> str:
    """Guess the format of a task file, as ``load_tasks(format="auto")`` does.

    ``.csv``/``.tsv``/``.parquet`` -> ``"hf"``; a ``.json`` object shaped like PubMedQA ->
    ``"pubmedqa"``; otherwise the first record decides: HH-RLHF ``chosen``/``rejected``
    transcripts -> ``"hh"``; ``"####"`` in its answer ->
    ``"gsm8k"``; an ``options`` field, or ``choices`` without an ``id`` -> ``"mcq"``;
    anything else -> ``"jsonl"``.

    Args:
        path: the file (``.gz`` allowed) or ``"bundled:<name>"``.

    Returns:
        One of ``"hf"``, ``"pubmedqa"``, ``"hh"``, ``"gsm8k"``, ``"mcq"``, ``"jsonl"``.

    Raises:
        TaskFormatError: the first record is malformed JSON.
        FileNotFoundError: the file does not exist.
    """
    path = _resolve(path)
    ext = _ext(path)
    if ext in (".csv", ".tsv", ".parquet"):
        return "hf"
    if ext == ".json":
        data = _parse_whole_json(path)
        if isinstance(data, dict) and _looks_like_pubmedqa(data):
            return "pubmedqa"
    first = next(iter(_iter_records(path)), None)
    if first is None or not isinstance(first[2], dict):
        return "jsonl"
    record = first[2]
    from .open_tasks import looks_like_hh

    if looks_like_hh(record):
        return "hh"
    if "####" in str(record.get("answer", "")):
        return "gsm8k"
    if "options" in record or ("choices" in record and "id" not in record):
        return "mcq"
    return "jsonl"


def split_tasks(
    tasks: Sequence[Task],
    heldout_fraction: float | None = None,
    heldout_size: int | None = None,
    seed: int = 0,
) -> tuple[list[Task], list[Task]]:
    """Split tasks into train and held-out sets, deterministically.

    A task whose ``metadata["split"]`` is ``"train"`` or ``"heldout"`` goes there. The other
    ("free") tasks are ranked by ``sha256(f"{seed}:{id}")`` (stable across runs, machines and
    Python versions) and the first ``heldout_size`` of them, or ``round(heldout_fraction *
    number of free tasks)``, are held out; with neither given all free tasks go to train.
    Input order is preserved within each list.

    Args:
        tasks: the tasks (ids are expected to be unique).
        heldout_fraction: fraction in [0, 1] of the free tasks to hold out.
        heldout_size: number of free tasks to hold out (0 .. number of free tasks).
        seed: changes which free tasks are held out.

    Returns:
        ``(train, heldout)``, disjoint, together containing every task once.

    Raises:
        ValueError: both ``heldout_fraction`` and ``heldout_size`` given, or either out of
            range.
    """
    if heldout_fraction is not None and heldout_size is not None:
        raise ValueError("give heldout_fraction or heldout_size, not both")
    if heldout_fraction is not None and not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
    free = [t for t in tasks if t.metadata.get("split") not in ("train", "heldout")]
    if heldout_size is not None:
        if not 0 <= heldout_size <= len(free):
            raise ValueError(f"heldout_size must be in [0, {len(free)}] (tasks without a fixed split), got {heldout_size}")
        n_heldout = heldout_size
    elif heldout_fraction is not None:
        n_heldout = math.floor(heldout_fraction * len(free) + 0.5)
    else:
        n_heldout = 0
    ranked = sorted(free, key=lambda t: (hashlib.sha256(f"{seed}:{t.id}".encode()).hexdigest(), t.id))
    heldout_ids = {t.id for t in ranked[:n_heldout]}
    train, heldout = [], []
    for t in tasks:
        split = t.metadata.get("split")
        if split == "heldout" or (split != "train" and t.id in heldout_ids):
            heldout.append(t)
        else:
            train.append(t)
    return train, heldout


def generate_arithmetic(n: int = 1000, seed: int = 1234, heldout: int = 128) -> list[Task]:
    """Generate two-digit addition tasks ("What is 47 + 38?"), as in the bundled set.

    ``a`` and ``b`` are drawn uniformly from 10..99 with ``random.Random(seed)``; a pair whose
    question text was already generated is dropped and drawn again, so every question is
    unique. The first ``n - heldout`` tasks get ``metadata["split"] = "train"``, the last
    ``heldout`` get ``"heldout"``; a held-out draw whose commuted twin (``b + a``) is in train
    is dropped too, so no held-out sum is seen in training in either order. Metadata also
    holds ``a`` and ``b``. Ids are ``add-0000``, ``add-0001``...

    Args:
        n: number of tasks (1 .. 8100, the number of distinct pairs).
        seed: random seed.
        heldout: number of tasks (taken from the end) in the held-out split.

    Returns:
        ``n`` tasks with ``answer_type="number"`` and the sum as the answer string.

    Raises:
        ValueError: ``n`` or ``heldout`` out of range.
    """
    if not 1 <= n <= 90 * 90:
        raise ValueError(f"n must be in [1, 8100], got {n}")
    if not 0 <= heldout <= n:
        raise ValueError(f"heldout must be in [0, {n}], got {heldout}")
    rng = random.Random(seed)
    width = max(4, len(str(n - 1)))
    seen: set[str] = set()
    train_pairs: set[tuple[int, int]] = set()
    tasks: list[Task] = []
    while len(tasks) < n:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        question = f"What is {a} + {b}?"
        i = len(tasks)
        split = "train" if i < n - heldout else "heldout"
        if question in seen or (split == "heldout" and (min(a, b), max(a, b)) in train_pairs):
            continue
        seen.add(question)
        if split == "train":
            train_pairs.add((min(a, b), max(a, b)))
        tasks.append(
            Task(
                id=f"add-{i:0{width}d}",
                question=question,
                answer=str(a + b),
                answer_type="number",
                metadata={"split": split, "a": a, "b": b},
            )
        )
    return tasks


def task_to_record(task: Task) -> dict[str, Any]:
    """The JSON object for ``task`` in the ``jsonl`` schema (``None``/empty fields left out).

    Args:
        task: the task.

    Returns:
        A dict with ``id``, ``question``, ``answer``, ``answer_type`` and, when set,
        ``context``, ``choices`` and ``metadata``; ``load_tasks`` reads it back unchanged.
    """
    record: dict[str, Any] = {
        "id": task.id,
        "question": task.question,
        "answer": task.answer,
        "answer_type": task.answer_type,
    }
    if task.context is not None:
        record["context"] = task.context
    if task.choices is not None:
        record["choices"] = dict(task.choices)
    if task.metadata:
        record["metadata"] = dict(task.metadata)
    if task.is_open:
        del record["answer"]
    return record


def save_tasks(tasks: Iterable[Task], path: str | Path) -> Path:
    """Write tasks as JSONL in the ``jsonl`` schema (gzip-compressed if the name ends in ``.gz``).

    Args:
        tasks: the tasks to write.
        path: destination file; parent directories are created.

    Returns:
        The path written.

    Raises:
        OSError: the file cannot be written.
        TypeError: a task's metadata is not JSON-serialisable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(task_to_record(t), ensure_ascii=False) + "\n" for t in tasks]
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8", newline="\n") as f:
        f.writelines(lines)
    return path


# ---- internals -----------------------------------------------------------------------


def _resolve(path: str | Path) -> Path:
    if isinstance(path, str) and path.startswith("bundled:"):
        return bundled_path(path)
    return Path(path)


def _ext(path: Path) -> str:
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


def _read_text(path: Path) -> str:
    """The whole file as UTF-8 text (``.gz`` decompressed); errors name the file and line."""
    return _decode(b"".join(_binary_lines(path)), path, 1)


def _parse_whole_json(path: Path) -> Any:
    """The parsed file, or ``None`` if it is not a single JSON document."""
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _looks_like_pubmedqa(data: dict) -> bool:
    first = next(iter(data.values()), None)
    return isinstance(first, dict) and "QUESTION" in first and "final_decision" in first


def _iter_records(path: Path) -> Iterator[tuple[str, int, Any]]:
    """Yield ``(location, 1-based number, record)``: JSON lines (blank lines skipped), or the
    elements of a top-level JSON array in a ``.json`` file."""
    if _ext(path) == ".json":
        data = _parse_whole_json(path)
        if isinstance(data, list):
            for i, record in enumerate(data, 1):
                yield f"record {i}", i, record
            return
        if isinstance(data, dict) and _looks_like_pubmedqa(data):
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


def _err(path: Path, loc: str, field_name: str, problem: str) -> TaskFormatError:
    return TaskFormatError(f"{path}: {loc}: field '{field_name}': {problem}")


def _check_unique(task: Task, seen: dict[str, str], path: Path, loc: str) -> None:
    if task.id in seen:
        raise _err(path, loc, "id", f"duplicate id {task.id!r} (first at {seen[task.id]})")
    seen[task.id] = loc


def _require_object(record: Any, path: Path, loc: str) -> dict:
    if not isinstance(record, dict):
        raise TaskFormatError(f"{path}: {loc}: expected a JSON object, got {type(record).__name__}")
    return record


def _text_field(record: dict, names: Sequence[str], path: Path, loc: str, required: bool = True) -> str | None:
    for name in names:
        if name in record and record[name] is not None:
            value = record[name]
            if not isinstance(value, str) or not value.strip():
                raise _err(path, loc, name, "must be a non-empty string")
            return value
    if required:
        raise _err(path, loc, names[0], "missing required field")
    return None


def _id_field(record: dict, path: Path, loc: str) -> str:
    if "id" not in record or record["id"] is None:
        raise _err(path, loc, "id", "missing required field")
    value = record["id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise _err(path, loc, "id", "must be a non-empty string or an integer")
    return _check_id_length(str(value).strip(), path, loc)


def _check_id_length(task_id: str, path: Path, loc: str) -> str:
    """``task_id``, or a :class:`TaskFormatError` when it exceeds :data:`MAX_TASK_ID_LENGTH` (the
    database column's size: PostgreSQL refuses longer ids, SQLite would store them)."""
    if len(task_id) > MAX_TASK_ID_LENGTH:
        raise _err(path, loc, "id", f"{len(task_id)} characters long; at most {MAX_TASK_ID_LENGTH} are allowed")
    return task_id


def _raw_answer(record: dict, path: Path, loc: str) -> Any:
    if "answer" not in record or record["answer"] is None:
        raise _err(path, loc, "answer", "missing required field")
    value = record["answer"]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _err(path, loc, "answer", f"must be a string or a number, got {type(value).__name__}")
    return value


def _number(value: Any) -> str | None:
    """Canonical number string (``"1,234"`` -> ``"1234"``), or ``None`` if not a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    text = str(value).strip()
    if _NUMBER_RE.match(text):
        return text.replace(",", "").lstrip("+")
    if _FRACTION_RE.match(text):
        return text.lstrip("+")
    return None


def _choices(value: Any, path: Path, loc: str, field_name: str) -> dict[str, str]:
    if isinstance(value, list):
        if not value:
            raise _err(path, loc, field_name, "must not be empty")
        if len(value) > len(_LETTERS):
            raise _err(path, loc, field_name, f"at most {len(_LETTERS)} options supported")
        if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) and str(v).strip() for v in value):
            raise _err(path, loc, field_name, "options must be non-empty strings")
        return {_LETTERS[i]: str(v) for i, v in enumerate(value)}
    if isinstance(value, dict):
        if not value:
            raise _err(path, loc, field_name, "must not be empty")
        out: dict[str, str] = {}
        for k, v in value.items():
            if not str(k).strip():
                raise _err(path, loc, field_name, "option letters must be non-empty")
            if isinstance(v, bool) or not isinstance(v, (str, int, float)) or not str(v).strip():
                raise _err(path, loc, field_name, f"option {k!r} must be a non-empty string")
            out[str(k).strip()] = str(v)
        return out
    raise _err(path, loc, field_name, f"must be a list or an object, got {type(value).__name__}")


def _letter(answer: str, choices: dict[str, str]) -> str | None:
    text = answer.strip()
    if text in choices:
        return text
    if text.upper() in choices:
        return text.upper()
    return None


def _validated_answer(raw: Any, answer_type: str, choices: dict[str, str] | None, path: Path, loc: str) -> str:
    if answer_type == "number":
        value = _number(raw)
        if value is None:
            raise _err(path, loc, "answer", f"answer_type is 'number' but {raw!r} is not a number")
        return value
    text = str(raw).strip()
    if not text:
        raise _err(path, loc, "answer", "must not be empty")
    if answer_type == "choice":
        if not choices:
            raise _err(path, loc, "choices", "answer_type is 'choice' but no choices are given")
        letter = _letter(text, choices)
        if letter is None:
            raise _err(path, loc, "answer", f"{raw!r} is not one of the choice letters {', '.join(choices)}")
        return letter
    if answer_type == "yes_no_maybe":
        if text.lower() not in YES_NO_MAYBE:
            raise _err(path, loc, "answer", f"{raw!r} is not yes, no or maybe")
        return text.lower()
    return text


def _from_schema(record: Any, path: Path, loc: str, line_no: int) -> Task:
    record = _require_object(record, path, loc)
    from .open_tasks import is_open_record, open_task_from_record

    if is_open_record(record):
        return open_task_from_record(record, path, loc, line_no)
    task_id = _id_field(record, path, loc)
    question = _text_field(record, ("question", "prompt"), path, loc)
    raw = _raw_answer(record, path, loc)
    choices = None
    if record.get("choices") is not None:
        choices = _choices(record["choices"], path, loc, "choices")
    answer_type = record.get("answer_type")
    if answer_type is None:
        answer_type = "choice" if choices else "number"
    if answer_type not in ANSWER_TYPES:
        raise _err(path, loc, "answer_type", f"{answer_type!r} is not one of {', '.join(ANSWER_TYPES)}")
    context = _text_field(record, ("context",), path, loc, required=False)
    metadata = record.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise _err(path, loc, "metadata", f"must be an object, got {type(metadata).__name__}")
    answer = _validated_answer(raw, answer_type, choices, path, loc)
    return Task(task_id, question, answer, answer_type, context, choices, dict(metadata))


def _from_gsm8k(record: Any, path: Path, loc: str, line_no: int) -> Task:
    record = _require_object(record, path, loc)
    question = _text_field(record, ("question",), path, loc)
    full = _raw_answer(record, path, loc)
    if not isinstance(full, str) or "####" not in full:
        raise _err(path, loc, "answer", "GSM8K answer has no '#### <final answer>' line")
    solution, _, final = full.rpartition("####")
    answer = _number(final)
    if answer is None:
        raise _err(path, loc, "answer", f"final answer {final.strip()!r} after '####' is not a number")
    return Task(f"gsm8k-{line_no}", question, answer, "number", metadata={"solution": solution.strip()})


_MCQ_FIELDS = {"id", "question", "prompt", "options", "choices", "answer", "context", "metadata"}


def _from_mcq(record: Any, path: Path, loc: str, line_no: int) -> Task:
    record = _require_object(record, path, loc)
    task_id = _id_field(record, path, loc) if record.get("id") is not None else f"mcq-{line_no}"
    question = _text_field(record, ("question", "prompt"), path, loc)
    options_field = "options" if record.get("options") is not None else "choices"
    if record.get(options_field) is None:
        raise _err(path, loc, "options", "missing required field (options or choices)")
    choices = _choices(record[options_field], path, loc, options_field)
    raw = _raw_answer(record, path, loc)
    letters = list(choices)
    letter: str | None = None
    if isinstance(raw, int):
        if not 0 <= raw < len(letters):
            raise _err(path, loc, "answer", f"index {raw} out of range for {len(letters)} options")
        letter = letters[raw]
    elif isinstance(raw, float):
        raise _err(path, loc, "answer", f"{raw!r} is not a letter, an index or an option text")
    else:
        letter = _letter(raw, choices)
        if letter is None:
            wanted = " ".join(raw.split()).casefold()
            matches = [k for k, v in choices.items() if " ".join(v.split()).casefold() == wanted]
            if len(matches) == 1:
                letter = matches[0]
            elif raw.strip().isdigit() and int(raw) < len(letters):
                letter = letters[int(raw)]
        if letter is None:
            raise _err(path, loc, "answer", f"{raw!r} is not a choice letter, an index or one of the option texts")
    context = _text_field(record, ("context",), path, loc, required=False)
    metadata = record.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise _err(path, loc, "metadata", f"must be an object, got {type(metadata).__name__}")
    metadata = {**{k: v for k, v in record.items() if k not in _MCQ_FIELDS}, **metadata}
    return Task(task_id, question, letter, "choice", context, choices, metadata)


def _load_pubmedqa(path: Path, limit: int | None) -> list[Task]:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TaskFormatError(f"{path}: line {e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(data, dict):
        raise TaskFormatError(f"{path}: line 1: expected a JSON object mapping PMID -> record")
    tasks: list[Task] = []
    for pmid, record in data.items():
        loc = f"record {pmid!r}"
        record = _require_object(record, path, loc)
        question = _text_field(record, ("QUESTION",), path, loc)
        contexts = record.get("CONTEXTS")
        if contexts is None:
            raise _err(path, loc, "CONTEXTS", "missing required field")
        if (
            not isinstance(contexts, list)
            or not contexts
            or not all(isinstance(c, str) for c in contexts)
            or not "".join(contexts).strip()
        ):
            raise _err(path, loc, "CONTEXTS", "must be a non-empty list of strings")
        decision = record.get("final_decision")
        if decision is None:
            raise _err(path, loc, "final_decision", "missing required field")
        if not isinstance(decision, str) or decision.strip().lower() not in YES_NO_MAYBE:
            raise _err(path, loc, "final_decision", f"{decision!r} is not yes, no or maybe")
        metadata: dict[str, Any] = {"pmid": str(pmid)}
        for key, name in (("LONG_ANSWER", "long_answer"), ("LABELS", "labels"), ("MESHES", "meshes"), ("YEAR", "year")):
            if record.get(key) is not None:
                metadata[name] = record[key]
        context = "\n".join(c.strip() for c in contexts if c.strip())
        _check_id_length(f"pubmedqa-{pmid}", path, loc)
        tasks.append(Task(f"pubmedqa-{pmid}", question, decision.strip().lower(), "yes_no_maybe", context, None, metadata))
        if limit is not None and len(tasks) >= limit:
            break
    return tasks


def _load_hf(path: Path, limit: int | None) -> list[Task]:
    ext = _ext(path)
    builder = _HF_BUILDERS.get(ext)
    if builder is None:
        raise TaskFormatError(f"{path}: line 1: format 'hf' reads {', '.join(_HF_BUILDERS)} files, not {ext or 'no extension'!r}")
    import datasets  # slow import: only when needed

    kwargs: dict[str, Any] = {}
    if builder == "csv":
        # read every column as text: keeps ids like "001" and answers like "1,234" as written
        sep = "\t" if ext == ".tsv" else ","
        header = next(csv.reader(io.StringIO(_read_text(path)), delimiter=sep), None)
        if not header:
            raise TaskFormatError(f"{path}: no tasks found (empty file)")
        kwargs["sep"] = sep
        kwargs["features"] = datasets.Features({name: datasets.Value("string") for name in header})
    bars = datasets.is_progress_bar_enabled()
    with tempfile.TemporaryDirectory(prefix="rlhf-hf-") as cache_dir:
        try:
            datasets.disable_progress_bars()
            ds = datasets.load_dataset(
                builder, data_files=str(path), split="train", cache_dir=cache_dir, keep_in_memory=True, **kwargs
            )
        except Exception as e:  # datasets raises many types for unreadable files
            raise TaskFormatError(f"{path}: line 1: could not be read by datasets ({type(e).__name__}: {e})") from e
        finally:
            if bars:
                datasets.enable_progress_bars()
        rows = ds if limit is None else ds.select(range(min(limit, len(ds))))
        tasks: list[Task] = []
        seen: dict[str, str] = {}
        for i, row in enumerate(rows, 1):
            loc = f"row {i}"
            record = {k: v for k, v in row.items() if not _missing(v)}
            for key in ("choices", "metadata", "messages"):
                value = record.get(key)
                if isinstance(value, dict):  # arrow structs: keys missing from this row come back as None
                    record[key] = value = {k: v for k, v in value.items() if v is not None}
                if isinstance(value, str) and value.strip()[:1] in ("{", "["):
                    try:
                        record[key] = json.loads(value)
                    except json.JSONDecodeError as e:
                        raise _err(path, loc, key, f"malformed JSON: {e.msg}") from None
            task = _from_schema(record, path, loc, i)
            _check_unique(task, seen, path, loc)
            tasks.append(task)
    return tasks


def _missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()
