"""Online preference learning on HH-RLHF with a simulated expert: do the experts' rankings of the
policy's own samples teach it what they prefer? (issue 21)

    python benchmarks/online_preferences.py                         # the three arms, configs/hh.yaml
    python benchmarks/online_preferences.py --arms online           # one arm, merged into the result file
    python benchmarks/online_preferences.py --arms online --algorithm dpo --name online_dpo   # the algorithm table
    python benchmarks/online_preferences.py --quick --out runs/op-quick   # plumbing check, tiny sizes

Three arms on the same seed, prompts and rounds (``configs/hh.yaml``: SFT warm-up, 6 GRPO rounds of
16 prompts x 4 samples, 256 held-out prompts); the pipeline stages (warm-up, proxy reward model on
400 static pairs, gold reward model on 400 other pairs) are trained once, in the first arm's run
directory, and copied to the others, so every arm starts from the same models:

* **offline** (a): the pipeline as configured: every group is ranked by the proxy trained once on
  static pairs.
* **online** (b): the *expert* is the gold reward model acting as an annotator: this script logs
  into the app (``rlhf serve --with-worker``: the web app and the loop in one process) and ranks
  served items only through its HTTP API (``/next_item``, ``/submit``), at most ``--budget`` items
  a round (default 8: half the round's 16 groups, so at most half of what the oracle scores); the
  loop waits for them (``feedback.min_rankings``), and a reward model refit on every expert ranking
  so far ranks the groups no expert ranked (``feedback.refit``, :mod:`rlhf_workbench.feedback.online_rm`).
  Which items the expert gets: ``feedback.selection: random``. The policy's reward code never calls
  the gold model: it only reads the rankings the app stored.
* **oracle** (c): the policy optimises the gold model directly (every group ranked by it): the
  ceiling of this budget.

Reported per arm (``arms.<name>``): the gold win rate over the reference (the policy as round 1
starts) on the 256 held-out prompts with its 95 % bootstrap interval; the **length-controlled**
win rate (:func:`rlhf_workbench.stats.length_controlled_estimate`: a logistic regression of the gold
preference on the tanh-squashed token-length difference, read at equal length, as length-controlled
AlpacaEval); mean answer length (tokens) and the reference's; KL to the reference (nats/token);
the agreement of the rankings the policy trained on with the gold model on the policy's own
samples (pairs of one group's traces that the training ranking orders, the fraction the gold
model orders the same way; by ranking source); expert rankings used; the per-round gold reward
and length (``rounds``); wall time of the arm (``seconds``, the pipeline stages excluded;
``stage_seconds`` beside it). ``paired`` holds paired bootstrap intervals over the held-out
prompts of the win-rate differences between arms (same prompts, same reference answers).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from load_annotators import PASSWORD, HttpSession, free_port, wait_until_up  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("sft_model", "reward_model", "gold_reward_model")
ARMS = ("offline", "online", "oracle")
GOLD_SOURCE = '[{name: reward_model, path: "run:gold_reward_model", weight: 1.0}]'
QUICK = ["rounds=2", "tasks.heldout_size=16", "pipeline.sft_warmup.examples=8",
         "pipeline.reward_model.pairs=32", "pipeline.reward_model.eval_pairs=8",
         "pipeline.gold_reward_model.pairs=32", "pipeline.gold_reward_model.eval_pairs=8",
         "rollout.prompts_per_round=4", "rollout.max_new_tokens=16", "eval.max_new_tokens=16",
         "eval.round_subset=8", "eval.kl_samples=4"]


def arm_settings(arm: str, budget: int, algorithm: str | None) -> list[str]:
    """The ``--set`` overrides of one arm (on top of the shared config and ``--set`` options)."""
    sets = [f"algorithm={algorithm}"] if algorithm else []
    if arm == "oracle":
        sets.append(f"feedback.sources={GOLD_SOURCE}")
    elif arm == "online":
        sets += ["feedback.source=human", f"feedback.min_rankings={budget}", "feedback.selection=random",
                 "feedback.poll_seconds=0.5", "feedback.refit={path: run:reward_model}"]
    return sets


def share_stages(src: Path, dst: Path) -> None:
    """Copy the finished pipeline stages of run ``src`` into run ``dst`` (skipped there on start)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in STAGES:
        if (src / name / "stage.json").exists() and not (dst / name).exists():
            shutil.copytree(src / name, dst / name)


def latest_version(db: Path) -> int:
    """The newest published policy version in the run's SQLite database (-1 before any)."""
    if not db.exists():
        return -1
    with sqlite3.connect(db) as c:
        try:
            row = c.execute("select max(id) from policy_versions").fetchone()
        except sqlite3.OperationalError:
            return -1
    return -1 if row[0] is None else int(row[0])


class GoldExpert:
    """The simulated expert: ranks an item's traces by the gold reward model's scores (dense ranks,
    0 best) through the app's HTTP API, at most ``budget`` items a round. It reads the prompts from
    the run's database (the conversation a human expert sees on the page)."""

    def __init__(self, run: Path, budget: int):
        from rlhf_workbench.evaluation.scoring import load_scorer

        self.run, self.budget, self.done = run, budget, {}
        self.score, _ = load_scorer(str(run / "gold_reward_model"))
        self.tasks = None

    def ranks(self, task_id: str, completion_ids: list[int], texts: list[str]) -> dict[str, int]:
        """Dense ranks of the traces under the gold model (0 best)."""
        if self.tasks is None:
            from rlhf_workbench.store import Store

            self.tasks = {t.id: t for t in Store(run_dir=self.run).tasks("train")}
        scores = [round(s, 6) for s in self.score([self.tasks[task_id]] * len(texts), texts)]
        levels = sorted(set(scores), reverse=True)
        return {str(c): levels.index(s) for c, s in zip(completion_ids, scores)}

    def work(self, url: str, rounds: int, proc, deadline: float) -> int:
        """Rank until the run publishes version ``rounds``; returns the rankings submitted."""
        session = HttpSession(url, "expert")
        try:
            while latest_version(self.run / "workbench.db") < rounds:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"online arm stopped early (server rc={proc.poll()}); see {self.run}/serve.log")
                item = json.loads(session.call("next_item"))
                if not item or self.done.get(item["round"], 0) >= self.budget:
                    time.sleep(1.0)
                    continue
                ranks = self.ranks(item["task_id"], item["completion_ids"], item["texts"])
                status = session.call("submit", item["rollout_id"], item["task_id"], json.dumps(ranks),
                                      "simulated expert: the gold reward model", "[]", item["revision"], "[]")
                if str(status).startswith("ok"):
                    self.done[item["round"]] = self.done.get(item["round"], 0) + 1
        finally:
            session.close()
        return sum(self.done.values())


def run_arm(arm: str, run: Path, config: Path, sets: list[str], budget: int, rounds: int, timeout: float) -> dict:
    """Run one arm from scratch into ``run`` (its stages already copied in when shared); returns
    ``{"seconds", "expert_submitted"}``."""
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "GRADIO_ANALYTICS_ENABLED": "False"}
    args = ["--config", str(config), "--out", str(run), *[x for s in sets for x in ("--set", s)]]
    t0 = time.time()
    if arm != "online":
        subprocess.run(["rlhf", "run", *args], check=True, env=env, timeout=timeout)
        return {"seconds": time.time() - t0, "expert_submitted": 0}
    subprocess.run(["rlhf", "user", "add", "expert", "--role", "annotator", "--password", PASSWORD, *args],
                   check=True, env=env)
    port = free_port()
    with open(run / "serve.log", "w") as log:
        proc = subprocess.Popen(["rlhf", "serve", "--port", str(port), "--with-worker", *args],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(url, proc, run / "serve.log", timeout=timeout)  # the stages run before the app is up
        while not (run / "gold_reward_model" / "stage.json").exists():
            time.sleep(2.0)
        submitted = GoldExpert(run, budget).work(url, rounds, proc, t0 + timeout)
        end = time.time() + 600  # the worker writes summary.json after its last round
        while not (run / "summary.json").exists() and time.time() < end and proc.poll() is None:
            time.sleep(2.0)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {"seconds": time.time() - t0, "expert_submitted": submitted}


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run the arms, analyse them, write the result file."""
    from online_preferences_analysis import analyse_arm, paired  # noqa: E402 - this folder is on sys.path

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "hh.yaml")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "online-preferences")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--budget", type=int, default=8, help="expert rankings (items) per round in the online arm")
    p.add_argument("--algorithm", default=None, help="override the config's algorithm (grpo, ppo, dpo, ...)")
    p.add_argument("--name", default="online_preferences", help="result file benchmarks/results/<name>.json")
    p.add_argument("--set", dest="sets", action="append", default=[], help="extra config override for every arm")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a plumbing check, not a measurement")
    p.add_argument("--timeout", type=float, default=3 * 3600.0, help="give up on an arm after this many seconds")
    args = p.parse_args(argv)
    from rlhf_workbench.config import load_config

    shared = (QUICK if args.quick else []) + args.sets
    cfg = load_config(args.config, {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in shared)})
    out_file = _common.RESULTS / f"{args.name}.json"
    result = json.loads(out_file.read_text()) if out_file.exists() and not args.quick else {}
    result.setdefault("arms", {})
    result["settings"] = {"config": str(args.config.relative_to(ROOT)), "overrides": shared, "rounds": cfg.rounds,
                          "seed": cfg.seed, "algorithm": args.algorithm or cfg.algorithm, "budget": args.budget,
                          "prompts_per_round": cfg.rollout.prompts_per_round,
                          "num_generations": cfg.rollout.num_generations, "heldout": cfg.tasks.heldout_size}
    first = None
    for arm in args.arms:
        run = args.out / arm
        if run.exists():
            shutil.rmtree(run)
        donor = first or next((args.out / a for a in ARMS if (args.out / a / "gold_reward_model").exists()), None)
        if donor is not None:
            share_stages(donor, run)
        sets = shared + arm_settings(arm, args.budget, args.algorithm)
        info = run_arm(arm, run, args.config, sets, args.budget, cfg.rounds, args.timeout)
        first = first or run
        result["arms"][arm] = {**analyse_arm(run, arm, cfg.rounds), **info, "overrides": sets,
                               "processor": _common.processor_info(), "command": _common.command_line()}
        print(json.dumps({k: v for k, v in result["arms"][arm].items() if not isinstance(v, (list, dict))}, indent=1))
    result["paired"] = paired(args.out, cfg.rounds)
    _common.write_result(result, out_file if not args.quick else args.out / f"{args.name}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
