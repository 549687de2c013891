"""Task file formats: :func:`load_tasks` (with :func:`detect_format`) and :func:`save_tasks`.

Loaders turn JSONL files, GSM8K, PubMedQA, multiple-choice files, HH-RLHF pairs and anything
``datasets`` reads from local files into :class:`~rlhf_workbench.tasks.task.Task` objects; bad
input raises :class:`~rlhf_workbench.tasks.task.TaskFormatError` naming the file, line and field,
before anything is stored. Raw records come from :mod:`rlhf_workbench.tasks.files`, the field
checks from :mod:`rlhf_workbench.tasks.task`, open and HH-RLHF records from
:mod:`rlhf_workbench.tasks.open`.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rlhf_workbench.tasks.files import file_extension, iter_records, looks_like_pubmedqa, parse_whole_json, read_text, resolve_path
from rlhf_workbench.tasks.open import hh_task_from_record, is_open_record, looks_like_hh, open_task_from_record
from rlhf_workbench.tasks.task import (ANSWER_TYPES, YES_NO_MAYBE, Task, TaskFormatError, check_id_length,
                                       check_record_text, choice_letter, field_error, id_field, parse_choices,
                                       raw_answer, canonical_number, require_object,
                                       text_field, validated_answer)

FORMATS: tuple[str, ...] = ("auto", "jsonl", "gsm8k", "pubmedqa", "mcq", "hf", "hh")

_HF_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


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
        ``prompt``/``messages`` and no ``answer`` (see :mod:`rlhf_workbench.tasks.open`).
        ``"auto"``: picks one of the above by looking at the file (see :func:`detect_format`).

    Every string of a record (keys and nested values too) is checked first, the same way for
    every database (:func:`~rlhf_workbench.tasks.task.check_record_text`): a NUL character or a
    lone surrogate is refused, and so is a text over
    :data:`~rlhf_workbench.tasks.task.MAX_TEXT_CHARS` (100,000) characters.
    Bidirectional-control characters are kept (the web app shows them as visible marks).

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
        TaskFormatError: malformed JSON, a missing or invalid field, a NUL character, a lone
            surrogate or a text over ``MAX_TEXT_CHARS`` anywhere in a record, an answer that does not
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
    path = resolve_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path}")
    if format == "auto":
        format = detect_format(path)

    if format == "pubmedqa":
        tasks = _load_pubmedqa(path, limit)
    elif format == "hf":
        tasks = _load_hf(path, limit)
    else:
        convert = {"jsonl": _from_schema, "gsm8k": _from_gsm8k, "mcq": _from_mcq, "hh": hh_task_from_record}[format]
        tasks = []
        seen: dict[str, str] = {}
        for loc, line_no, record in iter_records(path):
            check_record_text(record, path, loc)  # NUL, lone surrogates, size: the same on every database
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
    path = resolve_path(path)
    ext = file_extension(path)
    if ext in (".csv", ".tsv", ".parquet"):
        return "hf"
    if ext == ".json":
        data = parse_whole_json(path)
        if isinstance(data, dict) and looks_like_pubmedqa(data):
            return "pubmedqa"
    first = next(iter(iter_records(path)), None)
    if first is None or not isinstance(first[2], dict):
        return "jsonl"
    record = first[2]
    if looks_like_hh(record):
        return "hh"
    if "####" in str(record.get("answer", "")):
        return "gsm8k"
    if "options" in record or ("choices" in record and "id" not in record):
        return "mcq"
    return "jsonl"



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



# ---- one converter per format -------------------------------------------------------


def _check_unique(task: Task, seen: dict[str, str], path: Path, loc: str) -> None:
    if task.id in seen:
        raise field_error(path, loc, "id", f"duplicate id {task.id!r} (first at {seen[task.id]})")
    seen[task.id] = loc



def _from_schema(record: Any, path: Path, loc: str, line_no: int) -> Task:
    record = require_object(record, path, loc)
    if is_open_record(record):
        return open_task_from_record(record, path, loc, line_no)
    task_id = id_field(record, path, loc)
    question = text_field(record, ("question", "prompt"), path, loc)
    raw = raw_answer(record, path, loc)
    choices = None
    if record.get("choices") is not None:
        choices = parse_choices(record["choices"], path, loc, "choices")
    answer_type = record.get("answer_type")
    if answer_type is None:
        answer_type = "choice" if choices else "number"
    if answer_type not in ANSWER_TYPES:
        raise field_error(path, loc, "answer_type", f"{answer_type!r} is not one of {', '.join(ANSWER_TYPES)}")
    context = text_field(record, ("context",), path, loc, required=False)
    metadata = record.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise field_error(path, loc, "metadata", f"must be an object, got {type(metadata).__name__}")
    answer = validated_answer(raw, answer_type, choices, path, loc)
    metadata = dict(metadata)
    aliases = answer_aliases(record, metadata, path, loc)
    if aliases:
        metadata["answer_aliases"] = aliases
    return Task(task_id, question, answer, answer_type, context, choices, metadata)


def answer_aliases(record: dict, metadata: dict, path: Path, loc: str) -> list[str]:
    """Other accepted spellings of a free-text key (``answer_aliases``: a string or a list of
    non-empty strings, top level or in ``metadata``), kept in ``metadata["answer_aliases"]``,
    where :func:`rlhf_workbench.verify.verify` reads them (an abbreviation or a standard synonym
    of a diagnosis is then verified, after the same normalisation as the key).

    Raises:
        TaskFormatError: the field is neither a string nor a list of non-empty strings.
    """
    out: list[str] = []
    for where, value in (("answer_aliases", record.get("answer_aliases")),
                         ("metadata.answer_aliases", metadata.get("answer_aliases"))):
        if value is None:
            continue
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
            raise field_error(path, loc, where, "must be a string or a list of non-empty strings")
        out += [v.strip() for v in values if v.strip() not in out]
    return out


def _from_gsm8k(record: Any, path: Path, loc: str, line_no: int) -> Task:
    record = require_object(record, path, loc)
    question = text_field(record, ("question",), path, loc)
    full = raw_answer(record, path, loc)
    if not isinstance(full, str) or "####" not in full:
        raise field_error(path, loc, "answer", "GSM8K answer has no '#### <final answer>' line")
    solution, _, final = full.rpartition("####")
    answer = canonical_number(final)
    if answer is None:
        raise field_error(path, loc, "answer", f"final answer {final.strip()!r} after '####' is not a number")
    return Task(f"gsm8k-{line_no}", question, answer, "number", metadata={"solution": solution.strip()})


_MCQ_FIELDS = {"id", "question", "prompt", "options", "choices", "answer", "context", "metadata"}


def _from_mcq(record: Any, path: Path, loc: str, line_no: int) -> Task:
    record = require_object(record, path, loc)
    task_id = id_field(record, path, loc) if record.get("id") is not None else f"mcq-{line_no}"
    question = text_field(record, ("question", "prompt"), path, loc)
    options_field = "options" if record.get("options") is not None else "choices"
    if record.get(options_field) is None:
        raise field_error(path, loc, "options", "missing required field (options or choices)")
    choices = parse_choices(record[options_field], path, loc, options_field)
    raw = raw_answer(record, path, loc)
    letters = list(choices)
    letter: str | None = None
    if isinstance(raw, int):
        if not 0 <= raw < len(letters):
            raise field_error(path, loc, "answer", f"index {raw} out of range for {len(letters)} options")
        letter = letters[raw]
    elif isinstance(raw, float):
        raise field_error(path, loc, "answer", f"{raw!r} is not a letter, an index or an option text")
    else:
        letter = choice_letter(raw, choices)
        if letter is None:
            wanted = " ".join(raw.split()).casefold()
            matches = [k for k, v in choices.items() if " ".join(v.split()).casefold() == wanted]
            if len(matches) == 1:
                letter = matches[0]
            elif raw.strip().isdigit() and int(raw) < len(letters):
                letter = letters[int(raw)]
        if letter is None:
            raise field_error(path, loc, "answer", f"{raw!r} is not a choice letter, an index or one of the option texts")
    context = text_field(record, ("context",), path, loc, required=False)
    metadata = record.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise field_error(path, loc, "metadata", f"must be an object, got {type(metadata).__name__}")
    metadata = {**{k: v for k, v in record.items() if k not in _MCQ_FIELDS}, **metadata}
    return Task(task_id, question, letter, "choice", context, choices, metadata)


def _load_pubmedqa(path: Path, limit: int | None) -> list[Task]:
    text = read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TaskFormatError(f"{path}: line {e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(data, dict):
        raise TaskFormatError(f"{path}: line 1: expected a JSON object mapping PMID -> record")
    tasks: list[Task] = []
    for pmid, record in data.items():
        loc = f"record {pmid!r}"
        record = require_object(record, path, loc)
        check_record_text({pmid: record}, path, loc)
        question = text_field(record, ("QUESTION",), path, loc)
        contexts = record.get("CONTEXTS")
        if contexts is None:
            raise field_error(path, loc, "CONTEXTS", "missing required field")
        if (
            not isinstance(contexts, list)
            or not contexts
            or not all(isinstance(c, str) for c in contexts)
            or not "".join(contexts).strip()
        ):
            raise field_error(path, loc, "CONTEXTS", "must be a non-empty list of strings")
        decision = record.get("final_decision")
        if decision is None:
            raise field_error(path, loc, "final_decision", "missing required field")
        if not isinstance(decision, str) or decision.strip().lower() not in YES_NO_MAYBE:
            raise field_error(path, loc, "final_decision", f"{decision!r} is not yes, no or maybe")
        metadata: dict[str, Any] = {"pmid": str(pmid)}
        for key, name in (("LONG_ANSWER", "long_answer"), ("LABELS", "labels"), ("MESHES", "meshes"), ("YEAR", "year")):
            if record.get(key) is not None:
                metadata[name] = record[key]
        context = "\n".join(c.strip() for c in contexts if c.strip())
        check_id_length(f"pubmedqa-{pmid}", path, loc)
        tasks.append(Task(f"pubmedqa-{pmid}", question, decision.strip().lower(), "yes_no_maybe", context, None, metadata))
        if limit is not None and len(tasks) >= limit:
            break
    return tasks


def _load_hf(path: Path, limit: int | None) -> list[Task]:
    ext = file_extension(path)
    builder = _HF_BUILDERS.get(ext)
    if builder is None:
        raise TaskFormatError(f"{path}: line 1: format 'hf' reads {', '.join(_HF_BUILDERS)} files, not {ext or 'no extension'!r}")
    import datasets  # slow import: only when needed

    kwargs: dict[str, Any] = {}
    if builder == "csv":
        # read every column as text: keeps ids like "001" and answers like "1,234" as written
        sep = "\t" if ext == ".tsv" else ","
        header = next(csv.reader(io.StringIO(read_text(path)), delimiter=sep), None)
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
                        raise field_error(path, loc, key, f"malformed JSON: {e.msg}") from None
            check_record_text(record, path, loc)
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
