"""Offline training from a file: ``rlhf train --algorithm dpo|kto|sft|rm --data FILE --out-dir DIR``.

The file is read by :mod:`rlhf_workbench.tasks.preferences` (TRL's paired, unpaired and SFT
formats), split by prompt into train and held-out (``--heldout-fraction``, ``--seed``), and
trained on with the online loop's own code: :func:`rlhf_workbench.train.dpo.dpo_update`,
:func:`rlhf_workbench.train.kto.kto_update` and :func:`rlhf_workbench.train.sft.sft_update` on a
:class:`~rlhf_workbench.model.loading.PolicyPair` (frozen reference, or LoRA adapters disabled;
accelerate; mixed precision; packed prefix-sharing forwards), prompts rendered with the chat
template as the loop renders them (:func:`rlhf_workbench.model.rollout.render_prompt`) and completions
tokenised as ``text + eos``; ``rm`` trains a Bradley-Terry reward model with
:func:`rlhf_workbench.train.reward_model.train_reward_model` on ``task.transcript() + "\\n\\n"`` +
completion, the text ``rlhf eval --reward-model`` scores.

Each epoch visits the training examples in an order shuffled with ``random.Random(f"{seed}:{epoch}")``,
``--batch-size`` examples (DPO: pairs) per optimizer step (one call of the update function with
``optim.steps_per_round = 1``; ``--micro-batch-size`` sequences per forward). Learning-rate
defaults are TRL's per trainer: DPO and KTO 1e-6, SFT 2e-5, reward model 1e-5.

The output directory ``DIR``
-----------------------------
* ``DIR/`` itself holds the **final model** in the plain Hugging Face layout
  (``save_pretrained`` + tokenizer; a LoRA policy is merged), so ``rlhf eval --model DIR``,
  ``AutoModelForCausalLM.from_pretrained(DIR)`` (``AutoModelForSequenceClassification`` for
  ``rm``, and ``rlhf eval --reward-model DIR``) load it;
* ``DIR/checkpoints/step-N/``: the model at the end of each epoch (N = optimizer steps so far;
  LoRA: the adapter), with ``optimizer.pt`` and ``trainer_state.json``; the newest
  ``keep_checkpoints`` (default 2) are kept;
* ``DIR/metrics.json``: per-step training metrics under TRL's names (``loss``,
  ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
  ``logps/chosen``, ``logps/rejected``, ``grad_norm``; KTO ``kl``; SFT ``mean_token_accuracy``,
  ``num_tokens``; RM ``accuracy``, ``margin``), per-epoch means, and held-out metrics before
  training and after each epoch with TRL's ``eval_`` prefix (DPO: the DPO loss and rewards on
  the held-out pairs; SFT: ``eval_loss``, the token NLL of the held-out completions; RM:
  ``eval_accuracy``, pairwise accuracy; KTO: none, its reference point needs a batch);
* ``DIR/heldout.jsonl``: the held-out prompts as open tasks, which ``rlhf eval --model DIR``
  evaluates by default (win rate against the base model under ``--reward-model``);
* ``DIR/offline.json``: the settings, the base model and the counts.

**Resume**: running the same command again continues after the newest epoch checkpoint (model,
optimizer state, metrics, step count; the same epoch order), and with a larger ``--epochs`` adds
epochs. A ``DIR`` holding a run with other settings (anything but ``--epochs``) is refused. The
reward model's AdamW moments restart at each epoch (``train_reward_model`` builds its own
optimizer per call).
"""

from __future__ import annotations

import copy
import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from pydantic import ValidationError

from rlhf_workbench.config import ConfigError, RunConfig
from rlhf_workbench.model.loading import load_policy, save_policy
from rlhf_workbench.model.rollout import render_prompt
from rlhf_workbench.tasks.preferences import OfflineRecord, load_offline_file, records_for, save_heldout, split_records
from rlhf_workbench.train.dpo import dpo_update
from rlhf_workbench.train.engine import chunks, forward_logps, module_device
from rlhf_workbench.train.kto import kto_update
from rlhf_workbench.train.losses import dpo_loss
from rlhf_workbench.train.reward_model import RewardPair, load_reward_model, pairwise_accuracy, train_reward_model
from rlhf_workbench.train.samples import Sample
from rlhf_workbench.train.sft import sft_update

ALGORITHMS = ("dpo", "kto", "sft", "rm")
DEFAULT_LR = {"dpo": 1e-6, "kto": 1e-6, "sft": 2e-5, "rm": 1e-5}
"""TRL's default learning rates of DPOTrainer, KTOTrainer, SFTTrainer and RewardTrainer."""
INFO_FILE, HELDOUT_FILE, METRICS_FILE, STATE_FILE = "offline.json", "heldout.jsonl", "metrics.json", "trainer_state.json"


@dataclass
class OfflineArgs:
    """The settings of ``rlhf train`` (see the module docstring).

    Attributes:
        algorithm: one of :data:`ALGORITHMS`.
        data: the training file.
        out_dir: the output directory ``DIR``.
        model: base model (preset, hub id or local directory).
        epochs: passes over the training examples.
        lr: learning rate (None: :data:`DEFAULT_LR`).
        batch_size: examples (DPO/RM: pairs) per optimizer step.
        micro_batch_size: sequences per forward pass (None: ``optim.micro_batch_size``, 16); the
            reward model trains on a whole batch per forward and uses it for held-out scoring only.
        beta: DPO / KTO β (None: the config's 0.1).
        max_length: tokens per prompt + completion (see :func:`truncate`).
        limit: read only the first N records.
        heldout_fraction: fraction of the distinct prompts held out.
        seed: split, shuffling and initialisation seed.
        lora: train LoRA adapters (``model.lora`` defaults) instead of all weights.
        overrides: ``--set`` run-config fields (dotted keys), applied last.
    """

    algorithm: str
    data: str
    out_dir: str
    model: str = "smollm2-135m"
    epochs: int = 1
    lr: float | None = None
    batch_size: int = 8
    micro_batch_size: int | None = None
    beta: float | None = None
    max_length: int = 512
    limit: int | None = None
    heldout_fraction: float = 0.1
    seed: int = 0
    lora: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Raise ValueError naming the option that is out of range."""
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"--algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}")
        for flag, value, low in (("--epochs", self.epochs, 1), ("--batch-size", self.batch_size, 1),
                                 ("--micro-batch-size", self.micro_batch_size, 1), ("--max-length", self.max_length, 8)):
            if value is not None and value < low:
                raise ValueError(f"{flag} must be at least {low}, got {value}")
        if self.lora and self.algorithm == "rm":
            raise ValueError("--lora is for dpo, kto and sft (the reward model trains all weights)")

    def settings(self) -> dict[str, Any]:
        """What must match for a resume: every setting but ``epochs`` and ``out_dir``."""
        d = asdict(self)
        d.pop("epochs"), d.pop("out_dir")
        d["data"] = str(Path(self.data).resolve())
        return d


def build_config(args: OfflineArgs) -> RunConfig:
    """The :class:`RunConfig` the update functions read: the flags, then ``--set`` overrides.

    ``model.mixed_precision`` defaults to ``auto`` (bf16 where it is fast, see
    :func:`rlhf_workbench.model.loading.resolve_mixed_precision`); ``optim.steps_per_round`` is 1 (one
    optimizer step per batch).

    Raises:
        ConfigError: an override that is not a field or fails validation (named by its dotted path).
    """
    raw: dict[str, Any] = {
        "seed": args.seed,
        "model": {"name": args.model, "mixed_precision": "auto", **({"lora": {}} if args.lora else {})},
        "optim": {"lr": args.lr if args.lr is not None else DEFAULT_LR[args.algorithm], "steps_per_round": 1,
                  **({"micro_batch_size": args.micro_batch_size} if args.micro_batch_size else {})},
        **({"dpo": {"beta": args.beta}, "kto": {"beta": args.beta}} if args.beta is not None else {}),
    }
    for key, value in args.overrides.items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p} is a value, not a section of fields")
        node[leaf] = value
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        fields = "; ".join(f"field {'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise ConfigError(f"rlhf train: invalid setting: {fields}") from None


def truncate(prompt: list[int], completion: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Fit ``prompt + completion`` into ``max_length`` tokens.

    The completion keeps at least ``min(len(completion), max_length // 2)`` tokens; the prompt
    keeps its *last* tokens (the turn being answered), the completion its *first* ones.

    Returns:
        ``(prompt ids, completion ids)`` with ``len(p) + len(c) <= max_length``.
    """
    if len(prompt) + len(completion) <= max_length:
        return prompt, completion
    prompt = prompt[-(max_length - min(len(completion), max_length // 2)):]
    return prompt, completion[: max_length - len(prompt)]


def encode(tokenizer, records: list[OfflineRecord], max_length: int, side: str = "completion") -> list:
    """:class:`~rlhf_workbench.train.samples.Sample` of each record's ``side`` (completion, chosen or
    rejected): the chat-templated prompt and ``text + eos`` token ids, truncated by :func:`truncate`."""
    prompts: dict[str, list[int]] = {}
    out = []
    for r in records:
        p = prompts.get(r.task.id)
        if p is None:
            p = prompts[r.task.id] = render_prompt(tokenizer, r.task)
        ids = tokenizer.encode(getattr(r, side), add_special_tokens=False) + [tokenizer.eos_token_id]
        p_ids, c_ids = truncate(p, ids, max_length)
        out.append(Sample(p_ids, c_ids, label=r.label))
    return out


def offline_run_info(model: str | Path) -> dict | None:
    """``DIR/offline.json`` of an ``rlhf train`` output directory (None for anything else).

    ``rlhf eval --model DIR`` uses it: the held-out prompts ``DIR/heldout.jsonl`` and the base
    model (``settings.model``, the default ``--reference``).
    """
    p = Path(model) / INFO_FILE
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _latest_checkpoint(out: Path) -> Path | None:
    """The newest ``DIR/checkpoints/step-N`` holding a ``trainer_state.json`` (a finished save)."""
    root = out / "checkpoints"
    done = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file() and p.name[5:].isdigit()] if root.is_dir() else []
    return max(done, key=lambda p: int(p.name[5:]), default=None)


def _prune(out: Path, keep: int) -> None:
    root = out / "checkpoints"
    steps = sorted((p for p in root.glob("step-*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))
    for p in steps[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def _batches(items: list, batch_size: int, seed: int, epoch: int) -> list[list]:
    order = list(range(len(items)))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return [[items[i] for i in order[j: j + batch_size]] for j in range(0, len(order), batch_size)]


def _mean_metrics(rows: list[dict]) -> dict[str, float]:
    keys = {k for r in rows for k in r if k not in ("step", "epoch")}
    return {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in sorted(keys)}


def _prepare_dir(args: OfflineArgs, out: Path) -> tuple[list[OfflineRecord], list[OfflineRecord], dict]:
    """Read and split the file, check ``DIR`` holds no run with other settings, write
    ``offline.json`` and ``heldout.jsonl``. Returns ``(train, held-out, info)``."""
    records = records_for(args.algorithm, load_offline_file(args.data, args.limit), args.data)
    train, held, held_tasks = split_records(records, args.heldout_fraction, args.seed)
    if not train:
        raise ValueError(f"{args.data}: no training examples ({len(records)} in all, all held out)")
    previous = offline_run_info(out)
    if previous is not None and previous.get("settings") != args.settings():
        diff = sorted(k for k in set(previous.get("settings") or {}) | set(args.settings())
                      if (previous.get("settings") or {}).get(k) != args.settings().get(k))
        raise ValueError(f"{out} holds an `rlhf train` run with other settings ({', '.join(diff)}); "
                         "use a new --out-dir or the same settings")
    out.mkdir(parents=True, exist_ok=True)
    if held_tasks:
        save_heldout(held_tasks, out / HELDOUT_FILE)
    info = {"schema": "rlhf-offline/1", "settings": args.settings(), "train_examples": len(train),
            "heldout_examples": len(held), "heldout_prompts": len(held_tasks),
            "heldout_file": HELDOUT_FILE if held_tasks else None}
    (out / INFO_FILE).write_text(json.dumps(info, indent=1))
    return train, held, info


def train_offline(args: OfflineArgs, log: Callable[[str], None] = print) -> dict:
    """Train from ``args.data`` into ``args.out_dir`` (resuming from its newest checkpoint).

    Args:
        args: the settings.
        log: receives one line per epoch.

    Returns:
        The content of ``DIR/metrics.json``: ``algorithm``, ``settings``, counts, ``steps`` (one
        dict per optimizer step: ``step``, ``epoch`` and the update's metrics), ``epochs`` (per
        epoch: the means of the step metrics and the held-out ``eval_*`` metrics),
        ``eval_before`` (held-out metrics of the base model) and ``final_dir``.

    Raises:
        ValueError, TaskFormatError, FileNotFoundError: bad options or file (nothing is trained).
        ConfigError: a bad ``--set`` override.
    """
    args.check()
    out = Path(args.out_dir)
    cfg = build_config(args)
    train, held, info = _prepare_dir(args, out)
    ckpt = _latest_checkpoint(out)
    state = json.loads((ckpt / STATE_FILE).read_text()) if ckpt else {"epoch": 0, "step": 0, "steps": [], "epochs": []}
    if ckpt:
        log(f"resuming from {ckpt} (epoch {state['epoch']}, step {state['step']})")
    trainer = _train_rm if args.algorithm == "rm" else _train_policy
    state = trainer(args, cfg, out, train, held, ckpt, state, log)
    metrics = {"algorithm": args.algorithm, **{k: info[k] for k in ("settings", "train_examples", "heldout_examples",
                                                                     "heldout_prompts")},
               "mixed_precision": cfg.model.mixed_precision, "epochs_done": state["epoch"],
               "eval_before": state.get("eval_before"), "epochs": state["epochs"], "steps": state["steps"],
               "final_dir": str(out)}
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=1))
    return metrics


# --------------------------------------------------------------------------------------------
# DPO / KTO / SFT on the policy
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def _sum_logps(pair, samples: list, cfg: RunConfig, reference: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``([N] summed completion log-probs, [N] completion lengths)`` under the policy or the
    reference, ``optim.micro_batch_size`` sequences per forward, no gradient (nats)."""
    model = pair.ref_model if reference else pair.policy
    ctx = pair.reference_context() if reference else torch.no_grad()
    sums, lens = [], []
    was_training = model.training
    model.eval()
    with ctx:
        for chunk in chunks(samples, cfg.optim.micro_batch_size):
            logps, cmask = forward_logps(model, chunk, pair.tokenizer.pad_token_id, 1.0, cfg.model.mixed_precision,
                                         module_device(model))
            sums.append((logps * cmask).sum(-1).float().cpu())
            lens.append(cmask.sum(-1).cpu())
    model.train(was_training)
    return torch.cat(sums), torch.cat(lens)


def heldout_metrics(pair, algorithm: str, held: list, cfg: RunConfig) -> dict[str, float] | None:
    """Held-out metrics under TRL's ``eval_`` names, without gradient.

    DPO (``held``: (chosen, rejected) Sample pairs): ``eval_loss`` and ``eval_rewards/*``,
    ``eval_logps/*`` of :func:`~rlhf_workbench.train.losses.dpo_loss` (Rafailov et al. 2023 eq. 7) with
    ``cfg.dpo``, means over the pairs. SFT (Samples): ``eval_loss``, the mean completion-token NLL
    (nats/token). KTO, or no held-out data: None.
    """
    if not held or algorithm == "kto":
        return None
    if algorithm == "sft":
        s, n = _sum_logps(pair, held, cfg, reference=False)
        return {"eval_loss": float(-s.sum() / n.sum()), "eval_num_tokens": float(n.sum())}
    flat = [x for p in held for x in p]
    pol, lens = _sum_logps(pair, flat, cfg, reference=False)
    ref, _ = _sum_logps(pair, flat, cfg, reference=True)
    loss, stats = dpo_loss(pol[0::2], pol[1::2], ref[0::2], ref[1::2], beta=cfg.dpo.beta, loss_type=cfg.dpo.loss_type,
                           label_smoothing=cfg.dpo.label_smoothing, chosen_lengths=lens[0::2],
                           rejected_lengths=lens[1::2])
    out = {"eval_loss": float(loss), **{f"eval_{k}": float(v.float().mean()) for k, v in stats.items()}}
    out.update({"eval_logps/chosen": float(pol[0::2].mean()), "eval_logps/rejected": float(pol[1::2].mean())})
    return out


def _examples(algorithm: str, tokenizer, records: list[OfflineRecord], max_length: int) -> list:
    if algorithm == "dpo":
        return list(zip(encode(tokenizer, records, max_length, "chosen"), encode(tokenizer, records, max_length, "rejected")))
    return encode(tokenizer, records, max_length)


def _train_policy(args, cfg, out, train, held, ckpt, state, log) -> dict:
    """DPO / KTO / SFT epochs with the loop's update functions; checkpoint per epoch; final model into ``out``."""
    update = {"dpo": dpo_update, "kto": kto_update, "sft": sft_update}[args.algorithm]
    accelerator = Accelerator(mixed_precision="no", cpu=not torch.cuda.is_available())
    torch.manual_seed(args.seed)
    pair = load_policy(cfg.model, checkpoint=str(ckpt) if ckpt else None)
    train_x = _examples(args.algorithm, pair.tokenizer, train, args.max_length)
    held_x = _examples(args.algorithm, pair.tokenizer, held, args.max_length)
    optimizer = torch.optim.AdamW([p for p in pair.policy.parameters() if p.requires_grad], lr=cfg.optim.lr,
                                  weight_decay=cfg.optim.weight_decay)
    if ckpt and (ckpt / "optimizer.pt").is_file():
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    pair.train_module, optimizer = accelerator.prepare(pair.policy, optimizer)
    if pair.reference is not None:
        pair.reference.to(accelerator.device)
    if "eval_before" not in state:
        state["eval_before"] = heldout_metrics(pair, args.algorithm, held_x, cfg)
    for epoch in range(state["epoch"], args.epochs):
        rows = []
        for batch in _batches(train_x, args.batch_size, args.seed, epoch):
            stats = update(pair, optimizer, accelerator, batch, cfg)
            state["step"] += 1
            rows.append({"step": state["step"], "epoch": epoch + 1, **stats})
        state["steps"] += rows
        state["epoch"] = epoch + 1
        summary = {"epoch": epoch + 1, "step": state["step"], **_mean_metrics(rows),
                   **(heldout_metrics(pair, args.algorithm, held_x, cfg) or {})}
        state["epochs"].append(summary)
        if accelerator.is_main_process:
            _save_policy_checkpoint(pair, optimizer, out, state, cfg.keep_checkpoints)
        log(f"epoch {epoch + 1}/{args.epochs} ({args.algorithm}): step {state['step']} loss {summary.get('loss', float('nan')):.4f}"
            + (f" held-out loss {summary['eval_loss']:.4f}" if "eval_loss" in summary else ""))
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _save_final(pair.policy, pair.tokenizer, out, merge_lora=True)
    return state


def _save_policy_checkpoint(pair, optimizer, out: Path, state: dict, keep: int) -> Path:
    """``out/checkpoints/step-N``: policy (LoRA: adapter), ``optimizer.pt``, then ``trainer_state.json``
    (written last: a checkpoint without it is ignored on resume)."""
    path = out / "checkpoints" / f"step-{state['step']}"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        shutil.rmtree(path)
    save_policy(pair, path)
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    (path / STATE_FILE).write_text(json.dumps(state, indent=1))
    _prune(out, keep)
    return path


def _save_final(model, tokenizer, out: Path, merge_lora: bool = False) -> None:
    """The final model in the plain Hugging Face layout directly in ``out`` (LoRA merged into a copy)."""
    if merge_lora and hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# --------------------------------------------------------------------------------------------
# reward model
# --------------------------------------------------------------------------------------------


def _rm_pairs(records: list[OfflineRecord]) -> list:
    """:class:`~rlhf_workbench.train.reward_model.RewardPair` of paired records: prompt
    ``task.transcript() + "\\n\\n"``, the text ``rlhf eval``'s scorer puts before an answer."""
    return [RewardPair(r.task.transcript() + "\n\n", r.chosen, r.rejected) for r in records]


def _train_rm(args, cfg, out, train, held, ckpt, state, log) -> dict:
    """Bradley-Terry reward model, one :func:`~rlhf_workbench.train.reward_model.train_reward_model` call
    per epoch (seed ``seed + epoch``); held-out pairwise accuracy after each; final model into ``out``."""
    torch.manual_seed(args.seed)
    rm, tok = load_reward_model(str(ckpt) if ckpt else cfg.model.name, cfg.model.dtype)
    train_p, held_p = _rm_pairs(train), _rm_pairs(held)
    mb = cfg.optim.micro_batch_size

    def accuracy() -> dict | None:
        return {"eval_accuracy": pairwise_accuracy(rm, tok, held_p, mb, args.max_length)} if held_p else None

    if "eval_before" not in state:
        state["eval_before"] = accuracy()
    for epoch in range(state["epoch"], args.epochs):
        steps = train_reward_model(rm, tok, train_p, lr=cfg.optim.lr, epochs=1, batch_size=args.batch_size,
                                   max_length=args.max_length, seed=args.seed + epoch,
                                   max_grad_norm=cfg.optim.max_grad_norm, weight_decay=cfg.optim.weight_decay)
        rows = [{**s, "step": state["step"] + s["step"], "epoch": epoch + 1} for s in steps]
        state["step"] += len(steps)
        state["steps"] += rows
        state["epoch"] = epoch + 1
        summary = {"epoch": epoch + 1, "step": state["step"], **_mean_metrics(rows), **(accuracy() or {})}
        state["epochs"].append(summary)
        path = out / "checkpoints" / f"step-{state['step']}"
        if path.exists():
            shutil.rmtree(path)
        _save_final(rm, tok, path)
        (path / STATE_FILE).write_text(json.dumps(state, indent=1))
        _prune(out, cfg.keep_checkpoints)
        log(f"epoch {epoch + 1}/{args.epochs} (rm): step {state['step']} loss {summary['loss']:.4f}"
            + (f" held-out accuracy {summary['eval_accuracy']:.3f}" if "eval_accuracy" in summary else ""))
    _save_final(rm, tok, out)
    return state
