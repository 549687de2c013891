"""The online loop, top to bottom: rollout -> verify -> feedback -> update -> evaluate -> checkpoint.

    rlhf run --config configs/demo.yaml --out runs/demo

Round ``n`` samples K traces per prompt from policy version ``n-1``, verifies them against
the ground truth, ranks the verified ones (rule rewards, reward model, LLM judge or experts;
a safety filter can flag traces so they are never preferred), updates the policy (GRPO on
group-relative advantages, RLOO, PPO with a value model, DPO on pairs whose chosen trace is
always verified-correct, or KTO on desirable/undesirable traces; the first
``sft.warmup_rounds`` rounds fine-tune on the verified traces instead), evaluates on the
held-out split and publishes version ``n``. Every stage is written to the database in its
own transaction; running the same command again resumes after the last published version,
re-using a stored rollout of an unfinished round, so nothing is lost or sampled twice.
No held-out task is ever sampled for training: rollouts draw only from the train split.

:func:`run` reads as the loop: set-up (:mod:`rlhf_workbench.run.setup`: tasks, run directory,
pipeline stages of :mod:`rlhf_workbench.run.stages`, models), the base evaluation, then
:func:`_round` once per round, then the outputs (:mod:`rlhf_workbench.run.outputs`, and
``report.md`` from :mod:`rlhf_workbench.run.plots`).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path

import torch
from accelerate.utils import InitProcessGroupKwargs, gather_object, set_seed
from rich.console import Console
from rich.progress import Progress
from sqlalchemy import select

from rlhf_workbench.config import RunConfig
from rlhf_workbench.evaluation.heldout import EvalResult, evaluate
from rlhf_workbench.feedback.constitution import constitution_round
from rlhf_workbench.feedback.online_rm import REFIT_SOURCE, refit_round
from rlhf_workbench.feedback.safety import make_safety_filter
from rlhf_workbench.feedback.sources import (build_pairs, completion_rewards, length_penalized, make_ranker,
                                             rank_group, rankable)
from rlhf_workbench.feedback.thumbs import thumbs_batch
from rlhf_workbench.human.annotation import consume_human_rankings, wait_for_human_rankings
from rlhf_workbench.human.selection import score_rollout
from rlhf_workbench.model.api_rollout import (TEACHER_ORIGIN, sample_in_background, teacher_completions,
                                               teacher_rollout)
from rlhf_workbench.model.loading import PolicyPair, save_policy
from rlhf_workbench.model.rollout import Completion
from rlhf_workbench.model.sharding import make_accelerator
from rlhf_workbench.run.collect import collect
from rlhf_workbench.run.outputs import prune_checkpoints, save_eval, v0_texts, write_summary
from rlhf_workbench.run.plots import write_report
from rlhf_workbench.run.setup import RunState, load_models, load_run_tasks, open_run, pipeline_stages, share
from rlhf_workbench.run.stages import score_eval
from rlhf_workbench.store import CompletionRow, PreferencePair, RankingRow, Rollout, Store, TaskRow, VerificationRow
from rlhf_workbench.train.dpo import dpo_update
from rlhf_workbench.train.grpo import grpo_update, set_group_advantages
from rlhf_workbench.train.kto import kto_update
from rlhf_workbench.train.ppo import ppo_update, save_critic
from rlhf_workbench.train.rloo import rloo_update
from rlhf_workbench.train.samples import Sample, SampleGroup, flatten
from rlhf_workbench.train.sft import sft_update
from rlhf_workbench.verify import NO_KEY_REASON, Verdict, Verification, verify


def prompts_for_round(train: list, round: int, n: int, seed: int) -> list:
    """The ``n`` train tasks of a round: consecutive slices of a per-epoch shuffled order, so
    every train task is used once per epoch; deterministic in ``(seed, round)``."""
    start = (round - 1) * n
    out = []
    while len(out) < n:
        epoch, offset = divmod(start + len(out), len(train))
        order = list(range(len(train)))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        out.append(train[order[offset]])
    return out


def store_rollout(store: Store, round: int, version: int, settings: dict, tasks_by_id: dict,
                  comps: list[Completion], lenient: bool = False, selection: str = "fewest", seed: int = 0) -> int:
    """Verify one round's completions and store them with their verdicts in one transaction
    (strict verifier; ``lenient`` rewards the lenient reading instead, the opt-in setting; a
    teacher's trace is stored with ``extra``'s origin and API log-probs), with
    each item's informativeness under ``selection`` (``feedback.selection``, seeded by the run's
    ``seed``; :func:`rlhf_workbench.human.selection.score_rollout`)."""
    verdicts = [verify(c.text, tasks_by_id[c.task_id], lenient) for c in comps]
    items: dict[str, list] = {}
    for c, v in zip(comps, verdicts):
        items.setdefault(c.task_id, []).append((c.text, c.logps, v.correct or v.reason == NO_KEY_REASON))
    with store.session() as s, s.begin():
        rollout = Rollout(round=round, policy_version_id=version, settings=settings,
                          selection=score_rollout(selection, seed, round, items))
        s.add(rollout)
        s.flush()
        rows = [CompletionRow(rollout_id=rollout.id, task_id=c.task_id, index=c.index, text=c.text,
                              prompt_ids=c.prompt_ids, token_ids=c.token_ids, logps=c.logps, finished=c.finished,
                              origin=c.extra.get("origin", "sample"), api_logprobs=c.extra.get("api_logprobs"))
                for c in comps]
        s.add_all(rows)
        s.flush()
        s.add_all(VerificationRow(completion_id=r.id, **vars(v)) for r, v in zip(rows, verdicts))
        return rollout.id


def _by_task(rollout: Rollout) -> dict[str, list[CompletionRow]]:
    """A rollout's stored completions grouped by task, in stored order."""
    groups: dict[str, list[CompletionRow]] = {}
    for c in rollout.completions:
        groups.setdefault(c.task_id, []).append(c)
    return groups


def _record_rankings(store: Store, rollout: Rollout, source: str, scores: dict[str, dict[int, float]],
                     flagged: set[int], cfg: RunConfig, session=None) -> None:
    """Turn per-task scores of the traces into rankings, rewards and DPO pairs (one transaction,
    or written into ``session``, the caller's transaction, when given).

    Wrong and flagged traces are unranked: reward 0, never chosen. Ranked traces lose
    ``feedback.length_penalty`` times their share of ``rollout.max_new_tokens`` (none by default). Every unflagged trace of an
    open task (no answer key) is ranked (:func:`rlhf_workbench.feedback.sources.rankable`); its pairs
    are best against flagged traces, else best against the worst-ranked one (``best_vs_worst``).
    """
    by_task = _by_task(rollout)
    if session is None:
        with store.session() as s, s.begin():
            _record_rankings(store, rollout, source, scores, flagged, cfg, session=s)
        return
    s = session
    open_ids = set(s.scalars(select(TaskRow.id).where(TaskRow.id.in_(list(scores)), TaskRow.answer_type == "open")))
    for task_id, task_scores in scores.items():
        rows = by_task[task_id]
        vers = [c.verification for c in rows]
        is_open = task_id in open_ids
        ok = [rankable(v.correct, c.id in flagged, is_open) for v, c in zip(vers, rows)]
        ranks = rank_group(ok, [task_scores.get(c.id, 0.0) for c in rows])
        rewards = length_penalized(completion_rewards(ranks, cfg.feedback.ranking_weight), ranks,
                                   [len(c.token_ids) for c in rows], cfg.feedback.length_penalty,
                                   cfg.rollout.max_new_tokens)
        ranking = RankingRow(rollout_id=rollout.id, task_id=task_id, source=source,
                             ranks={str(c.id): k for c, k in zip(rows, ranks)},
                             rewards={str(c.id): x for c, x in zip(rows, rewards)})
        s.add(ranking)
        s.flush()
        pairing = "best_vs_worst" if is_open else cfg.dpo.pairing
        for ci, ri in build_pairs(ranks, pairing, cfg.dpo.max_pairs_per_prompt):
            s.add(PreferencePair(ranking_id=ranking.id, chosen_id=rows[ci].id, rejected_id=rows[ri].id))


def _safety_flags(rollout: Rollout, cfg: RunConfig) -> dict[int, str]:
    """Completion id -> reason for every trace the configured safety filter flags (none without one)."""
    if cfg.feedback.safety is None:
        return {}
    rows = list(rollout.completions)
    reasons = make_safety_filter(cfg.feedback.safety)([c.text for c in rows])
    return {c.id: why for c, why in zip(rows, reasons) if why}


def _rule_scores(rollout: Rollout, cfg: RunConfig, tasks_by_id: dict | None = None,
                 flagged: set[int] = frozenset()) -> tuple[dict[str, dict[int, float]], dict[str, float]]:
    """Scores of every trace from the configured automatic sources (a weighted mix of rule
    rewards, reward model and LLM judge), by task, and the sources' statistics (judge calls and
    consistency). Flagged traces are shown to the ranker as wrong, so no judge call is spent on them;
    the unflagged traces of an open task (no answer key) are shown as correct, so every source scores them.
    """
    ranker = make_ranker(cfg.feedback, cfg.rollout.max_new_tokens, seed=cfg.seed)
    by_task = _by_task(rollout)
    out = {}
    for task_id, rows in by_task.items():
        comps = [Completion(c.task_id, c.index, c.prompt_ids, c.token_ids, c.logps, c.text, c.finished) for c in rows]
        task = (tasks_by_id or {}).get(task_id)
        is_open = task is not None and task.is_open
        vers = [Verification(correct=rankable(c.verification.correct, c.id in flagged, is_open),
                             extracted=c.verification.extracted,
                             format_ok=c.verification.format_ok, reason=c.verification.reason,
                             ambiguous=bool(c.verification.ambiguous),
                             lenient_correct=bool(c.verification.lenient_correct)) for c in rows]
        out[task_id] = dict(zip((c.id for c in rows), ranker(comps, vers, task=task)))
    stats = ranker.stats() if hasattr(ranker, "stats") else {}
    return out, stats


ON_POLICY = ("grpo", "rloo", "ppo")  # updates whose loss assumes the policy sampled every trace


def _ranked_groups(store: Store, rollout: Rollout, comps: dict, on_policy: bool):
    """The rollout's rankings as :class:`~rlhf_workbench.train.samples.SampleGroup` objects (one per
    task, its traces with their rewards), with per trace ``(task_id, text, rank)``, the open task's
    worst rank (None for keyed tasks) and whether the teacher wrote it. ``on_policy`` leaves the
    teacher's traces out (see :func:`_round_batch`)."""
    groups, ranks, open_worst, teacher = [], [], [], []
    for rk in store.rankings_for_rollout(rollout.id):
        worst = max((x for x in rk.ranks.values() if x is not None), default=0)
        groups.append(SampleGroup())
        for cid, reward in rk.rewards.items():
            c = comps[int(cid)]
            if on_policy and c.origin == TEACHER_ORIGIN:
                continue
            old = None if c.origin == TEACHER_ORIGIN else c.logps  # the policy's are unknown for a teacher's text
            groups[-1].samples.append(Sample(c.prompt_ids, c.token_ids, old, reward=reward))
            ranks.append((rk.task_id, c.text, rk.ranks.get(cid)))
            # open task (no key): its worst rank, the undesirable end for KTO; None for keyed tasks
            open_worst.append(worst if c.verification.reason == NO_KEY_REASON else None)
            teacher.append(c.origin == TEACHER_ORIGIN)
    return groups, ranks, open_worst, teacher


def _rollout_stats(rollout: Rollout, comps: dict, samples: list[Sample], groups: list[SampleGroup]) -> dict:
    """A stored rollout's statistics: rewards of the batch, rates over the policy's own samples
    (``origin == "sample"``), and with a teacher its acceptance rate and the round's API usage
    (``teacher/requests``, ``teacher/retries``, ``teacher/prompt_tokens``, ... from the rollout's settings)."""
    sampled = [c for c in comps.values() if c.origin == "sample"]  # the policy's K: no revision, no teacher
    n = max(1, len(sampled))
    stats = {
        "reward": torch.tensor([s.reward for s in samples], dtype=torch.float32).mean().item() if samples else 0.0,
        "reward_std": torch.stack([torch.tensor(g.rewards, dtype=torch.float32).std() for g in groups]).mean().item()
        if groups else 0.0,
        "acceptance_rate": sum(c.verification.correct for c in sampled) / n,
        "format_rate": sum(c.verification.format_ok for c in sampled) / n,
        "lenient_acceptance_rate": sum(bool(c.verification.lenient_correct) for c in sampled) / n,
        "ambiguous_rate": sum(bool(c.verification.ambiguous) for c in sampled) / n,
        "unparsed_rate": sum(c.verification.verdict == Verdict.UNPARSED for c in sampled) / n,
        "completions/mean_length": sum(len(c.token_ids) for c in sampled) / n,
        "completions/clipped_ratio": sum(not c.finished for c in sampled) / n,
    }
    taught = [c for c in comps.values() if c.origin == TEACHER_ORIGIN]
    if taught:
        stats["teacher/acceptance_rate"] = sum(c.verification.correct for c in taught) / len(taught)
        stats.update({f"teacher/{k}": float(v) for k, v in (rollout.settings.get("teacher_usage") or {}).items()})
    return stats


def _round_batch(store: Store, rollout: Rollout, cfg: RunConfig, algorithm: str | None = None, tokenizer=None):
    """Training inputs of a stored rollout for ``algorithm``, plus rollout statistics.

    Each stored ranking covers one task's completions: it becomes one
    :class:`~rlhf_workbench.train.samples.SampleGroup` (its traces with their rewards).

    - ``grpo``: every trace, with its group-relative advantage computed over its group
      (:func:`rlhf_workbench.train.grpo.set_group_advantages`; the update needs no groups after).
    - ``rloo``: the groups (the update's leave-one-out baselines are per group); ``ppo``: every
      trace with its sequence reward.
    - ``kto``: desirable = best-ranked verified traces, undesirable = wrong or flagged ones;
      correct traces ranked below the best are left out. Open tasks (no key): desirable = best
      ranked, undesirable = flagged or worst ranked (when below the best). With ``tokenizer`` and
      ``feedback.thumbs``, plus the thumbs up / down not yet used (marked consumed by this round,
      :func:`rlhf_workbench.feedback.thumbs.thumbs_batch`); without a tokenizer they are left untouched.
    - ``sft``: the verified-correct traces, one per distinct text (rejection-sampling fine-tuning);
      for open tasks the best-ranked traces only.
    - ``dpo``: ``(chosen, rejected)`` pairs stored with the ranking.

    Teacher traces (``rollout.teacher``, origin ``"teacher"``) are in the DPO pairs, the KTO and
    the SFT batches like the policy's: those losses are correct for any sampler (DPO's and KTO's
    log-ratios are to the reference, SFT is likelihood). GRPO, RLOO and PPO leave them out: their
    importance ratio divides by the behaviour policy's log-probs, which a text the policy did not
    sample does not have, and their advantages are baselines over the policy's own samples.
    ``teacher_in_batch`` counts the teacher's traces in the batch (chosen ones for DPO).

    ``algorithm`` defaults to ``cfg.algorithm``.
    """
    algorithm = algorithm or cfg.algorithm
    comps = {c.id: c for c in rollout.completions}
    groups, ranks, open_worst, teacher = _ranked_groups(store, rollout, comps, algorithm in ON_POLICY)
    samples = flatten(groups)
    stats = _rollout_stats(rollout, comps, samples, groups)
    if algorithm == "grpo":
        set_group_advantages(groups, cfg.grpo.scale_rewards)
        return samples, stats
    if algorithm in ("rloo", "ppo"):
        return (groups if algorithm == "rloo" else samples), stats
    taught, mixed = 0, "teacher/acceptance_rate" in stats  # teacher traces in the batch; a teacher this round
    if algorithm == "kto":
        batch = []
        for s, (_, _, rank), worst, t in zip(samples, ranks, open_worst, teacher):
            if rank is None or rank == 0 or (worst is not None and rank == worst):
                s.label = rank == 0
                batch.append(s)
                taught += t
        stats["desirable"] = float(sum(s.label for s in batch))
        stats["undesirable"] = float(sum(not s.label for s in batch))
        if cfg.feedback.thumbs and tokenizer is not None:  # deployment thumbs (playground, serve-model)
            thumbs, thumb_stats = thumbs_batch(store, tokenizer, rollout.round, cfg.eval.max_new_tokens)
            batch += thumbs
            stats.update(thumb_stats)
        stats.update({"teacher_in_batch": float(taught)} if mixed else {})
        return batch, stats
    if algorithm == "sft":
        seen, batch = set(), []
        for s, (task_id, text, rank), worst, t in zip(samples, ranks, open_worst, teacher):
            if rank is not None and (worst is None or rank == 0) and (task_id, text) not in seen:
                seen.add((task_id, text))
                batch.append(s)
                taught += t
        stats["sft_traces"] = float(len(batch))
        stats.update({"teacher_in_batch": float(taught)} if mixed else {})
        return batch, stats
    stored = store.pairs_for_rollout(rollout.id)
    pairs = [(Sample(comps[p.chosen_id].prompt_ids, comps[p.chosen_id].token_ids),
              Sample(comps[p.rejected_id].prompt_ids, comps[p.rejected_id].token_ids)) for p in stored]
    stats["pairs"] = float(len(pairs))
    stats.update({"teacher_in_batch": float(sum(comps[p.chosen_id].origin == TEACHER_ORIGIN for p in stored))}
                 if mixed else {})
    return pairs, stats


def _update(algorithm: str, pair, critic, optimizer, accelerator, batch, cfg: RunConfig) -> dict[str, float]:
    """One round's policy update with ``algorithm`` (looked up at call time)."""
    if algorithm == "ppo":
        return ppo_update(pair, critic, optimizer, accelerator, batch, cfg)
    updates = {"grpo": grpo_update, "dpo": dpo_update, "rloo": rloo_update, "kto": kto_update, "sft": sft_update}
    return updates[algorithm](pair, optimizer, accelerator, batch, cfg)


def run(cfg: RunConfig, out_dir: str | Path, console: Console | None = None) -> dict:
    """Run (or resume) the online loop described by ``cfg``, writing everything under ``out_dir``.

    Under ``accelerate launch`` (several processes, DDP) every process loads the policy and
    generates its share of each round's prompts; the main process alone reads and writes the
    database, ranks, evaluates and saves checkpoints, and broadcasts each round's training batch;
    every process then trains on its shard of that batch (see :mod:`rlhf_workbench.train.engine`).
    With human feedback the other processes wait (process-group timeout: one day).
    With ``rollout.teacher`` each round also holds an API model's traces (:func:`_rollout`,
    :func:`_round_batch` says which updates train on them); ``algorithm: none`` collects the
    teacher's traces only (:func:`rlhf_workbench.run.collect.collect`: no policy, no update).

    Returns:
        The summary also written to ``out_dir/summary.json``: ``eval_before`` / ``eval_after``
        (``accuracy``, ``n`` and more), ``rounds``, ``wall_seconds``, ``significance``
        (on the main process; other processes return an empty dict).

    Raises:
        TaskFormatError: bad task file (before anything is written).
        ValueError: the run directory holds a run with a different config, or the configured
            tracker is unknown or not installed.
        RunInUseError: another live ``rlhf run`` or ``rlhf worker`` owns the run (nothing changed).
    """
    with ExitStack() as cleanup:  # the run's lock and tracker, released however the run ends
        if cfg.algorithm == "none":  # collection only: the teacher's traces ranked, no policy (run/collect.py)
            return collect(cfg, Path(out_dir), console, cleanup, _collect_round)
        return _run(cfg, out_dir, console, cleanup)


def _run(cfg: RunConfig, out_dir: str | Path, console: Console | None, cleanup: ExitStack) -> dict:
    """The body of :func:`run`, the loop top to bottom; what it enters into ``cleanup`` (the
    run's lock and tracker) is released when run returns or raises."""
    # DDP, or FSDP2 when `accelerate launch` is configured for FSDP, also on the CPU (sharding.py)
    accelerator = make_accelerator(mixed_precision="no",
                                   kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(days=1))])
    console = console or Console(quiet=not accelerator.is_main_process)
    t0 = time.time()
    set_seed(cfg.seed)
    train, heldout = load_run_tasks(cfg)  # validated in full before anything is written
    state = RunState(cfg, Path(out_dir), accelerator, console, train, heldout, t0)
    latest_id, ckpt = open_run(state, cleanup)  # database, lock, tracker; the newest published version
    console.print(f"[bold]tasks[/]: {len(train)} train, {len(heldout)} held-out from {cfg.tasks.path}")
    state.cfg = pipeline_stages(state)  # SFT warm-up, proxy and gold reward models, each once
    load_models(state, ckpt)  # resume from the newest published version
    if latest_id is None:
        _evaluate_base(state)  # v0: the base policy, published before round 1
        latest_id = 0
    for round in range(latest_id + 1, cfg.rounds + 1):
        _round(state, round)
    return _outputs(state)


def _evaluate(state: RunState, label: str, pair: PolicyPair, subset: int | None = None) -> EvalResult:
    """Greedy held-out evaluation of ``pair`` (the first ``subset`` held-out tasks, all when None),
    with the pipeline's reward-model metrics when it has scorers."""
    tasks = state.heldout[:subset] if subset else state.heldout
    ev = state.cfg.eval
    with Progress(console=state.console, transient=True) as bar:
        job = bar.add_task(f"eval {label}", total=len(tasks))
        result = evaluate(pair, tasks, ev.max_new_tokens, ev.batch_size, state.cfg.model.mixed_precision,
                          ev.kl_samples, progress=lambda n: bar.advance(job, n))
    if state.scorers:  # the reference's greedy answers are v0's (the reference is the policy at round 0)
        ref = None if label == "v0" else v0_texts(state.out, result.task_ids)
        result.scores, result.task_scores = score_eval(tasks, [c.text for c in result.completions], state.scorers, ref)
    return result


def _evaluate_base(state: RunState) -> None:
    """Evaluate the base policy and publish it as version 0 (a collective under FSDP)."""
    full, _ = state.gatherer.for_main(critic=False)  # FSDP: plain copies on the main process (a collective)
    if state.main:
        state.store.set_meta("status", {"state": "evaluating", "round": 0})
        before = _evaluate(state, "v0", full)
        save_eval(state.out, 0, before)
        state.store.publish_version(0, None, "base", None, before.metrics(), round=0)
        state.tracking.log(before.metrics(), step=0)
        state.console.print(f"v0 held-out accuracy {before.accuracy:.3f} (lenient {before.lenient_accuracy:.3f}, n={before.n})")
    full = None
    state.accelerator.wait_for_everyone()


def _round(state: RunState, round: int) -> None:
    """One round, on every process: rollout -> verify -> feedback -> batch -> update -> evaluate
    -> checkpoint, publishing version ``round`` (the main process ranks, evaluates and saves)."""
    cfg, store, accelerator = state.cfg, state.store, state.accelerator
    t_round = time.time()
    if state.lock is not None:
        state.lock.check()  # stop if another process took the run over while this one stalled
    rollout = _rollout(state, round)  # sampled and verified (main process: stored), or stored earlier
    algorithm = "sft" if round <= cfg.sft.warmup_rounds else cfg.algorithm
    batch = stats = None
    if state.main:
        rollout, feedback_stats = _feedback(state, rollout, algorithm)
        batch, stats = _round_batch(store, rollout, cfg, algorithm, state.pair.tokenizer)
        stats.update(feedback_stats)
        store.set_meta("status", {"state": "training", "round": round})
    batch, stats = share(accelerator, (batch, stats))
    t_rollout = time.time() - t_round
    train_stats = _update(algorithm, state.pair, state.critic, state.optimizer, accelerator, batch, cfg)
    state.engine.sync_weights(state.pair.policy)
    t_update = time.time() - t_round - t_rollout
    evaluated = cfg.eval.every_round or round == cfg.rounds
    # FSDP: plain copies gathered on the main process for evaluation and the checkpoint
    full, full_critic = state.gatherer.for_main(reference=evaluated)
    if not state.main:
        accelerator.wait_for_everyone()  # the main process evaluates and saves the checkpoint
        return
    metrics = {**{f"train/{k}": v for k, v in {**stats, **train_stats}.items()},
               "time/rollout_s": t_rollout, "time/update_s": t_update}
    if evaluated:
        store.set_meta("status", {"state": "evaluating", "round": round})
        result = _evaluate(state, f"v{round}", full, None if round == cfg.rounds else cfg.eval.round_subset)
        save_eval(state.out, round, result)
        metrics.update(result.metrics())
    ckpt_dir = _checkpoint(state, round, full, full_critic)
    metrics["time/round_s"] = time.time() - t_round
    # the checkpoint's path relative to the run directory: resumes, the app and `rlhf eval --run`
    # resolve it against their own run directory (another cwd, another machine's mount)
    store.publish_version(round, round - 1, algorithm, ckpt_dir.relative_to(state.out).as_posix(), metrics, round=round)
    state.tracking.log(metrics, step=round)
    prune_checkpoints(state.out / "checkpoints", keep=cfg.keep_checkpoints)
    acc = metrics.get("eval/accuracy")
    state.console.print(
        f"round {round}/{cfg.rounds} ({algorithm}): reward {stats['reward']:.3f} "
        f"acceptance {stats['acceptance_rate']:.2f} loss {train_stats.get('loss', float('nan')):.4f}"
        + (f" held-out acc {acc:.3f}" if acc is not None else "")
        + f" ({metrics['time/round_s']:.0f}s)"
    )
    full = full_critic = None
    accelerator.wait_for_everyone()


def _rollout(state: RunState, round: int) -> Rollout | None:
    """Round ``round``'s rollout on the main process (None on the others): the one an interrupted
    attempt stored, else K samples per prompt of the round from policy version ``round - 1``
    (every process generates its share) and, with ``rollout.teacher``, the API model's M answers
    (main process, requested in the background while the policy samples:
    :func:`rlhf_workbench.model.api_rollout.sample_in_background`; its usage in the settings'
    ``teacher_usage``), verified and stored by :func:`store_rollout`."""
    cfg, accelerator, r = state.cfg, state.accelerator, state.cfg.rollout
    rollout = state.store.rollout_for_round(round) if state.main else None
    if share(accelerator, rollout is not None):
        return rollout
    rank, world = accelerator.process_index, accelerator.num_processes
    tasks = prompts_for_round(state.train, round, r.prompts_per_round, cfg.seed)
    teacher = None
    if state.main:
        state.store.set_meta("status", {"state": "generating", "round": round})  # shown on the dashboard
        if r.teacher is not None:  # the API model answers every prompt of the round while the policy samples
            teacher = sample_in_background(r.teacher, tasks, round, cfg.seed, r.max_new_tokens, r.stop)
    batch_tasks = tasks[rank::world]
    set_seed(cfg.seed * 1000 + round + 7919 * rank)
    with Progress(console=state.console, transient=True) as bar, state.gatherer.generating(state.engine):
        job = bar.add_task(f"round {round}: rollout", total=len(batch_tasks) * r.num_generations)
        comps = state.engine.generate(batch_tasks, r.num_generations, r.temperature, r.top_p, r.max_new_tokens,
                                      r.stop, progress=lambda n: bar.advance(job, n))
    if world > 1:
        comps = gather_object(comps)
    if not state.main:
        return None
    settings = {**r.model_dump(), "do_sample": True, "mixed_precision": cfg.model.mixed_precision,
                "num_processes": world}
    if teacher is not None:  # its M answers per prompt, after the K samples, under the policy's tokenizer
        traces, settings["teacher_usage"] = teacher.result()
        comps = comps + teacher_completions(traces, state.tasks_by_id, state.pair.tokenizer, r.num_generations)
    store_rollout(state.store, round, round - 1, settings, state.tasks_by_id, comps, cfg.tasks.verifier == "lenient",
                  cfg.feedback.selection, cfg.seed)
    return state.store.rollout_for_round(round)


def _collect_round(state: RunState, round: int, tokenizer) -> dict[str, float]:
    """One round of collection only (``algorithm: none``, :func:`rlhf_workbench.run.collect.collect`):
    the rollout an interrupted attempt stored, else the teacher's M answers to each prompt of the round
    (``tokenizer``: the configured model's, for token counts and export), stored by :func:`store_rollout`
    as in a mixed round, then ranked by :func:`_feedback` (rule sources, or experts in the web app).
    Returns the round's statistics: the teacher's (``teacher/...``), the feedback's and ``pairs``."""
    cfg, store, r = state.cfg, state.store, state.cfg.rollout
    rollout = store.rollout_for_round(round)
    if rollout is None:
        store.set_meta("status", {"state": "generating", "round": round})
        tasks = prompts_for_round(state.train, round, r.prompts_per_round, cfg.seed)
        comps, usage = teacher_rollout(r.teacher, tasks, tokenizer, round, cfg.seed, r.max_new_tokens, r.stop)
        store_rollout(store, round, round - 1, {**r.model_dump(), "teacher_usage": usage, "collection_only": True},
                      state.tasks_by_id, comps, cfg.tasks.verifier == "lenient", cfg.feedback.selection, cfg.seed)
        rollout = store.rollout_for_round(round)
    rollout, feedback_stats = _feedback(state, rollout, "none")
    stats = _rollout_stats(rollout, {c.id: c for c in rollout.completions}, [], [])
    return {**{k: v for k, v in stats.items() if k.startswith("teacher/")}, **feedback_stats,
            "pairs": float(len(store.pairs_for_rollout(rollout.id)))}


def _feedback(state: RunState, rollout: Rollout, algorithm: str) -> tuple[Rollout, dict[str, float]]:
    """Record the round's rankings unless an interrupted attempt did (main process): safety flags,
    then the rule sources' scores or the experts' rankings from the web app, then constitution
    revisions. Returns the rollout (read again when revisions were added) and the feedback
    statistics (empty when the rankings were stored earlier)."""
    store, cfg = state.store, state.cfg
    if store.rankings_for_rollout(rollout.id):
        return rollout, {}
    feedback_stats = {}
    unsafe = _safety_flags(rollout, cfg)
    if cfg.feedback.source == "rules":
        scores, feedback_stats = _rule_scores(rollout, cfg, state.tasks_by_id, set(unsafe))
        _record_rankings(store, rollout, "rules", scores, set(unsafe), cfg)
    else:  # experts rank in the web app; wait for enough of them (see annotation.py)
        wait_for_human_rankings(store, rollout, cfg, state.console)
        refit = state.online_rm is not None  # tasks no expert ranked are left to the refit reward model
        consume_human_rankings(store, rollout, lambda s, scores, flagged: _record_rankings(
            store, rollout, "human", {t: v for t, v in scores.items() if v or not refit}, flagged | set(unsafe),
            cfg, session=s), cfg.feedback.adjudication_threshold)
        if refit:  # refit on the experts' rankings; it ranks the groups they did not
            scores, refit_stats = refit_round(state.online_rm, store, rollout, state.tasks_by_id,
                                              cfg.seed + rollout.round)
            _record_rankings(store, rollout, REFIT_SOURCE, scores, set(unsafe), cfg)
            state.online_rm.save(state.out / "online_reward_model")
            feedback_stats.update(refit_stats)
    feedback_stats["safety_flagged"] = float(len(unsafe))
    if cfg.feedback.constitution is not None:  # critique -> revision pairs (constitution.py)
        feedback_stats.update(constitution_round(store, rollout, cfg, state.pair, state.tasks_by_id, algorithm))
        rollout = store.rollout_for_round(rollout.round)
    for cid, why in list(unsafe.items())[:5]:
        state.console.print(f"[yellow]safety filter[/]: completion {cid} flagged: {why}")
    return rollout, feedback_stats


def _checkpoint(state: RunState, round: int, full: PolicyPair, full_critic) -> Path:
    """Save version ``round``'s checkpoint (``full``, the main process's plain copy of the policy;
    the critic; the optimizer state unless FSDP shards it) to ``checkpoints/v<round>``; returns it."""
    ckpt_dir = state.out / "checkpoints" / f"v{round}"
    if ckpt_dir.exists():  # left by a crash between saving and publishing
        shutil.rmtree(ckpt_dir)
    save_policy(full, ckpt_dir)
    if state.critic is not None:
        save_critic(state.accelerator.unwrap_model(full_critic), ckpt_dir / "critic")
    if not state.gatherer.active:  # FSDP: the optimizer state is sharded and not saved (sharding.py)
        torch.save(state.optimizer.state_dict(), ckpt_dir / "optimizer.pt")
    return ckpt_dir


def _outputs(state: RunState) -> dict:
    """After the last round: the final (LoRA-merged) policy in ``policy/``, ``summary.json`` and
    ``report.md``; returns the summary (an empty dict on other processes than the main one)."""
    final, _ = state.gatherer.for_main(reference=False, critic=False)
    if not state.main:
        return {}
    state.store.set_meta("status", {"state": "done", "round": state.cfg.rounds})
    final_dir = state.out / "policy"
    if final_dir.exists():
        shutil.rmtree(final_dir)
    save_policy(final, final_dir, merge_lora=True)
    summary = write_summary(state.out, state.store, state.cfg, time.time() - state.t0)
    write_report(state.out, state.store, summary)
    state.console.print(f"[bold green]done[/]: {json.dumps({k: summary[k] for k in ('eval_before', 'eval_after', 'significance')})}")
    return summary
