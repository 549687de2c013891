"""The online loop, top to bottom: rollout -> verify -> feedback -> update -> evaluate -> checkpoint.

    rlhf run --config configs/demo.yaml --out runs/demo

Round ``n`` samples K traces per prompt from policy version ``n-1``, verifies them against
the ground truth, ranks the verified ones, updates the policy (GRPO on group-relative
advantages or DPO on pairs whose chosen trace is always verified-correct), evaluates on the
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
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console
from rich.progress import Progress

from .config import RunConfig
from .evaluate import EvalResult, evaluate, mcnemar_exact
from .annotation import wait_for_human_rankings
from .feedback import build_pairs, completion_rewards, make_ranker, rank_group
from .losses import group_advantages
from .models import load_policy, save_policy
from .report import write_report
from .rollout import Completion, generate
from .store import CompletionRow, PreferencePair, RankingRow, Rollout, Store, VerificationRow
from .tasks import load_tasks, split_tasks
from .update import Sample, dpo_update, grpo_update
from .verify import verify


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
                   comps: list[Completion]) -> int:
    """Verify one round's completions and store them with their verdicts in one transaction."""
    with store.session() as s, s.begin():
        rollout = Rollout(round=round, policy_version_id=version, settings=settings)
        s.add(rollout)
        s.flush()
        rows = [CompletionRow(rollout_id=rollout.id, task_id=c.task_id, index=c.index, text=c.text,
                              prompt_ids=c.prompt_ids, token_ids=c.token_ids, logps=c.logps, finished=c.finished)
                for c in comps]
        s.add_all(rows)
        s.flush()
        s.add_all(VerificationRow(completion_id=r.id, **vars(verify(c.text, tasks_by_id[c.task_id])))
                  for r, c in zip(rows, comps))
        return rollout.id


def _record_rankings(store: Store, rollout: Rollout, source: str, scores: dict[str, dict[int, float]],
                     flagged: set[int], cfg: RunConfig) -> None:
    """Turn per-task scores of the traces into rankings, rewards and DPO pairs (one transaction).

    Wrong and flagged traces are unranked: reward 0, never chosen.
    """
    by_task: dict[str, list[CompletionRow]] = {}
    for c in rollout.completions:
        by_task.setdefault(c.task_id, []).append(c)
    with store.session() as s, s.begin():
        for task_id, task_scores in scores.items():
            rows = by_task[task_id]
            vers = [c.verification for c in rows]
            ok = [v.correct and c.id not in flagged for v, c in zip(vers, rows)]
            ranks = rank_group(ok, [task_scores.get(c.id, 0.0) for c in rows])
            rewards = completion_rewards(ranks, cfg.feedback.ranking_weight)
            ranking = RankingRow(rollout_id=rollout.id, task_id=task_id, source=source,
                                 ranks={str(c.id): k for c, k in zip(rows, ranks)},
                                 rewards={str(c.id): x for c, x in zip(rows, rewards)})
            s.add(ranking)
            s.flush()
            for ci, ri in build_pairs(ranks, cfg.dpo.pairing, cfg.dpo.max_pairs_per_prompt):
                s.add(PreferencePair(ranking_id=ranking.id, chosen_id=rows[ci].id, rejected_id=rows[ri].id))


def _rule_scores(rollout: Rollout, cfg: RunConfig) -> dict[str, dict[int, float]]:
    """Rule-reward scores (weighted mix of the configured sources) of every trace, by task."""
    ranker = make_ranker(cfg.feedback, cfg.rollout.max_new_tokens)
    by_task: dict[str, list[CompletionRow]] = {}
    for c in rollout.completions:
        by_task.setdefault(c.task_id, []).append(c)
    out = {}
    for task_id, rows in by_task.items():
        comps = [Completion(c.task_id, c.index, c.prompt_ids, c.token_ids, c.logps, c.text, c.finished) for c in rows]
        out[task_id] = dict(zip((c.id for c in rows), ranker(comps, [c.verification for c in rows])))
    return out


def _round_batch(store: Store, rollout: Rollout, cfg: RunConfig):
    """Training inputs of a stored rollout: GRPO samples with advantages, or DPO pairs; plus stats."""
    comps = {c.id: c for c in rollout.completions}
    rankings = store.rankings_for_rollout(rollout.id)
    K = cfg.rollout.num_generations
    samples, rewards = [], []
    for rk in rankings:
        for cid, reward in rk.rewards.items():
            c = comps[int(cid)]
            samples.append(Sample(c.prompt_ids, c.token_ids, c.logps))
            rewards.append(reward)
    r = torch.tensor(rewards, dtype=torch.float32)
    stats = {
        "reward": r.mean().item(),
        "reward_std": r.view(-1, K).std(dim=1).mean().item() if len(r) >= K else 0.0,
        "acceptance_rate": sum(c.verification.correct for c in comps.values()) / max(1, len(comps)),
        "format_rate": sum(c.verification.format_ok for c in comps.values()) / max(1, len(comps)),
        "completions/mean_length": sum(len(c.token_ids) for c in comps.values()) / max(1, len(comps)),
        "completions/clipped_ratio": sum(not c.finished for c in comps.values()) / max(1, len(comps)),
    }
    if cfg.algorithm == "grpo":
        adv = group_advantages(r, K, cfg.grpo.scale_rewards)
        for s, a in zip(samples, adv.tolist()):
            s.advantage = a
        return samples, stats
    pairs = [(Sample(comps[p.chosen_id].prompt_ids, comps[p.chosen_id].token_ids),
              Sample(comps[p.rejected_id].prompt_ids, comps[p.rejected_id].token_ids))
             for p in store.pairs_for_rollout(rollout.id)]
    stats["pairs"] = float(len(pairs))
    return pairs, stats


def run(cfg: RunConfig, out_dir: str | Path, console: Console | None = None) -> dict:
    """Run (or resume) the online loop described by ``cfg``, writing everything under ``out_dir``.

    Returns:
        The summary also written to ``out_dir/summary.json``: ``eval_before`` / ``eval_after``
        (``accuracy``, ``n`` and more), ``rounds``, ``wall_seconds``, ``significance``.

    Raises:
        TaskFormatError: bad task file (before anything is written).
        ValueError: the run directory holds a run with a different config.
    """
    console = console or Console()
    out = Path(out_dir)
    t0 = time.time()
    set_seed(cfg.seed)

    # --- tasks: validated in full before anything is written --------------------------------
    tasks = load_tasks(cfg.tasks.path, cfg.tasks.format, cfg.tasks.limit)
    if cfg.tasks.instruction:
        tasks = [replace(t, instruction=cfg.tasks.instruction) for t in tasks]
    train, heldout = split_tasks(tasks, cfg.tasks.heldout_fraction, cfg.tasks.heldout_size, seed=cfg.seed)
    if cfg.tasks.max_heldout:
        heldout = heldout[: cfg.tasks.max_heldout]
    leaked = {t.id for t in train} & {t.id for t in heldout}
    if leaked:
        raise ValueError(f"{cfg.tasks.path}: tasks in both splits: {sorted(leaked)[:5]}")
    out.mkdir(parents=True, exist_ok=True)
    store = Store(cfg.db_url, out)
    config = cfg.model_dump(mode="json")
    stored = store.get_meta("config")
    if stored is not None and {**stored, "rounds": 0} != {**config, "rounds": 0}:  # more rounds is a resume
        raise ValueError(f"{out} holds a run with another config; use a new --out or the same config")
    store.set_meta("config", config)
    store.add_tasks(train, "train")
    store.add_tasks(heldout, "heldout")
    tasks_by_id = {t.id: t for t in train}
    console.print(f"[bold]tasks[/]: {len(train)} train, {len(heldout)} held-out from {cfg.tasks.path}")

    # --- models: resume from the newest published version ------------------------------------
    latest = store.latest_version()
    ckpt = latest.checkpoint if latest is not None and latest.id > 0 else None
    pair = load_policy(cfg.model, checkpoint=ckpt)
    accelerator = Accelerator(mixed_precision="no", cpu=not torch.cuda.is_available())
    optimizer = torch.optim.AdamW([p for p in pair.policy.parameters() if p.requires_grad],
                                  lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    if ckpt and (Path(ckpt) / "optimizer.pt").exists():
        optimizer.load_state_dict(torch.load(Path(ckpt) / "optimizer.pt", weights_only=True))
    pair.train_module, optimizer = accelerator.prepare(pair.policy, optimizer)
    policy = pair.policy
    ev = cfg.eval

    def run_eval(label: str, subset: int | None = None) -> EvalResult:
        tasks = heldout[:subset] if subset else heldout
        with Progress(console=console, transient=True) as bar:
            job = bar.add_task(f"eval {label}", total=len(tasks))
            return evaluate(pair, tasks, ev.max_new_tokens, ev.batch_size, cfg.model.mixed_precision,
                            ev.kl_samples, progress=lambda n: bar.advance(job, n))

    if latest is None:
        store.set_meta("status", {"state": "evaluating", "round": 0})
        before = run_eval("v0")
        _save_eval(out, 0, before)
        store.publish_version(0, None, "base", None, before.metrics(), round=0)
        console.print(f"v0 held-out accuracy {before.accuracy:.3f} (strict {before.strict_accuracy:.3f}, n={before.n})")
        latest = store.latest_version()

    # --- the rounds ---------------------------------------------------------------------------
    r = cfg.rollout
    for round in range(latest.id + 1, cfg.rounds + 1):
        t_round = time.time()
        rollout = store.rollout_for_round(round)
        if rollout is None:
            store.set_meta("status", {"state": "generating", "round": round})  # shown on the dashboard
            batch_tasks = prompts_for_round(train, round, r.prompts_per_round, cfg.seed)
            set_seed(cfg.seed * 1000 + round)
            with Progress(console=console, transient=True) as bar:
                job = bar.add_task(f"round {round}: rollout", total=len(batch_tasks) * r.num_generations)
                comps = generate(policy, pair.tokenizer, batch_tasks, r.num_generations, True, r.temperature,
                                 r.top_p, r.max_new_tokens, r.stop, r.batch_size, cfg.model.mixed_precision,
                                 progress=lambda n: bar.advance(job, n))
            settings = {**r.model_dump(), "do_sample": True, "mixed_precision": cfg.model.mixed_precision}
            _store_rollout(store, round, round - 1, settings, tasks_by_id, comps)
            rollout = store.rollout_for_round(round)
        if not store.rankings_for_rollout(rollout.id):
            if cfg.feedback.source == "rules":
                _record_rankings(store, rollout, "rules", _rule_scores(rollout, cfg), set(), cfg)
            else:  # experts rank in the web app; wait for enough of them (see annotation.py)
                scores, flagged = wait_for_human_rankings(store, rollout, cfg, console)
                _record_rankings(store, rollout, "human", scores, flagged, cfg)
        t_rollout = time.time() - t_round
        batch, stats = _round_batch(store, rollout, cfg)
        update = grpo_update if cfg.algorithm == "grpo" else dpo_update
        store.set_meta("status", {"state": "training", "round": round})
        train_stats = update(pair, optimizer, accelerator, batch, cfg)
        t_update = time.time() - t_round - t_rollout
        metrics = {**{f"train/{k}": v for k, v in {**stats, **train_stats}.items()},
                   "time/rollout_s": t_rollout, "time/update_s": t_update}
        if ev.every_round or round == cfg.rounds:
            store.set_meta("status", {"state": "evaluating", "round": round})
            result = run_eval(f"v{round}", None if round == cfg.rounds else ev.round_subset)
            _save_eval(out, round, result)
            metrics.update(result.metrics())
        ckpt_dir = out / "checkpoints" / f"v{round}"
        if ckpt_dir.exists():  # left by a crash between saving and publishing
            shutil.rmtree(ckpt_dir)
        save_policy(pair, ckpt_dir)
        torch.save(optimizer.state_dict(), ckpt_dir / "optimizer.pt")
        metrics["time/round_s"] = time.time() - t_round
        store.publish_version(round, round - 1, cfg.algorithm, str(ckpt_dir), metrics, round=round)
        _prune_checkpoints(out / "checkpoints", keep=cfg.keep_checkpoints)
        acc = metrics.get("eval/accuracy")
        console.print(
            f"round {round}/{cfg.rounds}: reward {stats['reward']:.3f} acceptance {stats['acceptance_rate']:.2f} "
            f"loss {train_stats.get('loss', float('nan')):.4f}"
            + (f" held-out acc {acc:.3f}" if acc is not None else "")
            + f" ({metrics['time/round_s']:.0f}s)"
        )

    # --- outputs ---------------------------------------------------------------------------------
    store.set_meta("status", {"state": "done", "round": cfg.rounds})
    final_dir = out / "policy"
    if final_dir.exists():
        shutil.rmtree(final_dir)
    save_policy(pair, final_dir, merge_lora=True)
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
        "completions": [c.text for c in result.completions], "metrics": result.metrics(""),
    }, indent=1))


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
        return {k: m[k] for k in ("accuracy", "strict_accuracy", "format_rate", "accuracy_ci_low",
                                  "accuracy_ci_high", "completion_length", "kl") if k in m} | {"n": int(m["n"])}

    summary = {
        "eval_before": block(ev0), "eval_after": block(ev1), "rounds": last.id, "algorithm": cfg.algorithm,
        "wall_seconds": round(wall, 1), "model": cfg.model.name, "tasks": cfg.tasks.path,
        "significance": {"test": "exact McNemar (two-sided) on paired held-out outcomes", "n": len(ev0["correct"]),
                         **mcnemar_exact(ev0["correct"], ev1["correct"])},
        "significance_strict": mcnemar_exact([a and b for a, b in zip(ev0["correct"], ev0["format_ok"])],
                                             [a and b for a, b in zip(ev1["correct"], ev1["format_ok"])]),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
