"""Does a teacher behind an API help the student (issue 25)? The same rounds of rejection-sampling
distillation + DPO on the bundled two-digit additions, with and without an API model's traces.

    rlhf run --config configs/demo.yaml --out runs/demo            # the teacher: the demo's trained policy
    python benchmarks/teacher_traces.py --teacher runs/demo        # writes benchmarks/results/teacher_traces.json
    python benchmarks/teacher_traces.py --quick --student TINY --teacher TINY2   # smoke run, tiny sizes

The teacher (``--teacher``: a model directory, run checkpoint or run directory) is served by
``rlhf serve-model`` in a process of its own on loopback, exactly as any OpenAI-compatible endpoint
would be (``logprobs: true``; the bounded queue answers 503 beyond 8 requests, which the client
retries). Both arms run ``configs/teacher.yaml`` (the base model as the student, ``sft.warmup_rounds``
rounds of SFT on the verified traces, then DPO best-verified vs wrong; same seed, same prompts):

- ``teacher``: each prompt gets K = 4 student traces and M = 4 teacher traces;
- ``no_teacher``: ``rollout.teacher`` removed: the student's own K = 4 traces only (RFT + online DPO).

Reported: held-out strict accuracy before (v0, the same base model in both arms) and after each arm,
with Wilson 95 % intervals and exact McNemar tests against v0 and between the arms (Newcombe's
interval for the paired difference), the teacher's requests, retries and tokens (its ``usage``),
the teacher traces trained on, ``ratios`` (after / before accuracy per arm; teacher arm / no-teacher
arm after), the processor and the load (``_common.write_result``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FULL = {"rounds": 4, "rollout.prompts_per_round": 16, "tasks.max_heldout": 128}
QUICK = {"rounds": 2, "sft.warmup_rounds": 1, "rollout.prompts_per_round": 2, "rollout.num_generations": 2,
         "rollout.max_new_tokens": 8, "rollout.teacher.num_generations": 2, "rollout.teacher.timeout_s": 60,
         "tasks.max_heldout": 4, "eval.max_new_tokens": 8, "eval.kl_samples": 2,
         "eval.batch_size": 8, "optim.lr": 1e-3, "optim.micro_batch_size": 8, "model.mixed_precision": "no"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_teacher(model: str, name: str, log: Path) -> tuple[subprocess.Popen, str]:
    """``rlhf serve-model --model MODEL --name NAME`` on a free loopback port; waits (at most 10 min)
    until ``GET /v1/models`` answers. Returns the process and the base URL."""
    port = _free_port()
    cmd = [sys.executable, "-m", "rlhf_workbench.cli", "serve-model", "--model", model, "--name", name,
           "--port", str(port), "--max-tokens", "512"]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve-model exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(url + "/models", timeout=5, trust_env=False).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(1)
    proc.terminate()
    raise RuntimeError(f"serve-model did not answer within 10 minutes; see {log}")


def run_arm(name: str, overrides: dict, work: Path) -> dict:
    """Run one arm from scratch into ``work/<name>``: its summary, per-round metrics and held-out outcomes."""
    from rich.console import Console

    from rlhf_workbench.config import load_config
    from rlhf_workbench.run.loop import run
    from rlhf_workbench.store import Store

    cfg = load_config(ROOT / "configs" / "teacher.yaml", overrides)
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    summary = run(cfg, out, Console())
    metrics = Store(run_dir=out).metrics()
    keep = ("train/acceptance_rate", "train/teacher/acceptance_rate", "train/teacher_in_batch", "train/pairs",
            "train/sft_traces", "train/loss", "train/teacher/requests", "train/teacher/retries", "time/round_s")
    rounds = {r: {k: v for k in keep for rr, v in metrics.get(k, []) if rr == r} for r in range(1, cfg.rounds + 1)}
    final = json.loads((out / "eval" / f"v{cfg.rounds}.json").read_text())
    v0 = json.loads((out / "eval" / "v0.json").read_text())
    return {"summary": summary, "loop_seconds": round(time.time() - t0, 1), "rounds": rounds,
            "task_ids": final["task_ids"], "correct": final["correct"], "v0_correct": v0["correct"],
            "config": cfg.model_dump(mode="json")}


def _accuracy(correct: list[bool]) -> dict:
    from rlhf_workbench.stats import wilson_interval

    n, k = len(correct), sum(correct)
    return {"accuracy": k / n if n else 0.0, "correct": k, "n": n, "ci95": list(wilson_interval(k, n))}


def _ratios(v0: float, teacher: float, plain: float) -> dict:
    """Positive, finite ratios only (a zero denominator leaves its key out)."""
    pairs = {"after_over_before/teacher": (teacher, v0), "after_over_before/no_teacher": (plain, v0),
             "teacher_over_no_teacher": (teacher, plain)}
    return {k: a / b for k, (a, b) in pairs.items() if a > 0 and b > 0}


def compare(arms: dict) -> dict:
    """The result's comparison block from the two arms' outcomes."""
    from rlhf_workbench.stats import mcnemar_exact, newcombe_paired_diff_ci

    t, p = arms["teacher"], arms["no_teacher"]
    assert t["task_ids"] == p["task_ids"] and t["v0_correct"] == p["v0_correct"], "the arms evaluated differently"
    v0, acc_t, acc_p = _accuracy(t["v0_correct"]), _accuracy(t["correct"]), _accuracy(p["correct"])
    return {
        "v0": v0,
        "teacher": {**acc_t, "vs_v0": mcnemar_exact(t["v0_correct"], t["correct"]), "rounds": t["rounds"],
                    "loop_seconds": t["loop_seconds"], "teacher_usage": t["summary"].get("teacher_usage", {})},
        "no_teacher": {**acc_p, "vs_v0": mcnemar_exact(p["v0_correct"], p["correct"]), "rounds": p["rounds"],
                       "loop_seconds": p["loop_seconds"]},
        "difference_teacher_minus_no_teacher": {
            "accuracy": acc_t["accuracy"] - acc_p["accuracy"],
            "ci95_newcombe": list(newcombe_paired_diff_ci(p["correct"], t["correct"])),
            "mcnemar": mcnemar_exact(p["correct"], t["correct"])},
        "ratios": _ratios(v0["accuracy"], acc_t["accuracy"], acc_p["accuracy"]),
    }


def main(argv: list[str] | None = None) -> dict:
    """Run both arms against a served teacher and write the result file; returns the result."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="the teacher model: a run directory, checkpoint or model dir")
    ap.add_argument("--student", default=None, help="the student's base model (default: configs/teacher.yaml's)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per arm (default 4; --quick 2)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of the whole pipeline")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-teacher", help="run directories")
    ap.add_argument("--out", type=Path, default=None, help="result file (default benchmarks/results/teacher_traces.json; "
                    "--quick: <work>/teacher_traces_quick.json)")
    args = ap.parse_args(argv)
    overrides = dict(QUICK if args.quick else FULL)
    if args.rounds is not None:
        overrides["rounds"] = args.rounds
    if args.student:
        overrides["model.name"] = args.student
    busy = _common.warn_if_busy()
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    proc, url = start_teacher(args.teacher, "teacher", args.work / "serve-model.log")
    try:
        teacher_overrides = {**overrides, "rollout.teacher.base_url": url, "rollout.teacher.model": "teacher"}
        arms = {"teacher": run_arm("teacher", teacher_overrides, args.work),
                "no_teacher": run_arm("no_teacher", {**overrides, "rollout.teacher": None}, args.work)}
    finally:
        proc.terminate()
        proc.wait(30)
    result = {
        "settings": {"teacher": os.path.basename(os.path.normpath(args.teacher)), "quick": args.quick,
                     "overrides": {k: v for k, v in overrides.items()}},
        **compare(arms),
        "configs": {k: a["config"] for k, a in arms.items()},
        "wall_seconds": round(time.time() - t0, 1), "machine_busy_at_start": busy,
    }
    out = args.out or (args.work / "teacher_traces_quick.json" if args.quick
                       else ROOT / "benchmarks" / "results" / "teacher_traces.json")
    path = _common.write_result(result, out)
    d, usage = result["difference_teacher_minus_no_teacher"], result["teacher"]["teacher_usage"]
    print(f"wrote {os.path.relpath(path, ROOT)}: v0 {result['v0']['accuracy']:.3f}, with teacher "
          f"{result['teacher']['accuracy']:.3f}, without {result['no_teacher']['accuracy']:.3f} (diff "
          f"{d['accuracy']:+.3f}, McNemar p = {d['mcnemar']['p_value']:.2g}); teacher: {usage.get('requests', 0)} "
          f"requests, {usage.get('prompt_tokens', 0)} + {usage.get('completion_tokens', 0)} tokens")
    return result


if __name__ == "__main__":
    main()
