"""Preference drift: do the experts still rank the way they did, and the way the model scores?

Every submitted ranking (in submission order: ``annotations.updated_at``) gets two numbers:

- **model agreement** (:func:`model_tau`): Kendall's tau-b (Kendall 1945, Biometrika 33(3);
  ``scipy.stats.kendalltau``, ``variant="b"``) between the annotator's ranking and the automatic
  scores of the same traces, where the run has them (:func:`reference_scores`): the rewards an
  automatic source recorded for the item (a ranking row whose source is not ``human``: rules,
  reward model, judge), else the rule scores of the run's ``feedback.sources`` (format, length,
  verifier; model-based sources are not run by the dashboard). None when undefined (fewer than
  two common traces, or either side constant).
- **peer agreement** (:func:`peer_taus`): the mean tau-b against every *earlier* submitted ranking
  of the same item by another annotator, with the conventions of
  :func:`rlhf_workbench.human.adjudication.pair_tau` (both constant: 1, one constant: 0); None when the
  item had no comparable earlier ranking (with ``annotators_per_item: 1`` there never is one).

Per annotator and overall, the defined values form a series in submission order. The *recent
window* is its last ``window`` values and the *earlier window* the ``window`` before them; the
dashboard shows both means and a warning (:func:`drift_warning`) when the recent mean is below
``floor`` or lower than the earlier one by more than ``max_drop``. A series with fewer than
``window`` values gets no verdict yet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import select

from rlhf_workbench.config import FeedbackConfig, FeedbackSource
from rlhf_workbench.feedback.sources import RULE_SOURCES, rule_score
from rlhf_workbench.human.adjudication import pair_tau
from rlhf_workbench.store import Annotation, CompletionRow, RankingRow, User

WINDOW = 20       # rankings per window
FLOOR = 0.0       # warn when the recent mean tau is below this (more discordant than concordant)
MAX_DROP = 0.3    # warn when the recent mean is this much below the earlier window's


@dataclass(frozen=True)
class Judgment:
    """One submitted ranking: who, when, which item ``(rollout_id, task_id)``, completion id -> rank (0 best)."""

    annotator: str
    at: datetime
    item: tuple[int, str]
    ranks: dict[int, int]


def model_tau(ranks: dict[int, int], scores: dict[int, float] | None) -> float | None:
    """Kendall tau-b between a ranking (0 best) and scores (higher better) on the traces in both:
    1 when the annotator orders the traces as the scores do, -1 when exactly reversed.

    Returns:
        tau-b in [-1, 1]; None without scores, with fewer than two common traces, or when either
        side is constant there (tau-b undefined).
    """
    from scipy.stats import kendalltau

    if not scores:
        return None
    common = sorted(set(ranks) & set(scores))
    x, y = [-ranks[c] for c in common], [scores[c] for c in common]
    if len(common) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    tau = float(kendalltau(x, y, variant="b").statistic)
    return None if math.isnan(tau) else tau


def peer_taus(judgments: list[Judgment]) -> list[float | None]:
    """For each judgment (in the given order, oldest first), the mean
    :func:`~rlhf_workbench.human.adjudication.pair_tau` against every earlier judgment of the same item
    by another annotator; None where there is none comparable."""
    out: list[float | None] = []
    seen: dict[tuple[int, str], list[Judgment]] = {}
    for j in judgments:
        taus = [t for e in seen.get(j.item, []) if e.annotator != j.annotator
                and (t := pair_tau(j.ranks, e.ranks)) is not None]
        out.append(sum(taus) / len(taus) if taus else None)
        seen.setdefault(j.item, []).append(j)
    return out


def window_means(values: list[float], window: int = WINDOW) -> tuple[float | None, float | None]:
    """``(recent, earlier)``: the mean of the last ``window`` values and of the ``window`` before
    them; each None when that window is not full."""
    recent = values[-window:] if len(values) >= window else None
    earlier = values[-2 * window:-window] if len(values) >= 2 * window else None
    return (sum(recent) / window if recent else None), (sum(earlier) / window if earlier else None)


def drift_warning(values: list[float], window: int = WINDOW, floor: float = FLOOR,
                  max_drop: float = MAX_DROP) -> str | None:
    """A warning when the recent window's mean tau is below ``floor`` or has dropped by more than
    ``max_drop`` from the earlier window; None otherwise (or before ``window`` values)."""
    recent, earlier = window_means(values, window)
    if recent is None:
        return None
    if recent < floor:
        return f"recent mean τ {recent:.2f} is below {floor:.2f}"
    if earlier is not None and earlier - recent > max_drop:
        return f"recent mean τ {recent:.2f} dropped by {earlier - recent:.2f} from {earlier:.2f}"
    return None


@dataclass
class Series:
    """One annotator's (or everyone's) drift: the defined tau values in submission order, the
    window means and the warnings for both measures."""

    name: str
    n_rankings: int = 0
    model: list[float] = field(default_factory=list)
    peer: list[float] = field(default_factory=list)

    def report(self, window: int = WINDOW, floor: float = FLOOR, max_drop: float = MAX_DROP) -> dict:
        """``n_rankings``, per measure ``<m>_n``, ``<m>_recent``, ``<m>_earlier`` and ``<m>_warning``
        (``m`` = ``model``, ``peer``)."""
        out: dict = {"name": self.name, "n_rankings": self.n_rankings}
        for m, values in (("model", self.model), ("peer", self.peer)):
            out[f"{m}_n"] = len(values)
            out[f"{m}_recent"], out[f"{m}_earlier"] = window_means(values, window)
            out[f"{m}_warning"] = drift_warning(values, window, floor, max_drop)
        return out


def drift_series(judgments: list[Judgment], reference: dict[tuple[int, str], dict[int, float]]) -> dict[str, Series]:
    """Model and peer agreement of every judgment (sorted here by time, then given order), grouped
    per annotator and under ``"overall"`` (every annotator's values in one series)."""
    judgments = sorted(judgments, key=lambda j: j.at)
    series: dict[str, Series] = {"overall": Series("overall")}
    for j, peer in zip(judgments, peer_taus(judgments)):
        model = model_tau(j.ranks, reference.get(j.item))
        for s in (series["overall"], series.setdefault(j.annotator, Series(j.annotator))):
            s.n_rankings += 1
            if model is not None:
                s.model.append(model)
            if peer is not None:
                s.peer.append(peer)
    return series


# --- read from the database ------------------------------------------------------------------------
def load_judgments(store) -> list[Judgment]:
    """Every submitted annotation that ranks something, as a :class:`Judgment` (time: ``updated_at``,
    when it was submitted; adjudications are not the annotators' own and are left out)."""
    with store.session() as s:
        rows = s.execute(select(User.username, Annotation.updated_at, Annotation.rollout_id, Annotation.task_id,
                                Annotation.ranks).join(User, User.id == Annotation.user_id)
                         .where(Annotation.status == "submitted").order_by(Annotation.id)).all()
    return [Judgment(u, at, (r, t), {int(k): int(v) for k, v in ranks.items()})
            for u, at, r, t, ranks in rows if ranks]


def reference_scores(store, items) -> dict[tuple[int, str], dict[int, float]]:
    """Automatic scores of the traces of ``items`` (``(rollout_id, task_id)`` pairs): the rewards
    of an automatic source's ranking of the item where one is stored, else the rule scores
    (:func:`rlhf_workbench.feedback.sources.rule_score`) of the rule sources in the run's stored config
    (``feedback.sources``; the default format + 0.1 length when none is stored). Items with
    neither are left out."""
    cfg = store.get_meta("config") or {}
    stored = (cfg.get("feedback") or {}).get("sources")
    sources = ([FeedbackSource.model_validate(x) for x in stored] if stored
               else FeedbackConfig.model_fields["sources"].default_factory())
    rules = [x for x in sources if x.name in RULE_SOURCES]
    max_tokens = int((cfg.get("rollout") or {}).get("max_new_tokens") or 64)
    items = set(items)
    out: dict[tuple[int, str], dict[int, float]] = {}
    with store.session() as s:
        for rollout_id in {r for r, _ in items}:
            for row in s.scalars(select(RankingRow).where(RankingRow.rollout_id == rollout_id,
                                                          RankingRow.source != "human").order_by(RankingRow.id)):
                if (rollout_id, row.task_id) in items:
                    out.setdefault((rollout_id, row.task_id), {int(k): float(v) for k, v in row.rewards.items()})
            recorded = {key for key in out if key[0] == rollout_id}
            for c in s.scalars(select(CompletionRow).where(CompletionRow.rollout_id == rollout_id)) if rules else ():
                key = (rollout_id, c.task_id)
                if key in items and key not in recorded and c.verification is not None:
                    out.setdefault(key, {})[c.id] = sum(x.weight * rule_score(x, c, c.verification, max_tokens)
                                                        for x in rules)
    return out


def drift_summary(store, window: int = WINDOW, floor: float = FLOOR, max_drop: float = MAX_DROP) -> list[dict]:
    """:meth:`Series.report` of ``"overall"`` then each annotator (by name), from the database."""
    js = load_judgments(store)
    series = drift_series(js, reference_scores(store, {j.item for j in js}))
    names = ["overall"] + sorted(n for n in series if n != "overall")
    return [series[n].report(window, floor, max_drop) for n in names]
