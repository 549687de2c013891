"""Human feedback: serving items to annotators, validated submissions, and the worker's read.

An *item* is one task's traces in one rollout. Only items of the open round (the newest
rollout, not yet used for training) can be annotated, and only by an annotator they were served
to: :func:`next_item` records a claim (:mod:`rlhf_workbench.human.assignment`), capped at
``feedback.annotators_per_item`` in the database. The web app (:mod:`rlhf_workbench.app`) shows items and saves
annotations only through this module; the worker (the loop with ``feedback.source: human``)
waits here until enough items are submitted, then reads them and records the round's rankings in
one transaction (:func:`consume_human_rankings`) that marks every submission it used; a
submission that arrives later is refused, never acknowledged and dropped. The database is the
only channel between the two, so annotators and the worker can be separate processes on
separate machines.

Every write validates first and changes nothing on error (:class:`AnnotationError`): ranks are
integers from 0 to the number of verified traces - 1, trace ids are integers of this item, a
rationale has at most :data:`~rlhf_workbench.human.items.RATIONALE_MAX_CHARS` characters
(:mod:`rlhf_workbench.human.items`).

Experts also audit the verifier: a verified trace (graded correct) can be marked as actually
wrong. The worker treats it like a flagged trace (never chosen, reward 0), and
:func:`verifier_audit` turns the marks into the verifier's audited precision.
"""

from __future__ import annotations

import hashlib
import time
from typing import Callable

from rich.console import Console
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rlhf_workbench.config import RunConfig
from rlhf_workbench.feedback.thumbs import upsert_vote
from rlhf_workbench.human.adjudication import effective_submissions
from rlhf_workbench.human.assignment import claim_of, claimed_items, holders, is_trained, lock_round, take_claim
from rlhf_workbench.human.errors import AnnotationError
from rlhf_workbench.human.items import (Item, blind_order, checked_input, item_rows, open_item_rollout, rankable,
                                        trace_of)
from rlhf_workbench.human.selection import serve_order
from rlhf_workbench.stats import wilson_interval
from rlhf_workbench.store import Annotation, BinaryFeedback, CompletionRow, Rollout, Store, TaskRow, VerificationRow
from rlhf_workbench.verify import NO_KEY_REASON

DEFAULT_CLAIM_SECONDS = 1800.0  # feedback.claim_seconds' default


def _verified_counts(s, rollout_id: int) -> dict[str, int]:
    """Task id -> number of verified traces (every trace of an open task), for every task of the rollout."""
    return dict(s.execute(select(CompletionRow.task_id, func.count(VerificationRow.completion_id))
                          .outerjoin(VerificationRow, (VerificationRow.completion_id == CompletionRow.id)
                                     & (VerificationRow.correct.is_(True) | (VerificationRow.reason == NO_KEY_REASON)))
                          .where(CompletionRow.rollout_id == rollout_id)
                          .group_by(CompletionRow.task_id)).all())


def next_item(store: Store, user_id: int, annotators_per_item: int = 1, min_verified: int = 2,
              claim_seconds: float = DEFAULT_CLAIM_SECONDS) -> Item | None:
    """The next item of the open round for an annotator, claimed for them; None when there is
    nothing to do.

    In order: their own drafts, items already served to them and not done, then items with at
    least ``min_verified`` verified traces that fewer than ``annotators_per_item`` people hold and
    that this annotator has not done (fewest holders first, then in the order of
    ``feedback.selection`` stored with the round, :func:`rlhf_workbench.human.selection.serve_order`;
    ``fewest`` shuffles ties per annotator, so that annotators working at the same time are
    spread over different items).
    Serving claims the item for ``claim_seconds`` (:func:`rlhf_workbench.human.assignment.take_claim`)
    in the same transaction as the count, serialised with every other writer of the round, so
    annotators in any number of app processes never exceed ``annotators_per_item``; only a
    claimed item can be saved (:func:`save_annotation`)."""
    for attempt in range(2):
        try:
            return _serve(store, user_id, annotators_per_item, min_verified, claim_seconds)
        except IntegrityError:  # a slot taken by a writer the lock did not cover; look again
            if attempt:
                raise
    return None


def _serve(store: Store, user_id: int, annotators_per_item: int, min_verified: int,
           claim_seconds: float) -> Item | None:
    now = time.time()
    with store.session() as s, s.begin():
        rollout = lock_round(s)
        if rollout is None:
            return None
        mine = {a.task_id: a for a in s.scalars(select(Annotation).where(
            Annotation.rollout_id == rollout.id, Annotation.user_id == user_id))}
        held = holders(s, rollout.id, now)
        n_verified = _verified_counts(s, rollout.id)
        drafts = [t for t, a in mine.items() if a.status == "draft"]
        served = [t for t in claimed_items(s, rollout.id, user_id, now) if t not in mine]
        open_ = [t for t, n in n_verified.items() if n >= min_verified and t not in mine and t not in served
                 and len(held.get(t, set()) - {user_id}) < annotators_per_item]
        open_ = serve_order(rollout.selection, open_, held, user_id)  # feedback.selection (selection.py)
        for task_id in drafts + served + open_:
            if take_claim(s, rollout.id, task_id, user_id, annotators_per_item, claim_seconds, now) is None:
                continue  # a draft whose place went to someone else after its claim expired
            verified, rejected = item_rows(s, rollout.id, task_id)
            order = blind_order(len(verified), user_id, rollout.id, task_id)
            return Item(
                rollout_id=rollout.id, round=rollout.round, policy_version=rollout.policy_version_id,
                task=s.get(TaskRow, task_id).to_task(),
                verified=[trace_of(verified[i]) for i in order],
                rejected=[trace_of(c) for c in rejected],
                draft=mine.get(task_id),
            )
    return None


def claim_item(store: Store, user_id: int, rollout_id: int, task_id: str, annotators_per_item: int = 1,
               claim_seconds: float = DEFAULT_CLAIM_SECONDS) -> None:
    """Serve one named item of the open round to an annotator (what :func:`next_item` does for the
    item it picks): scripts and tests that know which item they want.

    Raises:
        AnnotationError: the rollout is not the open round, the task has no traces in it, or
            ``annotators_per_item`` other annotators hold it.
    """
    with store.session() as s, s.begin():
        rollout = open_item_rollout(s, rollout_id, task_id)
        if item_rows(s, rollout_id, task_id) == ([], []):
            raise AnnotationError(f"task {task_id!r} has no traces in round {rollout.round}")
        if take_claim(s, rollout_id, task_id, user_id, annotators_per_item, claim_seconds) is None:
            raise AnnotationError(f"this item already has {annotators_per_item} annotator(s), enough; "
                                  "load the next one")


def save_annotation(store: Store, user_id: int, rollout_id: int, task_id: str, status: str,
                    ranks: dict[int, int] | None = None, rationale: str = "", flagged: list[int] | None = None,
                    revision: int | None = None, annotators_per_item: int | None = None,
                    verifier_wrong: list[int] | None = None,
                    claim_seconds: float = DEFAULT_CLAIM_SECONDS, complete: bool = True) -> Annotation:
    """Save a draft, a submission or a skip of one item served to this annotator, after validating it.

    Args:
        status: ``draft``, ``submitted`` or ``skipped``.
        ranks: completion id -> rank (0 best, ties allowed, at most the number of verified traces
            - 1); a submission must rank every verified trace of the item and nothing else.
        rationale: at most :data:`RATIONALE_MAX_CHARS` characters (longer is refused, not cut).
        flagged: completion ids of this item marked unsafe / clinically wrong.
        verifier_wrong: completion ids of verified traces of this item whose answer the expert
            found actually wrong (an audit of the verifier; see :func:`verifier_audit`). A
            submission must still rank them; the worker treats them like flagged traces.
        revision: the revision of the draft the page was showing (None when it showed none);
            a different stored revision means the draft is stale.
        annotators_per_item: when given, a submission or skip is refused once that many others
            hold the item (the cap is enforced when the item is served; this re-checks it for an
            annotator whose claim expired).
        claim_seconds: how long a saved draft keeps the item for its annotator.
        complete: False for a partial judgment (a pairwise one, :mod:`rlhf_workbench.human.pairwise`):
            the submission ranks at least two verified traces (or every one, when the item has
            fewer), not necessarily all.

    The item's round is locked for the check and the write (:func:`rlhf_workbench.human.assignment.lock_round`),
    the same lock the worker takes to consume the round, so a submission is either read by the
    worker or refused because the round was used for training; never acknowledged and dropped.
    A submission or skip keeps the annotator's place on the item for good.

    Returns:
        The stored annotation.

    Raises:
        AnnotationError: unknown status; item unknown or not in the open round; round already
            used for training; item not served to this annotator (or their claim expired and the
            place went to someone else); ranks that miss a trace, name a trace of another item,
            or are not integers from 0 to the number of verified traces - 1; trace ids that are
            not integers, or a trace marked wrong that is not a verified trace of this item;
            rationale too long; stale draft; or a second submission of the same item by the
            same annotator.
    """
    if status not in ("draft", "submitted", "skipped"):
        raise AnnotationError(f"status must be draft, submitted or skipped, got {status!r}")
    ranks, flagged, verifier_wrong, rationale = checked_input(ranks, flagged, verifier_wrong, rationale)
    try:
        with store.session() as s, s.begin():
            return _save(s, user_id, rollout_id, task_id, status, ranks, rationale, flagged, revision,
                         annotators_per_item, verifier_wrong, claim_seconds, complete)
    except IntegrityError as e:  # the database refused a duplicate row another writer just made
        raise AnnotationError("this item was saved concurrently elsewhere; reload it") from e


def _save(s: Session, user_id: int, rollout_id: int, task_id: str, status: str, ranks: dict[int, int],
          rationale: str, flagged: list[int], revision: int | None, annotators_per_item: int | None,
          verifier_wrong: list[int], claim_seconds: float, complete: bool = True) -> Annotation:
    now = time.time()
    rollout = open_item_rollout(s, rollout_id, task_id)
    claim = claim_of(s, rollout_id, task_id, user_id)
    if claim is None:
        raise AnnotationError(f"task {task_id!r} of round {rollout.round} was not served to you (or you held it "
                              "too long and it went to another annotator): load the next item")
    verified, rejected = item_rows(s, rollout_id, task_id)
    verified_ids = {c.id for c in verified}
    all_ids = verified_ids | {c.id for c in rejected}
    foreign = sorted((set(ranks) - verified_ids) | (set(flagged) - all_ids))
    if foreign:
        raise AnnotationError(f"trace ids {foreign} are not verified traces of this item")
    not_verified = sorted(set(verifier_wrong) - verified_ids)
    if not_verified:
        raise AnnotationError(f"trace ids {not_verified} cannot be marked 'verified answer is actually wrong': "
                              "only verified traces of this item can (the verifier already rejected or "
                              "never saw the others)")
    bad = {cid: v for cid, v in ranks.items() if not 0 <= v < len(verified)}
    if bad:
        raise AnnotationError(f"ranks must be integers from 0 to {len(verified) - 1} (0 is best, ties allowed; "
                              f"this item has {len(verified)} verified traces), got {bad}")
    if status == "submitted" and not complete and len(ranks) < min(2, len(verified_ids)):
        raise AnnotationError("a pairwise judgment ranks two traces")
    if status == "submitted" and complete and set(ranks) != verified_ids:
        missing = sorted(verified_ids - set(ranks))
        raise AnnotationError(f"rank every trace: traces {missing} have no rank")
    expired = claim.expires_at is not None and claim.expires_at <= now
    if annotators_per_item is not None and status != "draft" and expired:
        others = len(holders(s, rollout_id, now).get(task_id, set()) - {user_id})
        if others >= annotators_per_item:
            raise AnnotationError(f"this item already has {others} annotation(s), enough; load the next one")
    existing = s.scalar(select(Annotation).where(Annotation.rollout_id == rollout_id, Annotation.task_id == task_id,
                                                Annotation.user_id == user_id))
    if existing is not None and existing.status != "draft":
        raise AnnotationError(f"you already {existing.status} this item")
    if existing is not None and revision != existing.revision:
        raise AnnotationError("stale draft: this item was saved elsewhere since you opened it; reload it")
    if existing is None:
        existing = Annotation(rollout_id=rollout_id, task_id=task_id, user_id=user_id, revision=0)
        s.add(existing)
    else:
        existing.revision += 1
    existing.status, existing.ranks, existing.rationale, existing.flagged, existing.verifier_wrong = (
        status, {str(k): v for k, v in ranks.items()}, rationale, flagged, verifier_wrong)
    claim.expires_at = None if status != "draft" else now + claim_seconds
    s.flush()
    return existing


def record_binary_feedback(store: Store, user_id: int | None, policy_version: int | None, prompt: str,
                           completion: str, label: bool) -> int:
    """Store a playground thumbs up (True) / down (False) with the policy version; returns its id.
    One vote per user and answer (version, prompt and answer text): a repeated click, concurrent
    or later, replaces the label of the first while no round has trained on it.

    With ``algorithm: kto`` (and ``feedback.thumbs``) the next round trains on it as a desirable /
    undesirable example (:mod:`rlhf_workbench.feedback.thumbs`); other algorithms leave it stored.

    Raises:
        AnnotationError: this user's vote on this answer was already trained on (nothing changed).
    """
    key = hashlib.sha256(f"{policy_version}\0{prompt}\0{completion}".encode("utf-8", "replace")).hexdigest()
    row = dict(user_id=user_id, policy_version_id=policy_version, prompt=prompt, completion=completion,
               label=bool(label), answer_key=key)
    fid, consumed = upsert_vote(store, row, (BinaryFeedback.user_id == user_id) & (BinaryFeedback.answer_key == key))
    if consumed is not None:
        raise AnnotationError(f"your vote on this answer was already trained on in round {consumed}; it can no "
                              "longer be changed")
    return fid


# --- the worker's side --------------------------------------------------------------------------
def _aggregate(rollout: Rollout, subs: list[Annotation]) -> tuple[dict[str, dict[int, float]], set[int]]:
    """Scores and flagged traces from submitted annotations (see :func:`human_scores`)."""
    scores: dict[str, dict[int, float]] = {c.task_id: {} for c in rollout.completions}
    sums: dict[str, dict[int, list[int]]] = {}
    flagged: set[int] = set()
    for a in subs:
        flagged.update(a.flagged or [])
        flagged.update(a.verifier_wrong or [])
        for cid, rank in a.ranks.items():
            sums.setdefault(a.task_id, {}).setdefault(int(cid), []).append(rank)
    verified: dict[str, list[int]] = {}
    for c in rollout.completions:
        if rankable(c.verification):
            verified.setdefault(c.task_id, []).append(c.id)
    for task_id, per in sums.items():
        scores[task_id] = {cid: -sum(r) / len(r) for cid, r in per.items()}
        if scores[task_id]:  # partially ranked (pairwise): unranked verified traces sit in the middle
            mid = (max(scores[task_id].values()) + min(scores[task_id].values())) / 2
            for cid in verified.get(task_id, []):
                scores[task_id].setdefault(cid, mid)
    return scores, flagged


def _submitted(s: Session, rollout_id: int, adjudication_threshold: float | None = None) -> list[Annotation]:
    """The rollout's rankings that train: its submissions, with those of disputed items replaced
    by their adjudicated ranking (:func:`rlhf_workbench.human.adjudication.effective_submissions`)."""
    subs = list(s.scalars(select(Annotation).where(Annotation.rollout_id == rollout_id,
                                                   Annotation.status == "submitted").order_by(Annotation.id)))
    return effective_submissions(s, rollout_id, subs, adjudication_threshold)


def human_scores(store: Store, rollout: Rollout, adjudication_threshold: float | None = None
                 ) -> tuple[dict[str, dict[int, float]], set[int], int]:
    """Aggregate the submitted annotations of a rollout (a read; the worker consumes them with
    :func:`consume_human_rankings`). With ``adjudication_threshold``
    (``feedback.adjudication_threshold``), a disputed item counts only by its adjudicated ranking,
    and not at all while it waits for one (:mod:`rlhf_workbench.human.adjudication`).

    Returns:
        ``(scores, flagged, n_rankings)``: per task, completion id -> minus the mean rank over
        annotators (higher is better; tasks nobody ranked get all zeros, i.e. the verifier alone
        decides; in a task ranked only in part, by pairwise judgments, a verified trace nobody
        ranked gets the midpoint of the ranked traces' scores: never best or worst by accident,
        and tied with everything when the judgments were ties); the union of flagged completion ids and of verified traces marked actually
        wrong (so either is never chosen and gets reward 0); the number of submissions that rank
        something (a submission of an item without verified traces ranks nothing and does not
        count toward ``feedback.min_rankings``).
    """
    with store.session() as s:
        subs = _submitted(s, rollout.id, adjudication_threshold)
    scores, flagged = _aggregate(rollout, subs)
    return scores, flagged, sum(bool(a.ranks) for a in subs)


def consume_human_rankings(store: Store, rollout: Rollout,
                           record: Callable[[Session, dict[str, dict[int, float]], set[int]], None],
                           adjudication_threshold: float | None = None) -> int | None:
    """The worker's read-score-and-record, as one transaction.

    Locks the rollout (:func:`rlhf_workbench.human.assignment.lock_round`, the lock every submission
    takes), reads its submitted annotations, aggregates them as :func:`human_scores` does, calls
    ``record(session, scores, flagged)`` to write the round's rankings in the same session, and
    marks every submission it read with ``consumed_round``. With ``adjudication_threshold``, an
    adjudicated item is read by its adjudicated ranking only and a disputed one not yet adjudicated
    not at all (:mod:`rlhf_workbench.human.adjudication`; the submissions left out stay unmarked). A
    submission racing with this either
    committed first (and is read here) or waits for the lock and then finds the round used for
    training (refused with that message): none is acknowledged and left out.

    Returns:
        The number of submissions consumed; None (and ``record`` is not called) when the rollout's
        rankings were already recorded.
    """
    with store.session() as s, s.begin():
        if lock_round(s, rollout.id) is None:
            raise ValueError(f"rollout {rollout.id} is not stored")
        if is_trained(s, rollout.id):
            return None
        subs = _submitted(s, rollout.id, adjudication_threshold)
        scores, flagged = _aggregate(rollout, subs)
        record(s, scores, flagged)
        if subs:
            s.execute(update(Annotation).where(Annotation.id.in_([a.id for a in subs]))
                      .values(consumed_round=rollout.round))
        return len(subs)


def verifier_audit(store: Store, z: float = 1.96) -> dict:
    """The verifier's precision as audited by the experts.

    *Audited* means reviewed by an expert in a **submitted** annotation: every verified trace
    (the verifier graded it correct) that the submission ranks counts once (a full ranking ranks
    every verified trace, so the expert has read each one; a pairwise judgment the two shown;
    two annotators of one item count twice). Drafts and skips audit nothing. A trace the annotator marked
    "verified answer is actually wrong" is a *false accept* of the verifier.

    Returns:
        ``{"audited", "wrong", "precision", "ci_low", "ci_high"}``: audited trace reviews, those
        marked wrong, the fraction not marked wrong, and its Wilson score interval
        (:func:`rlhf_workbench.stats.wilson_interval`, ``z`` = 1.96 for 95 %). The last three
        are None when nothing was audited yet.
    """
    with store.session() as s:
        subs = s.execute(select(Annotation.rollout_id, Annotation.task_id, Annotation.ranks,
                                Annotation.verifier_wrong).where(Annotation.status == "submitted")).all()
        verified: dict[tuple[int, str], set[int]] = {}
        for rollout_id, task_id, _, _ in subs:
            if (rollout_id, task_id) not in verified:
                verified[rollout_id, task_id] = set(s.scalars(
                    select(CompletionRow.id).join(VerificationRow, VerificationRow.completion_id == CompletionRow.id)
                    .where(CompletionRow.rollout_id == rollout_id, CompletionRow.task_id == task_id,
                           VerificationRow.correct.is_(True))))
    # a trace counts as read when the submission ranks it (a full ranking ranks every verified trace)
    audited = sum(len({int(k) for k in (ranks or {})} & verified[r, t]) for r, t, ranks, _ in subs)
    wrong = sum(len(set(w or []) & verified[r, t]) for r, t, _, w in subs)
    if not audited:
        return {"audited": 0, "wrong": 0, "precision": None, "ci_low": None, "ci_high": None}
    low, high = wilson_interval(audited - wrong, audited, z)
    return {"audited": audited, "wrong": wrong, "precision": (audited - wrong) / audited, "ci_low": low,
            "ci_high": high}


def open_item_count(store: Store, rollout: Rollout, min_verified: int = 2) -> int:
    """Items of a rollout with at least ``min_verified`` verified traces (any traces for an open task)."""
    per_task: dict[str, int] = {}
    for c in rollout.completions:
        per_task[c.task_id] = per_task.get(c.task_id, 0) + int(rankable(c.verification))
    return sum(n >= min_verified for n in per_task.values())


def wait_for_human_rankings(store: Store, rollout: Rollout, cfg: RunConfig, console: Console | None = None,
                            timeout: float | None = None):
    """Block until ``cfg.feedback.min_rankings`` items of ``rollout`` are submitted (or every item
    that can be ranked is: at least ``min_verified`` and at least one verified trace), publishing
    the waiting status in ``run_meta["status"]`` for the dashboard. Only submissions that rank
    something count. Then consume them with :func:`consume_human_rankings`.

    Returns:
        ``(scores, flagged)`` as :func:`human_scores`.

    Raises:
        TimeoutError: ``timeout`` seconds passed first.
    """
    start = time.time()
    need = min(cfg.feedback.min_rankings, open_item_count(store, rollout, max(1, cfg.feedback.min_verified)))
    while True:
        scores, flagged, have = human_scores(store, rollout, cfg.feedback.adjudication_threshold)
        store.set_meta("status", {"state": "waiting", "have": have, "need": need, "round": rollout.round})
        if have >= need:
            return scores, flagged
        if timeout is not None and time.time() - start > timeout:
            raise TimeoutError(f"only {have} of {need} rankings arrived in {timeout:.0f} s")
        if console is not None and int(time.time() - start) % 30 == 0:
            console.print(f"round {rollout.round}: waiting for {need - have} more rankings")
        time.sleep(cfg.feedback.poll_seconds)
