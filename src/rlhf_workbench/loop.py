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
"""

from __future__ import annotations

import json
import random
import shutil
import time
from contextlib import ExitStack
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, gather_object, set_seed
from rich.console import Console
from rich.progress import Progress
from sqlalchemy import select

from .annotation import consume_human_rankings, wait_for_human_rankings
from .config import RunConfig
from .constitution import constitution_round
from .evaluate import EvalResult, evaluate
from .feedback import build_pairs, completion_rewards, make_ranker, rank_group, rankable
from .losses import group_advantages
from .models import load_policy, load_tokenizer, resolve_mixed_precision, resolve_model_path, save_policy
from .pipeline import filter_prompt_length, load_scorers, prepare, resolve_run_paths, score_eval
from .ppo import load_critic, make_optimizer, ppo_update, save_critic
from .report import write_report
from .rollout import Completion, HFEngine
from .runlock import RunInUseError, RunLock
from .safety import make_safety_filter
from .selection import score_rollout
from .sharding import Gatherer, make_accelerator
from .stats import mcnemar_exact
from .store import CompletionRow, PreferencePair, RankingRow, Rollout, Store, TaskRow, VerificationRow
from .tasks import load_tasks, split_tasks
from .thumbs import thumbs_batch
from .tracking import Tracking
from .update import Sample, dpo_update, grpo_update, kto_update, rloo_update, sft_update
from .verify import NO_KEY_REASON, Verification, verify


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


def _store_rollout(store: Store, round: int, version: int, settings: dict, tasks_by_id: dict,
                   comps: list[Completion], lenient: bool = False, selection: str = "fewest", seed: int = 0) -> int:
    """Verify one round's completions and store them with their verdicts in one transaction
    (strict verifier; ``lenient`` rewards the lenient reading instead, the opt-in setting), with
    each item's informativeness under ``selection`` (``feedback.selection``, seeded by the run's
    ``seed``; :func:`rlhf_workbench.selection.score_rollout`)."""
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
                              prompt_ids=c.prompt_ids, token_ids=c.token_ids, logps=c.logps, finished=c.finished)
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

    Wrong and flagged traces are unranked: reward 0, never chosen. Every unflagged trace of an
    open task (no answer key) is ranked (:func:`rlhf_workbench.feedback.rankable`); its pairs
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
        rewards = completion_rewards(ranks, cfg.feedback.ranking_weight)
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


def _round_batch(store: Store, rollout: Rollout, cfg: RunConfig, algorithm: str | None = None, tokenizer=None):
    """Training inputs of a stored rollout for ``algorithm``, plus rollout statistics.

    - ``grpo``: every trace with its group-relative advantage (reward from the ranking).
    - ``rloo`` / ``ppo``: every trace with its sequence reward (groups contiguous, K per prompt).
    - ``kto``: desirable = best-ranked verified traces, undesirable = wrong or flagged ones;
      correct traces ranked below the best are left out. Open tasks (no key): desirable = best
      ranked, undesirable = flagged or worst ranked (when below the best). With ``tokenizer`` and
      ``feedback.thumbs``, plus the thumbs up / down not yet used (marked consumed by this round,
      :func:`rlhf_workbench.thumbs.thumbs_batch`); without a tokenizer they are left untouched.
    - ``sft``: the verified-correct traces, one per distinct text (rejection-sampling fine-tuning);
      for open tasks the best-ranked traces only.
    - ``dpo``: ``(chosen, rejected)`` pairs stored with the ranking.

    ``algorithm`` defaults to ``cfg.algorithm``.
    """
    algorithm = algorithm or cfg.algorithm
    comps = {c.id: c for c in rollout.completions}
    sampled = [c for c in comps.values() if c.origin != "revision"]  # statistics: the K samples, not revisions
    rankings = store.rankings_for_rollout(rollout.id)
    K = cfg.rollout.num_generations
    samples, rewards, ranks, open_worst = [], [], [], []
    for rk in rankings:
        worst = max((x for x in rk.ranks.values() if x is not None), default=0)
        for cid, reward in rk.rewards.items():
            c = comps[int(cid)]
            samples.append(Sample(c.prompt_ids, c.token_ids, c.logps, reward=reward))
            rewards.append(reward)
            ranks.append((rk.task_id, c.text, rk.ranks.get(cid)))
            # open task (no key): its worst rank, the undesirable end for KTO; None for keyed tasks
            open_worst.append(worst if c.verification.reason == NO_KEY_REASON else None)
    r = torch.tensor(rewards, dtype=torch.float32)
    stats = {
        "reward": r.mean().item() if len(r) else 0.0,
        "reward_std": r.view(-1, K).std(dim=1).mean().item() if len(r) >= K and len(r) % K == 0 else 0.0,
        "acceptance_rate": sum(c.verification.correct for c in sampled) / max(1, len(sampled)),
        "format_rate": sum(c.verification.format_ok for c in sampled) / max(1, len(sampled)),
        "lenient_acceptance_rate": sum(bool(c.verification.lenient_correct) for c in sampled) / max(1, len(sampled)),
        "ambiguous_rate": sum(bool(c.verification.ambiguous) for c in sampled) / max(1, len(sampled)),
        "completions/mean_length": sum(len(c.token_ids) for c in sampled) / max(1, len(sampled)),
        "completions/clipped_ratio": sum(not c.finished for c in sampled) / max(1, len(sampled)),
    }
    if algorithm == "grpo":
        adv = group_advantages(r, K, cfg.grpo.scale_rewards)
        for s, a in zip(samples, adv.tolist()):
            s.advantage = a
        return samples, stats
    if algorithm in ("rloo", "ppo"):
        return samples, stats
    if algorithm == "kto":
        batch = []
        for s, (_, _, rank), worst in zip(samples, ranks, open_worst):
            if rank is None or rank == 0 or (worst is not None and rank == worst):
                s.label = rank == 0
                batch.append(s)
        stats["desirable"] = float(sum(s.label for s in batch))
        stats["undesirable"] = float(sum(not s.label for s in batch))
        if cfg.feedback.thumbs and tokenizer is not None:  # deployment thumbs (playground, serve-model)
            thumbs, thumb_stats = thumbs_batch(store, tokenizer, rollout.round, cfg.eval.max_new_tokens)
            batch += thumbs
            stats.update(thumb_stats)
        return batch, stats
    if algorithm == "sft":
        seen, batch = set(), []
        for s, (task_id, text, rank), worst in zip(samples, ranks, open_worst):
            if rank is not None and (worst is None or rank == 0) and (task_id, text) not in seen:
                seen.add((task_id, text))
                batch.append(s)
        stats["sft_traces"] = float(len(batch))
        return batch, stats
    pairs = [(Sample(comps[p.chosen_id].prompt_ids, comps[p.chosen_id].token_ids),
              Sample(comps[p.rejected_id].prompt_ids, comps[p.rejected_id].token_ids))
             for p in store.pairs_for_rollout(rollout.id)]
    stats["pairs"] = float(len(pairs))
    return pairs, stats


def _stored_config(stored: dict | None) -> dict | None:
    """A run's stored config with defaults filled in for fields added since it was written, so an
    older run directory still resumes; a field that no longer exists makes it differ (``{}``)."""
    if stored is None:
        return None
    try:
        return RunConfig.model_validate(stored).model_dump(mode="json")
    except ValueError:
        return {}


def _share(accelerator: Accelerator, obj):
    """``obj`` as computed on the main process, on every process (identity for one process)."""
    if accelerator.num_processes == 1:
        return obj
    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


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
    every process then trains on its shard of that batch (see :mod:`rlhf_workbench.update`).
    With human feedback the other processes wait (process-group timeout: one day).

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
        return _run(cfg, out_dir, console, cleanup)


def _run(cfg: RunConfig, out_dir: str | Path, console: Console | None, cleanup: ExitStack) -> dict:
    """The body of :func:`run`; what it enters into ``cleanup`` is released when run returns or raises."""
    # DDP, or FSDP2 when `accelerate launch` is configured for FSDP, also on the CPU (sharding.py)
    accelerator = make_accelerator(mixed_precision="no",
                                   kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(days=1))])
    main = accelerator.is_main_process
    console = console or Console(quiet=not main)
    out = Path(out_dir)
    t0 = time.time()
    set_seed(cfg.seed)

    # --- tasks: validated in full before anything is written --------------------------------
    tasks = load_tasks(cfg.tasks.path, cfg.tasks.format, cfg.tasks.limit)
    if cfg.tasks.instruction:
        tasks = [replace(t, instruction=cfg.tasks.instruction) for t in tasks]
    if cfg.pipeline is not None and cfg.pipeline.max_prompt_tokens:
        tasks = filter_prompt_length(tasks, load_tokenizer(resolve_model_path(cfg.model.name, cfg.model.cache_dir)),
                                     cfg.pipeline.max_prompt_tokens)
    train, heldout = split_tasks(tasks, cfg.tasks.heldout_fraction, cfg.tasks.heldout_size, seed=cfg.seed)
    if cfg.tasks.max_heldout:
        heldout = heldout[: cfg.tasks.max_heldout]
    leaked = {t.id for t in train} & {t.id for t in heldout}
    if leaked:
        raise ValueError(f"{cfg.tasks.path}: tasks in both splits: {sorted(leaked)[:5]}")
    tasks_by_id = {t.id: t for t in train}
    store, error, lock_error, latest_id, ckpt, lock, tracking = None, None, None, None, None, None, None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        store = Store(cfg.db_url, out)
        try:  # one owner per run: a second run or worker on it stops here, having changed nothing
            lock = cleanup.enter_context(RunLock(store, out))
        except RunInUseError as e:
            lock_error = str(e)
        config = cfg.model_dump(mode="json")
        stored = _stored_config(store.get_meta("config"))
        same = {"rounds": 0, "tracking": None}  # more rounds is a resume; the tracker may change
        if lock_error:
            pass
        elif stored is not None and {**stored, **same} != {**config, **same}:
            error = f"{out} holds a run with another config; use a new --out or the same config"
        else:
            try:  # TensorBoard (default), W&B, trackio...: each round's metrics, step = round
                tracking = Tracking(cfg, out)
                cleanup.callback(tracking.finish)
            except ValueError as e:
                error = str(e)
        if not (lock_error or error):
            store.set_meta("config", config)
            store.add_tasks(train, "train")
            store.add_tasks(heldout, "heldout")
            latest = store.latest_version()
            latest_id = None if latest is None else latest.id
            # stored relative to the run directory (older runs: absolute), resolved against it here
            ckpt = str(out / latest.checkpoint) if latest is not None and latest.id > 0 else None
    error, lock_error, latest_id, ckpt = _share(accelerator, (error, lock_error, latest_id, ckpt))
    if lock_error:
        raise RunInUseError(lock_error)
    if error:
        raise ValueError(error)
    console.print(f"[bold]tasks[/]: {len(train)} train, {len(heldout)} held-out from {cfg.tasks.path}")

    # --- pipeline stages (SFT warm-up, proxy and gold reward models), each once -----------------
    if cfg.model.mixed_precision == "auto":
        cfg.model.mixed_precision = resolve_mixed_precision("auto")
    stages = prepare(cfg, train, out, accelerator, console, heldout)
    if "sft_warmup" in stages:  # policy and reference start from the warmed-up model
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": str(out / "sft_model")})})
    cfg = resolve_run_paths(cfg, out)

    # --- models: resume from the newest published version ------------------------------------
    pair = load_policy(cfg.model, checkpoint=ckpt)
    critic = None
    if cfg.algorithm == "ppo":
        critic = load_critic(cfg, checkpoint=str(Path(ckpt) / "critic") if ckpt else None)
        optimizer = make_optimizer(pair, critic, cfg)
    else:
        optimizer = torch.optim.AdamW([p for p in pair.policy.parameters() if p.requires_grad],
                                      lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    gatherer = Gatherer(accelerator, pair, critic)  # FSDP: plain copies for generation, eval, checkpoints
    if ckpt and not gatherer.active and (Path(ckpt) / "optimizer.pt").exists():  # FSDP saves none (sharded)
        optimizer.load_state_dict(torch.load(Path(ckpt) / "optimizer.pt", weights_only=True))
    # DDP wrappers, or FSDP shards of policy, critic and (frozen) reference alike
    pair.train_module, critic, optimizer = gatherer.prepare(optimizer)
    if pair.reference is not None and not gatherer.active:
        pair.reference.to(accelerator.device)
    engine = HFEngine(pair.policy, pair.tokenizer, cfg.rollout.batch_size, cfg.model.mixed_precision)
    ev = cfg.eval

    scorers = load_scorers(cfg, out) if main else {}  # the pipeline's proxy and gold reward models

    def run_eval(label: str, subset: int | None = None, pair=pair) -> EvalResult:
        tasks = heldout[:subset] if subset else heldout
        with Progress(console=console, transient=True) as bar:
            job = bar.add_task(f"eval {label}", total=len(tasks))
            result = evaluate(pair, tasks, ev.max_new_tokens, ev.batch_size, cfg.model.mixed_precision,
                              ev.kl_samples, progress=lambda n: bar.advance(job, n))
        if scorers:  # the reference's greedy answers are v0's (the reference is the policy at round 0)
            ref = None if label == "v0" else _v0_texts(out, result.task_ids)
            result.scores, result.task_scores = score_eval(tasks, [c.text for c in result.completions], scorers, ref)
        return result

    if latest_id is None:
        full, _ = gatherer.for_main(critic=False)  # FSDP: plain copies on the main process (a collective)
        if main:
            store.set_meta("status", {"state": "evaluating", "round": 0})
            before = run_eval("v0", pair=full)
            _save_eval(out, 0, before)
            store.publish_version(0, None, "base", None, before.metrics(), round=0)
            tracking.log(before.metrics(), step=0)
            console.print(f"v0 held-out accuracy {before.accuracy:.3f} (lenient {before.lenient_accuracy:.3f}, n={before.n})")
        latest_id, full = 0, None
        accelerator.wait_for_everyone()

    # --- the rounds ---------------------------------------------------------------------------
    r = cfg.rollout
    rank, world = accelerator.process_index, accelerator.num_processes
    for round in range(latest_id + 1, cfg.rounds + 1):
        t_round = time.time()
        if lock is not None:
            lock.check()  # stop if another process took the run over while this one stalled
        rollout = store.rollout_for_round(round) if main else None
        if not _share(accelerator, rollout is not None):
            if main:
                store.set_meta("status", {"state": "generating", "round": round})  # shown on the dashboard
            batch_tasks = prompts_for_round(train, round, r.prompts_per_round, cfg.seed)[rank::world]
            set_seed(cfg.seed * 1000 + round + 7919 * rank)
            with Progress(console=console, transient=True) as bar, gatherer.generating(engine):
                job = bar.add_task(f"round {round}: rollout", total=len(batch_tasks) * r.num_generations)
                comps = engine.generate(batch_tasks, r.num_generations, r.temperature, r.top_p, r.max_new_tokens,
                                        r.stop, progress=lambda n: bar.advance(job, n))
            if world > 1:
                comps = gather_object(comps)
            if main:
                settings = {**r.model_dump(), "do_sample": True, "mixed_precision": cfg.model.mixed_precision,
                            "num_processes": world}
                _store_rollout(store, round, round - 1, settings, tasks_by_id, comps, cfg.tasks.verifier == "lenient",
                               cfg.feedback.selection, cfg.seed)
                rollout = store.rollout_for_round(round)
        algorithm = "sft" if round <= cfg.sft.warmup_rounds else cfg.algorithm
        batch = stats = None
        if main:
            feedback_stats = {}
            if not store.rankings_for_rollout(rollout.id):
                unsafe = _safety_flags(rollout, cfg)
                if cfg.feedback.source == "rules":
                    scores, feedback_stats = _rule_scores(rollout, cfg, tasks_by_id, set(unsafe))
                    _record_rankings(store, rollout, "rules", scores, set(unsafe), cfg)
                else:  # experts rank in the web app; wait for enough of them (see annotation.py)
                    wait_for_human_rankings(store, rollout, cfg, console)
                    consume_human_rankings(store, rollout, lambda s, scores, flagged: _record_rankings(
                        store, rollout, "human", scores, flagged | set(unsafe), cfg, session=s),
                        cfg.feedback.adjudication_threshold)
                feedback_stats["safety_flagged"] = float(len(unsafe))
                if cfg.feedback.constitution is not None:  # critique -> revision pairs (constitution.py)
                    feedback_stats.update(constitution_round(store, rollout, cfg, pair, tasks_by_id, algorithm))
                    rollout = store.rollout_for_round(round)
                for cid, why in list(unsafe.items())[:5]:
                    console.print(f"[yellow]safety filter[/]: completion {cid} flagged: {why}")
            batch, stats = _round_batch(store, rollout, cfg, algorithm, pair.tokenizer)
            stats.update(feedback_stats)
            store.set_meta("status", {"state": "training", "round": round})
        batch, stats = _share(accelerator, (batch, stats))
        t_rollout = time.time() - t_round
        train_stats = _update(algorithm, pair, critic, optimizer, accelerator, batch, cfg)
        engine.sync_weights(pair.policy)
        t_update = time.time() - t_round - t_rollout
        # FSDP: plain copies gathered on the main process for evaluation and the checkpoint
        full, full_critic = gatherer.for_main(reference=ev.every_round or round == cfg.rounds)
        if not main:
            accelerator.wait_for_everyone()  # the main process evaluates and saves the checkpoint
            continue
        metrics = {**{f"train/{k}": v for k, v in {**stats, **train_stats}.items()},
                   "time/rollout_s": t_rollout, "time/update_s": t_update}
        if ev.every_round or round == cfg.rounds:
            store.set_meta("status", {"state": "evaluating", "round": round})
            result = run_eval(f"v{round}", None if round == cfg.rounds else ev.round_subset, pair=full)
            _save_eval(out, round, result)
            metrics.update(result.metrics())
        ckpt_dir = out / "checkpoints" / f"v{round}"
        if ckpt_dir.exists():  # left by a crash between saving and publishing
            shutil.rmtree(ckpt_dir)
        save_policy(full, ckpt_dir)
        if critic is not None:
            save_critic(accelerator.unwrap_model(full_critic), ckpt_dir / "critic")
        if not gatherer.active:  # FSDP: the optimizer state is sharded and not saved (sharding.py)
            torch.save(optimizer.state_dict(), ckpt_dir / "optimizer.pt")
        metrics["time/round_s"] = time.time() - t_round
        # the checkpoint's path relative to the run directory: resumes, the app and `rlhf eval --run`
        # resolve it against their own run directory (another cwd, another machine's mount)
        store.publish_version(round, round - 1, algorithm, ckpt_dir.relative_to(out).as_posix(), metrics, round=round)
        tracking.log(metrics, step=round)
        _prune_checkpoints(out / "checkpoints", keep=cfg.keep_checkpoints)
        acc = metrics.get("eval/accuracy")
        console.print(
            f"round {round}/{cfg.rounds} ({algorithm}): reward {stats['reward']:.3f} "
            f"acceptance {stats['acceptance_rate']:.2f} loss {train_stats.get('loss', float('nan')):.4f}"
            + (f" held-out acc {acc:.3f}" if acc is not None else "")
            + f" ({metrics['time/round_s']:.0f}s)"
        )
        full = full_critic = None
        accelerator.wait_for_everyone()

    # --- outputs ---------------------------------------------------------------------------------
    final, _ = gatherer.for_main(reference=False, critic=False)
    if not main:
        return {}
    store.set_meta("status", {"state": "done", "round": cfg.rounds})
    final_dir = out / "policy"
    if final_dir.exists():
        shutil.rmtree(final_dir)
    save_policy(final, final_dir, merge_lora=True)
    summary = _summary(out, store, cfg, time.time() - t0)
    write_report(out, store, summary)
    console.print(f"[bold green]done[/]: {json.dumps({k: summary[k] for k in ('eval_before', 'eval_after', 'significance')})}")
    return summary


def _save_eval(out: Path, version: int, result: EvalResult) -> None:
    """Per-task held-out outcomes of one evaluation as JSON (used for the paired test)."""
    d = out / "eval"
    d.mkdir(exist_ok=True)
    (d / f"v{version}.json").write_text(json.dumps({
        "version": version, "task_ids": result.task_ids, "correct": result.correct, "format_ok": result.format_ok,
        "lenient_correct": result.lenient_correct, "ambiguous": result.ambiguous, "open": result.open,
        "completions": [c.text for c in result.completions], "metrics": result.metrics(""), **result.task_scores,
    }, indent=1))


def _v0_texts(out: Path, task_ids: list[str]) -> list[str]:
    """The v0 (reference) greedy answers to ``task_ids``, from ``out/eval/v0.json``."""
    ev = json.loads((out / "eval" / "v0.json").read_text())
    by_id = dict(zip(ev["task_ids"], ev["completions"]))
    return [by_id[t] for t in task_ids]


def _prune_checkpoints(ckpt_root: Path, keep: int) -> None:
    dirs = sorted((p for p in ckpt_root.glob("v*") if p.name[1:].isdigit()), key=lambda p: int(p.name[1:]))
    for p in dirs[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)


def _summary(out: Path, store: Store, cfg: RunConfig, wall: float) -> dict:
    versions = store.versions()
    first, last = versions[0], versions[-1]
    ev0 = json.loads((out / "eval" / f"v{first.id}.json").read_text())
    ev1 = json.loads((out / "eval" / f"v{last.id}.json").read_text())

    def block(ev):
        m = ev["metrics"]
        return {k: m[k] for k in ("accuracy", "lenient_accuracy", "format_rate", "ambiguous_rate", "accuracy_ci_low",
                                  "accuracy_ci_high", "completion_length", "kl", "reward_proxy", "reward_gold", "win_rate",
                                  "win_rate_ci_low", "win_rate_ci_high", "reward_gold_reference") if k in m} | {"n": int(m["n"])} | (
            {"accuracy_applicable": bool(m["accuracy_applicable"]), "n_open": int(m["n_open"])} if m.get("n_open") else {})

    summary = {
        "eval_before": block(ev0), "eval_after": block(ev1), "rounds": last.id, "algorithm": cfg.algorithm,
        "wall_seconds": round(wall, 1), "model": cfg.model.name, "tasks": cfg.tasks.path,
        "significance": {"test": "exact McNemar (two-sided) on paired held-out outcomes", "n": len(ev0["correct"]),
                         **mcnemar_exact(ev0["correct"], ev1["correct"])},
        "significance_lenient": mcnemar_exact(ev0.get("lenient_correct", []), ev1.get("lenient_correct", [])),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
