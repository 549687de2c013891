"""Pairwise judgments beside full rankings: two verified traces A and B, "A better", "B better" or "tie".

A pairwise judgment is stored as the same :class:`rlhf_workbench.store.Annotation` row as a full
ranking, ranking only the two shown traces (and their identical copies,
:mod:`rlhf_workbench.human.duplicates`): A better is ``{A: 0, B: 1}``, B better ``{A: 1, B: 0}``, a tie
``{A: 0, B: 0}``; the item's other verified traces are left unranked. The worker consumes it with
the rest (:func:`rlhf_workbench.human.annotation.human_scores`): a verified trace nobody ranked gets the
midpoint of the ranked traces' scores, so it is never made best or worst by accident (after
"A better" the order is A, the unranked traces, B; after a tie everything ties and no pair is
built).

Which pair (:func:`choose_pair`): among the item's distinct verified traces, the pair that the
fewest earlier submissions (any annotator, any mode) have both ranked, then, among those, the
pair whose mean per-token log-prob under the sampling policy differ least: the two traces the
policy finds most alike in likelihood, where its own preference is least decided and a human
judgment tells it most. A and B keep the annotator's blind order.
"""

from __future__ import annotations

from itertools import combinations

from sqlalchemy import select

from rlhf_workbench.human.errors import AnnotationError
from rlhf_workbench.human.items import item_traces
from rlhf_workbench.human.duplicates import Entry, save_grouped, shown_entries
from rlhf_workbench.store import Annotation, Store

OUTCOMES = {"a": (0, 1), "b": (1, 0), "tie": (0, 0)}  # outcome -> (rank of A, rank of B), 0 best


def _mean_logp(logps: list) -> float:
    return sum(logps) / len(logps) if logps else 0.0


def choose_pair(store: Store, user_id: int, rollout_id: int, task_id: str) -> tuple[Entry, Entry] | None:
    """The two entries to show as A and B (see the module docstring for the choice); None when the
    item has fewer than two distinct verified traces."""
    entries = shown_entries(store, user_id, rollout_id, task_id)
    if len(entries) < 2:
        return None
    verified, _ = item_traces(store, rollout_id, task_id)
    logp = {c.id: _mean_logp(c.logps) for c in verified}
    with store.session() as s:
        ranked = [{int(k) for k in a.ranks or {}} for a in s.scalars(select(Annotation).where(
            Annotation.rollout_id == rollout_id, Annotation.task_id == task_id, Annotation.status == "submitted"))]

    def judged(a: Entry, b: Entry) -> int:
        return sum(bool(r & set(a.completion_ids)) and bool(r & set(b.completion_ids)) for r in ranked)

    pairs = combinations(range(len(entries)), 2)
    i, j = min(pairs, key=lambda p: (judged(entries[p[0]], entries[p[1]]),
                                     abs(logp[entries[p[0]].trace.completion_id]
                                         - logp[entries[p[1]].trace.completion_id]), p))
    return entries[i], entries[j]


def pair_ranks(a_ids: list[int], b_ids: list[int], outcome: str) -> dict[int, int]:
    """Completion id -> 0-based rank for a judgment of A (``a_ids``: its copies) against B.

    Raises:
        AnnotationError: unknown outcome, or A and B share a trace.
    """
    if outcome not in OUTCOMES:
        raise AnnotationError(f"a pairwise judgment is one of {sorted(OUTCOMES)}, got {outcome!r}")
    if not a_ids or not b_ids or set(a_ids) & set(b_ids):
        raise AnnotationError("a pairwise judgment compares two different traces")
    ra, rb = OUTCOMES[outcome]
    return {**{int(c): ra for c in a_ids}, **{int(c): rb for c in b_ids}}


def save_pairwise(store: Store, user_id: int, rollout_id: int, task_id: str, a_ids: list[int], b_ids: list[int],
                  outcome: str, rationale: str = "", revision: int | None = None,
                  annotators_per_item: int | None = None, claim_seconds: float | None = None) -> Annotation:
    """Submit a pairwise judgment (``outcome``: ``a``, ``b`` or ``tie``) of an item served to this
    annotator, as an Annotation ranking the two traces (and their identical copies) only.

    Validated as any submission (:func:`rlhf_workbench.human.annotation.save_annotation`): the traces
    must be verified traces of the item, the item served to this annotator in the open round.
    """
    return save_grouped(store, user_id, rollout_id, task_id, "submitted", pair_ranks(a_ids, b_ids, outcome),
                        rationale, [], revision, annotators_per_item, [], claim_seconds, complete=False)
