"""Items as the web app shows them: Markdown for the pages, JSON for the HTTP API.

Shared by the Annotate tab (:mod:`rlhf_workbench.app.annotate`), the Adjudicate tab
(:mod:`rlhf_workbench.app.review`), the Playground (:mod:`rlhf_workbench.app.playground`) and the
API for scripted clients (:mod:`rlhf_workbench.app.api`).

Every piece of untrusted text (task questions, contexts, choices, model output, annotators'
rationales, Playground answers) reaches a page only through :func:`safe_text`: one sanitising
path, so no style, form, script or remote resource survives in any tab. The HTTP API returns the
raw text (JSON, never rendered).
"""

from __future__ import annotations

import re

import nh3

from rlhf_workbench.human.duplicates import Entry, count_label, group_traces
from rlhf_workbench.human.items import Item
from rlhf_workbench.tasks.task import Task
from rlhf_workbench.verify import NO_KEY_REASON

# The HTML an untrusted text may keep: inline emphasis and structure, no attributes at all (so no
# style, no event handler, no src / href), nothing that loads, submits or overlays.
SAFE_TAGS = {"b", "strong", "i", "em", "code", "pre", "br", "p", "ul", "ol", "li", "sub", "sup", "blockquote"}
MAX_SHOWN_CHARS = 20_000  # characters of one text shown on a page (a 200 KB trace is cut, saying so)
BIDI_CONTROLS = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
# Markdown images fetch a URL when the page opens: ![x](url) and ![x][ref]; raw links are kept.
NOT_SAFE_TAG = re.compile("<(?!/?(?:" + "|".join(sorted(SAFE_TAGS, key=len, reverse=True)) + r")[\s/>])")
MD_IMAGE = re.compile(r"!(?=\[)")


def safe_text(text: str | None, limit: int = MAX_SHOWN_CHARS) -> str:
    """``text`` made safe to render as Markdown: HTML cut to :data:`SAFE_TAGS` without attributes
    (``nh3``, the Rust ``ammonia`` sanitiser), Markdown images neutralised (shown as text),
    bidirectional-control characters shown as visible ``[U+202E]`` marks (so annotators see the
    characters the verifier reads) and at most ``limit`` characters shown, with a note of how
    many were left out."""
    text = "" if text is None else str(text)
    cut = len(text) - limit
    if cut > 0:
        text = text[:limit]
    text = BIDI_CONTROLS.sub(lambda m: f"[U+{ord(m.group()):04X}]", text)
    text = NOT_SAFE_TAG.sub("&lt;", text)  # other tags and a bare "a<b" stay visible as text
    text = nh3.clean(text, tags=SAFE_TAGS, attributes={}, url_schemes=set(), strip_comments=True,
                     link_rel=None)
    text = MD_IMAGE.sub("\\\\!", text)
    if cut > 0:
        text += f"\n\n_(… {cut:,} more characters not shown)_"
    return text


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
        parts.append(f"**Context**\n\n{safe_text(t.context)}")
    messages = t.chat_messages() if t.is_open else []
    if len(messages) > 1:
        parts.append(f"**Conversation** (task `{t.id}`)\n\n" + "\n\n".join(
            f"**{m['role'].capitalize()}:** {safe_text(m['content'])}" for m in messages))
    else:
        parts.append(f"**Question** (task `{safe_text(t.id, 200)}`)\n\n{safe_text(t.question)}")
    if t.choices:
        parts.append("\n".join(f"- **{safe_text(k, 200)}.** {safe_text(v)}" for k, v in t.choices.items()))
    parts.append("_Open-ended: no answer key. Rank the replies by how well they answer._" if t.is_open
                 else f"**Ground truth:** `{safe_text(t.answer, 2000)}`")
    return "\n\n".join(parts)


def verdict_md(reason: str) -> str:
    """The verifier's line under a trace; none for an open task's traces (nothing was verified)."""
    return "" if reason == NO_KEY_REASON else f"\n\nverifier: _{safe_text(reason, 2000)}_"


def rejected_md(item: Item) -> str:
    """An item's rejected traces, each with the verifier's reason, or a line saying there are none."""
    if not item.rejected:
        return "_No rejected traces._"
    return "\n\n---\n\n".join(f"**Rejected {j}**\n\n{safe_text(tr.text)}{verdict_md(tr.reason)}"
                              for j, tr in enumerate(item.rejected, 1))


def source_label(sources: list[str] | None) -> str:
    """`` · written by the policy`` (or ``teacher``, or both for identical copies) when the run shows
    sources (``rollout.teacher.show_source``; callers pass None otherwise: blind by default)."""
    return f" · written by the {' and the '.join(sources)}" if sources else ""


def trace_md(number: int, trace, count: int = 1, sources: list[str] | None = None) -> str:
    """A verified trace as shown for ranking, with the verifier's reason for accepting it (and
    how many identical copies it stands for, :mod:`rlhf_workbench.human.duplicates`); ``sources``
    only when the run shows who wrote each trace (:func:`source_label`)."""
    copies = f" · {count_label(count)}" if count > 1 else ""
    return f"#### Trace {number}{copies}{source_label(sources)}\n\n{safe_text(trace.text)}{verdict_md(trace.reason)}"


def pair_md(label: str, entry: Entry, show_source: bool = False) -> str:
    """One side (A or B) of a pairwise judgment (who wrote it only with ``show_source``)."""
    copies = f" · {count_label(entry.count)}" if entry.count > 1 else ""
    who = source_label(entry.sources) if show_source else ""
    return f"#### {label}{copies}{who}\n\n{safe_text(entry.trace.text)}{verdict_md(entry.trace.reason)}"


def answer_md(text: str) -> str:
    """A playground answer; a blank one says so (and how many whitespace characters it has)."""
    if not text.strip():
        return f"_(blank answer: {len(text)} whitespace characters)_"
    return safe_text(text)


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


def entry_json(entry: Entry, show_source: bool = False) -> dict:
    """An entry (identical traces collapsed) as the HTTP API returns it; with ``show_source`` also
    its ``sources`` (who wrote the copies: ``policy`` / ``teacher``), else nothing says who did."""
    out = {"completion_ids": entry.completion_ids, "text": entry.trace.text, "count": entry.count}
    return {**out, "sources": entry.sources} if show_source else out


def item_json(item: Item, show_source: bool = False) -> dict:
    """An item as ``/next_item`` returns it: :func:`item_state` plus texts (the verified traces'
    texts in display order), groups as :func:`entry_json` objects, question and answer; with
    ``show_source`` also ``sources`` (one per text) and each group's ``sources``."""
    groups = [entry_json(e, show_source) for e in group_traces(item.verified)]
    out = {**item_state(item), "texts": [t.text for t in item.verified], "groups": groups,
           "question": item.task.question, "answer": item.task.answer}
    return {**out, "sources": [t.source for t in item.verified]} if show_source else out
