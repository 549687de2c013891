"""Before round 1: a run's state on every process and how it is set up.

:class:`RunState` holds what the loop (:mod:`rlhf_workbench.run.loop`) carries from round to
round; :func:`load_run_tasks` loads and splits the tasks, :func:`open_run` opens the run directory
(database, lock, tracker, the version to resume from), :func:`pipeline_stages` runs the stages of
:mod:`rlhf_workbench.run.stages` and :func:`load_models` loads the policy, critic and optimizer
for data-parallel training. :func:`share` gives every process the main process's value.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from rich.console import Console
from transformers import AutoConfig

from rlhf_workbench.config import RunConfig
from rlhf_workbench.feedback.online_rm import OnlineRewardModel
from rlhf_workbench.model.loading import PolicyPair, load_policy, load_tokenizer, resolve_mixed_precision, resolve_model_path
from rlhf_workbench.model.rollout import HFEngine, render_prompt
from rlhf_workbench.model.sharding import Gatherer
from rlhf_workbench.run.lock import RunInUseError, RunLock
from rlhf_workbench.run.stages import (Scorer, drop_heldout_prompts, filter_prompt_length, load_scorers, prepare,
                                      resolve_run_paths, stage_tasks, task_pairs)
from rlhf_workbench.run.tracking import Tracking
from rlhf_workbench.store import Store
from rlhf_workbench.tasks.loading import load_tasks
from rlhf_workbench.tasks.split import split_tasks
from rlhf_workbench.tasks.task import Task, TaskFormatError
from rlhf_workbench.train.ppo import load_critic, make_optimizer


def share(accelerator: Accelerator, obj):
    """``obj`` as computed on the main process, on every process (identity for one process)."""
    if accelerator.num_processes == 1:
        return obj
    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _stored_config(stored: dict | None) -> dict | None:
    """A run's stored config with defaults filled in for fields added since it was written, so an
    older run directory still resumes; a field that no longer exists makes it differ (``{}``)."""
    if stored is None:
        return None
    try:
        return RunConfig.model_validate(stored).model_dump(mode="json")
    except ValueError:
        return {}


@dataclass
class RunState:
    """What one run holds from setup to its outputs, on every process.

    ``store``, ``lock`` and ``tracking`` exist on the main process only (None elsewhere); the
    models (``pair``, ``critic``, ``optimizer``, ``gatherer``, ``engine``) are set by
    :func:`load_models`, ``scorers`` (the pipeline's reward models, main process) and
    ``online_rm`` (``feedback.refit``'s online reward model, main process) with them.
    ``cfg`` is the run's config as the rounds use it (after the pipeline stages, see
    :func:`pipeline_stages`); ``t0`` the wall-clock start (seconds since the epoch).
    """

    cfg: RunConfig
    out: Path
    accelerator: Accelerator
    console: Console
    train: list[Task]
    heldout: list[Task]
    t0: float
    store: Store | None = None
    lock: RunLock | None = None
    tracking: Tracking | None = None
    pair: PolicyPair | None = None
    critic: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    gatherer: Gatherer | None = None
    engine: HFEngine | None = None
    scorers: dict[str, Scorer] = field(default_factory=dict)
    online_rm: OnlineRewardModel | None = None
    tasks_by_id: dict[str, Task] = field(init=False)

    def __post_init__(self):
        self.tasks_by_id = {t.id: t for t in self.train}

    @property
    def main(self) -> bool:
        """Whether this is the main process (the one with the database)."""
        return self.accelerator.is_main_process


def load_run_tasks(cfg: RunConfig) -> tuple[list[Task], list[Task]]:
    """The run's ``(train, heldout)`` tasks: loaded, given the configured instruction, cut to the
    pipeline's prompt length, checked against the model's positions (:func:`check_prompt_length`),
    split (seeded), the held-out split capped, and training tasks whose normalised prompt text is a
    held-out task's dropped (:func:`~rlhf_workbench.run.stages.drop_heldout_prompts`: HH-RLHF repeats
    prompts under different records). Nothing is written: a refusal leaves no run.

    Raises:
        TaskFormatError: bad task file, or a prompt too long for the model.
        ValueError: a task id in both splits.
    """
    tasks = load_tasks(cfg.tasks.path, cfg.tasks.format, cfg.tasks.limit)
    if cfg.tasks.instruction:
        tasks = [replace(t, instruction=cfg.tasks.instruction) for t in tasks]
    model_path = resolve_model_path(cfg.model.name, cfg.model.cache_dir)
    tokenizer = load_tokenizer(model_path)
    if cfg.pipeline is not None and cfg.pipeline.max_prompt_tokens:
        tasks = filter_prompt_length(tasks, tokenizer, cfg.pipeline.max_prompt_tokens)
    check_prompt_length(tasks, tokenizer, model_positions(model_path),
                        max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens), cfg.tasks.path)
    train, heldout = split_tasks(tasks, cfg.tasks.heldout_fraction, cfg.tasks.heldout_size, seed=cfg.seed)
    if cfg.tasks.max_heldout:
        heldout = heldout[: cfg.tasks.max_heldout]
    train = drop_heldout_prompts(train, heldout)  # a duplicate of a held-out prompt never trains
    leaked = {t.id for t in train} & {t.id for t in heldout}
    if leaked:
        raise ValueError(f"{cfg.tasks.path}: tasks in both splits: {sorted(leaked)[:5]}")
    return train, heldout


def model_positions(model_path: str) -> int | None:
    """The number of positions the model at ``model_path`` reads (``max_position_embeddings``, or
    ``n_positions`` for GPT-2-like configs); None when its config names neither."""
    config = AutoConfig.from_pretrained(model_path)
    config = getattr(config, "text_config", None) or config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_prompt_length(tasks: list[Task], tokenizer, positions: int | None, max_new_tokens: int,
                        source: str = "tasks") -> None:
    """Refuse tasks whose chat-templated prompt plus ``max_new_tokens`` (the larger of
    ``rollout.max_new_tokens`` and ``eval.max_new_tokens``) exceeds the model's ``positions``: a
    4,000-token prompt on a 512-position model would otherwise run past what the model was
    trained to read, without a word. Refused, not dropped, so the task set is what the file says;
    ``pipeline.max_prompt_tokens`` drops long prompts on purpose (counted in the run log).

    Raises:
        TaskFormatError: naming the first five such tasks, their prompt lengths and the limit.
    """
    if positions is None:
        return
    too_long = [(t.id, n) for t in tasks if (n := len(render_prompt(tokenizer, t))) + max_new_tokens > positions]
    if too_long:
        named = ", ".join(f"task {tid!r} ({n:,} tokens)" for tid, n in too_long[:5])
        more = f" and {len(too_long) - 5} more" if len(too_long) > 5 else ""
        raise TaskFormatError(
            f"{source}: {named}{more}: the prompt plus {max_new_tokens} new tokens exceeds the model's "
            f"{positions:,} positions; shorten or drop these tasks, lower max_new_tokens, or set "
            "pipeline.max_prompt_tokens to drop long prompts")


def open_run(state: RunState, cleanup: ExitStack) -> tuple[int | None, str | None]:
    """Open the run directory on the main process: its database (``state.store``), lock
    (``state.lock``) and tracker (``state.tracking``), the config and tasks stored. Returns, on every
    process, ``(latest_id, checkpoint)``: the newest published version (None for a new run) and
    its checkpoint directory (None for v0 or a new run).

    Raises:
        RunInUseError: another live process owns the run (nothing changed).
        ValueError: the directory holds a run with another config, or the tracker cannot start.
    """
    cfg, out = state.cfg, state.out
    error = lock_error = latest_id = ckpt = None
    if state.main:
        out.mkdir(parents=True, exist_ok=True)
        state.store = store = Store(cfg.db_url, out)
        try:  # one owner per run: a second run or worker on it stops here, having changed nothing
            state.lock = cleanup.enter_context(RunLock(store, out))
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
                state.tracking = Tracking(cfg, out)
                cleanup.callback(state.tracking.finish)
            except ValueError as e:
                error = str(e)
        if not (lock_error or error):
            store.set_meta("config", config)
            store.add_tasks(state.train, "train")
            store.add_tasks(state.heldout, "heldout")
            latest = store.latest_version()
            latest_id = None if latest is None else latest.id
            # stored relative to the run directory (older runs: absolute), resolved against it here
            ckpt = str(out / latest.checkpoint) if latest is not None and latest.id > 0 else None
    error, lock_error, latest_id, ckpt = share(state.accelerator, (error, lock_error, latest_id, ckpt))
    if lock_error:
        raise RunInUseError(lock_error)
    if error:
        raise ValueError(error)
    return latest_id, ckpt


def pipeline_stages(state: RunState) -> RunConfig:
    """Run the pipeline stages not finished yet (:func:`rlhf_workbench.run.stages.prepare`) and
    return the config the rounds use: the policy and reference start from the SFT warm-up's
    model when there is one, ``run:`` source paths point into the run directory. ``auto`` mixed
    precision is resolved in ``state.cfg`` itself first."""
    cfg = state.cfg
    if cfg.model.mixed_precision == "auto":
        cfg.model.mixed_precision = resolve_mixed_precision("auto")
    stages = prepare(cfg, state.train, state.out, state.accelerator, state.console, state.heldout)
    if "sft_warmup" in stages:  # policy and reference start from the warmed-up model
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": str(state.out / "sft_model")})})
    return resolve_run_paths(cfg, state.out)


def load_models(state: RunState, ckpt: str | None) -> None:
    """Load the policy (and PPO's critic) from checkpoint ``ckpt`` (None: the configured model),
    its optimizer (state resumed when saved), wrap them for DDP or FSDP, and build the rollout
    engine and, on the main process, the pipeline's reward-model scorers."""
    cfg = state.cfg
    state.pair = pair = load_policy(cfg.model, checkpoint=ckpt)
    critic = None
    if cfg.algorithm == "ppo":
        critic = load_critic(cfg, checkpoint=str(Path(ckpt) / "critic") if ckpt else None)
        optimizer = make_optimizer(pair, critic, cfg)
    else:
        optimizer = torch.optim.AdamW([p for p in pair.policy.parameters() if p.requires_grad],
                                      lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    state.gatherer = Gatherer(state.accelerator, pair, critic)  # FSDP: plain copies for generation, eval, checkpoints
    if ckpt and not state.gatherer.active and (Path(ckpt) / "optimizer.pt").exists():  # FSDP saves none (sharded)
        optimizer.load_state_dict(torch.load(Path(ckpt) / "optimizer.pt", weights_only=True))
    # DDP wrappers, or FSDP shards of policy, critic and (frozen) reference alike
    pair.train_module, state.critic, state.optimizer = state.gatherer.prepare(optimizer)
    if pair.reference is not None and not state.gatherer.active:
        pair.reference.to(state.accelerator.device)
    state.engine = HFEngine(pair.policy, pair.tokenizer, cfg.rollout.batch_size, cfg.model.mixed_precision)
    state.scorers = load_scorers(cfg, state.out) if state.main else {}  # the pipeline's proxy and gold reward models
    if state.main and cfg.feedback.refit is not None:  # the online reward model (feedback/online_rm.py)
        prior = task_pairs(stage_tasks(state.train, cfg.pipeline, state.heldout)["reward_model"]) \
            if cfg.pipeline is not None and cfg.pipeline.reward_model is not None else []
        state.online_rm = OnlineRewardModel.load(cfg.feedback.refit.path, cfg.feedback.refit, prior)
