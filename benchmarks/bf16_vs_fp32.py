"""Is bf16 numerically safe for training here, and what does it do to the learning rate?

The project's ``mixed_precision: bf16`` is ``torch.autocast(bfloat16)`` over fp32 weights and
fp32 AdamW state (the loss, log-softmax and optimizer stay fp32). This benchmark runs DPO
(``update.dpo_update``, sigmoid loss, β 0.1, AdamW, clip 1.0) on HH-RLHF harmless-base pairs
from ``../shared/data`` with SmolLM2-135M twice from the same weights and the same batches, once
in fp32 and once under bf16 autocast, and reports:

  * step 1 on identical weights: the two losses (both ln 2 ≈ 0.6931 by construction, since
    policy = reference), the relative difference of the summed log-probs, and the cosine and
    norm ratio of the two gradients (bf16 / fp32) — is bf16 computing the same update?
  * over ``--steps`` steps: losses, reward margins and grad norms per step for each precision;
    how far the policy has moved, as the relative parameter change ``‖θ − θ0‖ / ‖θ0‖`` and as the
    mean per-token KL(policy ‖ reference) on ``--eval-pairs`` held-out chosen answers (evaluated
    in fp32 for both, so only the training differs);
  * the same for fp32 at ``--fp32-lr-scale`` × the learning rate (how drift and KL scale with
    the learning rate), and for bf16 *weights* (``model.dtype: bf16``, no fp32 master copy:
    AdamW updates far below a bf16 ulp of the weight are rounded away or up to one ulp);
  * seconds per step for each (bf16 uses the CPU's AMX units).

    python benchmarks/bf16_vs_fp32.py                     # 8 steps of 4 pairs, lr 1e-5
    python benchmarks/bf16_vs_fp32.py --quick --model PATH

Writes ``benchmarks/results/bf16_vs_fp32.json``; ``ratios`` = bf16 autocast (and bf16 weights)
steps per second over fp32's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402


def _setup(model_path: str, mixed_precision: str, lr: float, seed: int, micro: int, dtype: str = "fp32"):
    import torch
    from accelerate import Accelerator

    from rlhf_workbench.config import DPOConfig, ModelConfig, OptimConfig, RunConfig
    from rlhf_workbench.model.loading import load_policy

    torch.manual_seed(seed)
    cfg = RunConfig(algorithm="dpo", model=ModelConfig(name=model_path, dtype=dtype, mixed_precision=mixed_precision),
                    optim=OptimConfig(lr=lr, weight_decay=0.0, max_grad_norm=1.0, steps_per_round=1,
                                      micro_batch_size=micro),
                    dpo=DPOConfig(beta=0.1, loss_type="sigmoid"), seed=seed)
    pair = load_policy(cfg.model)
    accelerator = Accelerator(mixed_precision="no", cpu=True)
    optimizer = torch.optim.AdamW([p for p in pair.policy.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    pair.train_module, optimizer = accelerator.prepare(pair.policy, optimizer)
    return cfg, pair, accelerator, optimizer


def _samples(rows):
    from rlhf_workbench.train.samples import Sample

    return [(Sample(r["prompt_ids"], r["chosen_ids"]), Sample(r["prompt_ids"], r["rejected_ids"])) for r in rows]


def first_step_check(spec: dict) -> dict:
    """Loss, summed log-probs and gradient of the first batch under fp32 and bf16 autocast, same weights."""
    import torch

    from rlhf_workbench.model.logprobs import packed_logps
    from rlhf_workbench.model.rollout import autocast

    torch.set_num_threads(spec["threads"])
    _, pair, _, _ = _setup(spec["model_path"], "no", spec["lr"], spec["seed"], 2 * spec["batch"])
    model, pad = pair.policy, pair.tokenizer.pad_token_id
    rows = spec["pairs"][: spec["batch"]]
    prompts = [r["prompt_ids"] for r in rows for _ in (0, 1)]
    comps = [c for r in rows for c in (r["chosen_ids"], r["rejected_ids"])]
    out = {}
    for name, mp in (("fp32", "no"), ("bf16", "bf16")):
        model.zero_grad()
        with autocast(mp):
            logps, cmask = packed_logps(model, prompts, comps, pad)
        seq = (logps * cmask).sum(-1)
        # the policy-side DPO loss gradient at policy = reference: -logsigmoid(β·(Δc − Δr)), Δ = 0
        margin = 0.1 * (seq[0::2] - seq[0::2].detach() - (seq[1::2] - seq[1::2].detach()))
        loss = -torch.nn.functional.logsigmoid(margin).mean()
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        out[name] = {"loss": loss.item(), "seq_logps": seq.detach().double(), "grad": grad.double()}
    g32, g16 = out["fp32"]["grad"], out["bf16"]["grad"]
    s32, s16 = out["fp32"]["seq_logps"], out["bf16"]["seq_logps"]
    return {"loss_fp32": out["fp32"]["loss"], "loss_bf16": out["bf16"]["loss"],
            "seq_logps_max_rel_diff": ((s16 - s32).abs() / s32.abs()).max().item(),
            "seq_logps_mean_abs_diff_nats": (s16 - s32).abs().mean().item(),
            "grad_cosine": torch.nn.functional.cosine_similarity(g32, g16, dim=0).item(),
            "grad_norm_ratio_bf16_over_fp32": (g16.norm() / g32.norm()).item()}


def train(spec: dict) -> dict:
    """``spec["steps"]`` DPO steps at ``spec["mixed_precision"]``; drift and held-out KL after."""
    import torch

    from rlhf_workbench.model.logprobs import packed_logps
    from rlhf_workbench.train.dpo import dpo_update

    torch.set_num_threads(spec["threads"])
    cfg, pair, accelerator, optimizer = _setup(spec["model_path"], spec["mixed_precision"], spec["lr"], spec["seed"],
                                               2 * spec["batch"], spec.get("dtype", "fp32"))
    theta0 = torch.cat([p.detach().float().flatten().clone() for p in pair.policy.parameters()])
    B, per_step, seconds = spec["batch"], [], []
    for s in range(spec["steps"]):
        batch = _samples(spec["pairs"][s * B: (s + 1) * B])
        t0 = time.perf_counter()
        m = dpo_update(pair, optimizer, accelerator, batch, cfg)
        seconds.append(time.perf_counter() - t0)
        per_step.append({k: m[k] for k in ("loss", "rewards/margins", "rewards/accuracies", "grad_norm")})
    theta = torch.cat([p.detach().float().flatten() for p in pair.policy.parameters()])
    held = spec["eval_pairs"]
    prompts, comps = [r["prompt_ids"] for r in held], [r["chosen_ids"] for r in held]
    pad = pair.tokenizer.pad_token_id
    with torch.no_grad():  # evaluation without autocast (in the weights' own dtype)
        pol, cmask = packed_logps(pair.policy, prompts, comps, pad)
        with pair.reference_context():
            ref, _ = packed_logps(pair.ref_model, prompts, comps, pad)
    # KL estimate on the reference-free held-out answers: mean per-token log-ratio log π/π_ref
    # would be signed; use the k3 estimator (Schulman 2020), as GRPO's kl metric.
    d = (ref - pol) * cmask
    k3 = ((torch.exp(d) - d - 1) * cmask).sum() / cmask.sum()
    return {"mixed_precision": spec["mixed_precision"], "dtype": spec.get("dtype", "fp32"), "lr": spec["lr"],
            "per_step": per_step,
            "seconds_per_step": sum(seconds[1:]) / max(1, len(seconds) - 1),
            "param_rel_change": ((theta - theta0).norm() / theta0.norm()).item(),
            "heldout_kl_k3_per_token": k3.item(),
            "heldout_chosen_logratio_per_token": (((pol - ref) * cmask).sum() / cmask.sum()).item()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default=str(_common.SHARED_DATA))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4, help="pairs per step")
    ap.add_argument("--eval-pairs", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--fp32-lr-scale", type=float, default=3.0, help="extra fp32 run at this multiple of --lr")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 steps of 2 pairs, 4 eval pairs, length 96")
    ap.add_argument("--out", default=str(_common.RESULTS / "bf16_vs_fp32.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.batch, args.eval_pairs, args.max_length = 2, 2, 4, 96
    busy = _common.warn_if_busy()
    from train_throughput import dpo_pairs

    from rlhf_workbench.model.loading import load_tokenizer, resolve_model_path

    path = resolve_model_path(args.model)
    tok = load_tokenizer(path)
    n_train = args.steps * args.batch
    pairs, _ = dpo_pairs(tok, "hh", Path(args.data_dir), n_train + args.eval_pairs, args.max_length)
    spec = {"model_path": path, "threads": args.threads, "seed": args.seed, "lr": args.lr, "batch": args.batch,
            "steps": args.steps, "pairs": pairs[:n_train], "eval_pairs": pairs[n_train:]}
    check = _common.run_isolated(first_step_check, spec)
    runs = {}
    for name, mp, lr, dtype in (("fp32", "no", args.lr, "fp32"), ("bf16 autocast", "bf16", args.lr, "fp32"),
                                (f"fp32 lr×{args.fp32_lr_scale:g}", "no", args.lr * args.fp32_lr_scale, "fp32"),
                                ("bf16 weights", "no", args.lr, "bf16")):
        runs[name] = _common.run_isolated(train, {**spec, "mixed_precision": mp, "lr": lr, "dtype": dtype})
        print(f"{name}: done", flush=True)
    rows = [[name, f"{r['lr']:.1e}", r["per_step"][0]["loss"], r["per_step"][-1]["loss"],
             r["per_step"][-1]["rewards/margins"], r["param_rel_change"], r["heldout_kl_k3_per_token"],
             r["seconds_per_step"]] for name, r in runs.items()]
    _common.print_table(f"DPO on HH-RLHF, {args.steps} steps × {args.batch} pairs ({args.threads} threads)",
                        ["run", "lr", "loss step 1", "loss last", "margin last", "‖Δθ‖/‖θ0‖", "held-out KL/token",
                         "s/step"], rows)
    print(f"first step, same weights: loss fp32 {check['loss_fp32']:.6f} bf16 {check['loss_bf16']:.6f}; "
          f"summed logps max rel diff {check['seq_logps_max_rel_diff']:.2e}; gradient cosine "
          f"{check['grad_cosine']:.4f}, norm ratio bf16/fp32 {check['grad_norm_ratio_bf16_over_fp32']:.3f}")
    base = runs["fp32"]
    result = {"settings": {k: v for k, v in vars(args).items() if k != "out"},
              "device": _common.device_info(args.threads), "machine_busy_at_start": busy,
              "first_step": check, "runs": runs,
              "drift_ratio_bf16_over_fp32": runs["bf16 autocast"]["param_rel_change"] / base["param_rel_change"],
              "kl_ratio_bf16_over_fp32": _common.finite_ratio(runs["bf16 autocast"]["heldout_kl_k3_per_token"],
                                                              base["heldout_kl_k3_per_token"]),
              "drift_ratio_bf16_weights_over_fp32": runs["bf16 weights"]["param_rel_change"] / base["param_rel_change"],
              "ratios": {"bf16/steps_per_s": _common.finite_ratio(base["seconds_per_step"],
                                                                  runs["bf16 autocast"]["seconds_per_step"]),
                         "bf16_weights/steps_per_s": _common.finite_ratio(base["seconds_per_step"],
                                                                          runs["bf16 weights"]["seconds_per_step"])}}
    _common.write_result(result, args.out)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
