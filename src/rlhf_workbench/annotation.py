"""Human feedback: annotator accounts, the items they rank, and validated submissions.

An *item* is one task's traces in one rollout that has not been used for training yet. The
web app (``app.py``) shows items and saves annotations only through this module; the worker
(the loop with ``feedback.source: human``) waits here until enough items are submitted, then
turns them into rankings. The database is the only channel between the two, so annotators and
the worker can be separate processes on separate machines.

Every write validates first and changes nothing on error (:class:`AnnotationError`).

Experts also audit the verifier: a verified trace (graded correct) can be marked as actually
wrong. The worker treats it like a flagged trace (never chosen, reward 0), and
:func:`verifier_audit` turns the marks into the verifier's audited precision.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import random
import threading
import time
from dataclasses import dataclass

from rich.console import Console
from sqlalchemy import func, select

from .config import RunConfig
from .stats import wilson_interval
from .store import Annotation, BinaryFeedback, CompletionRow, RankingRow, Rollout, Store, TaskRow, User, VerificationRow
from .tasks import Task

ROLES = ("annotator", "admin")


_WRITE_LOCK = threading.Lock()  # one check-then-write at a time per process (see save_annotation)


class AnnotationError(ValueError):
    """A submission or account operation that was refused; nothing was stored."""


# --- accounts ---------------------------------------------------------------------------------
def hash_password(password: str, salt: bytes | None = None) -> str:
    """Salted scrypt hash (RFC 7914, n=2**14, r=8, p=1) as ``scrypt$<salt hex>$<hash hex>``."""
    salt = salt or os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1)
    return f"scrypt${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    """Constant-time comparison of ``password`` with a :func:`hash_password` string."""
    try:
        _, salt, _digest = stored.split("$")
    except ValueError:
        return False
    return hmac.compare_digest(hash_password(password, bytes.fromhex(salt)), stored)


def create_user(store: Store, username: str, password: str, role: str = "annotator") -> int:
    """Create an account; returns its id.

    Raises:
        AnnotationError: unknown role, empty username, password shorter than 8 characters, or
            the username is taken.
    """
    if role not in ROLES:
        raise AnnotationError(f"role must be one of {ROLES}, got {role!r}")
    if not username.strip():
        raise AnnotationError("username must not be empty")
    if len(password) < 8:
        raise AnnotationError("password must have at least 8 characters")
    with store.session() as s, s.begin():
        if s.scalar(select(User).where(User.username == username)) is not None:
            raise AnnotationError(f"user {username!r} already exists")
        user = User(username=username, password_hash=hash_password(password), role=role)
        s.add(user)
        s.flush()
        return user.id


def authenticate(store: Store, username: str, password: str) -> User | None:
    """The account if the password matches, else None."""
    with store.session() as s:
        user = s.scalar(select(User).where(User.username == username))
    return user if user is not None and check_password(password, user.password_hash) else None


# --- items ------------------------------------------------------------------------------------
@dataclass
class Trace:
    """One trace as an annotator sees it."""

    completion_id: int
    text: str
    reason: str  # the verifier's reason for its verdict


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


def _open_rollouts(s) -> list[Rollout]:
    """Rollouts not yet turned into rankings (so still open to annotators), newest first."""
    ranked = select(RankingRow.rollout_id).distinct()
    return list(s.scalars(select(Rollout).where(Rollout.id.not_in(ranked)).order_by(Rollout.id.desc())))


def _item_traces(s, rollout_id: int, task_id: str) -> tuple[list[CompletionRow], list[CompletionRow]]:
    rows = list(s.scalars(select(CompletionRow).where(CompletionRow.rollout_id == rollout_id,
                                                      CompletionRow.task_id == task_id).order_by(CompletionRow.index)))
    verified = [c for c in rows if c.verification is not None and c.verification.correct]
    rejected = [c for c in rows if c.verification is not None and not c.verification.correct]
    return verified, rejected


def next_item(store: Store, user_id: int, annotators_per_item: int = 1, min_verified: int = 2) -> Item | None:
    """The next item for an annotator: their own draft first, then an open item with at least
    ``min_verified`` verified traces that fewer than ``annotators_per_item`` people have submitted
    or skipped and that this annotator has not (fewest annotations first, ties in an order
    shuffled per annotator); None when there is nothing to do. Newest rollout first."""
    with store.session() as s:
        for rollout in _open_rollouts(s):
            mine = {a.task_id: a for a in s.scalars(select(Annotation).where(
                Annotation.rollout_id == rollout.id, Annotation.user_id == user_id))}
            done = dict(s.execute(select(Annotation.task_id, func.count()).where(
                Annotation.rollout_id == rollout.id, Annotation.status.in_(("submitted", "skipped")))
                .group_by(Annotation.task_id)).all())
            n_verified = dict(s.execute(select(CompletionRow.task_id, func.count(VerificationRow.completion_id))
                                        .outerjoin(VerificationRow, (VerificationRow.completion_id == CompletionRow.id)
                                                   & VerificationRow.correct.is_(True))
                                        .where(CompletionRow.rollout_id == rollout.id)
                                        .group_by(CompletionRow.task_id)).all())
            drafts = [t for t, a in mine.items() if a.status == "draft"]
            # Fewest annotations first, then an order shuffled per annotator, so that annotators
            # working at the same time are spread over different items.
            open_ = [t for t, n in n_verified.items() if n >= min_verified and t not in mine
                     and done.get(t, 0) < annotators_per_item]
            open_.sort(key=lambda t: (done.get(t, 0), hashlib.sha256(f"{user_id}:{t}".encode()).hexdigest()))
            candidates = drafts + open_
            if candidates:
                task_id = candidates[0]
                verified, rejected = _item_traces(s, rollout.id, task_id)
                order = list(range(len(verified)))
                random.Random(f"{user_id}:{rollout.id}:{task_id}").shuffle(order)  # blind, stable per annotator
                return Item(
                    rollout_id=rollout.id, round=rollout.round, policy_version=rollout.policy_version_id,
                    task=s.get(TaskRow, task_id).to_task(),
                    verified=[Trace(verified[i].id, verified[i].text, verified[i].verification.reason) for i in order],
                    rejected=[Trace(c.id, c.text, c.verification.reason) for c in rejected],
                    draft=mine.get(task_id),
                )
    return None


def save_annotation(store: Store, user_id: int, rollout_id: int, task_id: str, status: str,
                    ranks: dict[int, int] | None = None, rationale: str = "", flagged: list[int] | None = None,
                    revision: int | None = None, annotators_per_item: int | None = None,
                    verifier_wrong: list[int] | None = None) -> Annotation:
    """Save a draft, a submission or a skip of one item, after validating it.

    Args:
        status: ``draft``, ``submitted`` or ``skipped``.
        ranks: completion id -> rank (0 best, ties allowed); a submission must rank every
            verified trace of the item and nothing else.
        flagged: completion ids of this item marked unsafe / clinically wrong.
        verifier_wrong: completion ids of verified traces of this item whose answer the expert
            found actually wrong (an audit of the verifier; see :func:`verifier_audit`). A
            submission must still rank them; the worker treats them like flagged traces.
        revision: the revision of the draft the page was showing (None when it showed none);
            a different stored revision means the draft is stale.
        annotators_per_item: when given, a submission or skip is refused once the item already has
            that many from other annotators (several annotators may have been shown the same item
            at once). Checks and writes are serialised within the process, so concurrent
            submissions to one app cannot overshoot; separate app processes on one database can.

    Returns:
        The stored annotation.

    Raises:
        AnnotationError: unknown status, item closed or unknown, ranks that miss a trace or name
            a trace of another item, a trace marked wrong that is not a verified trace of this
            item, non-integer or negative ranks, stale draft, or a second submission of the same
            item by the same annotator.
    """
    if status not in ("draft", "submitted", "skipped"):
        raise AnnotationError(f"status must be draft, submitted or skipped, got {status!r}")
    ranks = {int(k): v for k, v in (ranks or {}).items()}
    flagged = [int(x) for x in (flagged or [])]
    try:
        verifier_wrong = sorted({int(x) for x in (verifier_wrong or [])})
    except (TypeError, ValueError) as e:
        raise AnnotationError(f"traces marked wrong must be completion ids (integers): {e}") from e
    with _WRITE_LOCK, store.session() as s, s.begin():
        rollout = s.get(Rollout, rollout_id)
        if rollout is None or s.get(TaskRow, task_id) is None:
            raise AnnotationError(f"no item for rollout {rollout_id} and task {task_id!r}")
        if s.scalar(select(func.count()).select_from(RankingRow).where(RankingRow.rollout_id == rollout_id)):
            raise AnnotationError("this item was already used for training; load the next one")
        verified, rejected = _item_traces(s, rollout_id, task_id)
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
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in ranks.values()):
            raise AnnotationError("ranks must be integers >= 0 (0 is best, ties allowed)")
        if status == "submitted" and set(ranks) != verified_ids:
            missing = sorted(verified_ids - set(ranks))
            raise AnnotationError(f"rank every trace: traces {missing} have no rank")
        if annotators_per_item is not None and status != "draft":
            others = s.scalar(select(func.count()).select_from(Annotation).where(
                Annotation.rollout_id == rollout_id, Annotation.task_id == task_id, Annotation.user_id != user_id,
                Annotation.status.in_(("submitted", "skipped"))))
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
            status, {str(k): v for k, v in ranks.items()}, rationale[:2000], flagged, verifier_wrong)
        s.flush()
        return existing


def record_binary_feedback(store: Store, user_id: int | None, policy_version: int | None, prompt: str,
                           completion: str, label: bool) -> int:
    """Store a playground thumbs up (True) / down (False) with the policy version; returns its id.

    Stored only: no update trains on these yet (KTO on them is planned, not built)."""
    with store.session() as s, s.begin():
        row = BinaryFeedback(user_id=user_id, policy_version_id=policy_version, prompt=prompt,
                             completion=completion, label=bool(label))
        s.add(row)
        s.flush()
        return row.id


# --- the worker's side --------------------------------------------------------------------------
def human_scores(store: Store, rollout: Rollout) -> tuple[dict[str, dict[int, float]], set[int], int]:
    """Aggregate the submitted annotations of a rollout.

    Returns:
        ``(scores, flagged, n_submitted)``: per task, completion id -> minus the mean rank over
        annotators (higher is better; tasks nobody ranked get all zeros, i.e. the verifier alone
        decides); the union of flagged completion ids and of verified traces marked actually
        wrong (so either is never chosen and gets reward 0); the number of submitted annotations.
    """
    with store.session() as s:
        subs = list(s.scalars(select(Annotation).where(Annotation.rollout_id == rollout.id,
                                                       Annotation.status == "submitted")))
    scores: dict[str, dict[int, float]] = {c.task_id: {} for c in rollout.completions}
    sums: dict[str, dict[int, list[int]]] = {}
    flagged: set[int] = set()
    for a in subs:
        flagged.update(a.flagged or [])
        flagged.update(a.verifier_wrong or [])
        for cid, rank in a.ranks.items():
            sums.setdefault(a.task_id, {}).setdefault(int(cid), []).append(rank)
    for task_id, per in sums.items():
        scores[task_id] = {cid: -sum(r) / len(r) for cid, r in per.items()}
    return scores, flagged, len(subs)


def verifier_audit(store: Store, z: float = 1.96) -> dict:
    """The verifier's precision as audited by the experts.

    *Audited* means reviewed by an expert in a **submitted** annotation: every verified trace
    (the verifier graded it correct) of the item counts once per submitted annotation (the
    submission ranks every verified trace, so the expert has read each one; two annotators of
    one item count twice). Drafts and skips audit nothing. A trace the annotator marked
    "verified answer is actually wrong" is a *false accept* of the verifier.

    Returns:
        ``{"audited", "wrong", "precision", "ci_low", "ci_high"}``: audited trace reviews, those
        marked wrong, the fraction not marked wrong, and its Wilson score interval
        (:func:`rlhf_workbench.stats.wilson_interval`, ``z`` = 1.96 for 95 %). The last three
        are None when nothing was audited yet.
    """
    item = (CompletionRow.rollout_id == Annotation.rollout_id) & (CompletionRow.task_id == Annotation.task_id)
    with store.session() as s:
        audited = s.scalar(select(func.count()).select_from(Annotation).join(CompletionRow, item)
                           .join(VerificationRow, VerificationRow.completion_id == CompletionRow.id)
                           .where(Annotation.status == "submitted", VerificationRow.correct.is_(True)))
        marked = [(r, t, set(w)) for r, t, w in s.execute(
            select(Annotation.rollout_id, Annotation.task_id, Annotation.verifier_wrong)
            .where(Annotation.status == "submitted")).all() if w]
        verified: dict[tuple[int, str], set[int]] = {}
        for rollout_id, task_id, _ in marked:  # count only marks on verified traces of the item
            if (rollout_id, task_id) not in verified:
                verified[rollout_id, task_id] = set(s.scalars(
                    select(CompletionRow.id).join(VerificationRow, VerificationRow.completion_id == CompletionRow.id)
                    .where(CompletionRow.rollout_id == rollout_id, CompletionRow.task_id == task_id,
                           VerificationRow.correct.is_(True))))
    wrong = sum(len(w & verified[r, t]) for r, t, w in marked)
    if not audited:
        return {"audited": 0, "wrong": 0, "precision": None, "ci_low": None, "ci_high": None}
    low, high = wilson_interval(audited - wrong, audited, z)
    return {"audited": audited, "wrong": wrong, "precision": (audited - wrong) / audited, "ci_low": low,
            "ci_high": high}


def open_item_count(store: Store, rollout: Rollout, min_verified: int = 2) -> int:
    """Items of a rollout with at least ``min_verified`` verified traces."""
    per_task: dict[str, int] = {}
    for c in rollout.completions:
        per_task[c.task_id] = per_task.get(c.task_id, 0) + int(c.verification.correct)
    return sum(n >= min_verified for n in per_task.values())


def wait_for_human_rankings(store: Store, rollout: Rollout, cfg: RunConfig, console: Console | None = None,
                            timeout: float | None = None):
    """Block until ``cfg.feedback.min_rankings`` items of ``rollout`` are submitted (or every open
    item is), publishing the waiting status in ``run_meta["status"]`` for the dashboard.

    Returns:
        ``(scores, flagged)`` as :func:`human_scores`.

    Raises:
        TimeoutError: ``timeout`` seconds passed first.
    """
    start = time.time()
    need = min(cfg.feedback.min_rankings, open_item_count(store, rollout, cfg.feedback.min_verified))
    while True:
        scores, flagged, have = human_scores(store, rollout)
        store.set_meta("status", {"state": "waiting", "have": have, "need": need, "round": rollout.round})
        if have >= need:
            return scores, flagged
        if timeout is not None and time.time() - start > timeout:
            raise TimeoutError(f"only {have} of {need} rankings arrived in {timeout:.0f} s")
        if console is not None and int(time.time() - start) % 30 == 0:
            console.print(f"round {rollout.round}: waiting for {need - have} more rankings")
        time.sleep(cfg.feedback.poll_seconds)
