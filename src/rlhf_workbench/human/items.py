"""Items: what annotators rank, and the checks every write to one makes.

An *item* is one task's traces in one rollout. Its verified traces (graded correct, or every
trace of an open task) are ranked, its rejected traces shown with the verifier's reason
(:func:`item_rows`, :func:`item_traces`), the verified ones in a blind order per annotator
(:func:`blind_order`). Annotations (:mod:`rlhf_workbench.human.annotation`) and adjudications
(:mod:`rlhf_workbench.human.adjudication`) write only to an item of the open round
(:func:`open_item_rollout`, which also takes the round's lock) and only validated fields
(:func:`checked_input`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from rlhf_workbench.human.assignment import is_trained, lock_round, open_rollout
from rlhf_workbench.human.errors import AnnotationError
from rlhf_workbench.store import Annotation, CompletionRow, Rollout, Store, TaskRow
from rlhf_workbench.tasks.task import Task
from rlhf_workbench.verify import NO_KEY_REASON

RATIONALE_MAX_CHARS = 2000


@dataclass
class Trace:
    """One trace as an annotator sees it; ``source`` (who wrote it) is shown only when the run
    says so (``rollout.teacher.show_source``): the page is blind to it by default."""

    completion_id: int
    text: str
    reason: str  # the verifier's reason for its verdict
    source: str = "policy"  # "policy" (its own sample) or "teacher" (the API model of rollout.teacher)


def trace_of(c: CompletionRow) -> Trace:
    """The :class:`Trace` of a stored completion (its verification loaded)."""
    return Trace(c.id, c.text, c.verification.reason, "teacher" if c.origin == "teacher" else "policy")


@dataclass
class Item:
    """What the annotation page shows: a task, its verified traces in a blind order shuffled
    per annotator, the rejected traces with the verifier's reason, and provenance."""

    rollout_id: int
    round: int
    policy_version: int
    task: Task
    verified: list[Trace]
    rejected: list[Trace]
    draft: Annotation | None = None


def rankable(v) -> bool:
    """Whether experts rank a trace with verification ``v`` (a ``VerificationRow`` or None):
    verified correct, or any trace of an open task (verdict "no key")."""
    return v is not None and (bool(v.correct) or v.reason == NO_KEY_REASON)


def item_rows(s: Session, rollout_id: int, task_id: str) -> tuple[list[CompletionRow], list[CompletionRow]]:
    """An item's verified and rejected completion rows in stored order, read in session ``s``:
    the policy's samples only, never a constitutional revision; an unverified trace is in neither."""
    rows = list(s.scalars(select(CompletionRow).where(
        CompletionRow.rollout_id == rollout_id, CompletionRow.task_id == task_id,
        CompletionRow.origin != "revision").order_by(CompletionRow.index)))
    verified = [c for c in rows if rankable(c.verification)]
    rejected = [c for c in rows if c.verification is not None and not rankable(c.verification)]
    return verified, rejected


def item_traces(store: Store, rollout_id: int, task_id: str) -> tuple[list[CompletionRow], list[CompletionRow]]:
    """An item's verified and rejected completion rows (stored order), detached for reading."""
    with store.session() as s:
        verified, rejected = item_rows(s, rollout_id, task_id)
        for c in verified + rejected:
            _ = c.verification.reason
        s.expunge_all()
    return verified, rejected


def normalise(text: str) -> str:
    """A trace's text with runs of whitespace collapsed to one space and the ends stripped: two
    traces whose normalised texts are equal are identical (:mod:`rlhf_workbench.human.duplicates`)."""
    return " ".join(text.split())


def blind_order(n: int, user_id: int, rollout_id: int, task_id: str) -> list[int]:
    """The order in which an annotator sees an item's ``n`` verified traces: shuffled, stable per
    annotator and item (indices into the traces in stored order)."""
    order = list(range(n))
    random.Random(f"{user_id}:{rollout_id}:{task_id}").shuffle(order)
    return order


def open_item_rollout(s: Session, rollout_id: int, task_id: str) -> Rollout:
    """Lock the rollout of an item (:func:`rlhf_workbench.human.assignment.lock_round`) and return it.

    Raises:
        AnnotationError: no such item, its round was already used for training, or it is not
            the open round.
    """
    rollout = lock_round(s, rollout_id)
    if rollout is None or s.get(TaskRow, task_id) is None:
        raise AnnotationError(f"no item for rollout {rollout_id} and task {task_id!r}")
    if is_trained(s, rollout_id):
        raise AnnotationError(f"round {rollout.round} was already used for training, so this was not saved; "
                              "load the next item")
    current = open_rollout(s)
    if current is None or current.id != rollout_id:
        raise AnnotationError(f"round {rollout.round} (rollout {rollout_id}) is not open for annotation"
                              + (f"; the open round is {current.round}" if current is not None else ""))
    return rollout


def _trace_id(x, what: str) -> int:
    """A completion id given as an int or a string of digits (JSON object keys); never a float."""
    if isinstance(x, int) and not isinstance(x, bool):
        return x
    if isinstance(x, str) and re.fullmatch(r"-?[0-9]+", x.strip()):
        return int(x)
    raise AnnotationError(f"{what} must be completion ids (integers), got {x!r}")


def checked_input(ranks, flagged, verifier_wrong, rationale) -> tuple[dict[int, int], list[int], list[int], str]:
    """Types and sizes of a submission's fields, before anything is read or written.

    Returns:
        ``(ranks, flagged, verifier_wrong, rationale)``: completion id -> rank, and the sorted
        distinct flagged and marked-wrong completion ids (ids given as digit strings are ints).

    Raises:
        AnnotationError: ranks not a mapping to integers, id lists not lists of integer ids, a
            rationale that is not text or longer than :data:`RATIONALE_MAX_CHARS`.
    """
    if not isinstance(ranks or {}, dict):
        raise AnnotationError("ranks must map completion ids to ranks")
    for name, ids in (("flagged traces", flagged), ("traces marked wrong", verifier_wrong)):
        if not isinstance(ids or [], (list, tuple, set)):
            raise AnnotationError(f"{name} must be a list of completion ids")
    out = {}
    for k, v in (ranks or {}).items():
        if not isinstance(v, int) or isinstance(v, bool):
            raise AnnotationError(f"ranks must be integers (0 is best, ties allowed), got {v!r} for trace {k!r}")
        out[_trace_id(k, "ranked traces")] = v
    flagged = sorted({_trace_id(x, "flagged traces") for x in (flagged or [])})
    wrong = sorted({_trace_id(x, "traces marked wrong") for x in (verifier_wrong or [])})
    if not isinstance(rationale, str):
        raise AnnotationError(f"the rationale must be text, got {type(rationale).__name__}")
    if len(rationale) > RATIONALE_MAX_CHARS:
        raise AnnotationError(f"the rationale has {len(rationale)} characters; the limit is {RATIONALE_MAX_CHARS}: "
                              "shorten it (nothing was saved)")
    return out, flagged, wrong, rationale
