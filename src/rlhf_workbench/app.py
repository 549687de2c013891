"""The experts' web app (Gradio): rank verified traces, watch the run, try the policy.

Three tabs behind a login (accounts from :mod:`rlhf_workbench.annotation`):

- **Annotate**: one item at a time (a question, its ground truth, the verified traces in a
  blind per-annotator order, each with the verifier's reason, the rejected traces folded away
  with theirs). Ranks are 1 = best on the page (ties allowed) and stored 0-based. Per trace, two
  checkboxes: "flag unsafe / clinically wrong", and "verified answer is actually wrong" (an
  audit of the verifier; both make the trace never chosen, reward 0). Keyboard: a digit fills the
  next unranked trace, Backspace clears the last rank, Enter submits, S skips (never while
  typing in the rationale; :mod:`rlhf_workbench.page_keys`). Identical traces are one entry with
  a count, and its rank and marks go to every copy (:mod:`rlhf_workbench.items`). A "Mode"
  switch offers pairwise judgments instead (:mod:`rlhf_workbench.pairwise`): two traces A and B,
  keys 1 / 2 / 3 (or the buttons) for A better / B better / tie, stored as a ranking of the two.
- **Dashboard** (:mod:`rlhf_workbench.dashboard`): held-out accuracy, reward, KL, loss and
  acceptance per round, rankings per hour per annotator, inter-annotator agreement, the
  verifier's audited precision, the worker's status and the current version.
- **Playground**: one question answered greedily by the current policy and by the reference
  (base) model side by side, with thumbs up/down stored as binary feedback.
- **Guidelines** (with ``feedback.guidelines``) and **Adjudicate** (admins, with
  ``feedback.adjudication_threshold``): :mod:`rlhf_workbench.review_ui`. An annotator who has not
  acknowledged the current guidelines gets the Guidelines tab, not an item, until they click
  "Start annotating".

Each user sees the tabs their role allows, and every handler checks the role again on the
server (:mod:`rlhf_workbench.auth`: annotators annotate, admins also see the dashboard, the
playground needs the ``playground`` or ``admin`` role), so a handler called directly through the
queue API refuses what the page would not show. Logins are throttled and sessions expire
(``app:`` in the run config).

The database is the only channel to the worker (the loop with ``feedback.source: human``).
API endpoints for scripted clients (``gradio_client``, logged in with ``auth=(user, password)``):
``/next_item`` (no arguments; the item as a JSON string, ``null`` when there is nothing to do;
with ``groups``, the identical traces collapsed)
and ``/submit`` (rollout_id, task_id, ranks_json, rationale, flagged_json, revision, wrong_json:
the verified traces whose answer is actually wrong; returns ``"ok: ..."`` or
``"error: <reason>"``). ``gradio_client`` fills in wrong_json's default ``"[]"`` when it is left
out; Gradio's plain HTTP API (``POST /gradio_api/call/submit``) needs all seven values.
Pairwise: ``/next_pair`` (the item with ``a`` and ``b``, the traces to judge) and ``/submit_pair``
(rollout_id, task_id, a_json, b_json, outcome ``a`` / ``b`` / ``tie``, rationale, revision). Only the
item ``/next_item`` served to the caller can be submitted (it is held for them for
``feedback.claim_seconds``), and only while its round is open.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from .annotation import (RATIONALE_MAX_CHARS, AnnotationError, Item, next_item,  # noqa: E402
                         record_binary_feedback)
from .auth import (CLIENT_ADDRESS, LoginPolicy, LoginThrottled, SessionMiddleware, allowed, login,  # noqa: E402
                   require, role_of)
from .config import RunConfig  # noqa: E402
from .dashboard import dashboard_tab  # noqa: E402
from .guidelines import has_acknowledged, load_guidelines  # noqa: E402
from .items import count_label, group_traces, save_grouped  # noqa: E402
from .page_keys import CSS, KEYBOARD_JS  # noqa: E402
from .pairwise import choose_pair, save_pairwise  # noqa: E402
from .review_ui import adjudicate_tab, guidelines_tab  # noqa: E402
from .store import Store  # noqa: E402
from .verify import NO_KEY_REASON  # noqa: E402

LATEX = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "$", "right": "$", "display": False},
    {"left": "\\(", "right": "\\)", "display": False},
    {"left": "\\[", "right": "\\]", "display": True},
]

# --- small helpers ---------------------------------------------------------------------------------
def _username(request: gr.Request | None) -> str | None:
    return getattr(request, "username", None) if request is not None else None


def _user_id(store: Store, request: gr.Request | None, action: str = "annotate") -> int:
    """The logged-in user's id if their role allows ``action``; AnnotationError (NotAllowed for
    the role) with a clear message otherwise (:func:`rlhf_workbench.auth.require`)."""
    return require(store, _username(request), action)


def _question_md(item: Item) -> str:
    return _task_md(item.task)


def _task_md(t) -> str:
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


def _verdict(reason: str) -> str:
    """The verifier's line under a trace; none for an open task's traces (nothing was verified)."""
    return "" if reason == NO_KEY_REASON else f"\n\nverifier: _{reason}_"


def _rejected_md(item: Item) -> str:
    if not item.rejected:
        return "_No rejected traces._"
    return "\n\n---\n\n".join(f"**Rejected {j}**\n\n{tr.text}{_verdict(tr.reason)}"
                              for j, tr in enumerate(item.rejected, 1))


def _trace_md(number: int, trace, count: int = 1) -> str:
    """A verified trace as shown for ranking, with the verifier's reason for accepting it (and
    how many identical copies it stands for, :mod:`rlhf_workbench.items`)."""
    copies = f" · {count_label(count)}" if count > 1 else ""
    return f"#### Trace {number}{copies}\n\n{trace.text}{_verdict(trace.reason)}"


def _pair_md(label: str, entry) -> str:
    """One side (A or B) of a pairwise judgment."""
    copies = f" · {count_label(entry.count)}" if entry.count > 1 else ""
    return f"#### {label}{copies}\n\n{entry.trace.text}{_verdict(entry.trace.reason)}"


def _entry_json(entry) -> dict:
    """An entry (identical traces collapsed) as the HTTP API returns it."""
    return {"completion_ids": entry.completion_ids, "text": entry.trace.text, "count": entry.count}


def _answer_md(text: str) -> str:
    if not text.strip():
        return f"_(blank answer: {len(text)} whitespace characters)_"
    return text


class _PlaygroundModels:
    """The latest policy and the reference, loaded lazily and reloaded when a new version appears."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.lock = threading.Lock()
        self.version: int | None = None
        self.pair = None

    def answer(self, store: Store, prompt_task) -> tuple[int, str, str]:
        from .models import load_policy
        from .rollout import generate

        latest = store.latest_version()
        version = latest.id if latest is not None else 0
        with self.lock:
            if self.pair is None or version != self.version:
                ckpt = store.checkpoint_dir(latest) if latest is not None and latest.id > 0 else None
                self.pair = load_policy(self.cfg.model, checkpoint=ckpt)
                self.pair.policy.eval()
                self.version = version
            pair, ev = self.pair, self.cfg.eval

            def run(model):
                return generate(model, pair.tokenizer, [prompt_task], num_generations=1, do_sample=False,
                                max_new_tokens=ev.max_new_tokens, mixed_precision=self.cfg.model.mixed_precision)[0].text

            policy_text = run(pair.policy)
            with pair.reference_context():
                ref_text = run(pair.ref_model)
        return version, policy_text, ref_text


# --- the app -----------------------------------------------------------------------------------------
def build_app(cfg: RunConfig, out_dir: Path) -> gr.Blocks:
    """The three-tab Blocks app for a run (``Store(cfg.db_url, out_dir)``); launch with :func:`launch`."""
    store = Store(cfg.db_url, out_dir)
    fb = cfg.feedback
    n_slots = cfg.rollout.num_generations
    models = _PlaygroundModels(cfg)
    guidelines = load_guidelines(fb.guidelines)  # FileNotFoundError / ValueError naming feedback.guidelines

    # --- annotation logic (shared by the page and the API) -----------------------------------
    def item_state(item: Item | None) -> dict | None:
        if item is None:
            return None
        return {"rollout_id": item.rollout_id, "task_id": item.task.id, "round": item.round,
                "policy_version": item.policy_version, "completion_ids": [t.completion_id for t in item.verified],
                "groups": [e.completion_ids for e in group_traces(item.verified)],
                "rejected_ids": [t.completion_id for t in item.rejected],
                "revision": item.draft.revision if item.draft is not None else -1}

    def render(item: Item | None, status: str, pair=None) -> list:
        """Updates for every output of the annotation page (see ``page_outputs``); ``pair``: the
        two entries (A, B) to judge in pairwise mode, None for a full ranking."""
        views = [gr.update(visible=pair is None), gr.update(visible=pair is not None),
                 gr.update(value=_pair_md("A", pair[0]) if pair else ""),
                 gr.update(value=_pair_md("B", pair[1]) if pair else "")]
        if item is None:
            updates = [gr.update(value="### Nothing to rank right now"),
                       gr.update(value="All open items are done. New items appear here when the worker has "
                                       "sampled the next round (checked every 10 s)."), None]
            for _ in range(n_slots):
                updates += [gr.update(visible=False), gr.update(value=""), gr.update(value=None),
                            gr.update(value=False), gr.update(value=False)]
            updates += [gr.update(label="Rejected traces (0)"), gr.update(value=""), gr.update(value=""),
                        *views, gr.update(value=status)]
            return updates
        draft = item.draft
        draft_ranks = {int(k): v for k, v in (draft.ranks or {}).items()} if draft else {}
        draft_flags = set(draft.flagged or []) if draft else set()
        draft_wrong = set(draft.verifier_wrong or []) if draft else set()
        header = f"### policy v{item.policy_version} · round {item.round}"
        if draft is not None:
            header += f" · draft revision {draft.revision}"
        state = item_state(item)
        if pair is not None:
            header += " · pairwise: which is better?"
            state["pair"] = [pair[0].completion_ids, pair[1].completion_ids]
        updates = [gr.update(value=header), gr.update(value=_question_md(item)), state]
        entries = group_traces(item.verified)
        n = len(entries)
        for i in range(n_slots):
            if i < n:
                tr = entries[i].trace
                rank = draft_ranks.get(tr.completion_id)
                updates += [gr.update(visible=True), gr.update(value=_trace_md(i + 1, tr, entries[i].count)),
                            gr.update(value=None if rank is None else rank + 1,
                                      label=f"Rank of Trace {i + 1} (1 = best)"),
                            gr.update(value=tr.completion_id in draft_flags),
                            gr.update(value=tr.completion_id in draft_wrong)]
            else:
                updates += [gr.update(visible=False), gr.update(value=""), gr.update(value=None),
                            gr.update(value=False), gr.update(value=False)]
        if n == 0:
            status = (status + " " if status else "") + "This item has no verified trace: submit it to confirm, or skip it."
        updates += [gr.update(label=f"Rejected traces ({len(item.rejected)}) · verifier's reasons"),
                    gr.update(value=_rejected_md(item)), gr.update(value=draft.rationale if draft else ""),
                    *views, gr.update(value=status)]
        return updates

    def load_next(request: gr.Request, mode: str = "ranking", status: str = "") -> list:
        try:
            uid = _user_id(store, request)
        except AnnotationError as e:
            return render(None, f"**{e}**")
        if not has_acknowledged(store, uid, guidelines):  # the guidelines come before the first item
            updates = render(None, "Read the **Guidelines** tab and click **Start annotating** to get your first item.")
            updates[0] = gr.update(value="### Read the guidelines first")
            return updates
        item = next_item(store, uid, fb.annotators_per_item, fb.min_verified, fb.claim_seconds)
        pair = None
        if item is not None and mode == "pairwise":
            pair = choose_pair(store, uid, item.rollout_id, item.task.id)
            if pair is None:
                status = (status + " " if status else "") + "Fewer than two distinct traces: rank this one in full."
        return render(item, status, pair)

    def collect(state: dict, values: list, require_all: bool) -> tuple[dict[int, int], list[int], list[int]]:
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

    def act(request: gr.Request, status_name: str, state: dict | None, rationale: str, values: list,
            mode: str = "ranking"):
        try:
            uid = _user_id(store, request)
            if state is None:
                raise AnnotationError("No item is loaded.")
            ranks, flagged, wrong = ({}, [], []) if status_name == "skipped" else collect(
                state, values, status_name == "submitted")
            revision = None if state["revision"] < 0 else state["revision"]
            save_grouped(store, uid, state["rollout_id"], state["task_id"], status_name, ranks,
                         rationale or "", flagged, revision, fb.annotators_per_item, wrong, fb.claim_seconds)
        except AnnotationError as e:
            gr.Warning(str(e))
            return [gr.skip()] * (len(page_outputs) - 1) + [gr.update(value=f"**Not saved:** {e}")]
        done = {"submitted": "Submitted", "skipped": "Skipped", "draft": "Draft saved"}[status_name]
        return load_next(request, mode, f"{done} (task `{state['task_id']}`, round {state['round']}).")

    # gradio passes the request only to positional parameters before *args, hence its place.
    def submit_ui(request: gr.Request, state, rationale, mode, *values):
        return act(request, "submitted", state, rationale, list(values), mode)

    def draft_ui(request: gr.Request, state, rationale, mode, *values):
        return act(request, "draft", state, rationale, list(values), mode)

    def skip_ui(request: gr.Request, state, rationale, mode, *values):
        return act(request, "skipped", state, rationale, list(values), mode)

    def judge(outcome: str):
        """The handler of one pairwise button (``a``, ``b`` or ``tie``)."""
        def pair_ui(request: gr.Request, state, rationale, mode):
            try:
                uid = _user_id(store, request)
                if state is None or not state.get("pair"):
                    raise AnnotationError("No pair is loaded.")
                revision = None if state["revision"] < 0 else state["revision"]
                save_pairwise(store, uid, state["rollout_id"], state["task_id"], *state["pair"], outcome,
                              rationale or "", revision, fb.annotators_per_item, fb.claim_seconds)
            except AnnotationError as e:
                gr.Warning(str(e))
                return [gr.skip()] * (len(page_outputs) - 1) + [gr.update(value=f"**Not saved:** {e}")]
            return load_next(request, mode, f"Submitted (task `{state['task_id']}`, round {state['round']}).")
        return pair_ui

    def poll(request: gr.Request, state, mode):
        if state is not None or not allowed(role_of(store, _username(request)), "annotate"):
            return [gr.skip()] * len(page_outputs)
        return load_next(request, mode, "")

    # --- API for scripted clients ----------------------------------------------------------------
    def api_next_item(request: gr.Request) -> str:
        """The logged-in annotator's next item as JSON (null when there is nothing to do):
        rollout_id, task_id, round, policy_version, completion_ids (verified traces in display
        order), texts (those traces' texts, same order), groups (identical traces collapsed: one
        entry per distinct text, in display order, each ``{"completion_ids", "text", "count"}``),
        rejected_ids, revision (-1 when no draft), question, answer."""
        try:
            uid = _user_id(store, request)
        except AnnotationError as e:
            return json.dumps({"error": str(e)})
        item = next_item(store, uid, fb.annotators_per_item, fb.min_verified, fb.claim_seconds)
        return "null" if item is None else json.dumps(item_json(item))

    def item_json(item: Item) -> dict:
        groups = [_entry_json(e) for e in group_traces(item.verified)]
        return {**item_state(item), "texts": [t.text for t in item.verified], "groups": groups,
                "question": item.task.question, "answer": item.task.answer}

    def api_next_pair(request: gr.Request) -> str:
        """The logged-in annotator's next item for a pairwise judgment as JSON (null when there is
        nothing to do): what /next_item returns, plus ``a`` and ``b``, the two traces to judge
        (each ``{completion_ids, text, count}``; both null when the item has fewer than two
        distinct verified traces: rank it with /submit)."""
        try:
            uid = _user_id(store, request)
        except AnnotationError as e:
            return json.dumps({"error": str(e)})
        item = next_item(store, uid, fb.annotators_per_item, fb.min_verified, fb.claim_seconds)
        if item is None:
            return "null"
        pair = choose_pair(store, uid, item.rollout_id, item.task.id)
        return json.dumps({**item_json(item), "a": _entry_json(pair[0]) if pair else None,
                           "b": _entry_json(pair[1]) if pair else None})

    def api_submit_pair(rollout_id: int, task_id: str, a_json: str, b_json: str, outcome: str, rationale: str,
                        revision: int, request: gr.Request) -> str:
        """Submit a pairwise judgment as the logged-in annotator: a_json / b_json the JSON lists of
        completion ids of A and B (``completion_ids`` from /next_pair), outcome ``a``, ``b`` or
        ``tie``, revision the draft revision shown or -1. Returns "ok: ..." or "error: <reason>"."""
        try:
            uid = _user_id(store, request)
            try:
                a_ids, b_ids = json.loads(a_json or "[]"), json.loads(b_json or "[]")
            except json.JSONDecodeError as e:
                raise AnnotationError(f"a_json / b_json must be JSON lists: {e}") from e
            if not isinstance(a_ids, list) or not isinstance(b_ids, list):
                raise AnnotationError("a_json and b_json must be JSON lists of completion ids")
            rev = None if revision is None or int(revision) < 0 else int(revision)
            a = save_pairwise(store, uid, int(rollout_id), str(task_id), a_ids, b_ids, str(outcome),
                              rationale or "", rev, fb.annotators_per_item, fb.claim_seconds)
        except (AnnotationError, ValueError, TypeError) as e:
            return f"error: {e}"
        return f"ok: submitted rollout {a.rollout_id} task {a.task_id}"

    def api_submit(rollout_id: int, task_id: str, ranks_json: str, rationale: str, flagged_json: str,
                   revision: int, request: gr.Request, wrong_json: str = "[]") -> str:
        """Submit a ranking as the logged-in annotator. ranks_json: JSON object completion id ->
        0-based rank (0 best, ties allowed; a rank given to one of identical traces applies to
        every copy), or a JSON list with one 0-based rank per entry of ``groups`` from
        /next_item; flagged_json: JSON list of completion ids; revision:
        the draft revision shown, or -1 for none; wrong_json (optional): JSON list of verified
        completion ids whose answer is actually wrong. Returns "ok: ..." or "error: <reason>"."""
        try:
            uid = _user_id(store, request)
            try:
                ranks = json.loads(ranks_json or "{}")
                flagged = json.loads(flagged_json or "[]")
                wrong = json.loads(wrong_json or "[]")
            except json.JSONDecodeError as e:
                raise AnnotationError(f"ranks_json / flagged_json / wrong_json must be JSON: {e}") from e
            if not isinstance(ranks, (dict, list)) or not isinstance(flagged, list) or not isinstance(wrong, list):
                raise AnnotationError("ranks_json must be a JSON object or list, flagged_json and wrong_json "
                                      "JSON lists")
            rev = None if revision is None or int(revision) < 0 else int(revision)
            a = save_grouped(store, uid, int(rollout_id), str(task_id), "submitted", ranks, rationale or "",
                             flagged, rev, fb.annotators_per_item, wrong, fb.claim_seconds)
        except (AnnotationError, ValueError, TypeError) as e:
            return f"error: {e}"
        return f"ok: submitted rollout {a.rollout_id} task {a.task_id}"

    # --- playground ------------------------------------------------------------------------------------
    def ask(question: str, instruction: str, request: gr.Request):
        from .tasks import Task

        try:
            _user_id(store, request, "playground")
        except AnnotationError as e:
            gr.Warning(str(e))
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), None, f"**{e}**"
        if not question or not question.strip():
            gr.Warning("Type a question first.")
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), None, "Type a question first."
        task = Task(id="playground", question=question.strip(), answer="", answer_type="text",
                    instruction=(instruction or "").strip() or None)
        version, pol, ref = models.answer(store, task)
        state = {"prompt": task.prompt(), "policy": pol, "reference": ref, "version": version}
        return (f"#### Current policy v{version}", _answer_md(pol), "#### Reference (base model, v0)",
                _answer_md(ref), state, "Rate each answer: thumbs up or down.")

    def rate(which: str, label: bool):
        def fn(state: dict | None, request: gr.Request):
            try:
                uid = _user_id(store, request, "playground")
            except AnnotationError as e:
                gr.Warning(str(e))
                return f"**{e}**"
            if not state or not isinstance(state, dict) or which not in state or "prompt" not in state:
                gr.Warning("Ask a question first.")
                return "Ask a question first."
            version = state["version"] if which == "policy" else 0
            record_binary_feedback(store, uid, version, state["prompt"], state[which], label)
            return f"Recorded thumbs {'up' if label else 'down'} for the {which} answer (v{version})."
        return fn

    # --- layout -------------------------------------------------------------------------------------------
    with gr.Blocks(title="RLHF workbench", analytics_enabled=False) as demo:
        gr.Markdown("## Online RLHF workbench")
        with gr.Tabs() as tabs:
            with gr.Tab("Annotate", id="annotate", elem_id="tab-annotate") as annotate_tab:
                header = gr.Markdown(elem_id="item-header")
                question = gr.Markdown(elem_id="item-question", latex_delimiters=LATEX)
                state = gr.State(None)
                mode = gr.Radio([("Full ranking", "ranking"), ("Pairwise: A, B or tie", "pairwise")],
                                value=fb.mode, label="Mode", elem_id="mode")
                with gr.Column(visible=False, elem_id="pair-view") as pair_col:
                    gr.Markdown("Keys: **1** A is better · **2** B is better · **3** tie · **S** skips.",
                                elem_id="pair-keys-help")
                    with gr.Row():
                        pair_a = gr.Markdown(latex_delimiters=LATEX, line_breaks=True, elem_id="pair-a-text")
                        pair_b = gr.Markdown(latex_delimiters=LATEX, line_breaks=True, elem_id="pair-b-text")
                    with gr.Row():
                        pair_btns = [gr.Button("A is better (1)", elem_id="pair-a-btn"),
                                     gr.Button("B is better (2)", elem_id="pair-b-btn"),
                                     gr.Button("Tie (3)", elem_id="pair-tie-btn")]
                with gr.Column(elem_id="ranking-view") as rank_col:
                    gr.Markdown("Keys: **1–9** rank the next unranked trace (1 = best, ties allowed) · **Backspace** "
                                "clears the last rank · **Enter** submits · **S** skips (not while typing in the "
                                "rationale).", elem_id="keys-help")
                    slot_parts, rank_boxes, flag_boxes, wrong_boxes = [], [], [], []
                    for i in range(n_slots):
                        with gr.Column(visible=False, variant="panel", elem_id=f"trace-{i + 1}",
                                       elem_classes=["trace"]) as grp:
                            text = gr.Markdown(latex_delimiters=LATEX, line_breaks=True, elem_id=f"trace-text-{i + 1}")
                            with gr.Row():
                                rank = gr.Number(label=f"Rank of Trace {i + 1} (1 = best)", precision=0,
                                                 elem_id=f"rank-{i + 1}", elem_classes=["rank-input"])
                                flag = gr.Checkbox(label="flag unsafe / clinically wrong", elem_id=f"flag-{i + 1}")
                                wrong = gr.Checkbox(label="verified answer is actually wrong", elem_id=f"wrong-{i + 1}")
                        slot_parts += [grp, text, rank, flag, wrong]
                        rank_boxes.append(rank)
                        flag_boxes.append(flag)
                        wrong_boxes.append(wrong)
                    with gr.Row():
                        submit_btn = gr.Button("Submit (Enter)", variant="primary", elem_id="submit-btn")
                        draft_btn = gr.Button("Save draft", elem_id="draft-btn")
                with gr.Accordion("Rejected traces", open=False, elem_id="rejected") as rejected_acc:
                    rejected_md = gr.Markdown(latex_delimiters=LATEX, line_breaks=True)
                rationale = gr.Textbox(label=f"Rationale (optional, at most {RATIONALE_MAX_CHARS} characters)", lines=2,
                                       max_length=RATIONALE_MAX_CHARS, elem_id="rationale")
                with gr.Row():
                    skip_btn = gr.Button("Skip (S)", elem_id="skip-btn")
                    reload_btn = gr.Button("Reload item", elem_id="reload-btn")
                status = gr.Markdown(elem_id="annotate-status")
                page_outputs = [header, question, state, *slot_parts, rejected_acc, rejected_md, rationale,
                                rank_col, pair_col, pair_a, pair_b, status]
                inputs = [state, rationale, mode, *rank_boxes, *flag_boxes, *wrong_boxes]
                for btn, fn in ((submit_btn, submit_ui), (draft_btn, draft_ui), (skip_btn, skip_ui)):
                    btn.click(fn, inputs, page_outputs, api_visibility="private", concurrency_limit=None,
                              trigger_mode="once")
                for btn, outcome in zip(pair_btns, ("a", "b", "tie")):
                    btn.click(judge(outcome), [state, rationale, mode], page_outputs, api_visibility="private",
                              concurrency_limit=None, trigger_mode="once")
                reload_btn.click(load_next, [mode], page_outputs, api_visibility="private", concurrency_limit=None)
                mode.change(load_next, [mode], page_outputs, api_visibility="private", concurrency_limit=None)
                demo.load(load_next, [mode], page_outputs, api_visibility="private", concurrency_limit=None)
                gr.Timer(10).tick(poll, [state, mode], page_outputs, api_visibility="private", concurrency_limit=None,
                                  show_progress="hidden")

            guide_tab = adj_tab = None
            if guidelines is not None:
                with gr.Tab("Guidelines", id="guidelines", elem_id="tab-guidelines") as guide_tab:
                    started = guidelines_tab(store, guidelines, lambda r, a: _user_id(store, r, a), tabs)
                started.success(load_next, [mode], page_outputs, api_visibility="private", concurrency_limit=None)
            if fb.adjudication_threshold is not None:
                with gr.Tab("Adjudicate", id="adjudicate", elem_id="tab-adjudicate") as adj_tab:
                    adjudicate_tab(store, adj_tab, fb.adjudication_threshold, n_slots,
                                   lambda r, a: _user_id(store, r, a), lambda row: _task_md(row.to_task()))

            with gr.Tab("Dashboard", id="dashboard", elem_id="tab-dashboard") as dash_tab:
                dashboard_tab(demo, store, dash_tab, lambda request: _user_id(store, request, "dashboard"))

            with gr.Tab("Playground", id="playground", elem_id="tab-playground") as pg_tab:
                pg_question = gr.Textbox(label="Question", lines=3, elem_id="pg-question")
                pg_instruction = gr.Textbox(label="Answer instruction appended to the question (as in training)",
                                            value=cfg.tasks.instruction or "", elem_id="pg-instruction")
                ask_btn = gr.Button("Ask both models", variant="primary", elem_id="ask-btn")
                pg_state = gr.State(None)
                with gr.Row():
                    with gr.Column():
                        pol_title = gr.Markdown("#### Current policy")
                        pol_answer = gr.Markdown(elem_id="policy-answer", latex_delimiters=LATEX)
                        with gr.Row():
                            pol_up = gr.Button("Thumbs up", elem_id="policy-up", scale=0)
                            pol_down = gr.Button("Thumbs down", elem_id="policy-down", scale=0)
                    with gr.Column():
                        ref_title = gr.Markdown("#### Reference (base model)")
                        ref_answer = gr.Markdown(elem_id="reference-answer", latex_delimiters=LATEX)
                        with gr.Row():
                            ref_up = gr.Button("Thumbs up", elem_id="reference-up", scale=0)
                            ref_down = gr.Button("Thumbs down", elem_id="reference-down", scale=0)
                pg_status = gr.Markdown(elem_id="pg-status")
                ask_btn.click(ask, [pg_question, pg_instruction],
                              [pol_title, pol_answer, ref_title, ref_answer, pg_state, pg_status],
                              api_visibility="private", concurrency_limit=1)
                for btn, which, label in ((pol_up, "policy", True), (pol_down, "policy", False),
                                          (ref_up, "reference", True), (ref_down, "reference", False)):
                    btn.click(rate(which, label), [pg_state], [pg_status], api_visibility="private",
                              concurrency_limit=None)

        def tabs_for_role(request: gr.Request):
            """Only the tabs the user's role allows; the first of them selected."""
            role = role_of(store, _username(request))
            shown = {name: allowed(role, action) for name, action in
                     (("annotate", "annotate"), ("dashboard", "dashboard"), ("playground", "playground"))}
            first = next((name for name, ok in shown.items() if ok), "annotate")
            extra = []
            if guide_tab is not None:
                uid = _user_id(store, request) if shown["annotate"] else None
                if uid is not None and not has_acknowledged(store, uid, guidelines):
                    first = "guidelines"  # before the first item
                extra.append(gr.Tab(visible=True if shown["annotate"] else "hidden"))
            if adj_tab is not None:
                extra.append(gr.Tab(visible=True if allowed(role, "adjudicate") else "hidden"))
            # "hidden" hides the tab's button too (Gradio 6; False leaves the button).
            return (gr.Tabs(selected=first), *(gr.Tab(visible=True if shown[name] else "hidden")
                                               for name in ("annotate", "dashboard", "playground")), *extra)

        demo.load(tabs_for_role, None, [tabs, annotate_tab, dash_tab, pg_tab,
                                        *(t for t in (guide_tab, adj_tab) if t is not None)],
                  api_visibility="private", concurrency_limit=None)
        gr.api(api_next_item, api_name="next_item", concurrency_limit=None)
        gr.api(api_submit, api_name="submit", concurrency_limit=None)
        gr.api(api_next_pair, api_name="next_pair", concurrency_limit=None)
        gr.api(api_submit_pair, api_name="submit_pair", concurrency_limit=None)
    demo.queue(default_concurrency_limit=8)
    demo.workbench_store = store  # for launch()'s login check
    return demo


def launch(cfg: RunConfig, out_dir: Path, host: str = "127.0.0.1", port: int = 7860, block: bool = True,
           demo: gr.Blocks | None = None) -> gr.Blocks:
    """Build (unless given) and serve the app with a login backed by the accounts table.

    Logins are throttled per username and per client address, and sessions expire after
    ``cfg.app.session_max_age_s`` (:mod:`rlhf_workbench.auth`); a throttled login is answered
    HTTP 429 with the reason.

    Args:
        block: serve until interrupted; False returns at once with the server running in a thread
            (stop it with ``demo.close()``).
    """
    from fastapi import HTTPException
    from starlette.middleware import Middleware

    for key in ("NO_PROXY", "no_proxy"):  # gradio calls its own URL at start-up
        have = [x for x in os.environ.get(key, "").split(",") if x]
        os.environ[key] = ",".join(dict.fromkeys([*have, "127.0.0.1", "localhost"]))
    demo = demo or build_app(cfg, out_dir)
    store = demo.workbench_store
    policy = LoginPolicy.from_config(cfg.app)

    def check(username: str, password: str) -> bool:
        try:
            return login(store, username, password, CLIENT_ADDRESS.get(), policy) is not None
        except LoginThrottled as e:
            raise HTTPException(status_code=429, detail=str(e), headers={"Retry-After": str(int(e.retry_after) + 1)})

    demo.launch(server_name=host, server_port=port, auth=check, ssr_mode=False, prevent_thread_lock=not block,
                auth_message=(f"Online RLHF workbench: log in with your account. After {policy.max_failures} failed "
                              f"logins within {policy.window_s / 60:g} min, logins are refused for "
                              f"{policy.lockout_s / 60:g} min."), head=KEYBOARD_JS,
                css=CSS, quiet=True, show_error=True,
                app_kwargs={"middleware": [Middleware(SessionMiddleware, max_age=cfg.app.session_max_age_s)]})
    return demo
