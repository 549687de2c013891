"""Statistics for evaluations users can trust: intervals and paired tests.

* proportions of questions (greedy pass@1, strict pass@1, format rate, maj@k with ``n == k``):
  Wilson score interval (:func:`wilson_interval`, Wilson 1927);
* means of per-question values (pass@k, sampled pass@1, reward, win rate, length, KL per
  sequence): percentile bootstrap over questions with a fixed seed (:func:`bootstrap_ci`,
  Efron 1979; Efron & Tibshirani 1993, sec. 13.3); a ratio of sums (KL per token) is
  bootstrapped as a ratio (:func:`bootstrap_ratio_ci`);
* pass@k: the unbiased estimator of Chen et al. 2021, eq. 1 (:func:`pass_at_k`); maj@k
  (:func:`maj_at_k`);
* two models on the same questions: the exact McNemar test (:func:`mcnemar_exact`) and
  Newcombe's paired difference interval (:func:`newcombe_paired_diff_ci`).
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927); ``(0, 1)`` when ``n == 0``."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(before: list[bool], after: list[bool]) -> dict[str, float]:
    """Exact McNemar test (two-sided binomial test on the discordant pairs) for paired outcomes.

    Args:
        before, after: per-task correctness on the same tasks, same order.

    Returns:
        ``{"b": improved, "c": regressed, "p_value": p}`` where ``b`` counts tasks wrong
        before and right after.

    Raises:
        ValueError: the lists differ in length.
    """
    if len(before) != len(after):
        raise ValueError(f"mcnemar_exact: {len(before)} vs {len(after)} outcomes")
    from scipy.stats import binomtest

    b = sum((not x) and y for x, y in zip(before, after))
    c = sum(x and (not y) for x, y in zip(before, after))
    p = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue
    return {"b": float(b), "c": float(c), "p_value": float(p)}


# ======================================================================================
# Statistics for `rlhf eval` and `rlhf compare`
# ======================================================================================

CONFIDENCE = 0.95
N_BOOT = 10_000  # bootstrap resamples
BOOT_SEED = 0  # fixed: the same data always give the same interval


def _z(confidence: float) -> float:
    """Two-sided standard normal quantile for ``confidence`` (1.95996... for 0.95).

    Raises:
        ValueError: ``confidence`` not in (0, 1).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + confidence / 2)


def _num(x: float | None) -> float | None:
    """``x`` as a JSON-safe float (NaN and None become None)."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its confidence interval.

    Attributes:
        value: the estimate (NaN when undefined, e.g. no questions).
        low, high: the interval (NaN when undefined).
        method: how the interval was computed: ``"wilson"`` (Wilson 1927 score interval of a
            proportion), ``"bootstrap"`` (percentile bootstrap of a mean over questions,
            Efron 1979), ``"bootstrap-ratio"`` (percentile bootstrap of a ratio of sums),
            ``"newcombe-paired"`` (Newcombe 1998 paired score interval of a difference) or
            ``"exact"`` (no sampling error: the value is known exactly).
        n: number of questions behind the estimate (the resampling unit).
        confidence: the interval's nominal coverage.
    """

    value: float
    low: float
    high: float
    method: str
    n: int
    confidence: float = CONFIDENCE

    def to_dict(self) -> dict[str, Any]:
        """``{"value", "ci_low", "ci_high", "method", "n", "confidence"}`` (NaN -> null)."""
        return {"value": _num(self.value), "ci_low": _num(self.low), "ci_high": _num(self.high),
                "method": self.method, "n": self.n, "confidence": self.confidence}

    def ci_text(self, digits: int = 3) -> str:
        """The interval as ``"[0.239, 0.397]"`` (``"n/a"`` when undefined)."""
        if math.isnan(self.low) or math.isnan(self.high):
            return "n/a"
        return f"[{self.low:.{digits}f}, {self.high:.{digits}f}]"


def proportion_estimate(successes: int, n: int, confidence: float = CONFIDENCE) -> Estimate:
    """``successes / n`` with the Wilson score interval (Wilson 1927); NaN value for ``n == 0``."""
    lo, hi = wilson_interval(successes, n, _z(confidence))
    value = successes / n if n else math.nan
    return Estimate(value, lo if n else math.nan, hi if n else math.nan, "wilson", n, confidence)


def bootstrap_ci(values: Sequence[float], confidence: float = CONFIDENCE, n_boot: int = N_BOOT,
                 seed: int = BOOT_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of a mean (Efron 1979; Efron & Tibshirani 1993, sec. 13.3).

    Draws ``n_boot`` resamples of the values with replacement (``numpy.random.default_rng(seed)``,
    PCG64: the same inputs and seed give the same interval on every machine) and returns the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles (linear interpolation) of
    the resampled means. The percentile interval always lies within ``[min, max]`` of the values.

    Args:
        values: one number per unit (question), e.g. per-question pass@k or reward.
        confidence: nominal coverage in (0, 1).
        n_boot: number of resamples (>= 1).
        seed: resampling seed.

    Returns:
        ``(low, high)``; ``(nan, nan)`` for no values.

    Raises:
        ValueError: ``n_boot < 1`` or ``confidence`` outside (0, 1).
    """
    return _bootstrap(np.asarray(values, dtype=float), None, confidence, n_boot, seed)


def bootstrap_ratio_ci(numerators: Sequence[float], denominators: Sequence[float], confidence: float = CONFIDENCE,
                       n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of a ratio of sums ``Σ num / Σ den`` resampling units
    (questions) with replacement, numerator and denominator together (the per-token KL is the
    summed KL over all completion tokens divided by the number of tokens).

    Returns:
        ``(low, high)``; ``(nan, nan)`` for no units or a zero total denominator. Resamples
        whose denominator sums to zero are dropped.

    Raises:
        ValueError: lengths differ, ``n_boot < 1`` or ``confidence`` outside (0, 1).
    """
    num, den = np.asarray(numerators, dtype=float), np.asarray(denominators, dtype=float)
    if num.shape != den.shape:
        raise ValueError(f"bootstrap_ratio_ci: {len(num)} numerators vs {len(den)} denominators")
    return _bootstrap(num, den, confidence, n_boot, seed)


def _bootstrap(x: np.ndarray, den: np.ndarray | None, confidence: float, n_boot: int, seed: int) -> tuple[float, float]:
    _z(confidence)
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    n = len(x)
    if n == 0 or (den is not None and den.sum() == 0):
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    rows = max(1, 4_000_000 // n)  # bound memory: at most ~4M indices per chunk
    for s in range(0, n_boot, rows):
        m = min(rows, n_boot - s)
        idx = rng.integers(0, n, size=(m, n))
        if den is None:
            stats[s : s + m] = x[idx].mean(axis=1)
        else:
            d = den[idx].sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                stats[s : s + m] = np.where(d > 0, x[idx].sum(axis=1) / np.where(d > 0, d, 1), np.nan)
    alpha = 1.0 - confidence
    lo, hi = np.nanquantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def mean_estimate(values: Sequence[float], confidence: float = CONFIDENCE, n_boot: int = N_BOOT,
                  seed: int = BOOT_SEED) -> Estimate:
    """Mean of per-question values with its percentile bootstrap interval (:func:`bootstrap_ci`)."""
    x = [float(v) for v in values]
    lo, hi = bootstrap_ci(x, confidence, n_boot, seed)
    return Estimate(sum(x) / len(x) if x else math.nan, lo, hi, "bootstrap", len(x), confidence)


def ratio_estimate(numerators: Sequence[float], denominators: Sequence[float], confidence: float = CONFIDENCE,
                   n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> Estimate:
    """``Σ num / Σ den`` with its percentile bootstrap interval (:func:`bootstrap_ratio_ci`)."""
    total = float(sum(denominators))
    lo, hi = bootstrap_ratio_ci(numerators, denominators, confidence, n_boot, seed)
    return Estimate(float(sum(numerators)) / total if total else math.nan, lo, hi, "bootstrap-ratio",
                    len(numerators), confidence)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from ``n`` samples of which ``c`` are correct.

    pass@k = 1 − C(n−c, k) / C(n, k) (Chen et al. 2021, "Evaluating Large Language Models
    Trained on Code", eq. 1): the probability that at least one of ``k`` samples drawn without
    replacement from the ``n`` is correct. Computed in their numerically stable product form
    1 − Π_{i=n−c+1}^{n} (1 − k / i); it is 1 when ``n − c < k``.

    Args:
        n: samples drawn for the question (>= 1).
        c: correct samples (0 .. n).
        k: the k of pass@k (1 .. n).

    Returns:
        A probability in [0, 1]; for ``k = 1`` exactly ``c / n``.

    Raises:
        ValueError: ``n < 1``, ``c`` outside ``[0, n]`` or ``k`` outside ``[1, n]``.
    """
    if n < 1:
        raise ValueError(f"pass_at_k: n must be at least 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: c must be in [0, n={n}], got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k must be in [1, n={n}] (the estimator needs n >= k samples), got {k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def majority_vote(answers: Sequence[str | None]) -> tuple[str | None, int]:
    """The most frequent extracted answer among samples (self-consistency, Wang et al. 2023).

    ``None`` entries (no answer could be extracted) abstain. Ties between equally frequent
    answers are broken deterministically in favour of the answer that appears **first** in
    sample order. Answers are compared as the verifier's normalised strings, so ``"1,200"``
    and ``"1200"`` are one answer (but ``"3/4"`` and ``"0.75"`` are two).

    Args:
        answers: the normalised extracted answer of each sample, in sample order.

    Returns:
        ``(answer, votes)``; ``(None, 0)`` when every sample abstains (or there are none).
    """
    counts: dict[str, int] = {}
    for a in answers:
        if a is not None:
            counts[a] = counts.get(a, 0) + 1  # dicts keep first-insertion order
    if not counts:
        return None, 0
    best = max(counts.values())
    winner = next(a for a, v in counts.items() if v == best)
    return winner, best


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool], k: int, max_subsets: int = 5000,
             seed: int = 0) -> float:
    """maj@k of one question: is the majority vote (:func:`majority_vote`) over k samples correct?

    With ``n == k`` samples this is 0 or 1 from all of them. With ``n > k`` it is the average
    over all C(n, k) subsets of k samples (each kept in sample order, so the first-occurrence
    tie-break applies within the subset), or over ``max_subsets`` subsets drawn uniformly with
    ``random.Random(seed)`` when C(n, k) is larger: the analogue for maj@k of the unbiased
    pass@k estimator. A voted answer is judged by the verdict of the first sample that gave
    it; when every sample of a subset abstains the vote is wrong.

    Args:
        answers: normalised extracted answers (``None`` = none found), in sample order.
        correct: the verifier's verdict of each sample.
        k: votes per majority (1 .. n).

    Returns:
        A value in [0, 1].

    Raises:
        ValueError: the lists differ in length, or ``k`` is outside ``[1, n]``.
    """
    n = len(answers)
    if len(correct) != n:
        raise ValueError(f"maj_at_k: {n} answers vs {len(correct)} verdicts")
    if not 1 <= k <= n:
        raise ValueError(f"maj_at_k: k must be in [1, n={n}], got {k}")
    verdict: dict[str, bool] = {}
    for a, c in zip(answers, correct):
        if a is not None:
            verdict.setdefault(a, bool(c))

    def hit(idx: Sequence[int]) -> bool:
        winner, _ = majority_vote([answers[i] for i in idx])
        return winner is not None and verdict[winner]

    if math.comb(n, k) <= max_subsets:
        subsets: Any = itertools.combinations(range(n), k)
        total = math.comb(n, k)
    else:
        rng = random.Random(seed)
        subsets = (sorted(rng.sample(range(n), k)) for _ in range(max_subsets))
        total = max_subsets
    return sum(hit(s) for s in subsets) / total


def newcombe_paired_diff_ci(a: Sequence[bool], b: Sequence[bool], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Confidence interval for ``mean(b) − mean(a)``, the difference of two paired proportions.

    Newcombe (1998), "Improved confidence intervals for the difference between binomial
    proportions based on paired data", Stat. Med. 17:2635–2650, method 10 (the square-and-add
    hybrid score interval; as in Altman et al. 2000, *Statistics with Confidence*, ch. 6, and
    Fagerland, Lydersen & Laake 2017, ch. 8): with Wilson intervals ``(l1, u1)`` for
    ``p1 = mean(b)`` and ``(l2, u2)`` for ``p2 = mean(a)`` and the correlation estimate ``φ``,

        L = D − sqrt((p1 − l1)² − 2φ(p1 − l1)(u2 − p2) + (u2 − p2)²)
        U = D + sqrt((p2 − l2)² − 2φ(p2 − l2)(u1 − p1) + (u1 − p1)²),   D = p1 − p2,

    where, with the paired table ``e`` = both right, ``f`` = only b right, ``g`` = only a
    right, ``h`` = both wrong and ``A = eh − fg``: ``φ = (A − n/2)/√((e+f)(g+h)(e+g)(f+h))``
    when ``A > n/2``, ``0`` when ``0 ≤ A ≤ n/2``, ``A/√(...)`` when ``A < 0``, and ``0`` when a
    margin is empty. Unlike a bootstrap it is well behaved for small n and zero cells.

    Args:
        a, b: per-question correctness of the two models on the same questions, same order.
        confidence: nominal coverage.

    Returns:
        ``(low, high)`` within [−1, 1]; ``(nan, nan)`` for no questions.

    Raises:
        ValueError: the lists differ in length.
    """
    if len(a) != len(b):
        raise ValueError(f"newcombe_paired_diff_ci: {len(a)} vs {len(b)} outcomes")
    n = len(a)
    if n == 0:
        return math.nan, math.nan
    z = _z(confidence)
    e = sum(x and y for x, y in zip(a, b))
    f = sum(y and not x for x, y in zip(a, b))
    g = sum(x and not y for x, y in zip(a, b))
    h = n - e - f - g
    p1, p2 = (e + f) / n, (e + g) / n
    l1, u1 = wilson_interval(e + f, n, z)
    l2, u2 = wilson_interval(e + g, n, z)
    margins = (e + f) * (g + h) * (e + g) * (f + h)
    phi = 0.0
    if margins > 0:
        A = e * h - f * g
        phi = (A - n / 2) / math.sqrt(margins) if A > n / 2 else (A / math.sqrt(margins) if A < 0 else 0.0)
    d = p1 - p2
    lo = d - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    hi = d + math.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    return max(-1.0, lo), min(1.0, hi)


def _logistic_intercepts(y: np.ndarray, x: np.ndarray, ridge: float = 1e-3, steps: int = 25) -> np.ndarray:
    """Intercepts ``a`` of ``y ~ σ(a + b·x)`` fit by Newton–Raphson for each row of ``y, x``
    (``[B, n]``; fractional ``y`` allowed), with a small ridge on both coefficients so that a
    row with only wins (separation) stays finite."""
    coef = np.zeros((y.shape[0], 2))
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(coef[:, :1] + coef[:, 1:] * x)))
        w = p * (1 - p)
        r = y - p
        g = np.stack([r.sum(1), (r * x).sum(1)], 1) - ridge * coef
        h00, h01, h11 = w.sum(1) + ridge, (w * x).sum(1), (w * x * x).sum(1) + ridge
        det = h00 * h11 - h01 * h01
        coef += np.stack([h11 * g[:, 0] - h01 * g[:, 1], h00 * g[:, 1] - h01 * g[:, 0]], 1) / det[:, None]
    return coef[:, 0]


def length_controlled_estimate(outcomes: Sequence[float], length_diffs: Sequence[float],
                               confidence: float = CONFIDENCE, n_boot: int = N_BOOT,
                               seed: int = BOOT_SEED) -> Estimate:
    """Length-controlled win rate: the win rate a logistic regression of the outcome on the length
    difference predicts at equal lengths (Dubois et al. 2024, "Length-Controlled AlpacaEval",
    eq. 2, with only the length term: ``P(win) = σ(a + b · tanh(Δ / sd(Δ)))``, reported as
    ``σ(a)``), with a percentile bootstrap interval over prompts (resample, refit).

    Args:
        outcomes: per prompt 1 (win), 0 (loss) or 0.5 (tie), e.g. from
            :func:`rlhf_workbench.evaluation.scoring.win_value`.
        length_diffs: per prompt the answer's length minus the reference answer's (tokens).

    Returns:
        An :class:`Estimate` (``method`` "bootstrap"); nan for no prompts.

    Raises:
        ValueError: lengths of the two sequences differ, or an outcome is outside [0, 1].
    """
    y, d = np.asarray(outcomes, dtype=float), np.asarray(length_diffs, dtype=float)
    if y.shape != d.shape:
        raise ValueError(f"length_controlled_estimate: {len(y)} outcomes vs {len(d)} length differences")
    if len(y) == 0:
        return Estimate(math.nan, math.nan, math.nan, "bootstrap", 0, confidence)
    if ((y < 0) | (y > 1)).any():
        raise ValueError("length_controlled_estimate: outcomes must lie in [0, 1]")
    sd = d.std()
    x = np.tanh(d / sd) if sd > 0 else np.zeros_like(d)
    point = float(1 / (1 + np.exp(-_logistic_intercepts(y[None], x[None])[0])))
    _z(confidence)
    idx = np.random.default_rng(seed).integers(0, len(y), size=(n_boot, len(y)))
    boot = 1 / (1 + np.exp(-_logistic_intercepts(y[idx], x[idx])))
    alpha = 1.0 - confidence
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return Estimate(point, float(lo), float(hi), "bootstrap", len(y), confidence)
