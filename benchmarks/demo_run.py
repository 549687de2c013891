"""The main job as a benchmark: run a config from scratch and keep what it measured.

    python benchmarks/demo_run.py                                   # configs/demo.yaml
    python benchmarks/demo_run.py --config configs/ppo.yaml --name ppo

Runs ``rlhf run --config CONFIG`` into a fresh directory (``runs/bench-<name>``, removed first)
and writes ``benchmarks/results/<name>.json``: the run's ``summary.json`` (held-out strict and
lenient accuracy before and after, format rate, the exact McNemar tests on strict and on
lenient outcomes), each round's metrics from the database (held-out accuracy on the round
subset, acceptance, format rate, reward, loss, seconds), the loop's wall time, the processor
and the load average at the start (a busy machine slows the loop; timings are then not those
of a quiet machine). The README's demo numbers come from this file.
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
ROUND_METRICS = ("eval/accuracy", "eval/lenient_accuracy", "eval/format_rate", "train/acceptance_rate",
                 "train/lenient_acceptance_rate", "train/format_rate", "train/reward", "train/loss",
                 "time/rollout_s", "time/update_s", "time/round_s", "eval/reward_proxy", "eval/reward_gold",
                 "eval/win_rate", "eval/win_rate_ci_low", "eval/win_rate_ci_high", "eval/reward_gold_reference",
                 "eval/kl",
                 "eval/completion_length")


def main() -> None:
    """Parse the arguments, run the loop, write the result file."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--name", default="demo", help="result file benchmarks/results/<name>.json")
    ap.add_argument("--set", action="append", default=[], help="config override key=value (as rlhf run)")
    ap.add_argument("--out-dir", default=None, help="run directory (default runs/bench-<name>)")
    args = ap.parse_args()

    from rich.console import Console

    from rlhf_workbench.cli import _parse_overrides
    from rlhf_workbench.config import load_config
    from rlhf_workbench.run.loop import run
    from rlhf_workbench.store import Store

    cfg = load_config(args.config, _parse_overrides(args.set))
    out = Path(args.out_dir or ROOT / "runs" / f"bench-{args.name}")
    if out.exists():
        shutil.rmtree(out)
    busy = _common.warn_if_busy()
    load = list(os.getloadavg())
    t0 = time.time()
    summary = run(cfg, out, Console())
    wall = time.time() - t0
    metrics = Store(run_dir=out).metrics()
    rounds = {}
    for name in ROUND_METRICS:
        for r, v in metrics.get(name, []):
            rounds.setdefault(r, {})[name] = v
    stages = {p.name: json.loads((p / "stage.json").read_text()) for p in sorted(out.iterdir())
              if (p / "stage.json").is_file()}  # the pipeline's stages (configs/hh.yaml)
    for st in stages.values():
        st.pop("task_ids", None)
    result = {
        "command": f"python benchmarks/demo_run.py --config {os.path.relpath(args.config, ROOT)} --name {args.name}"
                   + "".join(f" --set {s}" for s in args.set),
        "config": cfg.model_dump(mode="json"),
        "summary": summary,
        "loop_seconds": round(wall, 1),
        "rounds": [{"round": r, **rounds[r]} for r in sorted(rounds)],
        **({"stages": stages} if stages else {}),
        "load_average_at_start": load,
        "machine_was_busy": busy,
    }
    path = _common.write_result(result, ROOT / "benchmarks" / "results" / f"{args.name}.json")
    b, a = summary["eval_before"], summary["eval_after"]
    if "win_rate" in a:
        print(f"wrote {os.path.relpath(path, ROOT)}: gold win rate vs reference {a['win_rate']:.3f} "
              f"[{a['win_rate_ci_low']:.3f}, {a['win_rate_ci_high']:.3f}] (n = {a['n']}), loop {wall:.0f} s")
        return
    print(f"wrote {os.path.relpath(path, ROOT)}: strict {b['accuracy']:.3f} -> {a['accuracy']:.3f} "
          f"(p = {summary['significance']['p_value']:.2g}), lenient {b['lenient_accuracy']:.3f} -> "
          f"{a['lenient_accuracy']:.3f}, format {b['format_rate']:.3f} -> {a['format_rate']:.3f}, loop {wall:.0f} s")


if __name__ == "__main__":
    main()
