"""What a run writes under its directory besides the database: each evaluation's per-task
outcomes (``eval/v<n>.json``, read back for the paired test and the win rate), the pruning of old
checkpoints, and the final ``summary.json``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sqlalchemy import select

from rlhf_workbench.config import RunConfig
from rlhf_workbench.evaluation.heldout import EvalResult
from rlhf_workbench.stats import mcnemar_exact
from rlhf_workbench.store import Rollout, Store

SUMMARY_METRICS = ("accuracy", "lenient_accuracy", "format_rate", "ambiguous_rate", "unparsed_rate",
                   "accuracy_ci_low",
                   "accuracy_ci_high", "completion_length", "kl", "reward_proxy", "reward_gold", "win_rate",
                   "win_rate_ci_low", "win_rate_ci_high", "reward_gold_reference")
"""The evaluation metrics :func:`write_summary` copies into ``eval_before`` / ``eval_after`` (when logged)."""


def save_eval(out: Path, version: int, result: EvalResult) -> None:
    """Write the per-task held-out outcomes of version ``version``'s evaluation to
    ``out/eval/v<version>.json`` (task ids, strict / lenient correctness, format, ambiguity, open
    flags, greedy answers, the metrics and any per-task reward-model scores)."""
    d = out / "eval"
    d.mkdir(exist_ok=True)
    (d / f"v{version}.json").write_text(json.dumps({
        "version": version, "task_ids": result.task_ids, "correct": result.correct, "format_ok": result.format_ok,
        "lenient_correct": result.lenient_correct, "ambiguous": result.ambiguous, "open": result.open,
        "completions": [c.text for c in result.completions], "metrics": result.metrics(""), **result.task_scores,
    }, indent=1))


def v0_texts(out: Path, task_ids: list[str]) -> list[str]:
    """The v0 (reference) greedy answers to ``task_ids``, from ``out/eval/v0.json``.

    Raises:
        FileNotFoundError: no v0 evaluation was saved; KeyError: a task v0 was not evaluated on.
    """
    ev = json.loads((out / "eval" / "v0.json").read_text())
    by_id = dict(zip(ev["task_ids"], ev["completions"]))
    return [by_id[t] for t in task_ids]


def prune_checkpoints(ckpt_root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoint directories ``v<n>`` under ``ckpt_root``
    (by version number; none when ``keep`` <= 0)."""
    dirs = sorted((p for p in ckpt_root.glob("v*") if p.name[1:].isdigit()), key=lambda p: int(p.name[1:]))
    for p in dirs[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)


def _eval_block(ev: dict) -> dict:
    """The summary's view of one saved evaluation: :data:`SUMMARY_METRICS`, ``n``, and for open tasks
    ``accuracy_applicable`` / ``n_open``."""
    m = ev["metrics"]
    block = {k: m[k] for k in SUMMARY_METRICS if k in m} | {"n": int(m["n"])}
    if m.get("n_open"):
        block |= {"accuracy_applicable": bool(m["accuracy_applicable"]), "n_open": int(m["n_open"])}
    return block


def teacher_totals(store: Store) -> dict[str, int] | None:
    """The API model's usage summed over the run's rollouts (each round's ``teacher_usage`` in its
    settings: requests, retries and their causes, prompt and completion tokens, traces; see
    :class:`rlhf_workbench.model.api_rollout.APIUsage`); None when no round asked a teacher."""
    with store.session() as s:
        usages = [st.get("teacher_usage") for st in s.scalars(select(Rollout.settings).order_by(Rollout.round))]
    usages = [u for u in usages if u]
    if not usages:
        return None
    return {k: sum(int(u.get(k, 0)) for u in usages) for k in dict.fromkeys(k for u in usages for k in u)}


def write_summary(out: Path, store: Store, cfg: RunConfig, wall: float) -> dict:
    """The run's summary, also written to ``out/summary.json``: the first and last published
    versions' evaluations (``eval_before`` / ``eval_after``), ``rounds``, ``algorithm``,
    ``wall_seconds`` (``wall``, seconds), ``model``, ``tasks``, the exact McNemar test on their
    paired strict (``significance``) and lenient (``significance_lenient``) held-out outcomes and,
    with a teacher, its ``teacher_usage`` (:func:`teacher_totals`)."""
    versions = store.versions()
    first, last = versions[0], versions[-1]
    ev0 = json.loads((out / "eval" / f"v{first.id}.json").read_text())
    ev1 = json.loads((out / "eval" / f"v{last.id}.json").read_text())
    summary = {
        "eval_before": _eval_block(ev0), "eval_after": _eval_block(ev1), "rounds": last.id, "algorithm": cfg.algorithm,
        "wall_seconds": round(wall, 1), "model": cfg.model.name, "tasks": cfg.tasks.path,
        "significance": {"test": "exact McNemar (two-sided) on paired held-out outcomes", "n": len(ev0["correct"]),
                         **mcnemar_exact(ev0["correct"], ev1["correct"])},
        "significance_lenient": mcnemar_exact(ev0.get("lenient_correct", []), ev1.get("lenient_correct", [])),
    }
    if (teacher := teacher_totals(store)) is not None:  # rollout.teacher's cost over the run
        summary["teacher_usage"] = teacher
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
