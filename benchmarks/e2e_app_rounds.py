"""End to end through the web app: the real default model, `rlhf serve --with-worker`, and a
scripted expert that ranks traces only through the app's HTTP API (login, /next_item, /submit).

    python benchmarks/e2e_app_rounds.py --rounds 2 --out runs/e2e-app

The scripted expert prefers traces that give the requested `Answer:` line, then shorter ones
(ties share a rank) — a stand-in for a human's style preference over verified traces. It never
sees which traces are correct beyond what the page shows (only verified traces are rankable).
The worker trains on nothing but these rankings; the run's summary.json holds held-out accuracy
before and after. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from load_annotators import PASSWORD, HttpSession, free_port, wait_until_up  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def expert_ranks(completion_ids: list[int], texts: list[str]) -> dict[str, int]:
    """Dense ranks (0 best): an explicit answer line first, then fewer characters."""
    keys = [(0 if re.search(r"(?im)^\s*answer\s*:", t) else 1, len(t.strip())) for t in texts]
    levels = sorted(set(keys))
    return {str(cid): levels.index(k) for cid, k in zip(completion_ids, keys)}


def latest_version(db: Path) -> int:
    with sqlite3.connect(db) as c:
        row = c.execute("select max(id) from policy_versions").fetchone()
    return -1 if row[0] is None else int(row[0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "annotate.yaml")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "e2e-app")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--min-rankings", type=int, default=3)
    p.add_argument("--timeout", type=float, default=1500.0, help="give up after this many seconds")
    args = p.parse_args(argv)
    overrides = ["--set", f"rounds={args.rounds}", "--set", f"feedback.min_rankings={args.min_rankings}",
                 "--set", "tasks.max_heldout=128"]
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "GRADIO_ANALYTICS_ENABLED": "False"}
    subprocess.run(["rlhf", "user", "add", "expert1", "--role", "annotator", "--password", PASSWORD,
                    "--config", str(args.config), "--out", str(args.out), *overrides], check=True, env=env)
    port = free_port()
    log = args.out / "serve.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(["rlhf", "serve", "--config", str(args.config), "--out", str(args.out), "--port",
                                 str(port), "--with-worker", *overrides], stdout=fh, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    submitted, rounds_seen = 0, {}
    try:
        wait_until_up(url, proc, log, timeout=300)
        session = HttpSession(url, "expert1")
        while latest_version(args.out / "workbench.db") < args.rounds:
            if time.time() - t0 > args.timeout or proc.poll() is not None:
                raise RuntimeError(f"stopped early (server rc={proc.poll()}); see {log}")
            item = json.loads(session.call("next_item"))
            if not item:
                time.sleep(2.0)
                continue
            ranks = expert_ranks(item["completion_ids"], item["texts"])
            status = session.call("submit", item["rollout_id"], item["task_id"], json.dumps(ranks),
                                  "scripted expert: answer line first, then shorter", "[]", item["revision"], "[]")
            if str(status).startswith("ok"):
                submitted += 1
                rounds_seen[item["round"]] = rounds_seen.get(item["round"], 0) + 1
            print(f"round {item['round']} (policy v{item['policy_version']}) {item['task_id']}: {status}", flush=True)
        deadline = time.time() + 300  # the worker writes summary.json after its last round
        while not (args.out / "summary.json").exists() and time.time() < deadline:
            time.sleep(2.0)
        session.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    summary = json.loads((args.out / "summary.json").read_text())
    result = {"submitted_through_app": submitted, "per_round": rounds_seen, "wall_seconds": round(time.time() - t0, 1),
              "eval_before": summary["eval_before"], "eval_after": summary["eval_after"],
              "significance": summary["significance"], "rounds": summary["rounds"]}
    _common.write_result(result, _common.RESULTS / "e2e_app_rounds.json")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
