"""Items as the web app shows them: Markdown for the pages, JSON for the HTTP API.

Shared by the Annotate tab (:mod:`rlhf_workbench.app.annotate`), the Adjudicate tab
(:mod:`rlhf_workbench.app.review`), the Playground (:mod:`rlhf_workbench.app.playground`) and the
API for scripted clients (:mod:`rlhf_workbench.app.api`).
"""

from __future__ import annotations

from rlhf_workbench.human.duplicates import Entry, count_label, group_traces
from rlhf_workbench.human.items import Item
from rlhf_workbench.tasks.task import Task
from rlhf_workbench.verify import NO_KEY_REASON

LATEX = [  # the formula delimiters every Markdown component renders
    {"left": "$$", "right": "$$", "display": True},
    {"left": "$", "right": "$", "display": False},
    {"left": "\\(", "right": "\\)", "display": False},
    {"left": "\\[", "right": "\\]", "display": True},
]


def task_md(t: Task) -> str:
    """A task as the annotation and adjudication pages show it: context, question, options, key.
    An open task (no answer key) shows its whole conversation and no ground-truth panel."""
    parts = []
    if t.context:
        parts.append(f"**Context**\n\n{t.context}")
    messages = t.chat_messages() if t.is_open else []
    if len(messages) > 1:
        parts.append(f"**Conversation** (task `{t.id}`)\n\n" + "\n\n".join(
            f"**{m['role'].capitalize()}:** {m['content']}" for m in messages))
    else:
        parts.append(f"**Question** (task `{t.id}`)\n\n{t.question}")
    if t.choices:
        parts.append("\n".join(f"- **{k}.** {v}" for k, v in t.choices.items()))
    parts.append("_Open-ended: no answer key. Rank the replies by how well they answer._" if t.is_open
                 else f"**Ground truth:** `{t.answer}`")
    return "\n\n".join(parts)


def verdict_md(reason: str) -> str:
    """The verifier's line under a trace; none for an open task's traces (nothing was verified)."""
    return "" if reason == NO_KEY_REASON else f"\n\nverifier: _{reason}_"


def rejected_md(item: Item) -> str:
    """An item's rejected traces, each with the verifier's reason, or a line saying there are none."""
    if not item.rejected:
        return "_No rejected traces._"
    return "\n\n---\n\n".join(f"**Rejected {j}**\n\n{tr.text}{verdict_md(tr.reason)}"
                              for j, tr in enumerate(item.rejected, 1))


def trace_md(number: int, trace, count: int = 1) -> str:
    """A verified trace as shown for ranking, with the verifier's reason for accepting it (and
    how many identical copies it stands for, :mod:`rlhf_workbench.human.duplicates`)."""
    copies = f" · {count_label(count)}" if count > 1 else ""
    return f"#### Trace {number}{copies}\n\n{trace.text}{verdict_md(trace.reason)}"


def pair_md(label: str, entry: Entry) -> str:
    """One side (A or B) of a pairwise judgment."""
    copies = f" · {count_label(entry.count)}" if entry.count > 1 else ""
    return f"#### {label}{copies}\n\n{entry.trace.text}{verdict_md(entry.trace.reason)}"


def answer_md(text: str) -> str:
    """A playground answer; a blank one says so (and how many whitespace characters it has)."""
    if not text.strip():
        return f"_(blank answer: {len(text)} whitespace characters)_"
    return text


def item_state(item: Item | None) -> dict | None:
    """What the annotation page keeps of the item it shows (a ``gr.State``), and the core of the
    API's item JSON: rollout_id, task_id, round, policy_version, completion_ids (display order),
    groups (identical traces collapsed), rejected_ids, revision (-1 when no draft). None for none."""
    if item is None:
        return None
    return {"rollout_id": item.rollout_id, "task_id": item.task.id, "round": item.round,
            "policy_version": item.policy_version, "completion_ids": [t.completion_id for t in item.verified],
            "groups": [e.completion_ids for e in group_traces(item.verified)],
            "rejected_ids": [t.completion_id for t in item.rejected],
            "revision": item.draft.revision if item.draft is not None else -1}


def entry_json(entry: Entry) -> dict:
    """An entry (identical traces collapsed) as the HTTP API returns it."""
    return {"completion_ids": entry.completion_ids, "text": entry.trace.text, "count": entry.count}


def item_json(item: Item) -> dict:
    """An item as ``/next_item`` returns it: :func:`item_state` plus texts (the verified traces'
    texts in display order), groups as :func:`entry_json` objects, question and answer."""
    groups = [entry_json(e) for e in group_traces(item.verified)]
    return {**item_state(item), "texts": [t.text for t in item.verified], "groups": groups,
            "question": item.task.question, "answer": item.task.answer}
