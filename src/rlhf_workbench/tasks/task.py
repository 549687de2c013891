"""Task items: a question with a known answer, and the checks on the fields of a task record.

A :class:`Task` is what the loop samples reasoning traces for and what the verifier
checks them against. The loaders of task files (:mod:`rlhf_workbench.tasks.loading`, which reads
raw records with :mod:`rlhf_workbench.tasks.files`) build tasks with the field checks below; bad
input raises :class:`TaskFormatError` naming the file, line and field, before anything is stored.
Splitting into train and held-out sets is :mod:`rlhf_workbench.tasks.split`; open-ended tasks
(no answer key) are :mod:`rlhf_workbench.tasks.open`.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

AnswerType = Literal["number", "choice", "yes_no_maybe", "text", "open"]
MAX_TASK_ID_LENGTH = 200  # characters; the size of the database's task id column (store.TaskRow.id)
# Characters of one text in a task record (a question, a context, one choice, one message, any
# metadata string): 100,000, about 25,000 tokens, far beyond any prompt a policy here can read.
# Checked when the file is loaded, before anything is written, on every database alike.
MAX_TEXT_CHARS = 100_000
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
            key, nothing to verify (see :mod:`rlhf_workbench.tasks.open`).
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
# Checks on the fields of a task record (shared by every file format)
# --------------------------------------------------------------------------------------

YES_NO_MAYBE: tuple[str, ...] = ("yes", "no", "maybe")

_LETTERS = string.ascii_uppercase
_NUMBER_RE = re.compile(r"^[+-]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)$")
_FRACTION_RE = re.compile(r"^[+-]?\d+/\d+$")
_NOT_TEXT = re.compile("[\x00\ud800-\udfff]")  # NUL and lone surrogates: no database stores them alike


def field_error(path: Path, loc: str, field_name: str, problem: str) -> TaskFormatError:
    """The :class:`TaskFormatError` for a bad field: ``"<path>: <loc>: field '<field_name>': <problem>"``
    (``loc`` is ``line N``, ``row N``, ``record N`` or ``record '<pmid>'``)."""
    return TaskFormatError(f"{path}: {loc}: field '{field_name}': {problem}")


def check_record_text(record: Any, path: Path, loc: str, field_name: str = "") -> None:
    """The character and size rules every string of a raw task record obeys (its keys too, nested
    objects and lists included), the same on every database and checked before anything is written:
    no NUL character (PostgreSQL refuses U+0000 in text and JSON, SQLite would store it), no lone
    surrogate (not valid UTF-8 on either database), at most :data:`MAX_TEXT_CHARS` characters.
    Bidirectional-control characters (U+202E ...) are kept as the verifier reads them; the web app
    shows them as visible ``[U+202E]`` marks (:func:`rlhf_workbench.app.render.safe_text`).

    Raises:
        TaskFormatError: ``"<path>: <loc>: field '<field>': ..."``; nested fields are named with
            dots and indices (``choices.B``, ``messages[2].content``).
    """
    if isinstance(record, dict):
        for key, value in record.items():
            name = f"{field_name}.{key}" if field_name else str(key)
            check_record_text(key, path, loc, name)
            check_record_text(value, path, loc, name)
    elif isinstance(record, list):
        for i, value in enumerate(record):
            check_record_text(value, path, loc, f"{field_name}[{i}]")
    elif isinstance(record, str):
        bad = _NOT_TEXT.search(record)
        if bad is not None and bad.group() == "\x00":
            raise field_error(path, loc, field_name or "record", f"contains a NUL character (U+0000) at position "
                              f"{bad.start() + 1}; PostgreSQL cannot store it, so no database takes it")
        if bad is not None:
            raise field_error(path, loc, field_name or "record", f"contains a lone surrogate "
                              f"(U+{ord(bad.group()):04X}) at position {bad.start() + 1}; not valid Unicode text")
        if len(record) > MAX_TEXT_CHARS:
            raise field_error(path, loc, field_name or "record", f"{len(record):,} characters long; at most "
                              f"{MAX_TEXT_CHARS:,} are allowed (tasks.task.MAX_TEXT_CHARS)")


def require_object(record: Any, path: Path, loc: str) -> dict:
    """``record`` if it is a JSON object (dict).

    Raises:
        TaskFormatError: it is not (the message names its JSON type).
    """
    if not isinstance(record, dict):
        raise TaskFormatError(f"{path}: {loc}: expected a JSON object, got {type(record).__name__}")
    return record


def text_field(record: dict, names: Sequence[str], path: Path, loc: str, required: bool = True) -> str | None:
    """The first of the fields ``names`` (a name and its aliases) present and not null, as a string.

    Returns:
        The value, or None when no such field is present and ``required`` is False.

    Raises:
        TaskFormatError: the value is not a non-empty string, or no field is present and
            ``required`` (the message names ``names[0]``).
    """
    for name in names:
        if name in record and record[name] is not None:
            value = record[name]
            if not isinstance(value, str) or not value.strip():
                raise field_error(path, loc, name, "must be a non-empty string")
            return value
    if required:
        raise field_error(path, loc, names[0], "missing required field")
    return None


def id_field(record: dict, path: Path, loc: str) -> str:
    """The record's ``id`` (a non-empty string or an integer) as a stripped string.

    Raises:
        TaskFormatError: missing, of another type, blank, or over :data:`MAX_TASK_ID_LENGTH` characters.
    """
    if "id" not in record or record["id"] is None:
        raise field_error(path, loc, "id", "missing required field")
    value = record["id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise field_error(path, loc, "id", "must be a non-empty string or an integer")
    return check_id_length(str(value).strip(), path, loc)


def check_id_length(task_id: str, path: Path, loc: str) -> str:
    """``task_id``, or a :class:`TaskFormatError` when it exceeds :data:`MAX_TASK_ID_LENGTH` (the
    database column's size: PostgreSQL refuses longer ids, SQLite would store them)."""
    if len(task_id) > MAX_TASK_ID_LENGTH:
        raise field_error(path, loc, "id", f"{len(task_id)} characters long; at most {MAX_TASK_ID_LENGTH} are allowed")
    return task_id


def raw_answer(record: dict, path: Path, loc: str) -> Any:
    """The record's ``answer`` as given (a string or a number), before it is checked against its type.

    Raises:
        TaskFormatError: missing, null, a boolean or another JSON type.
    """
    if "answer" not in record or record["answer"] is None:
        raise field_error(path, loc, "answer", "missing required field")
    value = record["answer"]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise field_error(path, loc, "answer", f"must be a string or a number, got {type(value).__name__}")
    return value


def canonical_number(value: Any) -> str | None:
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


def parse_choices(value: Any, path: Path, loc: str, field_name: str) -> dict[str, str]:
    """Multiple-choice options as ``{letter: text}`` in display order: a list is lettered A, B, C, ...;
    a dict keeps its (stripped) keys.

    Raises:
        TaskFormatError: empty, more than 26 listed options, a blank option or key, or neither
            a list nor an object (the message names ``field_name``).
    """
    if isinstance(value, list):
        if not value:
            raise field_error(path, loc, field_name, "must not be empty")
        if len(value) > len(_LETTERS):
            raise field_error(path, loc, field_name, f"at most {len(_LETTERS)} options supported")
        if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) and str(v).strip() for v in value):
            raise field_error(path, loc, field_name, "options must be non-empty strings")
        return {_LETTERS[i]: str(v) for i, v in enumerate(value)}
    if isinstance(value, dict):
        if not value:
            raise field_error(path, loc, field_name, "must not be empty")
        out: dict[str, str] = {}
        for k, v in value.items():
            if not str(k).strip():
                raise field_error(path, loc, field_name, "option letters must be non-empty")
            if isinstance(v, bool) or not isinstance(v, (str, int, float)) or not str(v).strip():
                raise field_error(path, loc, field_name, f"option {k!r} must be a non-empty string")
            out[str(k).strip()] = str(v)
        return out
    raise field_error(path, loc, field_name, f"must be a list or an object, got {type(value).__name__}")


def choice_letter(answer: str, choices: dict[str, str]) -> str | None:
    """The key of ``choices`` that ``answer`` names (as given, else upper-cased), or None."""
    text = answer.strip()
    if text in choices:
        return text
    if text.upper() in choices:
        return text.upper()
    return None


def validated_answer(raw: Any, answer_type: str, choices: dict[str, str] | None, path: Path, loc: str) -> str:
    """``raw`` checked against ``answer_type`` and put in canonical form: a number without thousands
    separators (:func:`canonical_number`), a choice letter of ``choices``, yes/no/maybe lower-cased,
    or stripped text.

    Raises:
        TaskFormatError: the answer is empty or does not fit its type (no choices for a
            ``"choice"`` answer included).
    """
    if answer_type == "number":
        value = canonical_number(raw)
        if value is None:
            raise field_error(path, loc, "answer", f"answer_type is 'number' but {raw!r} is not a number")
        return value
    text = str(raw).strip()
    if not text:
        raise field_error(path, loc, "answer", "must not be empty")
    if answer_type == "choice":
        if not choices:
            raise field_error(path, loc, "choices", "answer_type is 'choice' but no choices are given")
        letter = choice_letter(text, choices)
        if letter is None:
            raise field_error(path, loc, "answer", f"{raw!r} is not one of the choice letters {', '.join(choices)}")
        return letter
    if answer_type == "yes_no_maybe":
        if text.lower() not in YES_NO_MAYBE:
            raise field_error(path, loc, "answer", f"{raw!r} is not yes, no or maybe")
        return text.lower()
    return text
