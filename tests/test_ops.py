"""Operability of a run: TensorBoard metrics under the database's names, no warnings, checkpoint
paths relative to the run directory (another cwd still resumes, evaluates and serves the
playground), and the loop on PostgreSQL."""

import json
import logging
import os
import warnings
from pathlib import Path

import pytest

from rlhf_workbench.run import loop as loop_mod
from rlhf_workbench.store import Store

from test_loop import tiny_cfg


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def _scalars(event_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in a TensorBoard folder as ``tag -> [(step, value)]``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_relative_out_tensorboard_and_no_warnings(tiny_model_dir, tmp_path, monkeypatch):
    """A run with a relative --out writes TensorBoard events with the database's metric names per
    round (step = round) and emits no warning (the transformers 5 ``past_key_values`` deprecation
    was one, as a FutureWarning and a logged warning); its checkpoints are stored relative to the
    run directory, so resuming, ``rlhf eval --run`` and the playground work from another cwd."""
    import transformers

    first = tmp_path / "first"
    first.mkdir()
    monkeypatch.chdir(first)
    transformers.utils.logging.warning_once.cache_clear()  # warnings already given once in this process
    handler = _Records()
    tf_logger = logging.getLogger("transformers")
    tf_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loop_mod.run(tiny_cfg(tiny_model_dir, rounds=1), Path("runs/rel"))
    finally:
        tf_logger.removeHandler(handler)
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage() for r in handler.records] == []

    run_dir = first / "runs" / "rel"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    scalars = _scalars(run_dir / "tensorboard")
    store = Store(run_dir=run_dir)
    db = store.metrics()
    assert set(scalars) == set(db)  # the same names: train/..., eval/..., time/...
    assert {"train/loss", "train/reward", "eval/accuracy", "time/round_s"} <= set(scalars)
    for name, points in db.items():
        assert [s for s, _ in scalars[name]] == [r for r, _ in points]  # step = round
        assert [v for _, v in scalars[name]] == pytest.approx([v for _, v in points], rel=1e-6)

    # Checkpoints are stored relative to the run directory.
    assert [v.checkpoint for v in store.versions()] == [None, "checkpoints/v1"]

    # From another cwd: resume (loads checkpoints/v1 through the run directory), eval --run, playground.
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    rel = Path(os.path.relpath(run_dir, other))
    from rlhf_workbench.evaluation.selection import run_checkpoint

    (run_dir / "policy").rename(run_dir / "policy.final")  # as if interrupted before the final save
    assert run_checkpoint(rel).resolve() == (run_dir / "checkpoints" / "v1").resolve()
    (run_dir / "policy.final").rename(run_dir / "policy")
    from rlhf_workbench.app.playground import PlaygroundModels

    cfg = tiny_cfg(tiny_model_dir, rounds=2)
    version, policy_text, _ = PlaygroundModels(cfg).answer(Store(None, rel), store.tasks("heldout")[0])
    assert version == 1 and isinstance(policy_text, str)
    summary = loop_mod.run(cfg, rel)
    assert summary["rounds"] == 2
    assert [v.checkpoint for v in store.versions()] == [None, "checkpoints/v1", "checkpoints/v2"]
    assert [s for s, _ in _scalars(run_dir / "tensorboard")["eval/accuracy"]] == [0, 1, 2]


def test_old_absolute_checkpoint_paths_still_load(tiny_model_dir, tmp_path):
    """Runs written before relative paths stored absolute ones: they resume and evaluate unchanged."""
    from rlhf_workbench.evaluation.selection import run_checkpoint
    from rlhf_workbench.store import PolicyVersion

    out = tmp_path / "run"
    loop_mod.run(tiny_cfg(tiny_model_dir, rounds=1), out)
    store = Store(run_dir=out)
    with store.session() as s, s.begin():
        s.get(PolicyVersion, 1).checkpoint = str((out / "checkpoints" / "v1").resolve())
    (out / "policy" / "config.json").unlink()  # so that eval --run falls back to the checkpoint
    assert run_checkpoint(out) == (out / "checkpoints" / "v1").resolve()
    assert loop_mod.run(tiny_cfg(tiny_model_dir, rounds=2), out)["rounds"] == 2


def test_unknown_tracker_is_refused_before_writing(tiny_model_dir, tmp_path):
    cfg = tiny_cfg(tiny_model_dir, rounds=1)
    cfg.tracking.backend = "nonsense"
    with pytest.raises(ValueError, match=r"tracking\.backend: unknown tracker 'nonsense'"):
        loop_mod.run(cfg, tmp_path / "run")
    assert Store(run_dir=tmp_path / "run").get_meta("config") is None
    cfg.tracking.backend = "none"
    loop_mod.run(cfg.model_copy(update={"rounds": 0}), tmp_path / "run2")
    assert not (tmp_path / "run2" / "tensorboard").exists()


def test_loop_on_postgresql(tiny_model_dir, tmp_path, postgres_url):
    """The loop against a PostgreSQL database: one round, rankings, pairs, a published version;
    resumable from the same database."""
    from sqlalchemy import func, select

    from rlhf_workbench.store import CompletionRow, RankingRow

    cfg = tiny_cfg(tiny_model_dir, algorithm="dpo", rounds=1)
    cfg.db_url = postgres_url
    out = tmp_path / "run"
    loop_mod.run(cfg, out)
    assert not (out / "workbench.db").exists()
    store = Store(postgres_url, out)
    assert [v.id for v in store.versions()] == [0, 1]
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(CompletionRow)) == 4
        assert s.scalar(select(func.count()).select_from(RankingRow)) == 2
    assert json.loads((out / "summary.json").read_text())["rounds"] == 1
    assert loop_mod.run(cfg.model_copy(update={"rounds": 2}), out)["rounds"] == 2
