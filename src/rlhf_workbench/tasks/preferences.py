"""Preference, unpaired and SFT files in TRL's dataset formats, for ``rlhf train`` (offline training).

Record formats (TRL's names; one JSON object per line of a ``.jsonl``/``.jsonl.gz`` file, the
elements of a ``.json`` array, or the rows of a local ``.csv``/``.tsv``/``.parquet`` file read
with ``datasets``):

* paired preference, standard: ``{"prompt": str, "chosen": str, "rejected": str}``;
  conversational: ``prompt`` a list of ``{"role", "content"}`` messages ending with the user's
  turn, ``chosen``/``rejected`` a list holding one assistant message (or a string);
  implicit prompt: ``chosen``/``rejected`` full conversations (message lists sharing every turn
  but the last assistant one) or Anthropic HH-RLHF transcripts (``"\\n\\nHuman: ...\\n\\nAssistant:
  ..."``, split by :func:`rlhf_workbench.tasks.open.hh_task_from_record`);
* unpaired (KTO): ``{"prompt", "completion", "label": true|false}``;
* SFT: ``{"prompt", "completion"}`` (prompt-completion) or ``{"messages": [...]}`` (language
  modelling on a conversation: every turn before the last one is the prompt, the last turn, an
  assistant message, is the completion; earlier assistant turns are context, not trained on).

Every prompt becomes an open :class:`~rlhf_workbench.tasks.task.Task` (no answer key), rendered with
the model's chat template exactly as the online loop renders a task (a string prompt is one user
turn), so a policy trained offline sees its prompts as it will in ``rlhf run`` and ``rlhf eval``.
The task id is ``p-<first 12 hex of sha256 of the messages>``: records with the same prompt share
a task, and the train/held-out split (:func:`split_records`) is by prompt, so no held-out prompt
is ever trained on. Bad input raises :class:`~rlhf_workbench.tasks.task.TaskFormatError` naming the
file, the line (``row N`` for datasets files, ``record N`` for a JSON array) and the field.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

from rlhf_workbench.tasks.files import file_extension, iter_records
from rlhf_workbench.tasks.loading import save_tasks
from rlhf_workbench.tasks.open import hh_task_from_record, looks_like_hh, open_task_from_record, validate_messages
from rlhf_workbench.tasks.split import split_tasks
from rlhf_workbench.tasks.task import Task, TaskFormatError, field_error

_DATASETS_EXT = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class OfflineRecord:
    """One training example read from a file.

    Attributes:
        task: the prompt as an open task (shared by records with the same prompt).
        chosen, rejected: the preferred and dispreferred completions (paired records).
        completion: the completion of an unpaired or SFT record.
        label: KTO's desirable (True) / undesirable (False) tag; None for SFT and paired records.
        loc: ``"<file>: line N"``, for messages.
    """

    task: Task
    chosen: str | None = None
    rejected: str | None = None
    completion: str | None = None
    label: bool | None = None
    loc: str = ""

    @property
    def kind(self) -> str:
        """``"paired"``, ``"unpaired"`` (a label) or ``"sft"``."""
        if self.chosen is not None:
            return "paired"
        return "sft" if self.label is None else "unpaired"


def iter_file(path: Path) -> Iterator[tuple[str, int, Any]]:
    """``(location, 1-based number, record)`` for every record of ``path``.

    JSON lines (``.gz`` too; blank lines skipped) or a ``.json`` array through the task loader's
    reader; ``.csv``/``.tsv``/``.parquet`` through ``datasets`` (cells holding JSON lists, as
    message lists written to a CSV do, are parsed).

    Raises:
        FileNotFoundError: no such file.
        TaskFormatError: malformed JSON (file and line named) or a file ``datasets`` cannot read.
    """
    if not path.is_file():
        raise FileNotFoundError(f"training file not found: {path}")
    builder = _DATASETS_EXT.get(file_extension(path))
    if builder is None:
        yield from iter_records(path)
        return
    import datasets

    kwargs = {"sep": "\t"} if file_extension(path) == ".tsv" else {}
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", keep_in_memory=True, **kwargs)
    except Exception as e:  # datasets raises many types for unreadable files
        raise TaskFormatError(f"{path}: line 1: could not be read by datasets ({type(e).__name__}: {e})") from e
    for i, row in enumerate(ds, 1):
        record = {k: v for k, v in row.items() if v is not None}
        for key in ("prompt", "chosen", "rejected", "completion", "messages"):
            value = record.get(key)
            if isinstance(value, str) and value.strip()[:1] == "[":
                try:
                    record[key] = json.loads(value)
                except json.JSONDecodeError:
                    pass  # a plain string that starts with "["
        yield f"row {i}", i, record


def _prompt_task(prompt: Any, path: Path, loc: str, line_no: int) -> Task:
    """An open task for a ``prompt`` value (string or message list), id ``p-<sha256 of the messages>``."""
    task = open_task_from_record({"prompt": prompt}, path, loc, line_no)
    digest = hashlib.sha256(json.dumps(task.chat_messages(), ensure_ascii=False).encode()).hexdigest()[:12]
    return replace(task, id=f"p-{digest}")


def _completion_text(value: Any, path: Path, loc: str, field_name: str) -> str:
    """A completion given as a string or as a list holding one assistant message."""
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
            raise field_error(path, loc, field_name, "a conversational completion must be a list holding one "
                       "{'role': 'assistant', 'content': ...} message")
        value = value[0].get("content")
    if not isinstance(value, str) or not value.strip():
        raise field_error(path, loc, field_name, "missing required field" if value is None else
                   "must be a non-empty string (or a list with one assistant message)")
    return value


def _split_conversation(messages: Any, path: Path, loc: str, field_name: str) -> tuple[list[dict], str]:
    """``(prompt messages, last assistant reply)`` of a full conversation."""
    if not isinstance(messages, list) or len(messages) < 2:
        raise field_error(path, loc, field_name, "must be a list of at least two {role, content} messages "
                   "(the prompt, then the assistant's reply)")
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant":
        raise field_error(path, loc, field_name, "the last message must be the assistant's (the completion)")
    prompt = validate_messages(messages[:-1], path, loc, field_name)
    return prompt, _completion_text([last], path, loc, field_name)


def _paired(record: dict, path: Path, loc: str, line_no: int) -> OfflineRecord:
    where = f"{path}: {loc}"
    if "prompt" in record:
        task = _prompt_task(record["prompt"], path, loc, line_no)
        return OfflineRecord(task, _completion_text(record["chosen"], path, loc, "chosen"),
                             _completion_text(record["rejected"], path, loc, "rejected"), loc=where)
    if looks_like_hh(record):
        hh = hh_task_from_record(record, path, loc, line_no)
        task = _prompt_task(hh.metadata["messages"], path, loc, line_no)
        return OfflineRecord(task, hh.metadata["chosen"], hh.metadata["rejected"], loc=where)
    if isinstance(record["chosen"], list):  # TRL's implicit prompt: two conversations sharing the prompt
        prompt, chosen = _split_conversation(record["chosen"], path, loc, "chosen")
        prompt_r, rejected = _split_conversation(record["rejected"], path, loc, "rejected")
        if prompt_r != prompt:
            raise field_error(path, loc, "rejected", "must share every turn but the last with 'chosen' (implicit prompt)")
        return OfflineRecord(_prompt_task(prompt, path, loc, line_no), chosen, rejected, loc=where)
    raise field_error(path, loc, "prompt", "missing required field (a 'chosen'/'rejected' record needs a 'prompt', "
               "conversations, or HH-RLHF transcripts starting with '\\n\\nHuman:')")


def parse_record(record: Any, path: Path, loc: str, line_no: int) -> OfflineRecord:
    """One :class:`OfflineRecord` from a parsed record in any of the module's formats.

    Raises:
        TaskFormatError: not an object, a record of no known format, or a missing / malformed
            field (named with the file and line).
    """
    if not isinstance(record, dict):
        raise TaskFormatError(f"{path}: {loc}: expected a JSON object, got {type(record).__name__}")
    if "chosen" in record or "rejected" in record:
        for name in ("chosen", "rejected"):
            if record.get(name) is None:
                raise field_error(path, loc, name, "missing required field (a preference record needs 'chosen' and 'rejected')")
        return _paired(record, path, loc, line_no)
    where = f"{path}: {loc}"
    if "messages" in record and "completion" not in record:
        prompt, reply = _split_conversation(record["messages"], path, loc, "messages")
        return OfflineRecord(_prompt_task(prompt, path, loc, line_no), completion=reply, loc=where)
    if "completion" in record:
        if record.get("prompt") is None:
            raise field_error(path, loc, "prompt", "missing required field (a 'completion' record needs a 'prompt')")
        label = record.get("label")
        if label is not None and not isinstance(label, bool):
            raise field_error(path, loc, "label", f"must be true (desirable) or false (undesirable), got {label!r}")
        return OfflineRecord(_prompt_task(record["prompt"], path, loc, line_no),
                             completion=_completion_text(record["completion"], path, loc, "completion"),
                             label=label, loc=where)
    raise field_error(path, loc, "chosen", "missing required field: expected prompt/chosen/rejected (preference), "
               "prompt/completion/label (KTO), prompt/completion or messages (SFT)")


def load_offline_file(path: str | Path, limit: int | None = None) -> list[OfflineRecord]:
    """Every record of a training file, validated in full before anything is trained.

    Args:
        path: the file (see the module docstring for formats).
        limit: read only the first ``limit`` records.

    Returns:
        The records in file order.

    Raises:
        FileNotFoundError: no such file.
        TaskFormatError: a malformed record (file, line, field), or no records at all.
        ValueError: ``limit`` below 1.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    path = Path(path)
    out: list[OfflineRecord] = []
    for loc, line_no, record in iter_file(path):
        out.append(parse_record(record, path, loc, line_no))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise TaskFormatError(f"{path}: no records found (empty file)")
    return out


def records_for(algorithm: str, records: list[OfflineRecord], path: str | Path) -> list[OfflineRecord]:
    """The records an algorithm trains on, or an error naming the first record it cannot use.

    DPO and the reward model need paired records. KTO takes unpaired records as they are and a
    paired record as two unpaired ones (chosen desirable, rejected undesirable: TRL's
    ``unpair_preference_dataset``). SFT takes prompt-completion and messages records, the
    desirable completions of unpaired records (undesirable ones are dropped) and the chosen side
    of paired records.

    Returns:
        For ``dpo``/``rm``: the paired records; for ``kto``: records with a ``label``; for
        ``sft``: records with a ``completion`` (label None or True).

    Raises:
        TaskFormatError: a record of the wrong kind for ``algorithm`` (DPO/RM), or nothing to train on.
    """
    if algorithm in ("dpo", "rm"):
        bad = next((r for r in records if r.kind != "paired"), None)
        if bad is not None:
            raise TaskFormatError(f"{bad.loc}: field 'chosen': missing required field (--algorithm {algorithm} "
                                  "needs prompt/chosen/rejected preference pairs)")
        return records
    out: list[OfflineRecord] = []
    for r in records:
        if r.kind == "paired":
            if algorithm == "kto":
                out += [OfflineRecord(r.task, completion=r.chosen, label=True, loc=r.loc),
                        OfflineRecord(r.task, completion=r.rejected, label=False, loc=r.loc)]
            else:
                out.append(OfflineRecord(r.task, completion=r.chosen, loc=r.loc))
        elif algorithm == "kto":
            if r.label is None:
                raise TaskFormatError(f"{r.loc}: field 'label': missing required field (--algorithm kto needs "
                                      "labelled completions or preference pairs)")
            out.append(r)
        elif r.label is not False:
            out.append(replace(r, label=None))
    if not out:
        raise TaskFormatError(f"{path}: nothing to train on with --algorithm {algorithm}")
    return out


def split_records(records: list[OfflineRecord], heldout_fraction: float, seed: int
                  ) -> tuple[list[OfflineRecord], list[OfflineRecord], list[Task]]:
    """Split by prompt into train and held-out, reproducibly.

    The distinct prompts (first appearance order) go through
    :func:`rlhf_workbench.tasks.split.split_tasks` with ``heldout_fraction`` and ``seed`` (ranked by
    ``sha256(f"{seed}:{id}")``, the split ``rlhf run`` makes), so the same file, fraction and seed
    always hold out the same prompts, and every record of a held-out prompt is held out.

    Returns:
        ``(train records, held-out records, held-out prompt tasks)``; each held-out task carries
        ``metadata["split"] = "heldout"`` and, when its first record is paired, that record's
        ``chosen``/``rejected`` (as HH-RLHF tasks do).

    Raises:
        ValueError: ``heldout_fraction`` outside [0, 1).
    """
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"--heldout-fraction must be in [0, 1), got {heldout_fraction}")
    first: dict[str, OfflineRecord] = {}
    for r in records:
        first.setdefault(r.task.id, r)
    _, held = split_tasks([r.task for r in first.values()], heldout_fraction, seed=seed)
    held_ids = {t.id for t in held}
    tasks = []
    for t in held:
        meta = {**t.metadata, "split": "heldout"}
        r = first[t.id]
        if r.kind == "paired":
            meta.update(chosen=r.chosen, rejected=r.rejected)
        tasks.append(replace(t, metadata=meta))
    return ([r for r in records if r.task.id not in held_ids], [r for r in records if r.task.id in held_ids], tasks)


def save_heldout(tasks: list[Task], path: str | Path) -> Path:
    """Write the held-out prompts as open tasks (``rlhf eval --tasks`` reads them back, all held out).

    Raises:
        OSError: the file cannot be written.
    """
    return save_tasks(tasks, path)
