"""Who works on which item: the open round, and claims counted in the database.

An item is one task's traces in one rollout. Only the *open* round can be annotated: the newest
rollout, as long as the worker has not turned it into rankings. When an item is served
(:func:`rlhf_workbench.human.annotation.next_item`) the annotator gets a claim on it: a row of
``item_claims`` with a slot number below ``feedback.annotators_per_item``, unique per item, so
the database itself refuses an annotator too many, whichever app process asks. A claim expires
after ``feedback.claim_seconds`` unless the item is submitted or skipped (then it is kept for
good); an expired claim is deleted when someone else needs its slot, so an abandoned item
returns to the pool.

Every write to items goes through :func:`lock_round` first, which serialises it with every
other writer of the same round, in any process: ``BEGIN IMMEDIATE`` on SQLite (one writer at a
time), ``SELECT ... FOR UPDATE`` of the rollout row on PostgreSQL. The worker takes the same
lock when it reads the submissions and records the round's rankings
(:func:`rlhf_workbench.human.annotation.consume_human_rankings`), so a submission is either in that
transaction or sees the round closed.

The functions here work inside a caller's session and raise nothing of their own: they return
None where a claim cannot be had, and the caller words the error.
"""

from __future__ import annotations

import time

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from rlhf_workbench.store import Annotation, ItemClaim, RankingRow, Rollout


def lock_round(s: Session, rollout_id: int | None = None) -> Rollout | None:
    """Start a serialised write and return the rollout it is about, locked.

    Must be the session's first statement. With ``rollout_id`` that rollout (None if unknown),
    else the open one (:func:`open_rollout`). Two transactions that lock the same rollout run
    one after the other; the second sees everything the first committed.
    """
    if s.get_bind().dialect.name == "sqlite":
        s.connection().exec_driver_sql("BEGIN IMMEDIATE")  # the write lock now, waiting up to busy_timeout
    if rollout_id is not None:
        return s.get(Rollout, rollout_id, with_for_update=True, populate_existing=True)
    latest = s.scalar(select(Rollout).order_by(Rollout.round.desc(), Rollout.id).limit(1).with_for_update())
    return latest if latest is not None and not is_trained(s, latest.id) else None


def is_trained(s: Session, rollout_id: int) -> bool:
    """Whether the rollout's rankings are recorded (its submissions were used for training)."""
    return s.scalar(select(RankingRow.id).where(RankingRow.rollout_id == rollout_id).limit(1)) is not None


def open_rollout(s: Session) -> Rollout | None:
    """The round open for annotation: the newest rollout (highest round) if it has no rankings
    yet, else None. Older rollouts without rankings (left by an interrupted or duplicate run) are
    not open."""
    latest = s.scalar(select(Rollout).order_by(Rollout.round.desc(), Rollout.id).limit(1))
    return latest if latest is not None and not is_trained(s, latest.id) else None


def holders(s: Session, rollout_id: int, now: float | None = None) -> dict[str, set[int]]:
    """Per task of the rollout, the users holding a place on it: a live claim (unexpired, or kept
    after a submission or skip), or a submitted or skipped annotation (rows older than claims)."""
    now = time.time() if now is None else now
    out: dict[str, set[int]] = {}
    for task_id, user_id in s.execute(select(ItemClaim.task_id, ItemClaim.user_id).where(
            ItemClaim.rollout_id == rollout_id,
            ItemClaim.expires_at.is_(None) | (ItemClaim.expires_at > now))):
        out.setdefault(task_id, set()).add(user_id)
    for task_id, user_id in s.execute(select(Annotation.task_id, Annotation.user_id).where(
            Annotation.rollout_id == rollout_id, Annotation.status.in_(("submitted", "skipped")))):
        out.setdefault(task_id, set()).add(user_id)
    return out


def claim_of(s: Session, rollout_id: int, task_id: str, user_id: int) -> ItemClaim | None:
    """The user's claim on an item (live or expired but not yet given away), or None."""
    return s.scalar(select(ItemClaim).where(ItemClaim.rollout_id == rollout_id, ItemClaim.task_id == task_id,
                                            ItemClaim.user_id == user_id))


def take_claim(s: Session, rollout_id: int, task_id: str, user_id: int, cap: int, seconds: float,
               now: float | None = None) -> ItemClaim | None:
    """Give the user a place on an item, or refresh the one they have; None when ``cap`` other
    users hold places. Call after :func:`lock_round`. A kept claim (submitted or skipped) stays
    kept; a live or expired one is extended to ``now + seconds``."""
    now = time.time() if now is None else now
    mine = claim_of(s, rollout_id, task_id, user_id)
    if mine is not None:
        if mine.expires_at is not None:
            mine.expires_at = now + seconds
        return mine
    others = holders(s, rollout_id, now).get(task_id, set()) - {user_id}
    if len(others) >= cap:
        return None
    free = _free_slots(s, rollout_id, task_id, cap)
    if not free:  # expired claims still hold the slots: give them away now
        s.execute(delete(ItemClaim).where(ItemClaim.rollout_id == rollout_id, ItemClaim.task_id == task_id,
                                          ItemClaim.expires_at.is_not(None), ItemClaim.expires_at <= now))
        free = _free_slots(s, rollout_id, task_id, cap)
    if not free:
        return None
    claim = ItemClaim(rollout_id=rollout_id, task_id=task_id, user_id=user_id, slot=free[0], expires_at=now + seconds)
    s.add(claim)
    s.flush()  # the UNIQUE (rollout, task, slot) constraint is checked here
    return claim


def _free_slots(s: Session, rollout_id: int, task_id: str, cap: int) -> list[int]:
    used = set(s.scalars(select(ItemClaim.slot).where(ItemClaim.rollout_id == rollout_id,
                                                      ItemClaim.task_id == task_id)))
    return [k for k in range(cap) if k not in used]


def claimed_items(s: Session, rollout_id: int, user_id: int, now: float | None = None) -> list[str]:
    """Tasks of the rollout on which the user holds a live, not yet kept claim (served, not done)."""
    now = time.time() if now is None else now
    return list(s.scalars(select(ItemClaim.task_id).where(
        ItemClaim.rollout_id == rollout_id, ItemClaim.user_id == user_id, ItemClaim.expires_at.is_not(None),
        ItemClaim.expires_at > now).order_by(ItemClaim.id)))

