"""Reward model on Anthropic HH-RLHF (harmless-base): frozen backbone + cached features vs TRL's RewardTrainer.

Split (fixed): every usable pair of ``harmless-base-test.jsonl.gz`` (the only HH split in the
shared data; :func:`load_preference_file`), shuffled with ``random.Random(0)``; the first
``--heldout`` (463) are held out, the rest (1,849) train. Held-out pairs never enter training,
selection or the feature statistics.

Ours: SmolLM2-135M frozen (:mod:`rlhf_workbench.train.rm_features`), texts ``prompt + completion +
eos`` left-truncated to their final 128 tokens, bf16 autocast by the ``mixed_precision: auto``
rule, one no-grad forward per text; the hidden states of several layers are pooled in that one
pass so that a *selection study* (pooling last / mean / mean_last x layers) runs on an inner
split of the training pairs only (last 20 % of train as validation). The reported model is
the API default (``mean_last``, final layer, 30 head epochs, lr 3e-3 cosine, weight decay 0.1),
fixed before the held-out set was scored. Its held-out accuracy is computed from the cached
features and checked against the ordinary scoring path (``save_pretrained`` ->
``load_reward_model`` -> ``score_texts``) on a few held-out texts.

TRL (1.16) RewardTrainer at equal settings: the same backbone as ``AutoModelForSequenceClassification``
with every weight frozen but the score head, the same token ids (``chosen_ids``/``rejected_ids``,
the same final 128 tokens), bf16 when ours uses it, AdamW lr 3e-3 cosine, weight decay 0.1,
batch 8 pairs, one epoch (each epoch is a full forward pass over the texts, so several would
multiply its time); the pad token is set to ``<|endoftext|>`` so that its last-token pooling
reads the eos position (SmolLM2's pad is its eos, which would make it read the token before).
Its held-out accuracy is computed from our cached final-layer last-token features, which are the
exact input of its score head (checked against TRL's model on a few held-out pairs). If the time
budget (``--deadline``) would not let TRL finish on all training pairs, it gets the first
pairs that fit, recorded in the result.

    python benchmarks/reward_model_hh.py
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from datetime import datetime, timezone
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


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def split_pairs(path, heldout: int, seed: int = 0):
    """``(train, held)``: every usable pair shuffled with ``Random(seed)``; the first ``heldout`` held out."""
    pairs = load_preference_file(path)
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
                                    STUDY_LAYERS, POOLINGS)
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
    for n in sorted({s for s in (100, 200, 400, 800, 1200, args.trl_pairs_used or 0, n_train) if 0 < s <= n_train}):
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


def run_trl(args, tok, train, held, held_last, n_pairs, bf16):
    import datasets
    import trl

    datasets.disable_progress_bars()
    torch.manual_seed(args.seed)
    tok_trl = type(tok).from_pretrained(args.tok_dir)
    tok_trl.padding_side = "right"
    tok_trl.pad_token = "<|endoftext|>"
    model, _ = load_reward_model(args.model, tokenizer=tok_trl)
    model.config.pad_token_id = tok_trl.pad_token_id
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("score."))
    sub = train[:n_pairs]
    rows = rows_of(tok, sub, args.max_tokens)
    ds = datasets.Dataset.from_list([{"chosen_ids": rows[i], "rejected_ids": rows[len(sub) + i]}
                                     for i in range(len(sub))])
    with tempfile.TemporaryDirectory() as out:
        cfg = trl.RewardConfig(
            output_dir=out, learning_rate=HEAD["lr"], per_device_train_batch_size=8, num_train_epochs=1,
            max_length=None, lr_scheduler_type="cosine", weight_decay=HEAD["weight_decay"], max_grad_norm=1.0,
            bf16=bf16, use_cpu=not torch.cuda.is_available(), report_to="none", save_strategy="no",
            logging_steps=1, disable_tqdm=True, seed=args.seed, gradient_checkpointing=False,
            dataloader_drop_last=False, center_rewards_coefficient=None,
        )
        trainer = trl.RewardTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok_trl)
        t0 = time.time()
        trainer.train()
        train_s = time.time() - t0
    logs = [h for h in trainer.state.log_history if "loss" in h]
    w = trainer.model.score.weight.detach().float()
    with torch.no_grad():
        r_c, r_r = (held_last[0] @ w.T).squeeze(-1), (held_last[1] @ w.T).squeeze(-1)
    correct = int((r_c > r_r).sum())
    chk = held[: args.check_pairs]
    trainer.model.eval()
    r_model = score_texts(trainer.model, tok_trl, [p.prompt for p in chk], [p.chosen for p in chk],
                          max_length=args.max_tokens)
    diff = max(abs(a - b) for a, b in zip(r_model, r_c[: len(chk)].tolist()))
    return {"train_pairs": len(sub), "epochs": 1, "steps": len(logs), "train_s": train_s,
            "heldout": acc_record(correct, len(held)),
            "first_loss": logs[0]["loss"] if logs else None, "last_loss": logs[-1]["loss"] if logs else None,
            "path_check": {"texts": len(chk), "max_abs_reward_diff": diff, "reward_std": float(r_c.std()),
                           "what": "TRL's model (score_texts, bf16 autocast off) vs its score weight on our "
                                   "cached final-layer last-token features"},
            "settings": {"lr": HEAD["lr"], "schedule": "cosine", "weight_decay": HEAD["weight_decay"],
                         "batch_size": 8, "epochs": 1, "bf16": bf16, "trainable": "score head only",
                         "max_grad_norm": 1.0}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--heldout", type=int, default=463)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--feature-batch", type=int, default=16)
    ap.add_argument("--check-pairs", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--deadline", default=None, help="UTC HH:MM by which everything must be done (TRL gets "
                    "fewer pairs and our feature pass stops early if needed)")
    ap.add_argument("--cache-dir", default="/tmp/rm_bench_cache")
    ap.add_argument("--min-heldout", type=int, default=0, help="with --deadline: complete this many held-out "
                    "pairs before the training pairs")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "reward_model_hh.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    deadline = float("inf")
    if args.deadline:
        now = datetime.now(timezone.utc)
        hh, mm = map(int, args.deadline.split(":"))
        deadline = now.replace(hour=hh, minute=mm, second=0).timestamp()
    start = time.time()
    info = _common.device_info(args.threads)
    busy = _common.warn_if_busy()

    model, tok = load_reward_model(args.model, pooling="mean_last", layer=-1, max_tokens=args.max_tokens,
                                   mixed_precision="auto")
    from rlhf_workbench.model.loading import resolve_model_path
    args.tok_dir = resolve_model_path(args.model)
    train, held, n_all = split_pairs(args.data, args.heldout, args.seed)
    log(f"{n_all} usable pairs: {len(train)} train, {len(held)} held out; mixed precision {model.mixed_precision}")
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    tag = f"{args.model.replace('/', '_')}_{args.max_tokens}_{model.mixed_precision}"
    held_cache = FeatureCache(model, tok, rows_of(tok, held, args.max_tokens), cache / f"held_{tag}.pt",
                              args.feature_batch)
    train_cache = FeatureCache(model, tok, rows_of(tok, train, args.max_tokens), cache / f"train_{tag}.pt",
                               args.feature_batch)
    nh, nt = len(held), len(train)
    # priority: complete the held-out pairs begun, then train pairs (chosen, rejected interleaved)
    # until 75 % of the time left (TRL gets the rest), then the remaining held-out pairs
    begun = sorted({i % nh for i in held_cache.done()})[: args.min_heldout or None]
    held_cache.run([j for i in begun for j in (i, nh + i)], deadline)
    remaining = deadline - time.time() - 180
    feat_deadline = time.time() + (remaining if args.skip_trl else 0.75 * remaining)
    if args.min_heldout and len(complete_pairs(held_cache, nh)) < args.min_heldout:
        held_cache.run([j for i in range(args.min_heldout) for j in (i, nh + i)], feat_deadline)
    train_cache.run([j for i in range(nt) for j in (i, nt + i)], feat_deadline)
    held_cache.run([j for i in range(nh) for j in (i, nh + i)], feat_deadline)
    held_idx, train_idx = complete_pairs(held_cache, nh), complete_pairs(train_cache, nt)
    held = [held[i] for i in held_idx]
    train_pairs_all, train = train, [train[i] for i in train_idx]
    held_f = pair_split(held_cache.features(held_idx + [nh + i for i in held_idx]), len(held_idx))
    train_f = pair_split(train_cache.features(train_idx + [nt + i for i in train_idx]), len(train_idx))
    n_train = len(train_idx)
    rate = (held_cache.state["done"] + train_cache.state["done"]) / max(1e-9, held_cache.seconds + train_cache.seconds)
    train_s = train_cache.seconds * (2 * n_train) / max(1, train_cache.state["done"])
    held_s = held_cache.seconds
    log(f"features: {len(held_idx)} held-out pairs, {n_train} train pairs, {rate:.2f} texts/s")
    trl_n = None
    if n_train < 16 or len(held) < 16:
        raise SystemExit(f"only {n_train} train and {len(held)} held-out pairs featurized by the deadline; "
                         "rerun to resume from the cache")
    if not args.skip_trl:
        t_left = deadline - time.time() - 240
        trl_n = int(min(n_train, max(64, 0.5 * rate * t_left))) if deadline != float("inf") else n_train
        args.skip_trl = trl_n < 16
    args.trl_pairs_used = trl_n
    result = {"split": {"file": "hh-rlhf/harmless-base-test.jsonl.gz", "usable_pairs": n_all, "shuffle_seed": args.seed,
                        "heldout": "first %d after shuffling" % nh, "train": "the remaining %d" % nt,
                        "heldout_pairs_scored": len(held), "train_pairs_used": n_train,
                        "note": ("complete" if len(held) == nh and n_train == nt else
                                 "partial: the feature pass stopped at --deadline (CPU shared); rerun without "
                                 "--deadline to complete (features are cached in --cache-dir)")},
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "tok_dir")},
              "device": info, "busy_at_start": busy, "feature_rate_texts_per_s": rate,
              "heldout_feature_s": held_s}
    result["ours"] = run_ours(args, model, tok, train, held, held_f, train_f, n_train, train_s)
    o = result["ours"]
    log(f"ours: held-out {o['heldout']['accuracy']:.3f} {o['heldout']['wilson95']} on {len(held)}, "
        f"train {o['train_s']:.0f} s")
    if not args.skip_trl:
        del model
        result["trl"] = run_trl(args, tok, train, held, held_f[(-1, "last")], trl_n,
                                result["ours"]["config"]["mixed_precision"] == "bf16")
        t = result["trl"]
        note = "" if trl_n == nt else f" (only {trl_n} of {nt} train pairs fitted the time budget)"
        t["note"] = "TRL ran 1 epoch: each epoch is a full backbone forward over the texts" + note
        log(f"trl: held-out {t['heldout']['accuracy']:.3f} {t['heldout']['wilson95']}, train {t['train_s']:.0f} s")
    try:
        result["load_average_at_end"] = list(os.getloadavg())
    except OSError:
        pass
    result["total_s"] = time.time() - start
    _common.write_result(result, args.out)
    print(json.dumps({k: result[k] for k in ("ours",) if k in result}, indent=1, default=str)[:3000])
    return result


if __name__ == "__main__":
    main()
