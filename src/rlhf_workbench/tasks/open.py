"""Open-ended tasks: a prompt with no answer key, and the HH-RLHF dialogue loader.

An open task (``answer_type="open"``, ``answer=""``) is a plain ``prompt`` string or a
conversational ``messages`` list (TRL's dataset formats: ``[{"role", "content"}, ...]``).
Nothing verifies it: every unflagged trace is ranked by the configured feedback sources
(reward model, LLM judge, rule rewards, experts). Multi-turn messages are kept in
``metadata["messages"]`` and rendered as given with the model's chat template
(:meth:`rlhf_workbench.tasks.task.Task.chat_messages`); the policy continues as the assistant.

HH-RLHF records (``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}``) load
as multi-turn prompts: every turn before the last assistant turn, with the chosen and rejected
final replies kept in ``metadata["chosen"]`` / ``metadata["rejected"]`` for supervised warm-up
and reward-model training.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from rlhf_workbench.tasks.task import Task, TaskFormatError, check_id_length, field_error

ROLES: tuple[str, ...] = ("system", "user", "assistant")
_HH_TURN_RE = re.compile(r"\n\n(Human|Assistant):[ ]?")


def is_open_record(record: Any) -> bool:
    """Whether a schema record describes an open-ended task.

    Args:
        record: a parsed JSON object (anything else is not open).

    Returns:
        ``True`` for ``answer_type: "open"``, or a record with ``messages`` or ``prompt`` and
        no ``answer`` (missing or ``null``).
    """
    if not isinstance(record, dict):
        return False
    if record.get("answer_type") == "open":
        return True
    return record.get("answer") is None and ("messages" in record or "prompt" in record)


def validate_messages(messages: Any, path: Path, loc: str, field_name: str = "messages") -> list[dict[str, str]]:
    """Check a conversational prompt and return it as plain ``{"role", "content"}`` dicts.

    Args:
        messages: the value read from the record.
        path: file name, for the error message.
        loc: ``line N`` / ``row N``, for the error message.
        field_name: the field the value came from.

    Returns:
        The messages (roles ``system``/``user``/``assistant``, non-empty string contents),
        ending with a user turn so the policy answers as the assistant.

    Raises:
        TaskFormatError: not a non-empty list of such messages, or the last turn is not the user's.
    """
    if not isinstance(messages, list) or not messages:
        raise field_error(path, loc, field_name, "must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise field_error(path, loc, field_name, f"message {i} must be an object, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise field_error(path, loc, field_name, f"message {i}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise field_error(path, loc, field_name, f"message {i}: content must be a non-empty string")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "user":
        raise field_error(path, loc, field_name, f"last message must be the user's (the policy answers it), got {out[-1]['role']!r}")
    return out


def _record_id(record: dict, path: Path, loc: str, line_no: int, prefix: str) -> str:
    value = record.get("id")
    if value is None:
        return f"{prefix}-{line_no}"
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise field_error(path, loc, "id", "must be a non-empty string or an integer")
    return check_id_length(str(value).strip(), path, loc)


def open_task_from_record(record: Any, path: Path, loc: str, line_no: int) -> Task:
    """An open :class:`Task` from a schema record without an answer key.

    Fields: ``prompt`` (alias ``question``) as a string, or ``messages`` (or ``prompt`` given
    as a message list, as TRL's conversational format does); ``id`` optional (default
    ``open-<line>``), ``context``, ``metadata``; ``answer`` must be absent or ``null``.

    Args:
        record: the parsed record.
        path: file name, for error messages.
        loc: ``line N`` / ``row N`` / ``record N``.
        line_no: the 1-based record number (used for default ids).

    Returns:
        A task with ``answer_type="open"`` and ``answer=""``; multi-turn prompts are in
        ``metadata["messages"]`` and ``question`` is their last user turn.

    Raises:
        TaskFormatError: not an object, no prompt, malformed messages or metadata, or an answer.
    """
    if not isinstance(record, dict):
        raise TaskFormatError(f"{path}: {loc}: expected a JSON object, got {type(record).__name__}")
    if record.get("answer") not in (None, ""):
        raise field_error(path, loc, "answer", "an open task (answer_type 'open') has no answer; drop the field or the answer_type")
    metadata = record.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise field_error(path, loc, "metadata", f"must be an object, got {type(metadata).__name__}")
    metadata = dict(metadata)
    context = record.get("context")
    if context is not None and (not isinstance(context, str) or not context.strip()):
        raise field_error(path, loc, "context", "must be a non-empty string")
    raw_messages, field_name = record.get("messages"), "messages"
    if raw_messages is None and isinstance(record.get("prompt"), list):
        raw_messages, field_name = record["prompt"], "prompt"
    if raw_messages is not None:
        messages = validate_messages(raw_messages, path, loc, field_name)
        question = messages[-1]["content"]
        if len(messages) > 1 or messages[0]["role"] != "user":
            metadata["messages"] = messages
    else:
        question = None
        for name in ("prompt", "question"):
            if record.get(name) is not None:
                question = record[name]
                if not isinstance(question, str) or not question.strip():
                    raise field_error(path, loc, name, "must be a non-empty string (or a list of messages)")
                break
        if question is None:
            raise field_error(path, loc, "prompt", "missing required field (an open task needs 'prompt' or 'messages')")
    task_id = _record_id(record, path, loc, line_no, "open")
    return Task(task_id, question, "", "open", context, None, metadata)


def parse_hh_dialogue(text: str) -> list[dict[str, str]]:
    """Split an HH-RLHF transcript (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) into messages.

    Args:
        text: the transcript.

    Returns:
        ``[{"role": "user"|"assistant", "content": ...}, ...]`` in order; contents stripped
        (a turn may be empty, as some HH replies are).

    Raises:
        ValueError: the text does not start with a ``Human:`` turn.
    """
    parts = _HH_TURN_RE.split(text)
    if len(parts) < 3 or parts[0].strip() or parts[1] != "Human":
        raise ValueError("expected a transcript starting with '\\n\\nHuman: '")
    return [{"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
            for speaker, content in zip(parts[1::2], parts[2::2])]


def _hh_text(turns: list[dict[str, str]]) -> str:
    """The reply after the shared prompt: one assistant turn's content, or several turns in HH form."""
    if len(turns) == 1:
        return turns[0]["content"]
    return turns[0]["content"] + "".join(
        f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in turns[1:])


def looks_like_hh(record: Any) -> bool:
    """Whether a record is an HH-RLHF pair: string ``chosen`` and ``rejected`` starting with a Human turn."""
    return (isinstance(record, dict) and isinstance(record.get("chosen"), str) and isinstance(record.get("rejected"), str)
            and record["chosen"].lstrip(" ").startswith("\n\nHuman:") and "\n\nAssistant:" in record["chosen"])


def hh_task_from_record(record: Any, path: Path, loc: str, line_no: int) -> Task:
    """An open :class:`Task` from an HH-RLHF record (``chosen``/``rejected`` transcripts).

    The prompt is every turn before the final assistant turn (the shared part of both
    transcripts); ``metadata`` holds ``messages`` (that prompt), ``chosen`` and ``rejected``
    (the two final replies) and ``source: "hh-rlhf"``. Where the transcripts diverge earlier
    (a few HH records do), the prompt is their longest shared prefix ending with a Human turn,
    each reply is the rest of its transcript (later turns in HH text form) and
    ``metadata["diverges_early"]`` is True. The id is the record's ``id`` or
    ``hh-<line>-<first 8 hex of sha256(prompt)>``.

    Args:
        record: the parsed record.
        path: file name, for error messages.
        loc: ``line N`` / ``record N``.
        line_no: the 1-based record number.

    Returns:
        The task (``answer_type="open"``).

    Raises:
        TaskFormatError: a missing or non-string ``chosen``/``rejected``, a transcript that does
            not parse or does not end with an assistant turn, or pairs with different prompts.
    """
    if not isinstance(record, dict):
        raise TaskFormatError(f"{path}: {loc}: expected a JSON object, got {type(record).__name__}")
    turns = {}
    for name in ("chosen", "rejected"):
        value = record.get(name)
        if not isinstance(value, str):
            raise field_error(path, loc, name, "missing required field" if value is None else f"must be a string, got {type(value).__name__}")
        try:
            turns[name] = parse_hh_dialogue(value)
        except ValueError as e:
            raise field_error(path, loc, name, str(e)) from None
        if turns[name][-1]["role"] != "assistant" or len(turns[name]) < 2:
            raise field_error(path, loc, name, "transcript must end with an 'Assistant:' turn")
    # the prompt: the turns both transcripts share, up to and including a user turn (usually all
    # but the final reply; a few HH records diverge earlier, e.g. a "Human:" inside a reply)
    shared = 0
    for x, y in zip(turns["chosen"][:-1], turns["rejected"][:-1]):
        if x != y:
            break
        shared += 1
    while shared and turns["chosen"][shared - 1]["role"] != "user":
        shared -= 1
    if not shared:
        raise field_error(path, loc, "rejected", "shares no Human turn with 'chosen' (no common prompt)")
    prompts = {"chosen": turns["chosen"][:shared]}
    if not prompts["chosen"][-1]["content"]:
        raise field_error(path, loc, "chosen", "the last Human turn is empty")
    replies = {name: _hh_text(t[shared:]) for name, t in turns.items()}
    messages = [m for m in prompts["chosen"] if m["content"]] or prompts["chosen"]
    if any(not m["content"] for m in messages):
        raise field_error(path, loc, "chosen", "empty dialogue turns")
    digest = hashlib.sha256(repr(messages).encode()).hexdigest()[:8]
    task_id = _record_id(record, path, loc, line_no, f"hh-{line_no}-{digest}") if record.get("id") is not None \
        else f"hh-{line_no}-{digest}"
    metadata = {"source": "hh-rlhf", "messages": messages, "chosen": replies["chosen"], "rejected": replies["rejected"]}
    if any(len(t) != shared + 1 for t in turns.values()):
        metadata["diverges_early"] = True  # the replies hold several turns, in HH text form
    return Task(task_id, messages[-1]["content"], "", "open", None, None, metadata)
