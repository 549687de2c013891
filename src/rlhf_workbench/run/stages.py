"""Pipeline stages before round 1: the classic RLHF pipeline around the online loop, for
prompts without an answer key (this module was ``pipeline.py`` before the stage packages).

InstructGPT's recipe (Ouyang et al. 2022, §3.5; Stiennon et al. 2020) in one run directory:

1. **supervised warm-up** on the preferred (``chosen``) replies of the training prompts
   (:func:`sft_warmup`), saved to ``<run>/sft_model``; the loop's policy *and reference* start
   from it, so the KL and the win rate are measured against the warmed-up model, as in the paper;
2. a **proxy reward model** on the training prompts' (chosen, rejected) pairs, saved to
   ``<run>/reward_model``; a feedback source names it ``path: run:reward_model``;
3. a **gold reward model** on *other* training pairs, which the proxy never saw, saved to
   ``<run>/gold_reward_model`` and used for evaluation only. The policy optimises the proxy;
   reporting the gold reward beside it shows reward over-optimisation when it happens (the proxy
   keeps rising while the gold reward falls: Gao et al. 2022, "Scaling laws for reward model
   overoptimization", whose set-up this mirrors with a gold model trained on held-apart data);
4. the online rounds (any algorithm), where every evaluation adds (:func:`score_eval`) the mean
   proxy and gold rewards of the greedy held-out answers and the **win rate against the
   reference** under the gold model.

Which pairs each stage uses is fixed by the seeded task split, by *prompt text*, not by record:
HH-RLHF repeats prompts under other record ids ("call me a bad name"), so every training task
whose normalised prompt (:func:`prompt_key`) is also a held-out prompt is left out of every stage
(:func:`drop_heldout_prompts`): a prompt and its duplicates stay on one side. Of the rest the
proxy takes the first ``reward_model.pairs`` training tasks, the gold model the next
``gold_reward_model.pairs`` whose prompts the proxy's pairs do not hold, the warm-up the chosen
replies of the first ``sft_warmup.examples``; the held-out prompts are in none.

The reference's greedy answers are the v0 evaluation's: the reference is the policy as round 1
starts, so its greedy answers on the held-out prompts are v0's (no second generation pass).
Each stage writes its output to a temporary directory and renames it, so a crash leaves either
nothing (the stage reruns on resume) or the finished stage (skipped on resume).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from rlhf_workbench.config import PipelineConfig, RewardStage, RunConfig
from rlhf_workbench.evaluation.scoring import load_scorer, win_value
from rlhf_workbench.model.loading import load_policy, save_policy
from rlhf_workbench.model.rollout import render_prompt
from rlhf_workbench.stats import CONFIDENCE, mean_estimate, wilson_interval
from rlhf_workbench.tasks.task import Task
from rlhf_workbench.train.reward_model import RewardPair, load_reward_model, train_reward_model
from rlhf_workbench.train.samples import Sample
from rlhf_workbench.train.sft import sft_update

RUN_PREFIX = "run:"  # a feedback source path relative to the run directory, e.g. run:reward_model


def task_pairs(tasks: Sequence[Task]) -> list[RewardPair]:
    """(chosen, rejected) pairs of the tasks that carry them (HH-RLHF records, preference files).

    The pair's prompt is ``task.transcript() + "\\n\\n"``, the text the loop's reward-model ranker
    and :func:`rlhf_workbench.evaluation.scoring.load_scorer` put before a reply, so the model is trained on
    the format it scores. Tasks without both replies are skipped.
    """
    out = []
    for t in tasks:
        chosen, rejected = t.metadata.get("chosen"), t.metadata.get("rejected")
        if isinstance(chosen, str) and isinstance(rejected, str):
            out.append(RewardPair(t.transcript() + "\n\n", chosen, rejected, task_id=t.id))
    return out


def prompt_key(task: Task) -> str:
    """The normalised prompt text of ``task``: its :meth:`~rlhf_workbench.tasks.task.Task.transcript`
    (every turn up to the user's last) case-folded, with punctuation and whitespace runs reduced
    to single spaces between words. Two records with the same key ask the same thing."""
    return " ".join(re.findall(r"\w+", task.transcript().casefold()))


def drop_heldout_prompts(train: Sequence[Task], heldout: Sequence[Task]) -> list[Task]:
    """The training tasks whose :func:`prompt_key` is no held-out task's (order kept)."""
    held = {prompt_key(t) for t in heldout}
    return [t for t in train if prompt_key(t) not in held]


def stage_tasks(train: Sequence[Task], cfg: PipelineConfig, heldout: Sequence[Task] = ()) -> dict[str, list[Task]]:
    """The training tasks each stage uses, none with a held-out prompt (:func:`drop_heldout_prompts`):
    ``reward_model`` the first proxy ``pairs`` tasks with a pair, ``gold_reward_model`` the next
    ``pairs`` whose prompts are not among the proxy's (disjoint by prompt text, not only by
    record), ``sft_warmup`` the first ``examples`` with a chosen reply (it may share the proxy's:
    both are the policy's side).

    Raises:
        ValueError: fewer usable training tasks with pairs than the two reward models ask for.
    """
    usable = drop_heldout_prompts(train, heldout)
    paired = [t for t in usable
              if isinstance(t.metadata.get("chosen"), str) and isinstance(t.metadata.get("rejected"), str)]
    n_proxy = cfg.reward_model.pairs if cfg.reward_model else 0
    n_gold = cfg.gold_reward_model.pairs if cfg.gold_reward_model else 0
    proxy = paired[:n_proxy]
    proxy_keys = {prompt_key(t) for t in proxy}
    gold = [t for t in paired[n_proxy:] if prompt_key(t) not in proxy_keys][:n_gold]
    if len(proxy) < n_proxy or len(gold) < n_gold:
        raise ValueError(f"pipeline: reward_model.pairs + gold_reward_model.pairs = {n_proxy + n_gold} but only "
                         f"{len(proxy) + len(gold)} training tasks carry a (chosen, rejected) pair with a prompt "
                         "that is neither held out nor the other reward model's")
    n_sft = cfg.sft_warmup.examples if cfg.sft_warmup else 0
    return {"reward_model": proxy, "gold_reward_model": gold,
            "sft_warmup": [t for t in usable if isinstance(t.metadata.get("chosen"), str)][:n_sft]}


def filter_prompt_length(tasks: list[Task], tokenizer, max_tokens: int | None) -> list[Task]:
    """The tasks whose chat-templated prompt (:func:`rlhf_workbench.model.rollout.render_prompt`) has at
    most ``max_tokens`` tokens (all of them when None)."""
    if max_tokens is None:
        return tasks
    return [t for t in tasks if len(render_prompt(tokenizer, t)) <= max_tokens]


def resolve_run_paths(cfg: RunConfig, out: Path) -> RunConfig:
    """A copy of ``cfg`` whose feedback-source and ``feedback.refit`` paths starting with ``run:``
    point into ``out``."""
    sources = [s.model_copy(update={"path": str(out / s.path[len(RUN_PREFIX):])})
               if s.path and s.path.startswith(RUN_PREFIX) else s for s in cfg.feedback.sources]
    update = {"sources": sources}
    refit = cfg.feedback.refit
    if refit is not None and refit.path.startswith(RUN_PREFIX):
        update["refit"] = refit.model_copy(update={"path": str(out / refit.path[len(RUN_PREFIX):])})
    return cfg.model_copy(update={"feedback": cfg.feedback.model_copy(update=update)})


def _done(path: Path) -> bool:
    return (path / "stage.json").is_file()


def _finish(tmp: Path, path: Path, info: dict) -> None:
    (tmp / "stage.json").write_text(json.dumps(info, indent=1))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def train_reward_stage(pairs: list[RewardPair], stage: RewardStage, backbone: str, path: Path,
                       mixed_precision: str, seed: int, eval_pairs: list[RewardPair] | None = None) -> dict:
    """Train a frozen-backbone reward model on ``pairs`` and save it to ``path``.

    The model is :func:`rlhf_workbench.train.reward_model.load_reward_model` with ``stage.pooling``
    over the final ``stage.max_tokens`` tokens of each text, trained by
    :func:`rlhf_workbench.train.reward_model.train_reward_model` on cached features (Bradley-Terry
    loss, ``stage.epochs`` head epochs). Returns the stage record also written to
    ``path/stage.json``: pairs, their task ids, seconds, backbone, the per-epoch training records
    and, with ``eval_pairs`` (the held-out prompts' pairs), ``heldout_accuracy`` (pairwise
    accuracy, ties wrong) with its 95 % Wilson interval.
    """
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    t0 = time.time()
    torch.manual_seed(seed)
    model, tokenizer = load_reward_model(backbone, pooling=stage.pooling, max_tokens=stage.max_tokens,
                                         mixed_precision=mixed_precision)
    records = train_reward_model(model, tokenizer, pairs, seed=seed, head_epochs=stage.epochs, head_lr=stage.lr,
                                 head_weight_decay=stage.weight_decay, eval_pairs=eval_pairs or None)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    info = {"pairs": len(pairs), "task_ids": [p.task_id for p in pairs], "seconds": round(time.time() - t0, 1),
            "backbone": backbone, "records": records}
    if eval_pairs:
        acc = records[-1]["eval_accuracy"]
        lo, hi = wilson_interval(round(acc * len(eval_pairs)), len(eval_pairs))
        info.update(heldout_accuracy=acc, heldout_ci_low=lo, heldout_ci_high=hi, heldout_pairs=len(eval_pairs))
    _finish(tmp, path, info)
    return info


def sft_warmup(cfg: RunConfig, tasks: Sequence[Task], path: Path, accelerator) -> dict:
    """Supervised warm-up of the configured policy on the tasks' chosen replies, saved to ``path``
    (plain Hugging Face layout) with ``stage.json``.

    Each example is the chat-templated prompt (:func:`~rlhf_workbench.model.rollout.render_prompt`)
    followed by the reply's tokens and eos (cut to ``max_reply_tokens``, without eos when cut);
    :func:`rlhf_workbench.train.sft.sft_update` trains on the reply tokens only (TRL SFTTrainer's
    completion-only loss), ``epochs`` passes, one optimizer step per ``optim.micro_batch_size``
    examples. Runs on every process (the update shards the batch); the main process saves.
    """
    st = cfg.pipeline.sft_warmup
    t0 = time.time()
    pair = load_policy(cfg.model.model_copy())
    tok = pair.tokenizer
    samples = []
    for t in tasks:
        reply = tok.encode(t.metadata["chosen"], add_special_tokens=False)
        ids = reply[: st.max_reply_tokens] + ([tok.eos_token_id] if len(reply) < st.max_reply_tokens else [])
        samples.append(Sample(render_prompt(tok, t), ids))
    optimizer = torch.optim.AdamW([p for p in pair.policy.parameters() if p.requires_grad], lr=st.lr,
                                  weight_decay=cfg.optim.weight_decay)
    pair.train_module, optimizer = accelerator.prepare(pair.policy, optimizer)
    steps = max(1, len(samples) // cfg.optim.micro_batch_size)
    run_cfg = cfg.model_copy(update={"sft": cfg.sft.model_copy(update={"epochs": st.epochs, "lr": st.lr}),
                                     "optim": cfg.optim.model_copy(update={"steps_per_round": steps})})
    stats = sft_update(pair, optimizer, accelerator, samples, run_cfg)
    info = {"examples": len(samples), "task_ids": [t.id for t in tasks], "seconds": round(time.time() - t0, 1),
            "metrics": stats}
    if accelerator.is_main_process:
        tmp = path.with_name(path.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        save_policy(pair, tmp, merge_lora=True)
        _finish(tmp, path, info)
    accelerator.wait_for_everyone()
    del pair, optimizer
    return info


def prepare(cfg: RunConfig, train: Sequence[Task], out: Path, accelerator, console=None,
            heldout: Sequence[Task] = ()) -> dict[str, dict]:
    """Run the configured stages that have not finished yet (SFT warm-up on every process, the
    reward models on the main process), in the order warm-up, proxy, gold. The reward models'
    held-out pairwise accuracy is measured on the pairs of ``heldout`` (when they have any).

    Returns:
        Stage name -> its ``stage.json`` record (read back for stages finished earlier).
    """
    p = cfg.pipeline
    if p is None:
        return {}
    chosen = stage_tasks(train, p, heldout)
    records = {}
    if p.sft_warmup is not None:
        path = out / "sft_model"
        if not _done(path):
            if console:
                console.print(f"pipeline: SFT warm-up on {len(chosen['sft_warmup'])} chosen replies")
            sft_warmup(cfg, chosen["sft_warmup"], path, accelerator)
        records["sft_warmup"] = json.loads((path / "stage.json").read_text())
    for name in ("reward_model", "gold_reward_model"):
        stage = getattr(p, name)
        if stage is None:
            continue
        path = out / name
        if accelerator.is_main_process and not _done(path):
            if console:
                console.print(f"pipeline: {name} on {len(chosen[name])} pairs")
            train_reward_stage(task_pairs(chosen[name]), stage, cfg.model.name, path, cfg.model.mixed_precision,
                               cfg.seed, task_pairs(heldout)[:stage.eval_pairs])
        accelerator.wait_for_everyone()
        records[name] = json.loads((path / "stage.json").read_text())
    return records


Scorer = Callable[[Sequence[Task], Sequence[str]], list[float]]


def load_scorers(cfg: RunConfig, out: Path) -> dict[str, Scorer]:
    """``{"proxy": ..., "gold": ...}``: the pipeline's trained reward models as scorers
    (:func:`rlhf_workbench.evaluation.scoring.load_scorer`), those configured only."""
    p = cfg.pipeline
    found = {}
    for key, name in (("proxy", "reward_model"), ("gold", "gold_reward_model")):
        if p is not None and getattr(p, name) is not None:
            found[key] = load_scorer(str(out / name))[0]
    return found


def score_eval(tasks: Sequence[Task], texts: Sequence[str], scorers: dict[str, Scorer],
               reference_texts: Sequence[str] | None) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Reward-model metrics of one greedy evaluation.

    Args:
        tasks, texts: the evaluated tasks and the policy's greedy answers (same order).
        scorers: ``proxy`` and/or ``gold`` (see :func:`load_scorers`).
        reference_texts: the reference's greedy answers to the same tasks (the v0 evaluation's),
            or None (no win rate, e.g. at v0 itself).

    Returns:
        ``(metrics, per_task)``: ``reward_proxy`` / ``reward_gold`` (means, the models' raw
        scale), and with a gold scorer and reference answers ``win_rate`` (mean of
        :func:`rlhf_workbench.evaluation.scoring.win_value` under the gold model: 1 win, 0.5 tie, 0 loss)
        with ``win_rate_ci_low`` / ``win_rate_ci_high`` (95 % seeded bootstrap,
        :func:`rlhf_workbench.stats.mean_estimate`), ``win_rate_n`` and ``reward_gold_reference``
        (the reference answers' mean gold reward on the same tasks); ``per_task`` holds the
        per-answer rewards (``reward_proxy``, ``reward_gold``, ``reward_gold_reference``).
    """
    metrics, per_task = {}, {}
    for key, score in scorers.items():
        vals = score(tasks, texts)
        per_task[f"reward_{key}"] = vals
        metrics[f"reward_{key}"] = sum(vals) / max(1, len(vals))
    if "gold" in scorers and reference_texts is not None:
        ref = scorers["gold"](tasks, reference_texts)
        per_task["reward_gold_reference"] = ref
        metrics["reward_gold_reference"] = sum(ref) / max(1, len(ref))  # same tasks: intermediate rounds use a subset
        wins = [win_value(m, r, a == b) for m, r, a, b in zip(per_task["reward_gold"], ref, texts, reference_texts)]
        est = mean_estimate(wins, CONFIDENCE)
        metrics.update({"win_rate": est.value, "win_rate_ci_low": est.low, "win_rate_ci_high": est.high,
                        "win_rate_n": float(len(wins))})
    return metrics, per_task
