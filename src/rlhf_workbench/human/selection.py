"""Active selection: which open item an expert is served first (``feedback.selection``).

When a round's traces are stored (:func:`rlhf_workbench.run.loop.store_rollout`) every item (one
task's traces in the rollout) gets an *informativeness* score and a short reason, stored in the
rollout's ``selection`` column (:func:`score_rollout`); the app serves open items in the order
of :func:`serve_order`:

* ``fewest`` (the default, today's order): items fewest annotators hold first, ties in an order
  shuffled per annotator. The scores are still computed and shown on the dashboard.
* ``random``: a uniformly random order, seeded by the run's ``seed`` (the same for every
  annotator), after fewest holders. The baseline active selection is measured against.
* ``uncertainty``: the highest score first, after fewest holders (a second ranking of an item
  tells less than a first ranking of another one).

The score of an item is how much an expert's ranking of it can change training:

    score = (d - 1) * mean over pairs i < j of 4 * p_ij * (1 - p_ij),
    p_ij  = sigma(log pi(y_i) - log pi(y_j))

where ``d`` is the number of *distinct* rankable traces of the item (after whitespace
normalisation, :func:`rlhf_workbench.human.items.normalise`; identical copies tie whatever the expert
says, so an item with one distinct trace teaches nothing and scores 0), ``log pi(y)`` is the
sequence log-probability of a distinct trace under the sampling policy (the stored per-token
log-probs summed; the mean over its copies), and ``p_ij`` is the probability that the policy,
asked to choose between two of its own traces, picks ``y_i`` (the Bradley-Terry model on the
policy's own likelihoods, Bradley & Terry 1952; the same implicit preference DPO reads off a
policy, Rafailov et al. 2023 eq. 5 with beta = 1 and a uniform reference). ``4 p (1 - p)`` is 1
when the policy is indifferent (margin 0: the expert's verdict decides where the policy goes) and
tends to 0 as the margin grows (the policy already made up its mind; a ranking that agrees with
it changes little). This is uncertainty sampling (Lewis & Gale 1994) on the policy's own
preference, scaled by how many distinct alternatives the expert can separate.

When other ranking signals score the traces (``source_scores``: rule rewards, reward-model
ensemble members, an LLM judge), their disagreement is added: the fraction of distinct pairs
that two sources order oppositely (a Kendall discordance, averaged over source pairs), times
``d - 1``. The loop passes none today (under ``feedback.source: human`` no automatic source
ranks the traces), so the stored score is the policy-margin term alone.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from itertools import combinations
from typing import Iterable, Sequence

from sqlalchemy import select

from rlhf_workbench.human.assignment import holders, open_rollout
from rlhf_workbench.human.items import normalise
from rlhf_workbench.store import Annotation

SELECTIONS = ("fewest", "random", "uncertainty")


@dataclass(frozen=True)
class ItemScore:
    """One item's informativeness (``score`` >= 0, unitless; higher = serve earlier under
    ``uncertainty``) and the human-readable ``reason`` the dashboard shows."""

    score: float
    reason: str


def pair_uncertainty(logp_a: float, logp_b: float) -> float:
    """``4 p (1 - p)`` with ``p = sigmoid(logp_a - logp_b)``: 1 when the policy is indifferent
    between two traces, -> 0 as its margin grows. ``logp_*``: sequence log-probs in nats."""
    m = abs(logp_a - logp_b)
    p = 1.0 / (1.0 + math.exp(-m)) if m < 700 else 1.0
    return 4.0 * p * (1.0 - p)


def _discordance(a: Sequence[float], b: Sequence[float]) -> float:
    """Fraction of pairs that ``a`` and ``b`` order strictly oppositely (ties count as agreement)."""
    pairs = list(combinations(range(len(a)), 2))
    if not pairs:
        return 0.0
    return sum((a[i] - a[j]) * (b[i] - b[j]) < 0 for i, j in pairs) / len(pairs)


def item_score(texts: Sequence[str], logps: Sequence[Sequence[float]],
               source_scores: dict[str, Sequence[float]] | None = None) -> ItemScore:
    """Informativeness of one item from its rankable traces (module docstring for the formula).

    Args:
        texts: the item's rankable traces (verified correct, or any trace of an open task).
        logps: per trace, its per-token log-probs under the sampling policy (nats; any length).
        source_scores: optional, source name -> one score per trace (higher = better) from other
            ranking signals; their pairwise disagreement on the distinct traces is added.

    Raises:
        ValueError: ``logps`` or a source's scores not one entry per trace.
    """
    if len(logps) != len(texts):
        raise ValueError(f"selection.item_score: {len(texts)} traces but {len(logps)} log-prob lists")
    for name, sc in (source_scores or {}).items():
        if len(sc) != len(texts):
            raise ValueError(f"selection.item_score: source {name!r} scores {len(sc)} traces, expected {len(texts)}")
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(texts):
        groups.setdefault(normalise(t), []).append(i)
    d = len(groups)
    if d < 2:
        what = "no rankable trace" if d == 0 else (
            "1 distinct trace" + (f" (×{len(texts)} identical)" if len(texts) > 1 else ""))
        return ItemScore(0.0, f"{what}: a ranking cannot separate anything")
    members = list(groups.values())
    seq = [sum(sum(logps[i]) for i in g) / len(g) for g in members]
    unc = [pair_uncertainty(seq[i], seq[j]) for i, j in combinations(range(d), 2)]
    mean_unc = sum(unc) / len(unc)
    margin = max(seq) - min(seq)
    score = (d - 1) * mean_unc
    reason = (f"{d} distinct traces, policy indifference {mean_unc:.2f} "
              f"(largest log-prob margin {margin:.1f} nats)")
    srcs = {k: [sum(v[i] for i in g) / len(g) for g in members] for k, v in (source_scores or {}).items()}
    if len(srcs) >= 2:
        dis = [_discordance(a, b) for a, b in combinations(srcs.values(), 2)]
        disagreement = sum(dis) / len(dis)
        score += (d - 1) * disagreement
        reason += f", sources disagree on {100 * disagreement:.0f} % of pairs"
    return ItemScore(round(score, 6), reason)


def random_score(seed: int, round: int, task_id: str) -> float:
    """A uniform draw in [0, 1) fixed by ``(seed, round, task_id)`` (sha256; the same on every
    machine and process): the ``random`` selection's order key."""
    h = hashlib.sha256(f"{seed}:{round}:{task_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0 ** 64


def score_rollout(mode: str, seed: int, round: int,
                  items: dict[str, Iterable[tuple[str, Sequence[float], bool]]]) -> dict:
    """The value stored in ``Rollout.selection`` for one round.

    Args:
        mode: ``feedback.selection`` (one of :data:`SELECTIONS`).
        seed: the run's seed (the ``random`` order).
        round: the round number.
        items: task id -> its traces as ``(text, per-token logps, rankable)``.

    Returns:
        ``{"mode", "seed", "items": {task_id: {"score", "reason", "random"}}}``: JSON-ready.

    Raises:
        ValueError: an unknown ``mode``.
    """
    if mode not in SELECTIONS:
        raise ValueError(f"feedback.selection: {mode!r} is not one of {', '.join(SELECTIONS)}")
    out = {}
    for task_id, traces in items.items():
        rankable = [(t, lp) for t, lp, ok in traces if ok]
        s = item_score([t for t, _ in rankable], [lp for _, lp in rankable])
        out[task_id] = {"score": s.score, "reason": s.reason, "random": random_score(seed, round, task_id)}
    return {"mode": mode, "seed": seed, "items": out}


def serve_order(selection: dict | None, task_ids: Iterable[str], held: dict[str, set[int]],
                user_id: int) -> list[str]:
    """The open items in the order an annotator is offered them.

    Args:
        selection: the rollout's stored ``selection`` (None for a rollout stored before the
            column existed: ``fewest``).
        task_ids: the items this annotator may take.
        held: task id -> users holding a place on it (:func:`rlhf_workbench.human.assignment.holders`).
        user_id: the annotator (ties of ``fewest`` are shuffled per annotator).
    """
    mode = (selection or {}).get("mode", "fewest")
    scored = (selection or {}).get("items", {})

    def tiebreak(t: str) -> str:
        return hashlib.sha256(f"{user_id}:{t}".encode()).hexdigest()

    def key(t: str):
        n = len(held.get(t, ()))
        info = scored.get(t, {})
        if mode == "uncertainty":
            return (n, -float(info.get("score", 0.0)), tiebreak(t))
        if mode == "random":
            return (n, float(info.get("random", 0.0)), t)
        return (n, tiebreak(t))

    return sorted(task_ids, key=key)


def why_served(selection: dict | None, task_id: str) -> str:
    """One line saying why an item is where it is in the queue (dashboard and /next_item)."""
    mode = (selection or {}).get("mode", "fewest")
    info = (selection or {}).get("items", {}).get(task_id)
    if info is None:
        return f"{mode}: no score stored"
    if mode == "uncertainty":
        return f"uncertainty: score {info['score']:.2f}: {info['reason']}"
    if mode == "random":
        return f"random (seed {selection.get('seed')}): draw {info['random']:.2f}; score {info['score']:.2f}"
    return f"fewest annotations first; score {info['score']:.2f}: {info['reason']}"


def queue_md(store, limit: int = 8) -> str:
    """The dashboard's line on selection: the open round's mode and its first ``limit`` items in
    serving order (for an annotator holding nothing) with score, reason and state (a Markdown
    table), or a sentence when no round is open. ``store``: :class:`rlhf_workbench.store.Store`."""
    with store.session() as s:
        rollout = open_rollout(s)
        if rollout is None:
            return "**Item selection:** no round open for annotation."
        sel, held = rollout.selection, holders(s, rollout.id)
        done = {t for t, in s.execute(select(Annotation.task_id).where(
            Annotation.rollout_id == rollout.id, Annotation.status == "submitted"))}
    mode = (sel or {}).get("mode", "fewest")
    order = serve_order(sel, list((sel or {}).get("items", {})), held, user_id=0)
    rows = [f"| {t} | {'submitted' if t in done else 'served' if held.get(t) else 'open'} | {why_served(sel, t)} |"
            for t in order[:limit]]
    head = f"**Item selection: {mode}** (round {rollout.round}; first {len(rows)} of {len(order)} items in serving order)"
    return "\n".join([head, "", "| item | state | why |", "|---|---|---|", *rows]) if rows else head
