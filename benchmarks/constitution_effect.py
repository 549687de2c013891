"""What constitutional revision pairs change (issue 14): the same small online DPO run with and
without ``feedback.constitution``, on the default 135M model.

    python benchmarks/constitution_effect.py            # writes benchmarks/results/constitution_effect.json

Both arms run ``configs/demo.yaml``'s two-digit additions (strict verifier, its instruction) with
``algorithm: dpo`` (lr 5e-6, best_vs_wrong pairs), the same seed and so the same round-1 rollout;
sized for a shared 2-core CPU: ``--rounds`` rounds (default 2) of 8 prompts x K = 4 samples, 48 new
tokens, greedy held-out evaluation on the first 64 held-out additions before and after. The
constitution arm adds ``feedback.constitution: {path: bundled:medical, critic: policy}`` (the policy
critiques and revises up to 8 traces per round, 48 tokens each, temperature 0.7); a revision is
kept only if it verifies. Reported: held-out strict accuracy of each arm with Wilson 95 %
intervals, the paired difference (constitution - baseline) with Newcombe's interval and an exact
McNemar test, the constitution's per-round counts (revised, kept, trained), the pairs each arm
trained on, and every critique/revision with why it was or was not kept. The processor load at
the start is recorded: on a busy machine only the timings suffer.

    python benchmarks/constitution_effect.py --critic-only runs/bench-constitution-baseline

runs only the constitution's step on round 1 of an existing baseline run (a copy of its database):
the stored rollout, rankings and v0 policy are exactly what the constitution arm's round 1 sees
(same seed), so the revisions it keeps are the pairs that arm would add. Where it keeps none, that
arm's round-1 DPO batch equals the baseline's and so does its policy (result: ``<name>_critic_only.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = {
    "algorithm": "dpo", "optim.lr": 5e-6, "optim.micro_batch_size": 8, "dpo.pairing": "best_vs_wrong",
    "rollout.prompts_per_round": 8, "rollout.num_generations": 4, "rollout.max_new_tokens": 48,
    "tasks.max_heldout": 64, "eval.every_round": False, "eval.kl_samples": 8, "keep_checkpoints": 1,
}
CONSTITUTION = {"path": "bundled:medical", "critic": "policy", "max_revisions_per_round": 8,
                "max_new_tokens": 48, "temperature": 0.7}


def _arm(name: str, rounds: int, constitution: bool) -> dict:
    """Run one arm from scratch into ``runs/bench-constitution-<name>``; its held-out outcomes and counts."""
    from rich.console import Console

    from rlhf_workbench.config import load_config
    from rlhf_workbench.run.loop import run
    from rlhf_workbench.store import Store

    overrides = {**OVERRIDES, "rounds": rounds}
    if constitution:
        overrides["feedback.constitution"] = CONSTITUTION
    cfg = load_config(ROOT / "configs" / "demo.yaml", overrides)
    out = ROOT / "runs" / f"bench-constitution-{name}"
    if out.exists():
        shutil.rmtree(out)
    t0 = time.time()
    summary = run(cfg, out, Console())
    wall = time.time() - t0
    store = Store(run_dir=out)
    metrics = store.metrics()
    per_round = {r: {} for r in range(1, rounds + 1)}
    for key in ("train/pairs", "train/acceptance_rate", "train/loss", "train/constitution/revisions",
                "train/constitution/kept", "train/constitution/trained", "time/round_s"):
        for r, v in metrics.get(key, []):
            per_round[r][key] = v
    final = json.loads((out / "eval" / f"v{rounds}.json").read_text())
    v0 = json.loads((out / "eval" / "v0.json").read_text())
    return {"summary": summary, "loop_seconds": round(wall, 1), "rounds": per_round,
            "task_ids": final["task_ids"], "correct": final["correct"], "v0_correct": v0["correct"],
            "revisions": {r: store.get_meta(f"constitution/round_{r}") for r in range(1, rounds + 1)}
            if constitution else None,
            "config": cfg.model_dump(mode="json")}


def critic_only(run_dir: Path, name: str) -> None:
    """The constitution's round-1 step on a copy of ``run_dir``'s database; writes ``<name>_critic_only.json``."""
    from dataclasses import replace

    from rlhf_workbench.config import load_config
    from rlhf_workbench.feedback.constitution import PolicyCritic, critique_and_revise, load_constitution
    from rlhf_workbench.model.loading import load_policy
    from rlhf_workbench.store import Store
    from rlhf_workbench.tasks.loading import load_tasks

    busy, load = _common.warn_if_busy(), list(os.getloadavg())
    cfg = load_config(ROOT / "configs" / "demo.yaml", {**OVERRIDES, "feedback.constitution": CONSTITUTION})
    work = ROOT / "runs" / "bench-constitution-critic-only"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copy(run_dir / "workbench.db", work / "workbench.db")
    store = Store(run_dir=work)
    baseline = {k: v for k, v in store.metrics().items() if k.startswith("train/")}
    tasks = {t.id: replace(t, instruction=cfg.tasks.instruction) for t in load_tasks(cfg.tasks.path)}
    pair = load_policy(cfg.model)  # v0: the base model, the policy that sampled round 1
    c = cfg.feedback.constitution
    critic = PolicyCritic(pair.policy, pair.tokenizer, c.temperature, cfg.model.mixed_precision,
                          seed=cfg.seed * 1000 + 1, batch_size=cfg.rollout.batch_size)
    t0 = time.time()
    revs = critique_and_revise(store, store.rollout_for_round(1), tasks, load_constitution(c.path), critic, pair.policy,
                               pair.tokenizer, c.max_revisions_per_round, c.max_new_tokens, None, None, cfg.seed,
                               cfg.model.mixed_precision)
    from dataclasses import asdict

    result = {"command": f"python benchmarks/constitution_effect.py --critic-only {os.path.relpath(run_dir, ROOT)}",
              "baseline_round_1": baseline, "revised": len(revs), "kept": sum(r.kept for r in revs),
              "revisions": [asdict(r) for r in revs], "critic_seconds": round(time.time() - t0, 1),
              "constitution": CONSTITUTION, "load_average_at_start": load, "machine_was_busy": busy}
    path = _common.write_result(result, ROOT / "benchmarks" / "results" / f"{name}_critic_only.json")
    print(f"wrote {os.path.relpath(path, ROOT)}: kept {result['kept']} of {result['revised']} revisions")


def main() -> None:
    """Run both arms (or, with ``--critic-only``, the constitution step alone) and write the result file."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--name", default="constitution_effect", help="result file benchmarks/results/<name>.json")
    ap.add_argument("--critic-only", type=Path, default=None, help="a baseline run directory (see above)")
    args = ap.parse_args()
    if args.critic_only is not None:
        return critic_only(args.critic_only.resolve(), args.name)

    from rlhf_workbench.stats import mcnemar_exact, newcombe_paired_diff_ci, wilson_interval

    busy = _common.warn_if_busy()
    load = list(os.getloadavg())
    t0 = time.time()
    arms = {"baseline": _arm("baseline", args.rounds, False), "constitution": _arm("constitution", args.rounds, True)}
    base, const = arms["baseline"], arms["constitution"]
    assert base["task_ids"] == const["task_ids"], "the arms evaluated different held-out tasks"
    n = len(base["correct"])

    def acc(correct):
        k = sum(correct)
        lo, hi = wilson_interval(k, n)
        return {"accuracy": k / n, "correct": k, "n": n, "ci95": [lo, hi]}

    revs = [r for rnd in (const["revisions"] or {}).values() for r in (rnd or [])]
    result = {
        "command": "python benchmarks/constitution_effect.py" + (f" --rounds {args.rounds}" if args.rounds != 2 else ""),
        "v0": acc(base["v0_correct"]),
        "baseline": {**acc(base["correct"]), "rounds": base["rounds"], "loop_seconds": base["loop_seconds"]},
        "constitution": {**acc(const["correct"]), "rounds": const["rounds"], "loop_seconds": const["loop_seconds"],
                         "revised": len(revs), "kept": sum(bool(r["kept"]) for r in revs)},
        "difference_constitution_minus_baseline": {
            "accuracy": (sum(const["correct"]) - sum(base["correct"])) / n,
            "ci95_newcombe": list(newcombe_paired_diff_ci(base["correct"], const["correct"])),
            "mcnemar": mcnemar_exact(base["correct"], const["correct"])},
        "baseline_vs_v0": mcnemar_exact(base["v0_correct"], base["correct"]),
        "constitution_vs_v0": mcnemar_exact(const["v0_correct"], const["correct"]),
        "revisions": revs,
        "configs": {"baseline": base["config"], "constitution": const["config"]},
        "wall_seconds": round(time.time() - t0, 1),
        "load_average_at_start": load,
        "machine_was_busy": busy,
    }
    path = _common.write_result(result, ROOT / "benchmarks" / "results" / f"{args.name}.json")
    d = result["difference_constitution_minus_baseline"]
    print(f"wrote {os.path.relpath(path, ROOT)}: v0 {result['v0']['accuracy']:.3f}, baseline "
          f"{result['baseline']['accuracy']:.3f}, constitution {result['constitution']['accuracy']:.3f} "
          f"(diff {d['accuracy']:+.3f}, 95 % CI {d['ci95_newcombe'][0]:+.3f}..{d['ci95_newcombe'][1]:+.3f}, "
          f"McNemar p = {d['mcnemar']['p_value']:.2g}); revisions kept {result['constitution']['kept']}/"
          f"{result['constitution']['revised']}")


if __name__ == "__main__":
    main()
