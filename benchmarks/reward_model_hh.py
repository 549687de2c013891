"""Reward model on Anthropic HH-RLHF (harmless-base): frozen backbone + cached features vs TRL's RewardTrainer.

    python benchmarks/reward_model_hh.py                  # the whole comparison (time estimate below)
    python benchmarks/reward_model_hh.py --skip-trl       # ours only
    python benchmarks/reward_model_hh.py --model DIR --max-tokens 16 --heldout 32 --limit 160 --epochs 1 --lrs 1e-2  # smoke

Split (fixed): every usable pair of ``harmless-base-test.jsonl.gz`` (the only HH split in the
shared data; :func:`load_preference_file`), shuffled with ``random.Random(--seed)``; the first
``--heldout`` (320) are held out, the rest (1,992) train; the last ``--val-fraction`` (20 %) of the
training pairs are the validation pairs of every selection. Held-out pairs never enter training,
selection or the feature statistics. The plain command reproduces this split.

Features (ours, and the evaluation of both): SmolLM2-135M frozen (:mod:`rlhf_workbench.train.rm_features`),
texts ``prompt + completion + eos`` left-truncated to their final ``--max-tokens`` (128) tokens, bf16
autocast by the ``mixed_precision: auto`` rule, one no-grad forward per text, cached in
``--cache-dir`` (a stopped run resumes from it). Several layers and poolings are kept from the
one pass.

**Equal settings** (``equal`` in the result file: the comparison): both sides are built from one
:class:`EqualSettings` object. The same training pairs (all of them), the same validation pairs,
the same final-layer last-token features (TRL's sequence-classification model reads exactly
these: checked on a few held-out pairs), the same head -- a linear scalar on standardised
features (:class:`~rlhf_workbench.train.rm_features.RewardHead`: zero-initialised weight and bias,
feature mean and std from the training pairs), computed in fp32 on both sides (TRL's ``score``
module is replaced by it) -- the same epochs, batch size, AdamW weight decay, cosine schedule,
no gradient clipping, no gradient checkpointing, and for BOTH sides the same small
learning-rate sweep (``--lrs``) trained on the first 80 % of the training pairs and selected
on the validation pairs; each side's best rate is then trained on all training pairs and scored
on the held-out pairs once. Ours fits the head on the cached features; TRL's
``RewardTrainer`` runs the frozen backbone forward on every text in every epoch (that is where
its time goes). Every setting of both sides is recorded (``equal.settings``, read back from what
each side ran with) and :func:`settings_differences` lists any difference; one without a
reason in :data:`REASONS` stops the run before a result is written.

**Ours at the API defaults** (``ours``: the model ``rlhf train-rm`` trains, not a comparison):
mean+last pooling of the final layer, 30 head epochs, batch 64, lr 3e-3, with a selection study
(pooling x layer x weight decay) on the validation pairs, a learning curve, and the check that
the saved model scores the same through ``save_pretrained -> load_reward_model -> score_texts``.

Time on a quiet 2-core CPU (~10 texts/s of bf16 features): the feature pass over the 4,624 texts
~8 min (none when cached); TRL ``(len(lrs) + 1)`` runs of ``--epochs`` full forward passes over
the training texts: with the defaults (3 rates, 2 epochs) 3 x 2 x 3,188 + 2 x 3,984 texts,
~50 min. Writes ``benchmarks/results/reward_model_hh.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

if str(Path(__file__).resolve().parent) not in sys.path:  # for `import _common`
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

from rlhf_workbench.train.reward_model import (encode_texts, load_preference_file, load_reward_model,  # noqa: E402
                                         score_texts)
from rlhf_workbench.train.rm_features import RewardHead, extract_features, fit_head, head_accuracy  # noqa: E402
from rlhf_workbench.stats import wilson_interval  # noqa: E402

DEFAULT_DATA = Path(os.environ.get("RLHF_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) \
    / "hh-rlhf" / "harmless-base-test.jsonl.gz"
STUDY_LAYERS = (10, 20, -1)
POOLINGS = ("last", "mean", "mean_last")
HEAD = {"epochs": 30, "lr": 3e-3, "weight_decay": 0.1, "batch_size": 64}
DEFAULT_HELDOUT = 320  # the README's split: 320 held out, 1,992 train


@dataclass(frozen=True)
class EqualSettings:
    """The one settings object both sides of the equal-settings comparison are built from."""

    pooling: str = "last"  # TRL's sequence-classification model pools the last real token
    layer: int = -1  # the final layer's hidden states (after the final norm)
    max_tokens: int = 128  # each text's final tokens
    head: str = "RewardHead: linear scalar with bias on standardised features, fp32"
    head_init: str = "zeros"
    epochs: int = 2
    batch_size: int = 8
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    weight_decay: float = 0.1
    schedule: str = "cosine"
    max_grad_norm: float = 0.0  # no clipping (ours' fit_head does not clip)
    gradient_checkpointing: bool = False
    val_fraction: float = 0.2
    selection: str = "best validation accuracy of the lr sweep, then all training pairs"
    seed: int = 0


# settings allowed to differ between the sides, with the reason (written into the result file)
REASONS = {"shuffle": "each side shuffles the pairs every epoch with its own seeded sampler (ours random.Random(seed), "
                      "TRL's RandomSampler seeded by Trainer): the same pairs per epoch, another order"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def split_pairs(path, heldout: int, seed: int = 0, limit: int | None = None):
    """``(train, held, n)``: every usable pair (the first ``limit`` when given) shuffled with
    ``Random(seed)``; the first ``heldout`` held out; ``n`` usable pairs in all."""
    pairs = load_preference_file(path)[:limit]
    random.Random(seed).shuffle(pairs)
    return pairs[heldout:], pairs[:heldout], len(pairs)


def rows_of(tok, pairs, max_tokens):
    """Token rows of the chosen then the rejected texts, each kept to its final ``max_tokens``."""
    prompts = [p.prompt for p in pairs]
    rows = encode_texts(tok, prompts, [p.chosen for p in pairs]) + encode_texts(tok, prompts, [p.rejected for p in pairs])
    return [r[-max_tokens:] for r in rows]


class FeatureCache:
    """Study features ``{(layer, pooling): [F]}`` of the rows of one text list, kept per row index in
    ``path`` (saved after every chunk) so that a stopped run resumes where it stopped."""

    def __init__(self, model, tok, rows, path: Path, batch: int):
        self.model, self.tok, self.rows, self.path, self.batch = model, tok, rows, path, batch
        depth = model.backbone.config.num_hidden_layers  # hidden_states has depth + 1 entries
        self.layers = tuple(la for la in STUDY_LAYERS if la < 0 or la <= depth)
        state = torch.load(path) if path.exists() else {"parts": [], "done": 0, "seconds": 0.0}
        if "index" not in state:  # contiguous format: rows 0 .. done-1
            state["index"] = list(range(state["done"]))
        self.state = state

    @property
    def seconds(self) -> float:
        return self.state["seconds"]

    def done(self) -> set[int]:
        return set(self.state["index"])

    def run(self, indices, deadline: float) -> None:
        """Featurize ``indices`` (in this order, those not cached yet) until ``deadline``."""
        have = self.done()
        todo = [i for i in indices if i not in have]
        chunk = 2 * self.batch  # the deadline is checked between chunks
        for c in range(0, len(todo), chunk):
            if time.time() >= deadline:
                break
            idx = todo[c: c + chunk]
            t0 = time.time()
            part = extract_features(self.model, [self.rows[i] for i in idx], self.tok.pad_token_id, self.batch,
                                    self.layers, POOLINGS)
            self.state["seconds"] += time.time() - t0
            self.state["parts"].append(part)
            self.state["index"] += idx
            self.state["done"] = len(self.state["index"])
            torch.save(self.state, self.path)
            log(f"{self.path.name}: {self.state['done']}/{len(self.rows)} texts, {self.seconds:.0f} s "
                f"({self.state['done'] / self.seconds:.2f} texts/s), load {os.getloadavg()[0]:.1f}")

    def features(self, indices):
        """``{(layer, pooling): [len(indices), F]}`` of cached rows."""
        where = {j: i for i, j in enumerate(self.state["index"])}
        take = torch.tensor([where[i] for i in indices], dtype=torch.long)
        return {k: torch.cat([p[k] for p in self.state["parts"]])[take] for k in self.state["parts"][0]}


def complete_pairs(cache: FeatureCache, n_pairs: int) -> list[int]:
    """Pairs ``i`` whose chosen row ``i`` and rejected row ``n_pairs + i`` are both cached."""
    have = cache.done()
    return [i for i in range(n_pairs) if i in have and n_pairs + i in have]


def pair_split(feats, n):
    """Chosen / rejected halves of features of ``2n`` rows."""
    return {k: (v[:n], v[n:2 * n]) for k, v in feats.items()}


def acc_record(correct: int, n: int) -> dict:
    lo, hi = wilson_interval(correct, n)
    return {"accuracy": correct / n, "correct": correct, "n": n, "wilson95": [lo, hi]}


def fit_eval(train_f, held_f, n_train=None, eval_curve=False, **kw):
    c, r = train_f
    if n_train is not None:
        c, r = c[:n_train], r[:n_train]
    head = RewardHead(c.shape[1])
    t0 = time.time()
    metrics = fit_head(head, c, r, **{**HEAD, **kw}, eval_features=held_f if eval_curve else None)
    secs = time.time() - t0
    with torch.no_grad():
        correct = int((head(held_f[0]) > head(held_f[1])).sum())
    return head, metrics, secs, correct


def run_ours(args, model, tok, train, held, held_f_all, train_f_all, n_train, train_feat_s):
    key = (-1, "mean_last")
    result = {"config": {"pooling": "mean_last", "layer": -1, "max_tokens": args.max_tokens,
                         "mixed_precision": model.mixed_precision, **{f"head_{k}": v for k, v in HEAD.items()}}}
    # selection study on an inner split of the training pairs only
    n_val = n_train // 5
    study = []
    for k in train_f_all:
        c, r = train_f_all[k]
        inner = (c[: n_train - n_val], r[: n_train - n_val])
        val = (c[n_train - n_val: n_train], r[n_train - n_val: n_train])
        for wd in (0.01, 0.1, 1.0):
            head = RewardHead(c.shape[1])
            fit_head(head, *inner, **{**HEAD, "weight_decay": wd})
            study.append({"layer": k[0], "pooling": k[1], "weight_decay": wd,
                          "val_accuracy": head_accuracy(head, *val)})
    result["selection"] = {"train_pairs": n_train - n_val, "val_pairs": n_val, "results": study,
                           "best": max(study, key=lambda s: s["val_accuracy"])}
    log(f"selection best on validation: {result['selection']['best']}")
    # the reported model: API defaults, all training pairs
    head, metrics, head_s, correct = fit_eval(train_f_all[key], held_f_all[key], eval_curve=True)
    result["heldout"] = acc_record(correct, len(held))
    result["train_pairs"] = n_train
    result["train_s"] = train_feat_s + head_s
    result["feature_s_train"] = train_feat_s
    result["head_fit_s"] = head_s
    result["epochs"] = [{k: m[k] for k in ("epoch", "pairs_seen", "loss", "accuracy", "eval_accuracy")}
                        for m in metrics]
    curve = []
    for n in sorted({s for s in (100, 200, 400, 800, 1200, n_train) if 0 < s <= n_train}):
        _, _, _, c_n = fit_eval(train_f_all[key], held_f_all[key], n_train=n)
        curve.append({"train_pairs": n, **acc_record(c_n, len(held))})
    result["learning_curve"] = curve
    # the saved model scores the same through the ordinary path
    model.head.load_state_dict(head.state_dict())
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        tok.save_pretrained(d)
        loaded, tok2 = load_reward_model(d)
        sub = held[: args.check_pairs]
        r_path = score_texts(loaded, tok2, [p.prompt for p in sub], [p.chosen for p in sub])
    with torch.no_grad():
        r_cached = head(held_f_all[key][0][: len(sub)]).tolist()
    result["path_check"] = {"texts": len(sub), "max_abs_reward_diff": max(abs(a - b) for a, b in zip(r_path, r_cached)),
                            "reward_std": float(torch.tensor(r_cached).std()),
                            "what": "saved -> load_reward_model -> score_texts vs the head on cached features "
                                    "(held-out chosen texts)"}
    return result


class ScoreHead(torch.nn.Module):
    """TRL's ``score`` module replaced by ours' head: ``[B, L, H]`` hidden states -> ``[B, L, 1]``
    rewards of :class:`RewardHead` (standardised features, fp32 even under bf16 autocast), so
    that both sides train the same head on the same features."""

    def __init__(self, head: RewardHead):
        super().__init__()
        self.head = head
        self.init_zero = not any(bool(p.abs().sum()) for p in head.parameters())  # read back into the settings

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return self.head(hidden.float()).unsqueeze(-1)


def settings_differences(ours: dict, trl: dict, reasons: dict | None = None) -> dict:
    """``{"differences": {key: {"ours", "trl", "reason"}}, "unexplained": [keys]}`` over the union
    of both sides' recorded settings (a key one side lacks differs); ``reasons`` defaults to
    :data:`REASONS`."""
    reasons = REASONS if reasons is None else reasons
    diff = {k: {"ours": ours.get(k), "trl": trl.get(k), "reason": reasons.get(k)}
            for k in sorted(set(ours) | set(trl)) if ours.get(k, ...) != trl.get(k, ...)}
    return {"differences": diff, "unexplained": sorted(k for k, v in diff.items() if not v["reason"])}


def ours_settings(s: EqualSettings, mixed_precision: str, n: dict) -> dict:
    """Ours' recorded settings at :class:`EqualSettings` ``s`` (``n``: pair counts)."""
    return {**{k: v for k, v in asdict(s).items() if k != "lrs"}, "lrs": list(s.lrs), "mixed_precision": mixed_precision,
            "shuffle": "random.Random(seed) per epoch", **n}


def trl_settings(args, s: EqualSettings, score, mixed_precision: str, n: dict) -> dict:
    """TRL's recorded settings, read back from its ``RewardConfig`` ``args`` and its ``score`` module."""
    head = score.head if isinstance(score, ScoreHead) else None
    sched = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    return {"pooling": "last", "layer": -1, "max_tokens": s.max_tokens,
            "head": s.head if head is not None else type(score).__name__,
            "head_init": s.head_init if head is not None and score.init_zero else "other", "epochs": int(args.num_train_epochs), "batch_size": args.per_device_train_batch_size,
            "lrs": list(s.lrs), "weight_decay": args.weight_decay, "schedule": str(sched),
            "max_grad_norm": args.max_grad_norm, "gradient_checkpointing": bool(getattr(
                args, "activation_checkpointing", args.gradient_checkpointing)),
            "val_fraction": s.val_fraction, "selection": s.selection, "seed": args.seed,
            "mixed_precision": "bf16" if args.bf16 else "no", "shuffle": "Trainer's RandomSampler (seed)", **n}


def trl_config(out: str, s: EqualSettings, lr: float, bf16: bool):
    """``trl.RewardConfig`` at the equal settings ``s`` with learning rate ``lr``."""
    import trl

    return trl.RewardConfig(
        output_dir=out, learning_rate=lr, per_device_train_batch_size=s.batch_size, num_train_epochs=s.epochs,
        max_length=None, lr_scheduler_type=s.schedule, warmup_steps=0, weight_decay=s.weight_decay,
        max_grad_norm=s.max_grad_norm, bf16=bf16, use_cpu=not torch.cuda.is_available(), report_to="none",
        save_strategy="no", logging_steps=1, disable_tqdm=True, seed=s.seed, data_seed=s.seed,
        activation_checkpointing=s.gradient_checkpointing, dataloader_drop_last=False,
        center_rewards_coefficient=None)


def trl_model(args, tok_trl, train_feats):
    """TRL's model: the backbone as ``AutoModelForSequenceClassification``, every weight frozen,
    its ``score`` replaced by a zero :class:`RewardHead` standardised on ``train_feats`` (the
    training pairs' chosen and rejected final-layer last-token features)."""
    model, _ = load_reward_model(args.model, tokenizer=tok_trl)
    model.config.pad_token_id = tok_trl.pad_token_id
    head = RewardHead(train_feats.shape[1])
    head.standardize_from(train_feats)
    model.score = ScoreHead(head)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("score."))
    return model


def train_trl(args, s: EqualSettings, tok, tok_trl, pairs, feats, lr: float, bf16: bool):
    """One ``trl.RewardTrainer`` run on ``pairs`` (their cached ``feats`` standardise the head).

    Returns:
        ``(trainer, seconds, logs)``.
    """
    import datasets
    import trl

    torch.manual_seed(s.seed)
    rows = rows_of(tok, pairs, s.max_tokens)
    ds = datasets.Dataset.from_list([{"chosen_ids": rows[i], "rejected_ids": rows[len(pairs) + i]}
                                     for i in range(len(pairs))])
    model = trl_model(args, tok_trl, torch.cat(feats))
    with tempfile.TemporaryDirectory() as out:
        trainer = trl.RewardTrainer(model=model, args=trl_config(out, s, lr, bf16), train_dataset=ds,
                                    processing_class=tok_trl)
        t0 = time.time()
        trainer.train()
        seconds = time.time() - t0
    return trainer, seconds, [h for h in trainer.state.log_history if "loss" in h]


def sweep_and_fit(fit, s: EqualSettings, train_f, held_f):
    """The lr sweep and final fit of one side: ``fit(lr, (lo, hi))`` trains on training pairs
    ``lo:hi`` and returns ``(head, extra)``; the first ``1 - val_fraction`` train, the rest
    validate; the best rate is refitted on all pairs and scored on the held-out features."""
    n = train_f[0].shape[0]
    n_val = int(round(n * s.val_fraction))
    val = (train_f[0][n - n_val:], train_f[1][n - n_val:])
    sweep = []
    for lr in s.lrs:
        head, extra = fit(lr, (0, n - n_val))
        sweep.append({"lr": lr, "val_accuracy": head_accuracy(head, *val), **extra})
        log(f"  lr {lr:g}: validation {sweep[-1]['val_accuracy']:.3f}")
    best = max(sweep, key=lambda r: r["val_accuracy"])
    head, extra = fit(best["lr"], (0, n))
    with torch.no_grad():
        correct = int((head(held_f[0]) > head(held_f[1])).sum())
    return {"sweep": sweep, "best_lr": best["lr"], "heldout": acc_record(correct, held_f[0].shape[0]),
            "train_pairs": n, "val_pairs": n_val, "final": extra}, head


def run_equal(args, tok, train, held, train_f, held_f, mixed_precision: str) -> dict:
    """Ours and TRL at :class:`EqualSettings`, each with its own lr sweep (see the module docstring)."""
    s = EqualSettings(epochs=args.epochs, batch_size=args.batch_size, lrs=tuple(args.lrs), max_tokens=args.max_tokens,
                      val_fraction=args.val_fraction, seed=args.seed)
    key = (s.layer, s.pooling)
    tr, he = train_f[key], held_f[key]
    n = {"train_pairs": tr[0].shape[0], "val_pairs": int(round(tr[0].shape[0] * s.val_fraction)),
         "heldout_pairs": he[0].shape[0]}

    def fit_ours(lr, span):
        head = RewardHead(tr[0].shape[1])
        t0 = time.time()
        fit_head(head, tr[0][span[0]:span[1]], tr[1][span[0]:span[1]], epochs=s.epochs, lr=lr,
                 weight_decay=s.weight_decay, batch_size=s.batch_size, seed=s.seed)
        return head, {"train_s": time.time() - t0}

    log("equal settings, ours: lr sweep")
    out = {"settings": {"ours": ours_settings(s, mixed_precision, n)}}
    out["ours"], _ = sweep_and_fit(fit_ours, s, tr, he)
    if args.skip_trl:
        return out
    tok_trl = type(tok).from_pretrained(args.tok_dir)
    tok_trl.padding_side = "right"
    tok_trl.pad_token = "<|endoftext|>"  # SmolLM2's pad is its eos: TRL would pool the token before it
    runs = {}

    def fit_trl(lr, span):
        trainer, secs, logs = train_trl(args, s, tok, tok_trl, train[span[0]:span[1]],
                                        (tr[0][span[0]:span[1]], tr[1][span[0]:span[1]]), lr, mixed_precision == "bf16")
        runs["last"] = trainer
        return trainer.model.score.head, {"train_s": secs, "steps": len(logs),
                                          "first_loss": logs[0]["loss"] if logs else None,
                                          "last_loss": logs[-1]["loss"] if logs else None}

    log("equal settings, TRL: lr sweep")
    out["trl"], head = sweep_and_fit(fit_trl, s, tr, he)
    trainer = runs["last"]
    out["settings"]["trl"] = trl_settings(trainer.args, s, trainer.model.score, mixed_precision, n)
    chk = held[: args.check_pairs]
    r_model = score_texts(trainer.model, tok_trl, [p.prompt for p in chk], [p.chosen for p in chk],
                          max_length=args.max_tokens)
    with torch.no_grad():
        r_cached = head(he[0][: len(chk)]).tolist()
    out["trl"]["path_check"] = {"texts": len(chk), "max_abs_reward_diff": max(abs(a - b) for a, b in zip(r_model, r_cached)),
                                "reward_std": float(torch.tensor(r_cached).std()),
                                "what": "TRL's model (score_texts) vs its head on our cached final-layer last-token "
                                        "features (held-out chosen texts)"}
    out["settings_differences"] = settings_differences(out["settings"]["ours"], out["settings"]["trl"])
    if out["settings_differences"]["unexplained"]:
        raise RuntimeError(f"the two sides ran with different settings: {out['settings_differences']}")
    return out


def featurize(args, model, tok, train, held):
    """Cached study features of every held-out and training pair (resumes from ``--cache-dir``).

    Returns:
        ``(held_f, train_f, info)``: ``{(layer, pooling): (chosen, rejected)}`` each, and timings.
    """
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    tag = f"{Path(args.model).name}_{args.max_tokens}_{model.mixed_precision}_{args.seed}_{args.heldout}_{args.limit}"
    nh, nt = len(held), len(train)
    held_cache = FeatureCache(model, tok, rows_of(tok, held, args.max_tokens), cache / f"held_{tag}.pt",
                              args.feature_batch)
    train_cache = FeatureCache(model, tok, rows_of(tok, train, args.max_tokens), cache / f"train_{tag}.pt",
                               args.feature_batch)
    held_cache.run(range(2 * nh), float("inf"))
    train_cache.run([j for i in range(nt) for j in (i, nt + i)], float("inf"))
    held_f = pair_split(held_cache.features(list(range(2 * nh))), nh)
    train_f = pair_split(train_cache.features(list(range(2 * nt))), nt)
    seconds = held_cache.seconds + train_cache.seconds
    info = {"feature_rate_texts_per_s": 2 * (nh + nt) / max(seconds, 1e-9), "heldout_feature_s": held_cache.seconds,
            "train_feature_s": train_cache.seconds,
            "features_cached_before": "seconds add up over resumed runs (the feature cache records them)"}
    return held_f, train_f, info


def parse_args(argv):
    """The command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--heldout", type=int, default=DEFAULT_HELDOUT, help="held-out pairs (the first after shuffling)")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N usable pairs (smoke runs)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--feature-batch", type=int, default=16)
    ap.add_argument("--check-pairs", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=EqualSettings.epochs, help="equal settings: epochs, both sides")
    ap.add_argument("--batch-size", type=int, default=EqualSettings.batch_size, help="equal settings: pairs per step")
    ap.add_argument("--lrs", type=float, nargs="+", default=list(EqualSettings.lrs),
                    help="equal settings: the learning rates each side's sweep tries")
    ap.add_argument("--val-fraction", type=float, default=EqualSettings.val_fraction)
    ap.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "rm_bench_cache"))
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "reward_model_hh.json"))
    return ap.parse_args(argv)


def main(argv=None):
    """Split, featurize, fit ours at the API defaults, then ours and TRL at equal settings; write the JSON."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    info = _common.device_info(args.threads)
    busy = _common.warn_if_busy()
    model, tok = load_reward_model(args.model, pooling="mean_last", layer=-1, max_tokens=args.max_tokens,
                                   mixed_precision="auto")
    from rlhf_workbench.model.loading import resolve_model_path
    args.tok_dir = resolve_model_path(args.model)
    train, held, n_all = split_pairs(args.data, args.heldout, args.seed, args.limit)
    log(f"{n_all} usable pairs: {len(train)} train, {len(held)} held out; mixed precision {model.mixed_precision}")
    held_f, train_f, feat = featurize(args, model, tok, train, held)
    result = {"split": {"file": "hh-rlhf/harmless-base-test.jsonl.gz", "usable_pairs": n_all, "shuffle_seed": args.seed,
                        "heldout": f"first {len(held)} after shuffling", "train": f"the remaining {len(train)}",
                        "heldout_pairs": len(held), "train_pairs": len(train),
                        "val_pairs": int(round(len(train) * args.val_fraction))},
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "tok_dir", "cache_dir")},
              "device": info, "busy_at_start": busy, **feat}
    result["ours"] = run_ours(args, model, tok, train, held, held_f, train_f, len(train), feat["train_feature_s"])
    o = result["ours"]
    log(f"ours (API defaults): held-out {o['heldout']['accuracy']:.3f} {o['heldout']['wilson95']} on {len(held)}")
    precision = model.mixed_precision
    del model
    result["equal"] = run_equal(args, tok, train, held, train_f, held_f, precision)
    for side in ("ours", "trl"):
        if side in result["equal"]:
            e = result["equal"][side]
            log(f"equal settings, {side}: lr {e['best_lr']:g}, held-out {e['heldout']['accuracy']:.3f} "
                f"{e['heldout']['wilson95']}")
    result["total_s"] = time.time() - start
    _common.write_result(result, args.out, command=_common.command_line(__file__, argv))
    print(json.dumps({k: result[k] for k in ("equal",) if k in result}, indent=1, default=str)[:3000])
    return result


if __name__ == "__main__":
    main()
