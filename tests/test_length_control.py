"""The length-controlled win rate (rlhf_workbench.stats.length_controlled_estimate): a policy that
wins only by being longer is at chance once length is controlled; a real gain survives it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rlhf_workbench.stats import length_controlled_estimate


def _outcomes(rng, diffs, intercept, slope):
    p = 1 / (1 + np.exp(-(intercept + slope * np.tanh(diffs / diffs.std()))))
    return (rng.random(len(diffs)) < p).astype(float)


def test_winning_by_length_alone_is_chance_once_length_is_controlled():
    rng = np.random.default_rng(1)
    diffs = rng.normal(10, 8, 400)  # the policy's answers are ~10 tokens longer
    y = _outcomes(rng, diffs, 0.0, 2.0)  # and win only through length
    est = length_controlled_estimate(y, diffs)
    assert y.mean() > 0.65
    assert est.low < 0.5 < est.high and abs(est.value - 0.5) < 0.1


def test_a_gain_at_equal_length_survives():
    rng = np.random.default_rng(2)
    diffs = rng.normal(0, 8, 400)
    y = _outcomes(rng, diffs, 1.0, 1.0)
    est = length_controlled_estimate(y, diffs)
    assert est.low > 0.6 and est.value == pytest.approx(1 / (1 + math.exp(-1.0)), abs=0.06)


def test_without_length_differences_it_is_the_plain_win_rate():
    y = [1.0, 0.0, 0.5, 1.0, 1.0, 0.0, 1.0, 0.5]
    est = length_controlled_estimate(y, [0] * len(y))
    assert est.value == pytest.approx(sum(y) / len(y), abs=1e-3)
    assert length_controlled_estimate(y, [0] * len(y)) == est  # seeded: the same interval again


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="3 outcomes vs 2 length differences"):
        length_controlled_estimate([1, 0, 1], [1, 2])
    with pytest.raises(ValueError, match=r"outcomes must lie in \[0, 1\]"):
        length_controlled_estimate([2.0], [1])
    assert math.isnan(length_controlled_estimate([], []).value)
