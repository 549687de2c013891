"""Reward model on Anthropic HH-RLHF (harmless-base): ours vs TRL's RewardTrainer.

Both start from the same weights (bundled SmolLM2-135M backbone, scalar head initialised
under the same seed), see the same pairs in TRL's text format (``prompt + completion + eos``),
with the same learning rate (constant), batch size, epochs, max length, AdamW without weight
decay and gradient clipping at 1.0, fp32 on CPU. Pairs longer than ``max_length`` tokens are
dropped beforehand (TRL drops them too), so no sequence is truncated. Held-out pairwise
accuracy is measured on the next ``--eval`` pairs of the same file with the same function.

Only the test split of harmless-base is available in the shared data, so train and held-out
pairs are disjoint slices of that file.

    python benchmarks/reward_model_hh.py --train 256 --eval 256
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

if str(Path(__file__).resolve().parent) not in sys.path:  # for `import _common`
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

from rlhf_workbench.reward_model import encode_texts, load_preference_file, load_reward_model, pairwise_accuracy, \
    train_reward_model

DEFAULT_DATA = Path(os.environ.get("RLHF_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) \
    / "hh-rlhf" / "harmless-base-test.jsonl.gz"


def fits(tokenizer, pairs, max_length):
    """Pairs whose chosen and rejected texts (with eos) both fit in ``max_length`` tokens."""
    prompts = [p.prompt for p in pairs]
    c = encode_texts(tokenizer, prompts, [p.chosen for p in pairs])
    r = encode_texts(tokenizer, prompts, [p.rejected for p in pairs])
    return [p for p, a, b in zip(pairs, c, r) if len(a) <= max_length and len(b) <= max_length]


def fresh_model(args):
    torch.manual_seed(args.seed)
    return load_reward_model(args.model, torch.bfloat16 if args.bf16 else torch.float32)


def run_trl(args, train, held):
    import datasets
    import trl

    datasets.disable_progress_bars()
    model, tok = fresh_model(args)
    ds = datasets.Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in train])
    with tempfile.TemporaryDirectory() as out:
        cfg = trl.RewardConfig(
            output_dir=out, learning_rate=args.lr, per_device_train_batch_size=args.batch_size,
            num_train_epochs=args.epochs, max_length=args.max_length, lr_scheduler_type="constant",
            weight_decay=0.0, max_grad_norm=1.0, bf16=args.bf16, use_cpu=not torch.cuda.is_available(),
            report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=args.seed,
            gradient_checkpointing=False, dataloader_drop_last=False,
        )
        trainer = trl.RewardTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
        assert len(trainer.train_dataset) == len(train), "TRL dropped pairs that should fit"
        t0 = time.time()
        trainer.train()
        train_s = time.time() - t0
    logs = [h for h in trainer.state.log_history if "loss" in h]
    acc = pairwise_accuracy(trainer.model, tok, held, args.batch_size, args.max_length)
    return {"heldout_accuracy": acc, "train_s": train_s, "steps": len(logs),
            "first_loss": logs[0]["loss"] if logs else None, "last_loss": logs[-1]["loss"] if logs else None,
            "mean_train_accuracy": sum(h.get("accuracy", 0) for h in logs) / max(1, len(logs))}


def run_ours(args, train, held):
    model, tok = fresh_model(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    t0 = time.time()
    metrics = train_reward_model(model, tok, train, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                                 max_length=args.max_length, seed=args.seed)
    train_s = time.time() - t0
    acc = pairwise_accuracy(model, tok, held, args.batch_size, args.max_length)
    return {"heldout_accuracy": acc, "train_s": train_s, "steps": len(metrics),
            "first_loss": metrics[0]["loss"], "last_loss": metrics[-1]["loss"],
            "mean_train_accuracy": sum(m["accuracy"] for m in metrics) / len(metrics)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--train", type=int, default=256)
    ap.add_argument("--eval", type=int, default=256)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "reward_model_hh.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    _, tok = fresh_model(args)
    need = args.train + args.eval
    pairs, offset = [], 0
    while len(pairs) < need:  # read in chunks until enough pairs fit in max_length
        chunk = load_preference_file(args.data, limit=4 * need, offset=offset)
        if not chunk:
            break
        offset += len(chunk)
        pairs += fits(tok, chunk, args.max_length)
    if len(pairs) < need:
        raise SystemExit(f"only {len(pairs)} pairs fit in {args.max_length} tokens; need {need}")
    train, held = pairs[: args.train], pairs[args.train: need]

    result = {"settings": {k: v for k, v in vars(args).items() if k != "out"},
              "device": "cuda" if torch.cuda.is_available() else f"cpu ({args.threads} threads)",
              "ours": run_ours(args, train, held)}
    print(f"ours: held-out pairwise accuracy {result['ours']['heldout_accuracy']:.3f} "
          f"({result['ours']['steps']} steps, {result['ours']['train_s']:.0f} s)", flush=True)
    if not args.skip_trl:
        result["trl"] = run_trl(args, train, held)
        print(f"trl:  held-out pairwise accuracy {result['trl']['heldout_accuracy']:.3f} "
              f"({result['trl']['steps']} steps, {result['trl']['train_s']:.0f} s)", flush=True)
    _common.write_result(result, args.out)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
