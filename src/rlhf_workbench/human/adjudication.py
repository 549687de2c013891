"""Adjudication: items whose annotators disagree go to an admin, whose ranking is the one that trains.

With ``feedback.annotators_per_item >= 2`` and ``feedback.adjudication_threshold`` set, an item
of the open round is *disputed* when its submitted rankings agree less than the threshold:

    agreement = mean over the item's annotator pairs of tau(a, b)

where ``tau`` is Kendall's tau-b (Kendall 1945, Biometrika 33(3); ``scipy.stats.kendalltau``,
``variant="b"``) between two annotators' ranks of the traces *both* ranked (ranks 0 = best, ties
allowed), with two conventions where tau-b is undefined: both rankings constant on the common
traces (every trace tied by both) counts as 1 (they agree), one constant and the other not as 0.
A pair with fewer than two common traces (two pairwise judgments of different pairs) is not
compared; an item with no comparable pair is not disputed. So opposite pairwise choices on the
same pair give tau = -1, "A better" against "tie" gives 0, and identical choices 1; the clinical
config's threshold 0.0 sends rankings that point in opposite directions (tau < 0) to an admin.

A disputed item waits in the admin-only Adjudicate queue (:func:`disputes`). An admin who did not
annotate the item reads every annotator's ranking and submits a full ranking of its verified
traces (:func:`adjudicate`); it is stored as an :class:`~rlhf_workbench.store.Annotation` with
status ``adjudicated``. What the worker trains on (:func:`effective_submissions`, called by
:func:`rlhf_workbench.human.annotation.consume_human_rankings`):

- a non-disputed item: its submitted rankings, as before;
- an adjudicated item: the adjudicated ranking only (every annotator's submission of the item is
  left out, and keeps ``consumed_round`` None);
- a disputed item not adjudicated when the worker consumes the round: no human ranking at all
  (like an item nobody ranked: its verified traces tie, the verifier alone decides), and it can
  no longer be adjudicated, since its round is closed.

Disputes are computed when read, from the submissions and the configured threshold (nothing is
stored until an admin adjudicates), so the app and the worker must run with the same
``feedback.adjudication_threshold``: they do when started from the same config.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rlhf_workbench.human.errors import AnnotationError
from rlhf_workbench.human.items import checked_input, item_rows, open_item_rollout
from rlhf_workbench.human.assignment import open_rollout
from rlhf_workbench.store import Annotation, Store, User

ADJUDICATED = "adjudicated"  # Annotation.status of an admin's adjudicated ranking


def pair_tau(a: dict[int, int], b: dict[int, int]) -> float | None:
    """Kendall tau-b between two rankings (completion id -> rank, 0 best) on the traces both rank.

    Returns:
        tau-b in [-1, 1]; 1.0 when both are constant on the common traces, 0.0 when exactly one is;
        None when fewer than two traces are common (not comparable).
    """
    from scipy.stats import kendalltau

    common = sorted(set(a) & set(b))
    if len(common) < 2:
        return None
    x, y = [a[c] for c in common], [b[c] for c in common]
    flat_x, flat_y = len(set(x)) < 2, len(set(y)) < 2
    if flat_x or flat_y:
        return 1.0 if flat_x and flat_y else 0.0
    tau = float(kendalltau(x, y, variant="b").statistic)
    return None if math.isnan(tau) else tau


def item_agreement(rankings: dict[str, dict[int, int]]) -> float | None:
    """Mean :func:`pair_tau` over every pair of an item's annotators (``username -> ranks``);
    None when no pair is comparable (fewer than two annotators, or no two share two traces)."""
    taus = [t for u, v in itertools.combinations(sorted(rankings), 2)
            if (t := pair_tau(rankings[u], rankings[v])) is not None]
    return sum(taus) / len(taus) if taus else None


def is_disputed(agreement: float | None, threshold: float | None) -> bool:
    """Whether an item with this :func:`item_agreement` goes to adjudication (never without a threshold)."""
    return threshold is not None and agreement is not None and agreement < threshold


@dataclass
class Dispute:
    """A disputed item: every annotator's submitted ranking, their agreement, and the
    adjudication when there is one (``adjudicated_by`` None while it waits in the queue)."""

    rollout_id: int
    task_id: str
    rankings: dict[str, dict[int, int]]  # username -> completion id -> rank (0 best)
    rationales: dict[str, str]
    agreement: float
    adjudicated_by: str | None = None
    adjudicated_ranks: dict[int, int] | None = None


def _disputes(s: Session, rollout_id: int, threshold: float | None) -> list[Dispute]:
    if threshold is None:
        return []
    rows = s.execute(select(Annotation.task_id, Annotation.status, User.username, Annotation.ranks,
                            Annotation.rationale)
                     .join(User, User.id == Annotation.user_id)
                     .where(Annotation.rollout_id == rollout_id,
                            Annotation.status.in_(("submitted", ADJUDICATED))).order_by(Annotation.id)).all()
    subs: dict[str, dict[str, dict[int, int]]] = {}
    why: dict[str, dict[str, str]] = {}
    done: dict[str, tuple[str, dict[int, int]]] = {}
    for task_id, status, user, ranks, rationale in rows:
        ranks = {int(k): int(v) for k, v in (ranks or {}).items()}
        if status == ADJUDICATED:
            done[task_id] = (user, ranks)
        elif ranks:  # a submission of an item without verified traces ranks nothing
            subs.setdefault(task_id, {})[user] = ranks
            why.setdefault(task_id, {})[user] = rationale or ""
    out = []
    for task_id, per_user in subs.items():
        agreement = item_agreement(per_user)
        if is_disputed(agreement, threshold):
            by, ranks = done.get(task_id, (None, None))
            out.append(Dispute(rollout_id, task_id, per_user, why[task_id], agreement, by, ranks))
    out.sort(key=lambda d: (d.agreement, d.task_id))
    return out


def disputes(store: Store, threshold: float | None, rollout_id: int | None = None,
             include_adjudicated: bool = False) -> list[Dispute]:
    """The disputed items of a rollout (default: the open round), least agreement first.

    Args:
        threshold: ``feedback.adjudication_threshold`` (None: nothing is ever disputed).
        include_adjudicated: also return the items already adjudicated (the queue shows only the
            others).
    """
    with store.session() as s:
        if rollout_id is None:
            rollout = open_rollout(s)
            if rollout is None:
                return []
            rollout_id = rollout.id
        found = _disputes(s, rollout_id, threshold)
    return [d for d in found if include_adjudicated or d.adjudicated_by is None]


def adjudicate(store: Store, admin_id: int, rollout_id: int, task_id: str, ranks: dict[int, int],
               threshold: float | None, rationale: str = "", flagged: list[int] | None = None,
               verifier_wrong: list[int] | None = None) -> Annotation:
    """Store an admin's ranking of a disputed item of the open round: the ranking training uses.

    Args:
        ranks: completion id -> rank (0 best, ties allowed) for *every* verified trace of the item.
        threshold: ``feedback.adjudication_threshold`` the dispute is judged with.
        flagged, verifier_wrong: as in :func:`rlhf_workbench.human.annotation.save_annotation`; they
            apply to the item together with the annotators' own marks (a trace either marked is
            never chosen).

    Raises:
        AnnotationError: the item is not disputed under ``threshold``, already adjudicated, not in
            the open round (or its round was used for training); the admin has an annotation of
            the item themselves (a party to the dispute does not settle it); ranks that miss a
            verified trace, name another item's traces or fall outside 0 .. n-1; rationale too long.
    """
    ranks, flagged, verifier_wrong, rationale = checked_input(ranks, flagged, verifier_wrong, rationale)
    try:
        with store.session() as s, s.begin():
            open_item_rollout(s, rollout_id, task_id)  # locks the round, as submissions and the worker do
            found = {d.task_id: d for d in _disputes(s, rollout_id, threshold)}
            dispute = found.get(task_id)
            if dispute is None:
                raise AnnotationError(f"task {task_id!r} of rollout {rollout_id} is not disputed (its annotators' "
                                      f"agreement is not below feedback.adjudication_threshold = {threshold})")
            if dispute.adjudicated_by is not None:
                raise AnnotationError(f"task {task_id!r} was already adjudicated by {dispute.adjudicated_by!r}")
            mine = s.scalar(select(Annotation.status).where(Annotation.rollout_id == rollout_id,
                                                            Annotation.task_id == task_id,
                                                            Annotation.user_id == admin_id))
            if mine is not None:
                raise AnnotationError(f"you have a {mine} annotation of task {task_id!r}: another admin, not a "
                                      "party to the disagreement, must adjudicate it")
            verified, rejected = item_rows(s, rollout_id, task_id)
            _check_full_ranking(ranks, flagged, verifier_wrong, {c.id for c in verified}, {c.id for c in rejected})
            row = Annotation(rollout_id=rollout_id, task_id=task_id, user_id=admin_id, status=ADJUDICATED,
                             ranks={str(k): v for k, v in ranks.items()}, rationale=rationale, flagged=flagged,
                             verifier_wrong=verifier_wrong, revision=0)
            s.add(row)
            s.flush()
            return row
    except IntegrityError as e:
        raise AnnotationError("this item was adjudicated concurrently elsewhere; reload the queue") from e


def _check_full_ranking(ranks: dict[int, int], flagged: list[int], wrong: list[int], verified: set[int],
                        rejected: set[int]) -> None:
    """An adjudication ranks every verified trace of its item, 0 .. n-1 (else AnnotationError)."""
    foreign = sorted((set(ranks) - verified) | (set(flagged) - verified - rejected) | (set(wrong) - verified))
    if foreign:
        raise AnnotationError(f"trace ids {foreign} are not verified traces of this item")
    missing = sorted(verified - set(ranks))
    if missing:
        raise AnnotationError(f"an adjudication ranks every trace: traces {missing} have no rank")
    bad = {cid: v for cid, v in ranks.items() if not 0 <= v < len(verified)}
    if bad:
        raise AnnotationError(f"ranks must be integers from 0 to {len(verified) - 1} (0 is best, ties allowed), "
                              f"got {bad}")


def effective_submissions(s: Session, rollout_id: int, subs: list[Annotation],
                          threshold: float | None) -> list[Annotation]:
    """What trains, of a rollout's submitted annotations ``subs`` (see the module docstring): the
    submissions of undisputed items plus every adjudicated ranking, in the session ``s``."""
    adjudicated = list(s.scalars(select(Annotation).where(Annotation.rollout_id == rollout_id,
                                                          Annotation.status == ADJUDICATED)
                                 .order_by(Annotation.id)))
    if threshold is None and not adjudicated:
        return subs
    held = {d.task_id for d in _disputes(s, rollout_id, threshold)} | {a.task_id for a in adjudicated}
    return [a for a in subs if a.task_id not in held] + adjudicated
