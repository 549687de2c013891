"""The web app's Annotate tab: rank an item's verified traces, or judge a pair of them.

One item at a time (a question, its ground truth, the verified traces in a blind per-annotator
order, each with the verifier's reason, the rejected traces folded away with theirs). Ranks are
1 = best on the page (ties allowed) and stored 0-based. Per trace, two checkboxes: "flag unsafe
/ clinically wrong", and "verified answer is actually wrong" (an audit of the verifier; both
make the trace never chosen, reward 0). Keyboard: a digit fills the next unranked trace,
Backspace clears the last rank, Enter submits, S skips (never while typing in the rationale;
:mod:`rlhf_workbench.app.page_keys`). Identical traces are one entry with a count, and its rank
and marks go to every copy (:mod:`rlhf_workbench.human.duplicates`). A "Mode" switch offers
pairwise judgments instead (:mod:`rlhf_workbench.human.pairwise`): two traces A and B, keys 1 / 2
/ 3 (or the buttons) for A better / B better / tie, stored as a ranking of the two. An annotator
who has not acknowledged the current guidelines gets no item until they do
(:mod:`rlhf_workbench.app.review`).

Every handler checks the role on the server (:func:`rlhf_workbench.app.auth.request_user`).
"""

from __future__ import annotations

import gradio as gr

from rlhf_workbench.app.auth import allowed, request_user, request_username, role_of
from rlhf_workbench.app.render import LATEX, item_state, pair_md, rejected_md, task_md, trace_md
from rlhf_workbench.config import FeedbackConfig
from rlhf_workbench.human.annotation import next_item
from rlhf_workbench.human.duplicates import Entry, group_traces, save_grouped
from rlhf_workbench.human.errors import AnnotationError
from rlhf_workbench.human.guidelines import Guidelines, has_acknowledged
from rlhf_workbench.human.items import RATIONALE_MAX_CHARS, Item
from rlhf_workbench.human.pairwise import choose_pair, save_pairwise
from rlhf_workbench.store import Store

DONE = {"submitted": "Submitted", "skipped": "Skipped", "draft": "Draft saved"}


class AnnotatePage:
    """The Annotate tab's logic: what it shows for an item and what its buttons store.

    Its handlers (``load_next``, ``submit_ui``, ``draft_ui``, ``skip_ui``, ``poll`` and the
    ``pair_ui`` of :meth:`judge`) answer one update per component of :attr:`outputs`, which
    :func:`annotate_tab` sets when it lays the page out.

    Args:
        store: the run's database.
        fb: the run's ``feedback`` config (annotators per item, claim time, minimum verified traces).
        n_slots: trace slots on the page (K + M traces of an item, :func:`rlhf_workbench.app.build.trace_slots`).
        guidelines: the guidelines an annotator acknowledges before the first item, or None.
        show_source: say who wrote each trace (``rollout.teacher.show_source``); default blind.
    """

    def __init__(self, store: Store, fb: FeedbackConfig, n_slots: int, guidelines: Guidelines | None,
                 show_source: bool = False):
        self.store, self.fb, self.n_slots, self.guidelines = store, fb, n_slots, guidelines
        self.show_source = show_source
        self.outputs: list = []

    def _hidden_slots(self) -> list:
        return [gr.update(visible=False), gr.update(value=""), gr.update(value=None),
                gr.update(value=False), gr.update(value=False)]

    def render(self, item: Item | None, status: str, pair: tuple[Entry, Entry] | None = None) -> list:
        """Updates for every output of the annotation page (see :attr:`outputs`); ``pair``: the
        two entries (A, B) to judge in pairwise mode, None for a full ranking."""
        views = [gr.update(visible=pair is None), gr.update(visible=pair is not None),
                 gr.update(value=pair_md("A", pair[0], self.show_source) if pair else ""),
                 gr.update(value=pair_md("B", pair[1], self.show_source) if pair else "")]
        if item is None:
            updates = [gr.update(value="### Nothing to rank right now"),
                       gr.update(value="All open items are done. New items appear here when the worker has "
                                       "sampled the next round (checked every 10 s)."), None]
            updates += self._hidden_slots() * self.n_slots
            return updates + [gr.update(label="Rejected traces (0)"), gr.update(value=""), gr.update(value=""),
                              *views, gr.update(value=status)]
        draft = item.draft
        header = f"### policy v{item.policy_version} · round {item.round}"
        if draft is not None:
            header += f" · draft revision {draft.revision}"
        state = item_state(item)
        if pair is not None:
            header += " · pairwise: which is better?"
            state["pair"] = [pair[0].completion_ids, pair[1].completion_ids]
        entries = group_traces(item.verified)
        updates = [gr.update(value=header), gr.update(value=task_md(item.task)), state, *self._slots(entries, draft)]
        if not entries:
            status = (status + " " if status else "") + "This item has no verified trace: submit it to confirm, or skip it."
        return updates + [gr.update(label=f"Rejected traces ({len(item.rejected)}) · verifier's reasons"),
                          gr.update(value=rejected_md(item)), gr.update(value=draft.rationale if draft else ""),
                          *views, gr.update(value=status)]

    def _slots(self, entries: list[Entry], draft) -> list:
        """The trace slots' updates: one entry per slot with the draft's rank and marks, the rest hidden."""
        draft_ranks = {int(k): v for k, v in (draft.ranks or {}).items()} if draft else {}
        draft_flags = set(draft.flagged or []) if draft else set()
        draft_wrong = set(draft.verifier_wrong or []) if draft else set()
        updates = []
        for i in range(self.n_slots):
            if i >= len(entries):
                updates += self._hidden_slots()
                continue
            tr = entries[i].trace
            rank = draft_ranks.get(tr.completion_id)
            sources = entries[i].sources if self.show_source else None
            updates += [gr.update(visible=True), gr.update(value=trace_md(i + 1, tr, entries[i].count, sources)),
                        gr.update(value=None if rank is None else rank + 1, label=f"Rank of Trace {i + 1} (1 = best)"),
                        gr.update(value=tr.completion_id in draft_flags),
                        gr.update(value=tr.completion_id in draft_wrong)]
        return updates

    def load_next(self, request: gr.Request, mode: str = "ranking", status: str = "") -> list:
        """Show the caller's next item (claimed for them), in ``mode`` ``ranking`` or ``pairwise``."""
        try:
            uid = request_user(self.store, request)
        except AnnotationError as e:
            return self.render(None, f"**{e}**")
        if not has_acknowledged(self.store, uid, self.guidelines):  # the guidelines come before the first item
            updates = self.render(None, "Read the **Guidelines** tab and click **Start annotating** to get your "
                                        "first item.")
            updates[0] = gr.update(value="### Read the guidelines first")
            return updates
        fb = self.fb
        item = next_item(self.store, uid, fb.annotators_per_item, fb.min_verified, fb.claim_seconds)
        pair = None
        if item is not None and mode == "pairwise":
            pair = choose_pair(self.store, uid, item.rollout_id, item.task.id)
            if pair is None:
                status = (status + " " if status else "") + "Fewer than two distinct traces: rank this one in full."
        return self.render(item, status, pair)

    def collect(self, state: dict, values: list, require_all: bool) -> tuple[dict[int, int], list[int], list[int]]:
        """The page's rank boxes and checkboxes (``values``: ranks, flags, wrong marks, one per
        slot) as completion id -> 0-based rank, flagged ids and ids marked wrong, every identical
        copy included.

        Raises:
            AnnotationError: a rank that is not a whole number from 1 to the number of entries,
                or (``require_all``) an entry without a rank.
        """
        n_slots = self.n_slots
        groups = state.get("groups") or [[cid] for cid in state["completion_ids"]]  # one slot per entry
        ranks_in, flags_in, wrong_in = values[:n_slots], values[n_slots:2 * n_slots], values[2 * n_slots:]
        ranks, missing = {}, []
        for i, ids in enumerate(groups):
            v = ranks_in[i]
            if v is None or v == "":
                missing.append(i + 1)
                continue
            if float(v) != int(float(v)) or not 1 <= int(float(v)) <= len(groups):
                raise AnnotationError(f"Trace {i + 1}: a rank must be a whole number from 1 to {len(groups)} (1 = best)")
            ranks.update({cid: int(float(v)) - 1 for cid in ids})  # every identical copy
        if require_all and missing:
            raise AnnotationError(f"rank every trace: Trace {', '.join(map(str, missing))} "
                                  f"{'has' if len(missing) == 1 else 'have'} no rank")
        flagged = [cid for i, ids in enumerate(groups) if flags_in[i] for cid in ids]
        wrong = [cid for i, ids in enumerate(groups) if wrong_in[i] for cid in ids]
        return ranks, flagged, wrong

    def _not_saved(self, e: AnnotationError) -> list:
        gr.Warning(str(e))
        return [gr.skip()] * (len(self.outputs) - 1) + [gr.update(value=f"**Not saved:** {e}")]

    def act(self, request: gr.Request, status_name: str, state: dict | None, rationale: str, values: list,
            mode: str = "ranking") -> list:
        """Store the page's annotation as ``status_name`` (submitted, draft or skipped), then show
        the next item; on a refusal, a warning and nothing changes."""
        fb = self.fb
        try:
            uid = request_user(self.store, request)
            if state is None:
                raise AnnotationError("No item is loaded.")
            ranks, flagged, wrong = ({}, [], []) if status_name == "skipped" else self.collect(
                state, values, status_name == "submitted")
            revision = None if state["revision"] < 0 else state["revision"]
            save_grouped(self.store, uid, state["rollout_id"], state["task_id"], status_name, ranks,
                         rationale or "", flagged, revision, fb.annotators_per_item, wrong, fb.claim_seconds)
        except AnnotationError as e:
            return self._not_saved(e)
        return self.load_next(request, mode, f"{DONE[status_name]} (task `{state['task_id']}`, round {state['round']}).")

    # gradio passes the request only to positional parameters before *args, hence its place.
    def submit_ui(self, request: gr.Request, state, rationale, mode, *values):
        """Submit: every entry ranked."""
        return self.act(request, "submitted", state, rationale, list(values), mode)

    def draft_ui(self, request: gr.Request, state, rationale, mode, *values):
        """Save a draft (the item stays claimed)."""
        return self.act(request, "draft", state, rationale, list(values), mode)

    def skip_ui(self, request: gr.Request, state, rationale, mode, *values):
        """Skip the item for good."""
        return self.act(request, "skipped", state, rationale, list(values), mode)

    def judge(self, outcome: str):
        """The handler of one pairwise button (``a``, ``b`` or ``tie``)."""
        def pair_ui(request: gr.Request, state, rationale, mode):
            fb = self.fb
            try:
                uid = request_user(self.store, request)
                if state is None or not state.get("pair"):
                    raise AnnotationError("No pair is loaded.")
                revision = None if state["revision"] < 0 else state["revision"]
                save_pairwise(self.store, uid, state["rollout_id"], state["task_id"], *state["pair"], outcome,
                              rationale or "", revision, fb.annotators_per_item, fb.claim_seconds)
            except AnnotationError as e:
                return self._not_saved(e)
            return self.load_next(request, mode, f"Submitted (task `{state['task_id']}`, round {state['round']}).")
        return pair_ui

    def poll(self, request: gr.Request, state, mode):
        """The 10 s timer: an annotator with no item loaded gets one as soon as there is one."""
        if state is not None or not allowed(role_of(self.store, request_username(request)), "annotate"):
            return [gr.skip()] * len(self.outputs)
        return self.load_next(request, mode, "")


def _pair_view():
    """The pairwise view (hidden until pairwise mode): ``(column, A text, B text, [A, B, tie] buttons)``."""
    with gr.Column(visible=False, elem_id="pair-view") as pair_col:
        gr.Markdown("Keys: **1** A is better · **2** B is better · **3** tie · **S** skips.", elem_id="pair-keys-help")
        with gr.Row():
            pair_a = gr.Markdown(latex_delimiters=LATEX, line_breaks=True, elem_id="pair-a-text")
            pair_b = gr.Markdown(latex_delimiters=LATEX, line_breaks=True, elem_id="pair-b-text")
        with gr.Row():
            buttons = [gr.Button("A is better (1)", elem_id="pair-a-btn"),
                       gr.Button("B is better (2)", elem_id="pair-b-btn"),
                       gr.Button("Tie (3)", elem_id="pair-tie-btn")]
    return pair_col, pair_a, pair_b, buttons


def _trace_slot(i: int) -> list:
    """Trace slot ``i`` (0-based): ``[group, text, rank box, flag box, wrong box]``."""
    with gr.Column(visible=False, variant="panel", elem_id=f"trace-{i + 1}", elem_classes=["trace"]) as grp:
        text = gr.Markdown(latex_delimiters=LATEX, line_breaks=True, elem_id=f"trace-text-{i + 1}")
        with gr.Row():
            rank = gr.Number(label=f"Rank of Trace {i + 1} (1 = best)", precision=0, elem_id=f"rank-{i + 1}",
                             elem_classes=["rank-input"])
            flag = gr.Checkbox(label="flag unsafe / clinically wrong", elem_id=f"flag-{i + 1}")
            wrong = gr.Checkbox(label="verified answer is actually wrong", elem_id=f"wrong-{i + 1}")
    return [grp, text, rank, flag, wrong]


def _ranking_view(n_slots: int):
    """The full-ranking view: ``(column, slot components, rank boxes, flag boxes, wrong boxes,
    submit button, draft button)``."""
    with gr.Column(elem_id="ranking-view") as rank_col:
        gr.Markdown("Keys: **1–9** rank the next unranked trace (1 = best, ties allowed) · **Backspace** "
                    "clears the last rank · **Enter** submits · **S** skips (not while typing in the "
                    "rationale).", elem_id="keys-help")
        slots = [_trace_slot(i) for i in range(n_slots)]
        with gr.Row():
            submit_btn = gr.Button("Submit (Enter)", variant="primary", elem_id="submit-btn")
            draft_btn = gr.Button("Save draft", elem_id="draft-btn")
    parts = [c for slot in slots for c in slot]
    return rank_col, parts, [s[2] for s in slots], [s[3] for s in slots], [s[4] for s in slots], submit_btn, draft_btn


def annotate_tab(demo: gr.Blocks, page: AnnotatePage) -> gr.Radio:
    """Lay out the Annotate tab in the current context and wire its events to ``page`` (an item
    on page load, on Reload, on a mode change and every 10 s while none is shown). Returns the
    Mode radio, the input of ``page.load_next``."""
    header = gr.Markdown(elem_id="item-header")
    question = gr.Markdown(elem_id="item-question", latex_delimiters=LATEX)
    state = gr.State(None)
    mode = gr.Radio([("Full ranking", "ranking"), ("Pairwise: A, B or tie", "pairwise")],
                    value=page.fb.mode, label="Mode", elem_id="mode")
    pair_col, pair_a, pair_b, pair_btns = _pair_view()
    rank_col, slot_parts, rank_boxes, flag_boxes, wrong_boxes, submit_btn, draft_btn = _ranking_view(page.n_slots)
    with gr.Accordion("Rejected traces", open=False, elem_id="rejected") as rejected_acc:
        rejected = gr.Markdown(latex_delimiters=LATEX, line_breaks=True)
    rationale = gr.Textbox(label=f"Rationale (optional, at most {RATIONALE_MAX_CHARS} characters)", lines=2,
                           max_length=RATIONALE_MAX_CHARS, elem_id="rationale")
    with gr.Row():
        skip_btn = gr.Button("Skip (S)", elem_id="skip-btn")
        reload_btn = gr.Button("Reload item", elem_id="reload-btn")
    status = gr.Markdown(elem_id="annotate-status")
    page.outputs = outputs = [header, question, state, *slot_parts, rejected_acc, rejected, rationale,
                              rank_col, pair_col, pair_a, pair_b, status]
    inputs = [state, rationale, mode, *rank_boxes, *flag_boxes, *wrong_boxes]
    quiet = dict(api_visibility="private", concurrency_limit=None)
    for btn, fn in ((submit_btn, page.submit_ui), (draft_btn, page.draft_ui), (skip_btn, page.skip_ui)):
        btn.click(fn, inputs, outputs, trigger_mode="once", **quiet)
    for btn, outcome in zip(pair_btns, ("a", "b", "tie")):
        btn.click(page.judge(outcome), [state, rationale, mode], outputs, trigger_mode="once", **quiet)
    reload_btn.click(page.load_next, [mode], outputs, **quiet)
    mode.change(page.load_next, [mode], outputs, **quiet)
    demo.load(page.load_next, [mode], outputs, **quiet)
    gr.Timer(10).tick(page.poll, [state, mode], outputs, show_progress="hidden", **quiet)
    return mode
