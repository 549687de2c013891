"""The web app's HTTP API for scripted clients (``gradio_client``, logged in with ``auth=(user, password)``).

- ``/next_item`` (no arguments): the caller's next item as a JSON string, ``null`` when there is
  nothing to do (with ``groups``, the identical traces collapsed);
- ``/submit`` (rollout_id, task_id, ranks_json, rationale, flagged_json, revision, wrong_json:
  the verified traces whose answer is actually wrong): returns ``"ok: ..."`` or
  ``"error: <reason>"``. ``gradio_client`` fills in wrong_json's default ``"[]"`` when it is
  left out; Gradio's plain HTTP API (``POST /gradio_api/call/submit``) needs all seven values;
- pairwise: ``/next_pair`` (the item with ``a`` and ``b``, the traces to judge) and
  ``/submit_pair`` (rollout_id, task_id, a_json, b_json, outcome ``a`` / ``b`` / ``tie``,
  rationale, revision).

Only the item ``/next_item`` served to the caller can be submitted (it is held for them for
``feedback.claim_seconds``), and only while its round is open. Every endpoint needs the
``annotator`` or ``admin`` role (:func:`rlhf_workbench.app.auth.request_user`).
"""

from __future__ import annotations

import json

import gradio as gr

from rlhf_workbench.app.auth import request_user
from rlhf_workbench.app.render import entry_json, item_json
from rlhf_workbench.config import FeedbackConfig
from rlhf_workbench.human.annotation import next_item
from rlhf_workbench.human.duplicates import save_grouped
from rlhf_workbench.human.errors import AnnotationError
from rlhf_workbench.human.pairwise import choose_pair, save_pairwise
from rlhf_workbench.store import Store


def _revision(revision) -> int | None:
    """The API's draft revision (-1 or None: no draft) as :func:`rlhf_workbench.human.annotation.save_annotation` takes it."""
    return None if revision is None or int(revision) < 0 else int(revision)


class AnnotationAPI:
    """The four endpoints; :meth:`register` adds them to the Blocks being built.

    Args:
        store: the run's database.
        fb: the run's ``feedback`` config.
        show_source: answer who wrote each trace (``rollout.teacher.show_source``); default blind.
    """

    def __init__(self, store: Store, fb: FeedbackConfig, show_source: bool = False):
        self.store, self.fb, self.show_source = store, fb, show_source

    def register(self) -> None:
        """Expose the endpoints as ``/next_item``, ``/submit``, ``/next_pair`` and ``/submit_pair``."""
        gr.api(self.api_next_item, api_name="next_item", concurrency_limit=None)
        gr.api(self.api_submit, api_name="submit", concurrency_limit=None)
        gr.api(self.api_next_pair, api_name="next_pair", concurrency_limit=None)
        gr.api(self.api_submit_pair, api_name="submit_pair", concurrency_limit=None)

    def api_next_item(self, request: gr.Request) -> str:
        """The logged-in annotator's next item as JSON (null when there is nothing to do):
        rollout_id, task_id, round, policy_version, completion_ids (verified traces in display
        order), texts (those traces' texts, same order), groups (identical traces collapsed: one
        entry per distinct text, in display order, each ``{"completion_ids", "text", "count"}``),
        rejected_ids, revision (-1 when no draft), question, answer."""
        try:
            uid = request_user(self.store, request)
        except AnnotationError as e:
            return json.dumps({"error": str(e)})
        fb = self.fb
        item = next_item(self.store, uid, fb.annotators_per_item, fb.min_verified, fb.claim_seconds)
        return "null" if item is None else json.dumps(item_json(item, self.show_source))

    def api_next_pair(self, request: gr.Request) -> str:
        """The logged-in annotator's next item for a pairwise judgment as JSON (null when there is
        nothing to do): what /next_item returns, plus ``a`` and ``b``, the two traces to judge
        (each ``{completion_ids, text, count}``; both null when the item has fewer than two
        distinct verified traces: rank it with /submit)."""
        try:
            uid = request_user(self.store, request)
        except AnnotationError as e:
            return json.dumps({"error": str(e)})
        fb = self.fb
        item = next_item(self.store, uid, fb.annotators_per_item, fb.min_verified, fb.claim_seconds)
        if item is None:
            return "null"
        pair = choose_pair(self.store, uid, item.rollout_id, item.task.id)
        return json.dumps({**item_json(item, self.show_source), "a": entry_json(pair[0], self.show_source)
                           if pair else None, "b": entry_json(pair[1], self.show_source) if pair else None})

    def api_submit_pair(self, rollout_id: int, task_id: str, a_json: str, b_json: str, outcome: str, rationale: str,
                        revision: int, request: gr.Request) -> str:
        """Submit a pairwise judgment as the logged-in annotator: a_json / b_json the JSON lists of
        completion ids of A and B (``completion_ids`` from /next_pair), outcome ``a``, ``b`` or
        ``tie``, revision the draft revision shown or -1. Returns "ok: ..." or "error: <reason>"."""
        try:
            uid = request_user(self.store, request)
            try:
                a_ids, b_ids = json.loads(a_json or "[]"), json.loads(b_json or "[]")
            except json.JSONDecodeError as e:
                raise AnnotationError(f"a_json / b_json must be JSON lists: {e}") from e
            if not isinstance(a_ids, list) or not isinstance(b_ids, list):
                raise AnnotationError("a_json and b_json must be JSON lists of completion ids")
            a = save_pairwise(self.store, uid, int(rollout_id), str(task_id), a_ids, b_ids, str(outcome),
                              rationale or "", _revision(revision), self.fb.annotators_per_item, self.fb.claim_seconds)
        except (AnnotationError, ValueError, TypeError) as e:
            return f"error: {e}"
        return f"ok: submitted rollout {a.rollout_id} task {a.task_id}"

    def api_submit(self, rollout_id: int, task_id: str, ranks_json: str, rationale: str, flagged_json: str,
                   revision: int, request: gr.Request, wrong_json: str = "[]") -> str:
        """Submit a ranking as the logged-in annotator. ranks_json: JSON object completion id ->
        0-based rank (0 best, ties allowed; a rank given to one of identical traces applies to
        every copy), or a JSON list with one 0-based rank per entry of ``groups`` from
        /next_item; flagged_json: JSON list of completion ids; revision:
        the draft revision shown, or -1 for none; wrong_json (optional): JSON list of verified
        completion ids whose answer is actually wrong. Returns "ok: ..." or "error: <reason>"."""
        fb = self.fb
        try:
            uid = request_user(self.store, request)
            try:
                ranks = json.loads(ranks_json or "{}")
                flagged = json.loads(flagged_json or "[]")
                wrong = json.loads(wrong_json or "[]")
            except json.JSONDecodeError as e:
                raise AnnotationError(f"ranks_json / flagged_json / wrong_json must be JSON: {e}") from e
            if not isinstance(ranks, (dict, list)) or not isinstance(flagged, list) or not isinstance(wrong, list):
                raise AnnotationError("ranks_json must be a JSON object or list, flagged_json and wrong_json "
                                      "JSON lists")
            a = save_grouped(self.store, uid, int(rollout_id), str(task_id), "submitted", ranks, rationale or "",
                             flagged, _revision(revision), fb.annotators_per_item, wrong, fb.claim_seconds)
        except (AnnotationError, ValueError, TypeError) as e:
            return f"error: {e}"
        return f"ok: submitted rollout {a.rollout_id} task {a.task_id}"
