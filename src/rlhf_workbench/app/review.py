"""The web app's Guidelines and Adjudicate tabs (laid out by :func:`rlhf_workbench.app.build.build_app`).

- **Guidelines** (with ``feedback.guidelines``): the guidelines markdown and a "Start annotating"
  button that records the acknowledgement (:mod:`rlhf_workbench.human.guidelines`) and opens the
  Annotate tab. The app opens this tab, not an item, for an annotator who has not acknowledged the
  current guidelines; afterwards the tab stays there to read on demand.
- **Adjudicate** (admins, with ``feedback.adjudication_threshold``): the open round's disputed
  items one at a time (:func:`rlhf_workbench.human.adjudication.disputes`, least agreement first): the
  question, each verified trace (identical copies as one entry with its count), every
  annotator's rank of it and their rationales; the admin types a rank per entry (1 = best, ties
  allowed) and submits; the ranking is stored for every copy and is the one that trains.

Every handler checks the logged-in user's role on the server (``check(request, action)`` raises
:class:`~rlhf_workbench.human.errors.AnnotationError`).
"""

from __future__ import annotations

from typing import Callable

import gradio as gr

from rlhf_workbench.app.render import safe_text
from rlhf_workbench.human.adjudication import Dispute, adjudicate, disputes
from rlhf_workbench.human.errors import AnnotationError
from rlhf_workbench.human.items import RATIONALE_MAX_CHARS
from rlhf_workbench.human.guidelines import Guidelines, acknowledge
from rlhf_workbench.human.duplicates import count_label, entry_ranks, shown_entries
from rlhf_workbench.store import Store, TaskRow


def _rank_of(entry, ranks: dict[int, int]) -> str:
    """An annotator's rank of an entry as shown (1 = best), or "–" when they did not rank it."""
    got = [ranks[c] for c in entry.completion_ids if c in ranks]
    return str(min(got) + 1) if got else "–"


def dispute_md(d: Dispute, entries, question: str) -> str:
    """The disputed item as the admin reads it: the question, a table of every annotator's rank
    per entry (Trace numbers as in the rank boxes below) and their rationales."""
    users = sorted(d.rankings)
    head = "| trace | " + " | ".join(safe_text(u, 100) for u in users) + " |\n|---|" + "---|" * len(users)
    rows = [f"| Trace {i}{' · ' + count_label(e.count) if e.count > 1 else ''} | "
            + " | ".join(_rank_of(e, d.rankings[u]) for u in users) + " |" for i, e in enumerate(entries, 1)]
    why = "\n".join(f"- **{safe_text(u, 100)}**: {safe_text(d.rationales[u], 2000)}" for u in users
                    if d.rationales.get(u, "").strip())
    return (f"{question}\n\n**Annotators' ranks** (1 = best, – not ranked; agreement: mean Kendall τ-b "
            f"= {d.agreement:.2f})\n\n{head}\n" + "\n".join(rows) + (f"\n\n**Rationales**\n\n{why}" if why else ""))


def guidelines_tab(store: Store, guidelines: Guidelines, check: Callable, tabs: gr.Tabs):
    """Lay out the Guidelines tab in the current context and wire "Start annotating": it records
    the acknowledgement, then selects the Annotate tab of ``tabs``. Returns the click's event, for
    the caller to chain the loading of the first item with ``.success(...)``."""
    gr.Markdown(guidelines.text, elem_id="guidelines-text")
    start = gr.Button("Start annotating", variant="primary", elem_id="guidelines-start")
    status = gr.Markdown(elem_id="guidelines-status")

    def ack(request: gr.Request):
        try:
            uid = check(request, "annotate")
        except AnnotationError as e:
            raise gr.Error(str(e)) from None
        acknowledge(store, uid, guidelines)
        return "Guidelines acknowledged: they stay here in this tab.", gr.Tabs(selected="annotate")

    return start.click(ack, None, [status, tabs], api_visibility="private", concurrency_limit=None)


def adjudicate_tab(store: Store, tab: gr.Tab, threshold: float, n_slots: int, check: Callable,
                   question_md: Callable[[TaskRow], str]) -> None:
    """Lay out the Adjudicate tab inside ``tab`` and wire it: refreshed when the tab is selected,
    on Refresh and after a submission. ``question_md(task_row)`` renders the item's question."""
    queue = gr.Markdown(elem_id="adj-queue")
    item_md = gr.Markdown(elem_id="adj-item")
    state = gr.State(None)
    texts, boxes = [], []
    for i in range(n_slots):
        with gr.Column(visible=False, variant="panel", elem_id=f"adj-trace-{i + 1}") as grp:
            text = gr.Markdown(elem_id=f"adj-trace-text-{i + 1}")
            rank = gr.Number(label=f"Adjudicated rank of Trace {i + 1} (1 = best)", precision=0,
                             elem_id=f"adj-rank-{i + 1}")
        texts += [grp, text]
        boxes.append(rank)
    rationale = gr.Textbox(label=f"Adjudication rationale (optional, at most {RATIONALE_MAX_CHARS} characters)",
                           max_length=RATIONALE_MAX_CHARS, elem_id="adj-rationale")
    with gr.Row():
        submit = gr.Button("Submit adjudication", variant="primary", elem_id="adj-submit")
        refresh = gr.Button("Refresh queue", elem_id="adj-refresh")
    status = gr.Markdown(elem_id="adj-status")
    outputs = [queue, item_md, state, *texts, *boxes, rationale, status]

    def show(request: gr.Request, note: str = ""):
        try:
            uid = check(request, "adjudicate")
        except AnnotationError as e:
            return [gr.skip()] * (len(outputs) - 1) + [f"**{e}**"]
        waiting = disputes(store, threshold)
        if not waiting:
            return (["No disagreements to adjudicate in the open round.", "", None]
                    + [gr.update(visible=False), ""] * n_slots + [None] * n_slots + ["", note])
        d = waiting[0]
        entries = shown_entries(store, uid, d.rollout_id, d.task_id)
        with store.session() as s:
            question = question_md(s.get(TaskRow, d.task_id))
        slots = []
        for i in range(n_slots):
            e = entries[i] if i < len(entries) else None
            copies = f" · {count_label(e.count)}" if e is not None and e.count > 1 else ""
            slots += [gr.update(visible=e is not None),
                      f"#### Trace {i + 1}{copies}\n\n{safe_text(e.trace.text)}" if e is not None else ""]
        n = len(waiting)
        head = f"### {n} item{'s' if n != 1 else ''} to adjudicate · task `{d.task_id}`"
        return ([head, dispute_md(d, entries, question), {"rollout_id": d.rollout_id, "task_id": d.task_id}]
                + slots + [None] * n_slots + ["", note])

    def send(request: gr.Request, st, why, *values):
        try:
            uid = check(request, "adjudicate")
            if not st:
                raise AnnotationError("No disputed item is loaded.")
            entries = shown_entries(store, uid, st["rollout_id"], st["task_id"])
            given = [None if v is None or v == "" else int(float(v)) - 1 for v in values[:len(entries)]]
            if any(r is None for r in given):
                raise AnnotationError("give every trace an adjudicated rank (1 = best, ties allowed)")
            adjudicate(store, uid, st["rollout_id"], st["task_id"], entry_ranks(entries, given), threshold, why or "")
        except AnnotationError as e:
            gr.Warning(str(e))
            return [gr.skip()] * (len(outputs) - 1) + [f"**Not saved:** {e}"]
        return show(request, f"Adjudicated task `{st['task_id']}`: its ranking is the one that trains.")

    tab.select(show, None, outputs, api_visibility="private", concurrency_limit=None)
    refresh.click(show, None, outputs, api_visibility="private", concurrency_limit=None)
    submit.click(send, [state, rationale, *boxes], outputs, api_visibility="private", concurrency_limit=None,
                 trigger_mode="once")
