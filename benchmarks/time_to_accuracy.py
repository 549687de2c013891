"""Time to a better model: this project's loop against TRL's GRPOTrainer, end to end, until the
held-out strict accuracy reaches a target.

    python benchmarks/time_to_accuracy.py                 # configs/demo.yaml, target 40 %, <= 8 steps each
    python benchmarks/time_to_accuracy.py --quick         # toy sizes: plumbing check, target not meant to be reached
    nice -n 5 python benchmarks/time_to_accuracy.py --target 0.5 --max-steps 10

Both systems start from the same model and train on the same task file with GRPO, one after the
other, each in its own worker process (``_common.run_isolated``):

* **ours**: the real online loop, ``rlhf_workbench.run.loop.run`` on ``configs/demo.yaml`` (rollout
  -> verify -> rank -> update -> evaluate -> checkpoint, with its database and checkpoints), one
  optimizer step per round.
* **TRL**: ``trl.GRPOTrainer`` (``use_vllm=False``) with the same model, the same train prompts in
  the same order (the loop's ``prompts_for_round`` for rounds 1, 2, ...; TRL's dataset is that
  list, unshuffled), rendered by the same chat template with the demo's instruction (checked
  token for token), the same reward, ``num_generations`` K, prompts per step (TRL's
  ``generation_batch_size = prompts · K``, as TRL counts completions, trained in micro-batches of
  the loop's ``optim.micro_batch_size``: ``per_device_train_batch_size = micro_batch_size``,
  ``gradient_accumulation_steps = steps_per_generation = prompts · K / micro_batch_size``, one
  optimizer step per generation as ours; one forward of all 128 completions took TRL's worker
  past 6.9 GB and the shared machine's memory), learning rate (constant, no warm-up), AdamW, weight decay, gradient clipping,
  β, ε, ``loss_type``, ``scale_rewards``, bf16 autocast (``bf16=True`` where the demo resolves
  ``mixed_precision`` to bf16), ``max_completion_length``, temperature, top-p 1, no top-k, one
  optimizer step per generation (``num_iterations = 1``), gradient checkpointing off on both
  (``model.gradient_checkpointing`` for ours; TRL's ``GRPOConfig`` turns it *on* by default, so it
  is set explicitly), and the same checkpoint saving: ours saves the policy and the AdamW state
  after every round (the loop's checkpoint), TRL likewise after every step (``save_strategy =
  "steps"``, ``save_steps = 1``, model and optimizer state, ``save_total_limit = 1``).

Fair by construction: both sides are built from one settings object (the run config of
:func:`bench_config` and the thread count), and each side records, read back from what it
actually ran with (the loop's config, TRL's ``GRPOConfig`` and accelerator, ``torch`` threads),
every setting that could differ (:data:`COMPARED`: gradient checkpointing, precision, threads,
batch and micro-batch, epochs, learning rate and schedule, what the clock counts, checkpoint
saving, ...) under ``systems.<side>.settings``. :func:`settings_differences` compares them; a
difference without a reason in :data:`REASONS` stops the run before a result is written, and
``settings_differences`` in the result file lists every difference with its reason.

Reward (the same for both): 1 when ``rlhf_workbench.verify.verify(completion, task)`` says
correct (the strict verifier: an explicit ``Answer: <n>`` equal to the key), else 0. The demo
adds a ranking bonus among correct traces (``feedback.ranking_weight``); it is set to 0 here, so
our reward is exactly TRL's reward function.

Evaluation (the same for both): ``rlhf_workbench.evaluation.heldout.evaluate`` (greedy, strict held-out
accuracy, ``eval.max_new_tokens`` and batch size of the config, no KL) on the first ``--eval-n``
tasks of the loop's held-out split (the whole split, 128 tasks, by default), before training and
after every optimizer step (the loop evaluates after every round). Ours evaluates through the loop's own per-round
evaluation (``eval.round_subset = tasks.max_heldout = --eval-n``), TRL's through a
``TrainerCallback`` at ``on_step_end``. The evaluated task ids are checked to be the same.

Wall clock: starts when the evaluation of the untrained model ends and stops for every later
evaluation, so it counts training only: for ours everything the loop does between two
evaluations (sampling, verifying, ranking, the database, the update, saving the checkpoint of
the round), for TRL everything ``Trainer.train`` does between two ``on_step_end`` evaluations
(sampling, the update and saving the step's checkpoint: TRL saves after ``on_step_end``, ours
after its evaluation, so on both sides a step's checkpoint falls into the next step's time and
the last step's is not counted).
Loading the model and the untrained evaluation are not counted for either. A side stops at the
first evaluation whose strict accuracy is >= ``--target``, after ``--max-steps`` steps, or once
its training clock passes ``--max-seconds``. ``ratios.time_to_target`` = TRL's seconds to the
target / ours (null when a side did not reach it; ``ratios.time_to_target_lower_bound`` is then
TRL's whole training time / ours when only TRL missed it).

Target: 40 % by default. The demo (benchmarks/results/demo.json) starts at 8.6 % (95 % CI up to
14.7 %, n = 128) and levels off near 70 %; 40 % lies well outside the start's noise and well
below the plateau, on the steep part of the curve, so the time to it measures learning speed
rather than where each run happens to level off. One evaluation of 128 tasks has a 95 % interval
of about ±8.5 points at 40 %, so a run may cross the target a step early or late by chance.

Timings depend on the machine and on other work running on it: the load average at every
evaluation, before and after each side, and the processor are recorded. The two sides take turns
step by step (ours, TRL, ours, ...; ``--no-interleave`` runs them one after the other), so a
slow spell of a shared machine falls on both alike. On a machine shared with other work use
``--threads 1``: with 2 threads on 2 cores under a load average of ~20, one 128-task evaluation
took 1264 s instead of ~15 s (the OpenMP threads wait for each other). Writes ``benchmarks/results/time_to_accuracy.json``
and a plot ``benchmarks/results/time_to_accuracy.png`` (held-out accuracy against training wall time).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # for `import _common` (and the workers)
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

ROOT = _common.ROOT
DEFAULT_CONFIG = ROOT / "configs" / "demo.yaml"


# --------------------------------------------------------------------------------------------
# shared set-up
# --------------------------------------------------------------------------------------------


def bench_config(spec: dict):
    """The run config both systems follow: ``spec["config"]`` (a YAML file) with the benchmark's
    overrides: ``rounds = max_steps``, ranking bonus 0 (reward = the verifier's 0/1), evaluation
    after every round on the first ``eval_n`` held-out tasks, no KL, and ``spec["overrides"]``
    (``key=value`` strings as ``rlhf run --set``; ``--quick`` and ``--model`` use them).

    Returns:
        A validated :class:`rlhf_workbench.config.RunConfig` (``mixed_precision`` resolved).
    """
    from rlhf_workbench.cli import _parse_overrides
    from rlhf_workbench.config import load_config
    from rlhf_workbench.model.loading import resolve_mixed_precision

    sets = [f"rounds={spec['max_steps']}", "feedback.ranking_weight=0", "eval.every_round=true",
            f"eval.round_subset={spec['eval_n']}", f"tasks.max_heldout={spec['eval_n']}", "eval.kl_samples=0",
            "keep_checkpoints=1", "model.gradient_checkpointing=false", *spec["overrides"]]
    cfg = load_config(spec["config"], _parse_overrides(sets))
    cfg.model.mixed_precision = resolve_mixed_precision(cfg.model.mixed_precision)
    return cfg


def split(cfg):
    """``(train, heldout)`` tasks exactly as the loop builds them (instruction, split, ``max_heldout``)."""
    from dataclasses import replace

    from rlhf_workbench.tasks.loading import load_tasks
    from rlhf_workbench.tasks.split import split_tasks

    tasks = load_tasks(cfg.tasks.path, cfg.tasks.format, cfg.tasks.limit)
    if cfg.tasks.instruction:
        tasks = [replace(t, instruction=cfg.tasks.instruction) for t in tasks]
    train, heldout = split_tasks(tasks, cfg.tasks.heldout_fraction, cfg.tasks.heldout_size, seed=cfg.seed)
    return train, heldout[: cfg.tasks.max_heldout] if cfg.tasks.max_heldout else heldout


class NoTurns:
    """Turn-taking that never waits (the sides run one after the other, ``--no-interleave``)."""

    def take(self) -> None:
        """Return at once."""

    def pass_on(self) -> None:
        """Do nothing."""

    def finish(self) -> None:
        """Do nothing."""


class Turns(_common.Baton):
    """:class:`_common.Baton` for sides that may stop at different steps: :meth:`finish` marks a
    side done and hands the turn on for good, and :meth:`take` stops waiting once every other
    side is done. The first :meth:`take` waits until every side has loaded its model.

    Raises:
        TimeoutError: from :meth:`take`, no turn within ``timeout_s`` while another side runs.
    """

    def __init__(self, ctx, n: int, timeout_s: float = 3600.0):
        super().__init__(ctx, n, timeout_s)
        self.finished = [ctx.Event() for _ in range(n)]

    def take(self) -> None:
        if not self._started:
            self._started = True
            self.ready.wait(self.timeout_s)
            if self.index == 0:
                self.turns[0].release()
        deadline = time.monotonic() + self.timeout_s
        while not self.turns[self.index].acquire(timeout=0.5):
            if all(e.is_set() for i, e in enumerate(self.finished) if i != self.index):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"side {self.index}: no turn within {self.timeout_s:.0f} s")

    def finish(self) -> None:
        """This side is done (or failed): never wait for it again."""
        self.finished[self.index].set()
        if not self._started:  # failed before its first turn: do not leave the others at the barrier
            self.ready.abort()
        self.pass_on()


class Clock:
    """A side's training wall clock, stopped while it evaluates or waits for its turn.

    :meth:`evaluate` is called at every evaluation point: it stops the clock, evaluates
    (holding the side's turn, so nothing else of the benchmark computes meanwhile), records the
    point, and either finishes the side (:meth:`done`) or hands the turn on, waits for it and
    restarts the clock. The first call (the untrained model) starts the clock. ``points`` holds
    one dict per evaluation: ``step``, ``wall_s`` (training seconds so far), ``accuracy``
    (strict) with its Wilson 95 % interval, ``lenient_accuracy``, ``format_rate``,
    ``completion_length`` (mean tokens), ``n`` and ``eval_s`` (seconds the evaluation took, not
    counted), ``load_1min`` (the load average then); ``task_ids`` are the evaluated tasks.
    """

    def __init__(self, target: float, max_steps: int, max_seconds: float, turns=None, name: str = ""):
        self.name = name
        self.target, self.max_steps, self.max_seconds = target, max_steps, max_seconds
        self.turns = turns or NoTurns()
        self.points: list[dict] = []
        self.task_ids: list[str] = []
        self.wall = 0.0
        self._resumed: float | None = None

    def evaluate(self, step: int, run_eval):
        """Evaluate after ``step`` optimizer steps with ``run_eval()`` (an
        :class:`~rlhf_workbench.evaluation.heldout.EvalResult`). Returns ``(result, done)``."""
        if self._resumed is not None:
            self.wall += time.perf_counter() - self._resumed
        else:
            self.turns.take()
        start = time.perf_counter()
        result = run_eval()
        eval_s = time.perf_counter() - start
        self.task_ids = self.task_ids or list(result.task_ids)
        m = result.metrics(prefix="")
        self.points.append({"step": step, "wall_s": round(self.wall, 2), "accuracy": result.accuracy,
                            **{k: m[k] for k in ("accuracy_ci_low", "accuracy_ci_high", "lenient_accuracy",
                                                 "format_rate", "completion_length")},
                            "n": result.n, "eval_s": round(eval_s, 2), "load_1min": os.getloadavg()[0]})
        print(f"  {self.name} step {step}: held-out strict accuracy {result.accuracy:.3f} at {self.wall:.1f} s of training "
              f"(eval {eval_s:.1f} s)", flush=True)
        done = step > 0 and self.done(step)
        if done:
            self.turns.finish()
        else:
            self.turns.pass_on()
            self.turns.take()
            self._resumed = time.perf_counter()
        return result, done

    def reached(self) -> bool:
        """True when an evaluation after training reached the target."""
        return len(self.points) > 1 and self.points[-1]["accuracy"] >= self.target

    def done(self, step: int) -> bool:
        """True when the run should stop after ``step`` steps."""
        return self.reached() or step >= self.max_steps or self.wall >= self.max_seconds


def _side_result(clock: Clock, load_before: list[float], extra: dict) -> dict:
    return {"curve": clock.points, "reached_target": clock.reached(),
            "time_to_target_s": clock.points[-1]["wall_s"] if clock.reached() else None,
            "steps_to_target": clock.points[-1]["step"] if clock.reached() else None,
            "training_seconds": round(clock.wall, 2), "steps": clock.points[-1]["step"],
            "eval_task_ids": clock.task_ids, "load_average_before": load_before,
            "load_average_after": list(os.getloadavg()), **extra}


# --------------------------------------------------------------------------------------------
# ours: the real loop, its per-round evaluation timed and used as the checkpoint of the curve
# --------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised from the loop's evaluation to end the run (target reached or budget spent)."""


def ours(spec: dict) -> dict:
    """Run ``rlhf_workbench.run.loop.run`` on the benchmark config in a fresh run directory, with
    the loop's ``evaluate`` wrapped to time each evaluation (the clock stops during it) and to
    stop the run when :meth:`Clock.done`.

    Returns:
        The side's result (:func:`_side_result`) plus ``mixed_precision``.
    """
    import torch
    from rich.console import Console

    import rlhf_workbench.run.loop as loop

    torch.set_num_threads(spec["threads"])
    cfg = bench_config(spec)
    clock = Clock(spec["target"], spec["max_steps"], spec["max_seconds"], spec.get("turns"), spec["side"])
    original = loop.evaluate

    def timed(*args, **kwargs):
        result, done = clock.evaluate(len(clock.points), lambda: original(*args, **kwargs))
        if done:
            raise _Stop
        return result

    load_before = list(os.getloadavg())
    out = Path(tempfile.mkdtemp(prefix="tta-ours-"))
    loop.evaluate = timed
    try:
        loop.run(cfg, out, Console(quiet=spec["quiet"]))
    except _Stop:
        pass
    finally:
        loop.evaluate = original
        shutil.rmtree(out, ignore_errors=True)
    settings = ours_settings(cfg, torch.get_num_threads())
    return _side_result(clock, load_before, {"mixed_precision": cfg.model.mixed_precision, "settings": settings})


# --------------------------------------------------------------------------------------------
# TRL: GRPOTrainer with the verifier as reward function, evaluated from a callback
# --------------------------------------------------------------------------------------------


def trl_args(cfg, out: str):
    """``trl.GRPOConfig`` mirroring ``cfg`` (see the module docstring for each setting).

    Raises:
        ValueError: ``optim.micro_batch_size`` does not divide ``prompts_per_round · K``.
    """
    import trl

    r, g, o = cfg.rollout, cfg.grpo, cfg.optim
    completions = r.prompts_per_round * r.num_generations
    if completions % o.micro_batch_size:
        raise ValueError(f"optim.micro_batch_size {o.micro_batch_size} must divide the step's {completions} "
                         "completions (TRL accumulates whole micro-batches)")
    return trl.GRPOConfig(
        output_dir=out, max_steps=cfg.rounds, learning_rate=o.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=o.weight_decay, max_grad_norm=o.max_grad_norm, optim="adamw_torch",
        bf16=cfg.model.mixed_precision == "bf16", use_cpu=True, report_to="none",
        # TRL's default is gradient checkpointing on; transformers 5 names it activation_checkpointing (the old name
        # is a deprecated alias that only applies while the new one is unset): set from the shared config
        activation_checkpointing=cfg.model.gradient_checkpointing,
        save_strategy="steps", save_steps=1, save_only_model=False, save_total_limit=1,  # as the loop's checkpoint
        logging_strategy="no", disable_tqdm=True, seed=cfg.seed, data_seed=cfg.seed,
        gradient_accumulation_steps=completions // o.micro_batch_size, dataloader_num_workers=0,
        per_device_train_batch_size=o.micro_batch_size,
        generation_batch_size=completions, num_generations=r.num_generations, num_iterations=1,
        max_completion_length=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=0, beta=g.beta,
        epsilon=g.epsilon, loss_type=g.loss_type, scale_rewards=g.scale_rewards, use_vllm=False,
        shuffle_dataset=False, log_completions=False, mask_truncated_completions=False)


def _eval_callback(clock: Clock, evaluate_fn):
    """A ``TrainerCallback`` that evaluates (clock stopped) before training and after every
    optimizer step, and stops training when :meth:`Clock.done`."""
    from transformers import TrainerCallback

    class EvalCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            clock.evaluate(0, lambda: evaluate_fn(model))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            _, done = clock.evaluate(state.global_step, lambda: evaluate_fn(model))
            control.should_training_stop = done

    return EvalCallback()


def trl_side(spec: dict) -> dict:
    """Train with ``trl.GRPOTrainer`` on the benchmark config's model, prompts and reward,
    evaluating as ours does (:func:`_eval_callback`).

    Returns:
        The side's result (:func:`_side_result`) plus ``mixed_precision`` (TRL's accelerator)
        and ``train_reward`` (mean reward of each step's completions).

    Raises:
        RuntimeError: TRL renders a prompt to other token ids than the loop does.
    """
    import datasets
    import torch
    import trl
    from transformers import AutoModelForCausalLM, set_seed

    from rlhf_workbench.evaluation.heldout import evaluate
    from rlhf_workbench.run.loop import prompts_for_round
    from rlhf_workbench.model.loading import PolicyPair, load_tokenizer, resolve_model_path
    from rlhf_workbench.model.rollout import render_prompt
    from rlhf_workbench.verify import verify

    torch.set_num_threads(spec["threads"])
    cfg = bench_config(spec)
    set_seed(cfg.seed)
    datasets.disable_progress_bars()
    path = resolve_model_path(cfg.model.name, cfg.model.cache_dir)
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.pad_token_id = model.generation_config.pad_token_id = tok.pad_token_id
    train, heldout = split(cfg)
    order = [t for rnd in range(1, cfg.rounds + 1) for t in prompts_for_round(train, rnd, cfg.rollout.prompts_per_round,
                                                                              cfg.seed)]
    by_id = {t.id: t for t in train}
    ds = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": t.prompt()}], "task_id": t.id}
                                     for t in order])
    rewards: list[float] = []

    def correctness(completions, task_id, **kwargs):
        out = [verify(c[0]["content"] if isinstance(c, list) else c, by_id[tid]).reward
               for c, tid in zip(completions, task_id)]
        rewards.append(sum(out) / len(out))
        return out

    ev = cfg.eval

    def evaluate_fn(m):
        return evaluate(PolicyPair(m, None, tok), heldout, ev.max_new_tokens, ev.batch_size,
                        cfg.model.mixed_precision, 0)

    clock = Clock(spec["target"], cfg.rounds, spec["max_seconds"], spec.get("turns"), spec["side"])
    load_before = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="tta-trl-") as out:
        trainer = trl.GRPOTrainer(model=model, reward_funcs=correctness, args=trl_args(cfg, out), train_dataset=ds,
                                  processing_class=tok, callbacks=[_eval_callback(clock, evaluate_fn)])
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
        rendered = tok.apply_chat_template([{"role": "user", "content": order[0].prompt()}],
                                           add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        if list(rendered) != list(render_prompt(tok, order[0])):
            raise RuntimeError("TRL's chat template renders the prompt to other token ids than rollout.render_prompt")
        trainer.train()
        a = trainer.args
        raw = {k: getattr(a, k) for k in TRL_FIELDS}
        precision = str(trainer.accelerator.mixed_precision)
        raw["mixed_precision"] = precision
        m = trainer.model
        active = m.is_activation_checkpointing if hasattr(m, "is_activation_checkpointing") else m.is_gradient_checkpointing
        settings = trl_settings(a, precision, torch.get_num_threads(), active)
    return _side_result(clock, load_before, {"mixed_precision": precision, "trl_args": raw, "settings": settings,
                                             "train_reward": rewards})


TRL_FIELDS = ("learning_rate", "lr_scheduler_type", "weight_decay", "max_grad_norm", "optim", "bf16",
              "per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation",
              "generation_batch_size", "num_generations", "num_iterations",
              "max_completion_length", "temperature", "top_p", "top_k", "beta", "epsilon", "loss_type",
              "scale_rewards", "max_steps", "seed", "gradient_checkpointing", "activation_checkpointing", "save_strategy", "save_steps",
              "save_only_model")


# --------------------------------------------------------------------------------------------
# equal settings, checked
# --------------------------------------------------------------------------------------------

CLOCK = ("training only: from the end of one evaluation to the start of the next (sampling, reward, update, "
         "the previous step's checkpoint); evaluations and waiting for the turn excluded")
SAVING = "policy weights and AdamW state after every optimizer step (the last step's not timed)"
# every setting that could differ between the sides; each side records all of them
COMPARED = ("gradient_checkpointing", "mixed_precision", "threads", "prompts_per_step", "num_generations",
            "completions_per_step", "micro_batch_size", "optimizer_steps_per_step", "epochs_per_generation",
            "learning_rate", "lr_schedule", "warmup_steps", "optimizer", "weight_decay", "max_grad_norm", "beta",
            "epsilon", "loss_type", "scale_rewards", "max_new_tokens", "temperature", "top_p", "top_k", "clock",
            "checkpoint_saving", "seed")
# settings allowed to differ, with the reason (written into the result file); none at present
REASONS: dict[str, str] = {}


def ours_settings(cfg, threads: int) -> dict:
    """Ours' values of :data:`COMPARED`, read from the loop's run config and the thread count."""
    r, g, o = cfg.rollout, cfg.grpo, cfg.optim
    return {"gradient_checkpointing": cfg.model.gradient_checkpointing, "mixed_precision": cfg.model.mixed_precision,
            "threads": threads, "prompts_per_step": r.prompts_per_round, "num_generations": r.num_generations,
            "completions_per_step": r.prompts_per_round * r.num_generations, "micro_batch_size": o.micro_batch_size,
            "optimizer_steps_per_step": o.steps_per_round, "epochs_per_generation": 1, "learning_rate": o.lr,
            "lr_schedule": "constant", "warmup_steps": 0, "optimizer": "adamw_torch", "weight_decay": o.weight_decay,
            "max_grad_norm": o.max_grad_norm, "beta": g.beta, "epsilon": g.epsilon, "loss_type": g.loss_type,
            "scale_rewards": g.scale_rewards, "max_new_tokens": r.max_new_tokens, "temperature": r.temperature,
            "top_p": r.top_p, "top_k": 0, "clock": CLOCK,
            "checkpoint_saving": SAVING if cfg.keep_checkpoints >= 1 else "none", "seed": cfg.seed}


def trl_settings(args, mixed_precision: str, threads: int, checkpointing_active: bool | None = None) -> dict:
    """TRL's values of :data:`COMPARED`, read from its ``GRPOConfig`` (``args``), its accelerator's
    mixed precision and the thread count; ``checkpointing_active`` (the model's
    ``is_gradient_checkpointing`` after the trainer set it up) overrides the config's flag."""
    gc = getattr(args, "activation_checkpointing", args.gradient_checkpointing)
    gc = gc if checkpointing_active is None else checkpointing_active
    saves = args.save_strategy in ("steps", "SaveStrategy.STEPS") or str(args.save_strategy).endswith("STEPS")
    every_step = saves and args.save_steps == 1 and not args.save_only_model
    return {"gradient_checkpointing": bool(gc), "mixed_precision": "bf16" if mixed_precision == "bf16" else "no",
            "threads": threads, "prompts_per_step": args.generation_batch_size // args.num_generations,
            "num_generations": args.num_generations, "completions_per_step": args.generation_batch_size,
            "micro_batch_size": args.per_device_train_batch_size,
            "optimizer_steps_per_step": args.generation_batch_size // (
                args.per_device_train_batch_size * args.gradient_accumulation_steps),
            "epochs_per_generation": args.num_iterations, "learning_rate": args.learning_rate,
            "lr_schedule": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
            "warmup_steps": args.warmup_steps, "optimizer": str(getattr(args.optim, "value", args.optim)),
            "weight_decay": args.weight_decay, "max_grad_norm": args.max_grad_norm, "beta": args.beta,
            "epsilon": args.epsilon, "loss_type": args.loss_type, "scale_rewards": args.scale_rewards,
            "max_new_tokens": args.max_completion_length, "temperature": args.temperature, "top_p": args.top_p,
            "top_k": args.top_k or 0, "clock": CLOCK, "checkpoint_saving": SAVING if every_step else "other",
            "seed": args.seed}


def settings_differences(ours: dict, trl: dict, reasons: dict[str, str] | None = None) -> dict:
    """Compare the two sides' :data:`COMPARED` settings.

    Returns:
        ``{"differences": {key: {"ours", "trl", "reason"}}, "unexplained": [keys]}``: every key
        whose values differ (or that a side did not record), and those without a reason in
        ``reasons`` (default :data:`REASONS`).
    """
    reasons = REASONS if reasons is None else reasons
    diff = {k: {"ours": ours.get(k), "trl": trl.get(k), "reason": reasons.get(k)}
            for k in COMPARED if k not in ours or k not in trl or ours[k] != trl[k]}
    return {"differences": diff, "unexplained": sorted(k for k, v in diff.items() if not v["reason"])}


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def plot(result: dict, path: Path) -> Path:
    """Held-out strict accuracy against training wall time for both systems (steps: the value
    holds until the next evaluation), the target as a dashed line; saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name, label, colour in (("ours", "this project (rlhf run)", "tab:blue"), ("trl", "TRL GRPOTrainer", "tab:red")):
        side = result["systems"].get(name)
        if not side:
            continue
        xs = [p["wall_s"] for p in side["curve"]]
        ys = [100 * p["accuracy"] for p in side["curve"]]
        t = side["time_to_target_s"]
        ax.step(xs, ys, where="post", color=colour, marker="o", ms=4,
                label=f"{label}: " + (f"{t:.0f} s to target" if t is not None else "target not reached"))
    ax.axhline(100 * result["settings"]["target"], color="grey", ls="--", lw=1, label="target")
    ratio = result["ratios"].get("time_to_target")
    rc = result["run_config"]
    ax.set_title(f"GRPO on {rc['tasks']['path']}, {Path(rc['model']['name']).name}"
                 + (f": TRL / ours = {ratio:.2f}x to the target" if ratio else ""), fontsize=10)
    ax.set_ylim(0, 100)
    ax.set_xlabel("training wall time, s (evaluation excluded)")
    ax.set_ylabel(f"held-out strict accuracy, % (n = {result['settings']['eval_n']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def ratios(systems: dict) -> dict:
    """``time_to_target`` = TRL's seconds to the target / ours (None unless both reached it);
    ``time_to_target_lower_bound`` = TRL's whole training time / ours when only TRL missed it;
    ``steps_to_target`` likewise for optimizer steps."""
    ours, trl = systems.get("ours"), systems.get("trl")
    if not ours or not trl:
        return {}
    out = {"time_to_target": None, "steps_to_target": None}
    if ours["reached_target"] and trl["reached_target"]:
        out["time_to_target"] = trl["time_to_target_s"] / ours["time_to_target_s"]
        out["steps_to_target"] = trl["steps_to_target"] / ours["steps_to_target"]
    elif ours["reached_target"]:
        out["time_to_target_lower_bound"] = trl["training_seconds"] / ours["time_to_target_s"]
    return out


SIDES = {"ours": ours, "trl": trl_side}


def run_side(spec: dict) -> dict:
    """``SIDES[spec["side"]](spec)``, marking the side finished in ``spec["turns"]`` however it
    ends, so that a failed side never leaves the other waiting for its turn."""
    try:
        return SIDES[spec["side"]](spec)
    finally:
        if spec.get("turns") is not None:
            spec["turns"].finish()


def run_sides(names: list[str], spec: dict, interleave: bool = True, isolate: bool = True) -> dict:
    """Run the sides ``names`` (keys of :data:`SIDES`), each in its own worker process
    (``_common``'s fork server), and return ``{name: result}``. With ``interleave`` all are
    alive together and take turns (:class:`Turns`): one side's training step, then the other's,
    each evaluation inside its side's turn, so that a slow or busy spell of the machine falls on
    both alike; otherwise one after the other (``isolate=False``: in this process).

    Raises:
        RuntimeError: a side raised or its worker died (the others are then terminated).
    """
    if not interleave or not isolate or len(names) == 1:
        return {n: _common.run_isolated(run_side, {**spec, "side": n}, isolate=isolate) for n in names}
    import copy
    import multiprocessing.connection

    ctx = _common._context()
    turns = Turns(ctx, len(names))
    running = {}
    for i, name in enumerate(names):
        mine = copy.copy(turns)
        mine.index = i
        running[name] = _common._start(ctx, run_side, ({**spec, "side": name, "turns": mine},), {})
    results: dict = {}
    try:
        while len(results) < len(running):
            pending = {conn: n for n, (proc, conn) in running.items() if n not in results}
            for conn in multiprocessing.connection.wait(list(pending)):
                try:
                    status, value = conn.recv()
                except EOFError:
                    raise RuntimeError(f"{pending[conn]}: worker died") from None
                results[pending[conn]] = _common._result(pending[conn], status, value)
    finally:
        for proc, _ in running.values():
            if proc.is_alive() and len(results) < len(running):
                proc.terminate()
            proc.join()
    return results


QUICK = ["rollout.prompts_per_round=2", "rollout.num_generations=2", "rollout.max_new_tokens=8",
         "rollout.batch_size=4", "eval.max_new_tokens=8", "eval.batch_size=8", "optim.micro_batch_size=4"]


def main(argv=None) -> dict:
    """Parse the arguments, run ours then TRL (each in its own worker), write the JSON and the plot."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config both follow (default configs/demo.yaml)")
    ap.add_argument("--target", type=float, default=0.4, help="held-out strict accuracy to reach (fraction)")
    ap.add_argument("--max-steps", type=int, default=8, help="optimizer steps (loop rounds) at most, each side")
    ap.add_argument("--max-seconds", type=float, default=720.0, help="training seconds at most, each side")
    ap.add_argument("--eval-n", type=int, default=128, help="held-out tasks evaluated (the first N of the split)")
    ap.add_argument("--model", default=None, help="model instead of the config's (preset, hub id or path)")
    ap.add_argument("--set", action="append", default=[], help="config override key=value (as rlhf run --set)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--quick", action="store_true", help="toy sizes (2 steps, 2 prompts x 2, 8 tokens, 8 held-out)")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--no-interleave", action="store_true",
                    help="run the sides one after the other instead of taking turns step by step")
    ap.add_argument("--no-isolate", action="store_true", help="run both in this process, one after the other")
    ap.add_argument("--out", default=str(_common.RESULTS / "time_to_accuracy.json"))
    args = ap.parse_args(argv)
    overrides = list(args.set)
    if args.quick:
        args.max_steps, args.eval_n = min(args.max_steps, 2), min(args.eval_n, 8)
        overrides = QUICK + overrides
    if args.model:
        overrides.append(f"model.name={args.model}")
    spec = {"config": args.config, "overrides": overrides, "target": args.target, "max_steps": args.max_steps,
            "max_seconds": args.max_seconds, "eval_n": args.eval_n, "threads": args.threads, "quiet": False}
    cfg = bench_config(spec)
    busy = _common.warn_if_busy()
    systems = run_sides(["ours"] if args.skip_trl else ["ours", "trl"], spec, not args.no_interleave,
                        not args.no_isolate)
    if "trl" in systems and systems["trl"]["eval_task_ids"] != systems["ours"]["eval_task_ids"]:
        raise RuntimeError("the two systems were evaluated on different held-out tasks")
    compared = settings_differences(systems["ours"]["settings"], systems["trl"]["settings"]) if "trl" in systems \
        else None
    if compared and compared["unexplained"]:
        raise RuntimeError(f"the two sides ran with different settings and no recorded reason: "
                           f"{ {k: compared['differences'][k] for k in compared['unexplained']} }")
    result = {"command": _common.command_line(__file__, argv),
              "settings": {"config": _common.portable_path(args.config), "target": args.target,
                           "max_steps": args.max_steps, "max_seconds": args.max_seconds, "eval_n": args.eval_n,
                           "threads": args.threads, "overrides": overrides, "quick": args.quick,
                           "interleaved": not (args.no_interleave or args.no_isolate or args.skip_trl),
                           "reward": "1 if rlhf_workbench.verify.verify(completion, task).correct (strict) else 0",
                           "clock": "training only: starts after the untrained evaluation, stops during "
                                    "evaluations and while waiting for the turn"},
              "run_config": cfg.model_dump(mode="json"), "device": _common.device_info(args.threads),
              "machine_busy_at_start": busy, "nice": os.nice(0), "systems": systems,
              "settings_differences": compared, "ratios": ratios(systems)}
    for side in systems.values():
        side.pop("eval_task_ids")
    out = _common.write_result(result, args.out)
    plot(result, out.with_suffix(".png"))
    for name, side in systems.items():
        t = side["time_to_target_s"]
        print(f"{name}: " + (f"{100 * args.target:.0f} % reached after {side['steps_to_target']} steps, {t:.1f} s"
                             if t is not None else f"target not reached in {side['steps']} steps, "
                             f"{side['training_seconds']:.1f} s") + f" (mixed precision {side['mixed_precision']})")
    print(f"ratios: {result['ratios']}\nwrote {out} and {out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
