"""Collection only (``algorithm: none``): traces from an API model alone, ranked and exported; no
local policy is loaded and nothing is trained.

    rlhf run   --config configs/collect.yaml --out runs/collect                 # rule sources rank
    rlhf serve --config configs/collect.yaml --out runs/collect --with-worker   # experts rank in the app
    rlhf export --run runs/collect --out-dir prefs
    rlhf train --algorithm dpo --data prefs/preferences.jsonl --out-dir runs/dpo_from_collect

Why a value of ``algorithm`` and not a command of its own: a collection is a run without an update.
It keeps everything a run has (the run directory and its database, the lock, resume after an
interruption, ``rlhf serve`` / ``rlhf worker`` for expert rankings, ``rlhf export``), so the same
commands serve it; only the round differs.

Each round (:func:`rlhf_workbench.run.loop.run` passes its ``_collect_round`` as ``collect_round``)
asks the teacher (``rollout.teacher``) for M answers to each of ``rollout.prompts_per_round``
prompts, verifies and stores them exactly as the policy's samples, and ranks them with the run's
feedback (rule sources, or experts in the web app: safety filter, duplicate grouping, pairwise mode
and blind order as in any run). It publishes a policy version per round without a checkpoint
(``algorithm: none``: the rollouts' provenance and the round's metrics, ``collect/teacher/requests``
and the other :class:`~rlhf_workbench.model.api_rollout.APIUsage` counters). ``model.name`` only
provides the tokenizer, for token counts (the length source, ``feedback.length_penalty``) and the
chat template that checks prompt lengths.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

from rich.console import Console
from sqlalchemy import func, select

from rlhf_workbench.config import RunConfig
from rlhf_workbench.model.loading import load_tokenizer, resolve_model_path
from rlhf_workbench.model.sharding import make_accelerator
from rlhf_workbench.run.outputs import teacher_totals
from rlhf_workbench.run.setup import RunState, load_run_tasks, open_run
from rlhf_workbench.store import PreferencePair, RankingRow, Store


def collect(cfg: RunConfig, out_dir: Path, console: Console | None, cleanup: ExitStack,
            collect_round: Callable[[RunState, int, object], dict[str, float]]) -> dict:
    """Run (or resume) a collection in ``out_dir``: ``cfg.rounds`` rounds of ``collect_round(state,
    round, tokenizer)`` (the loop's teacher rollout, verification, storage and feedback), each
    published as a version without a checkpoint; the run's lock and tracker are entered into
    ``cleanup``.

    Returns:
        The summary also written to ``out_dir/summary.json``: ``algorithm`` (``"none"``), ``rounds``,
        ``wall_seconds``, ``model`` (the tokenizer's), ``teacher`` (base_url and model),
        ``teacher_usage`` (summed counters), ``pairs`` and ``by_source`` (preference pairs stored).

    Raises:
        TaskFormatError: bad task file (before anything is written).
        ValueError: the run directory holds a run with a different config.
        RunInUseError: another live process owns the run.
        APIRolloutError: the endpoint refused a request for good (the round is not stored; rerun to resume).
    """
    t0 = time.time()
    accelerator = make_accelerator(mixed_precision="no")  # one process: the run's state needs one
    console = console or Console()
    train, heldout = load_run_tasks(cfg)
    state = RunState(cfg, out_dir, accelerator, console, train, heldout, t0)
    latest_id, _ = open_run(state, cleanup)
    store = state.store
    console.print(f"[bold]collection only[/]: {len(train)} train tasks, teacher {cfg.rollout.teacher.model} at "
                  f"{cfg.rollout.teacher.base_url}")
    tokenizer = load_tokenizer(resolve_model_path(cfg.model.name, cfg.model.cache_dir))
    if latest_id is None:  # no policy: version 0 only anchors the first rollout's provenance
        store.publish_version(0, None, "none", None, {}, round=0)
        latest_id = 0
    for round in range(latest_id + 1, cfg.rounds + 1):
        if state.lock is not None:
            state.lock.check()
        t_round = time.time()
        metrics = {f"collect/{k}": v for k, v in collect_round(state, round, tokenizer).items()}
        metrics["time/round_s"] = time.time() - t_round
        store.publish_version(round, round - 1, "none", None, metrics, round=round)
        state.tracking.log(metrics, step=round)
        console.print(f"round {round}/{cfg.rounds} (collect): {metrics.get('collect/teacher/traces', 0):.0f} "
                      f"teacher traces, acceptance {metrics.get('collect/teacher/acceptance_rate', 0):.2f}, "
                      f"{metrics['collect/pairs']:.0f} pairs ({metrics['time/round_s']:.0f}s)")
    store.set_meta("status", {"state": "done", "round": cfg.rounds})
    return write_collect_summary(out_dir, store, cfg, time.time() - t0)


def write_collect_summary(out: Path, store: Store, cfg: RunConfig, wall: float) -> dict:
    """A collection's ``summary.json`` (see :func:`collect`); returns it."""
    with store.session() as s:
        from_pairs = dict(s.execute(select(RankingRow.source, func.count(PreferencePair.id))
                                    .join(RankingRow, RankingRow.id == PreferencePair.ranking_id)
                                    .group_by(RankingRow.source)).all())
    teacher = cfg.rollout.teacher
    summary = {"algorithm": "none", "rounds": cfg.rounds, "wall_seconds": round(wall, 1), "model": cfg.model.name,
               "tasks": cfg.tasks.path, "teacher": {"base_url": teacher.base_url, "model": teacher.model},
               "teacher_usage": teacher_totals(store) or {}, "pairs": sum(from_pairs.values()),
               "by_source": from_pairs}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
