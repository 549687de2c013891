"""Inter-annotator agreement and annotator throughput, read from the annotations table.

Only *submitted* annotations count. An *item* is one task's verified traces in one rollout
(see :mod:`rlhf_workbench.human.annotation`); agreement is measured over the items that at least
two annotators submitted.

Two statistics:

- **Kendall's tau-b**, the mean over every item and every pair of its annotators of the
  tau-b between the two rankings of that item's traces (Kendall 1945, "The treatment of ties
  in ranking problems", Biometrika 33(3); computed by :func:`scipy.stats.kendalltau`,
  ``variant="b"``)::

      tau_b = (n_c - n_d) / sqrt((n_0 - n_1) (n_0 - n_2))

  with ``n_c``/``n_d`` concordant/discordant trace pairs, ``n_0 = n(n-1)/2`` and ``n_1``,
  ``n_2`` the pairs tied in the first / second ranking. Ties are allowed; a pair in which one
  ranking is constant (every trace tied) has no tau-b and is skipped.
- **Krippendorff's alpha**, ordinal level, over all items at once (Krippendorff 2011,
  "Computing Krippendorff's Alpha-Reliability", Annenberg School for Communication,
  https://repository.upenn.edu/asc_papers/43; computed by the ``krippendorff`` package)::

      alpha = 1 - D_o / D_e,   D_o = (1/n) sum_ck o_ck delta2_ck,
                              D_e = 1/(n(n-1)) sum_ck n_c n_k delta2_ck,
      ordinal delta2_ck = (sum_{g=c..k} n_g - (n_c + n_k)/2)^2

  where units are completions (every verified trace of every item), coders are annotators,
  values are ranks (0 best) and an annotator who did not submit an item is missing (nan).
  ``o_ck`` is the coincidence matrix and ``n_c`` the pairable count of value ``c``.
"""

from __future__ import annotations

import itertools
import math
from datetime import datetime, timezone

import numpy as np
from sqlalchemy import select

from rlhf_workbench.store import Annotation, Store, User

MIN_ACTIVE_SPAN_S = 300.0  # rankings_per_hour never divides by less than five minutes


def _submitted(store: Store) -> list[tuple[int, str, str, dict[int, int], datetime, datetime]]:
    """``(rollout_id, task_id, username, {completion id: rank}, created_at, updated_at)`` of every
    submitted annotation, in submission (id) order."""
    with store.session() as s:
        rows = s.execute(select(Annotation.rollout_id, Annotation.task_id, User.username, Annotation.ranks,
                                Annotation.created_at, Annotation.updated_at)
                         .join(User, User.id == Annotation.user_id)
                         .where(Annotation.status == "submitted").order_by(Annotation.id)).all()
    return [(r, t, u, {int(k): int(v) for k, v in (ranks or {}).items()}, c, up) for r, t, u, ranks, c, up in rows]


def multi_annotated_items(store: Store) -> dict[tuple[int, str], dict[str, dict[int, int]]]:
    """Items submitted by at least two annotators: ``(rollout_id, task_id) -> {username: ranks}``."""
    items: dict[tuple[int, str], dict[str, dict[int, int]]] = {}
    for rollout_id, task_id, user, ranks, _, _ in _submitted(store):
        items.setdefault((rollout_id, task_id), {})[user] = ranks
    return {k: v for k, v in items.items() if len(v) >= 2}


def pairwise_kendall_tau(items: dict[tuple[int, str], dict[str, dict[int, int]]]) -> tuple[float | None, int]:
    """Mean tau-b over every (item, annotator pair); returns ``(mean or None, pairs used)``.

    Each pair is compared on the traces both annotators ranked (for submissions: all verified
    traces of the item). Pairs with fewer than two common traces, or where either ranking is
    constant, are skipped.
    """
    from scipy.stats import kendalltau

    taus = []
    for per_user in items.values():
        for a, b in itertools.combinations(sorted(per_user), 2):
            common = sorted(set(per_user[a]) & set(per_user[b]))
            x = [per_user[a][c] for c in common]
            y = [per_user[b][c] for c in common]
            if len(common) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
                continue
            tau = kendalltau(x, y, variant="b").statistic
            if not math.isnan(tau):
                taus.append(float(tau))
    return (sum(taus) / len(taus) if taus else None), len(taus)


def ordinal_alpha(items: dict[tuple[int, str], dict[str, dict[int, int]]]) -> float | None:
    """Krippendorff's alpha (ordinal) with completions as units and annotators as coders;
    None when it is undefined (no items, or a single rank value in all the data)."""
    import krippendorff

    coders = sorted({u for per_user in items.values() for u in per_user})
    units = sorted({c for per_user in items.values() for ranks in per_user.values() for c in ranks})
    if not coders or not units:
        return None
    col = {c: j for j, c in enumerate(units)}
    row = {u: i for i, u in enumerate(coders)}
    data = np.full((len(coders), len(units)), np.nan)
    for per_user in items.values():
        for user, ranks in per_user.items():
            for cid, rank in ranks.items():
                data[row[user], col[cid]] = rank
    if len(np.unique(data[~np.isnan(data)])) < 2:
        return None
    alpha = float(krippendorff.alpha(reliability_data=data, level_of_measurement="ordinal"))
    return None if math.isnan(alpha) else alpha


def agreement_summary(store: Store) -> dict:
    """Agreement over the items that at least two annotators submitted.

    Returns:
        ``kendall_tau``: mean pairwise Kendall tau-b (None when no pair qualifies);
        ``krippendorff_alpha``: ordinal alpha over all such items (None when undefined);
        ``n_items``: items with at least two submitted annotations;
        ``n_annotations``: submitted annotations on those items;
        ``n_tau_pairs``: (item, annotator pair) comparisons averaged into ``kendall_tau``.
    """
    items = multi_annotated_items(store)
    tau, n_pairs = pairwise_kendall_tau(items)
    return {
        "kendall_tau": tau,
        "krippendorff_alpha": ordinal_alpha(items),
        "n_items": len(items),
        "n_annotations": sum(len(v) for v in items.values()),
        "n_tau_pairs": n_pairs,
    }


def _utc(t: datetime) -> datetime:
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t  # SQLite returns naive UTC


def rankings_per_hour(store: Store, min_span_s: float = MIN_ACTIVE_SPAN_S) -> dict[str, float]:
    """Submitted annotations per hour for every annotator who submitted at least one.

    The active span of an annotator runs from the creation of their first submitted annotation
    (when they first saved it, as a draft or directly) to the last submission, and is taken as
    at least ``min_span_s`` seconds so that a single quick submission does not read as
    thousands per hour: ``rate = n_submitted / max(span, min_span_s) * 3600``.
    """
    spans: dict[str, list] = {}
    for _, _, user, _, created, updated in _submitted(store):
        first, last, n = spans.get(user, (None, None, 0))
        created, updated = _utc(created), _utc(updated)
        spans[user] = (min(created, first) if first else created, max(updated, last) if last else updated, n + 1)
    return {user: n / max((last - first).total_seconds(), min_span_s) * 3600.0
            for user, (first, last, n) in sorted(spans.items())}
