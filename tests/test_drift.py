"""Preference drift: rolling Kendall tau against the model's scores and earlier rankings."""

from datetime import datetime, timedelta, timezone

import pytest

from rlhf_workbench.human.drift import (Judgment, drift_series, drift_warning, model_tau, peer_taus,
                                  window_means)

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def J(who, minute, item, ranks):
    return Judgment(who, T0 + timedelta(minutes=minute), (1, item), ranks)


def test_model_tau_by_hand():
    # ranks 0 best; scores higher better. Same order -> 1, reversed -> -1.
    assert model_tau({1: 0, 2: 1, 3: 2}, {1: 0.9, 2: 0.5, 3: 0.1}) == 1.0
    assert model_tau({1: 0, 2: 1, 3: 2}, {1: 0.1, 2: 0.5, 3: 0.9}) == -1.0
    # one discordant pair of three: (2 - 1) / 3
    assert model_tau({1: 0, 2: 1, 3: 2}, {1: 0.9, 2: 0.1, 3: 0.5}) == pytest.approx(1 / 3)
    assert model_tau({1: 0, 2: 1}, {1: 1.0, 2: 1.0}) is None  # constant scores: undefined
    assert model_tau({1: 0, 2: 1}, {1: 1.0, 3: 0.0}) is None  # one common trace
    assert model_tau({1: 0, 2: 1}, None) is None


def test_peer_taus_compare_with_earlier_rankings_by_others():
    js = [J("ann", 0, "q1", {1: 0, 2: 1, 3: 2}),
          J("bob", 1, "q1", {1: 0, 2: 2, 3: 1}),   # vs ann: 1/3
          J("ann", 2, "q2", {4: 0, 5: 1}),         # nothing earlier
          J("cat", 3, "q1", {1: 2, 2: 1, 3: 0}),   # vs ann -1, vs bob -1/3 -> mean -2/3
          J("ann", 4, "q2", {4: 1, 5: 0})]         # only her own earlier ranking: not compared
    got = peer_taus(js)
    assert got[0] is None and got[2] is None and got[4] is None
    assert got[1] == pytest.approx(1 / 3) and got[3] == pytest.approx(-2 / 3)


def test_windows_and_warning():
    assert window_means([1, 1, 0.5], 2) == (0.75, None)
    assert window_means([1, 1, 0, 0], 2) == (0.0, 1.0)
    assert window_means([1], 2) == (None, None)
    assert drift_warning([1.0], window=2) is None  # no verdict before a full window
    assert drift_warning([0.9, 0.8, 0.4, 0.2], window=2, floor=0.0, max_drop=0.3) == \
        "recent mean τ 0.30 dropped by 0.55 from 0.85"
    assert drift_warning([0.9, 0.8, 0.7, 0.6], window=2, floor=0.0, max_drop=0.3) is None  # drop 0.2
    assert drift_warning([0.2, -0.4], window=2, floor=0.0) == "recent mean τ -0.10 is below 0.00"


def test_drift_series_per_annotator_and_overall():
    ref = {(1, "q1"): {1: 0.9, 2: 0.5, 3: 0.1}}
    js = [J("bob", 1, "q1", {1: 2, 2: 1, 3: 0}),   # reversed model order: -1; vs ann (earlier): -1
          J("ann", 0, "q1", {1: 0, 2: 1, 3: 2}),   # model order: 1; first ranking of q1
          J("ann", 2, "q2", {4: 0, 5: 1})]         # no reference scores, no earlier ranking
    s = drift_series(js, ref)
    assert s["ann"].model == [1.0] and s["ann"].peer == [] and s["ann"].n_rankings == 2
    assert s["bob"].model == [-1.0] and s["bob"].peer == [-1.0]
    assert s["overall"].model == [1.0, -1.0] and s["overall"].n_rankings == 3  # sorted by time
    r = s["overall"].report(window=2, floor=0.0, max_drop=0.3)
    assert r["model_recent"] == 0.0 and r["model_earlier"] is None and r["model_warning"] is None
    assert s["bob"].report(window=1)["peer_warning"] == "recent mean τ -1.00 is below 0.00"


def test_drift_summary_from_the_database(tiny_model_dir, tmp_path):
    """Model scores from the run's rule sources (length: shorter is better) when no automatic
    ranking is stored; the dashboard's markdown shows the warning."""
    from rlhf_workbench.human.accounts import create_user
    from rlhf_workbench.human.annotation import claim_item, save_annotation
    from rlhf_workbench.config import ModelConfig
    from rlhf_workbench.app.dashboard import drift_md
    from rlhf_workbench.human.drift import drift_summary
    from rlhf_workbench.model.loading import load_policy
    from rlhf_workbench.store import Store
    from rlhf_workbench.tasks.task import Task

    from conftest import seed_rollout

    store = Store(run_dir=tmp_path)
    store.add_tasks([Task(id="q1", question="What is 1 + 1?", answer="2")], "train")
    store.publish_version(0, None, "base", None, {}, 0)
    store.set_meta("config", {"feedback": {"sources": [{"name": "length", "weight": 1.0}]},
                              "rollout": {"max_new_tokens": 64}})
    pair = load_policy(ModelConfig(name=str(tiny_model_dir), mixed_precision="no"))
    rid = seed_rollout(store, pair, {"q1": ["Answer: 2", "1 + 1 = 2\nAnswer: 2",
                                            "One plus one makes two, so 1 + 1 = 2.\nAnswer: 2"]})
    short, mid, long_ = [c.id for c in store.rollout_for_round(1).completions]
    ann, bob = create_user(store, "ann", "correct horse"), create_user(store, "bob", "correct horse")
    for u, ranks in ((ann, {short: 0, mid: 1, long_: 2}), (bob, {short: 2, mid: 1, long_: 0})):
        claim_item(store, u, rid, "q1", annotators_per_item=2)
        save_annotation(store, u, rid, "q1", "submitted", ranks, annotators_per_item=2)
    rows = {r["name"]: r for r in drift_summary(store, window=1)}
    assert rows["ann"]["model_recent"] == 1.0 and rows["bob"]["model_recent"] == -1.0  # shorter-is-better order
    assert rows["bob"]["peer_recent"] == -1.0 and rows["ann"]["peer_n"] == 0
    assert rows["overall"]["n_rankings"] == 2 and rows["overall"]["model_earlier"] == 1.0
    assert rows["bob"]["model_warning"] == "recent mean τ -1.00 is below 0.00"
    md = drift_md(store)  # window 20: no verdict yet, both series listed
    assert "No drift warning." in md and "| bob | 1 | n/a (1 of 20) | n/a (1 of 20) |" in md
