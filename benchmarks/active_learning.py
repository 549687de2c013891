"""Active vs random item selection (issue 15): rankings an expert must give to teach a hidden preference.

    nice -n 5 python benchmarks/active_learning.py          # writes benchmarks/results/active_learning.json

A scripted expert with a *hidden preference* ranks verified traces only through the app's HTTP
API (login, /next_item, /submit), exactly as e2e_app_rounds.py does, while `rlhf serve
--with-worker` trains on nothing but those rankings (GRPO, reward = correct + ranking_weight *
rank reward). The same runs are made once with ``feedback.selection: random`` and once with
``uncertainty`` (rlhf_workbench.human.selection) for several seeds; a seed fixes the prompts of every
round and the sampling, so round 1's rollout is identical under both strategies and only the
items served (``--per-round`` of them a round) differ.

**Hidden preference** (:func:`prefers`): the expert wants the reply to end as a proper sentence,
with a full stop, then shorter replies. It is neither correctness nor the answer line: the strict
verifier accepts "The answer is 103." and "The answer is 103" alike, a wrong reply can end with a
full stop, and the expert only ever sees verified traces.

**Warm start**: the base model states a verifiable answer in ~2 % of samples, too few items to
rank, so every expert run starts from the demo's trained policy (``configs/demo.yaml``, 8 GRPO
rounds on the verifier plus a length bonus: 68 % strict held-out accuracy; the output of
``python benchmarks/demo_run.py``, ``runs/bench-demo/policy``, trained here when absent). That
policy learned to write "a + b = c\\nThe answer is c" with no full stop (127 of 128 held-out
replies), so the held-out score starts near 0 and the expert must teach the opposite of what the
length bonus taught; about one sampled trace in five still ends with a full stop, so items with
both kinds exist from round 1.

**Held-out score**: the fraction of the held-out prompts (``--heldout``, greedy decoding, the
run's own evaluation after every round: ``eval/v<N>.json``) whose reply ends with a full stop; correctness
is reported beside it. Curves: score against rankings given (submissions the worker consumed
up to that version), mean over seeds. ``ratios.rankings_to_target``: the rankings random
selection needs to first reach a target divided by those active selection needs (linear
interpolation on the seed-mean curves); the target is a held-out score of 0.5 (half the held-out
replies in the preferred style; the start is ~0), with 0.25 and 0.75 reported too. A strategy
that never reaches the target within its rankings is censored and the ratio is a bound. The interval is a percentile bootstrap over seeds (seeds resampled
jointly for both strategies: they share round 1); with 3 seeds it has few distinct resamples
and is indicative only. The paired test of the preference (exact McNemar, held-out prompt x seed,
before vs after) is reported under each strategy, also restricted to prompts answered correctly
both before and after (the preference learned separately from correctness).

Cost: 6 server runs of 3 rounds (8 prompts x 8 traces, 32 held-out greedy replies a round); on a quiet
2-core machine a round took 76-102 s (seed 2 in the committed result, 2 runs at once); on a loaded one
use --parallel to get through (see the result's note). Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from load_annotators import PASSWORD, HttpSession, free_port, wait_until_up  # noqa: E402

from rlhf_workbench.stats import mcnemar_exact  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("random", "uncertainty")
ENV = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "GRADIO_ANALYTICS_ENABLED": "False"}


def prefers(text: str) -> bool:
    """The hidden preference: the reply ends as a sentence, with a full stop (its last non-space
    character is "."), e.g. "12 + 30 = 42\\nThe answer is 42." rather than "... is 42"."""
    return text.rstrip().endswith(".")


def expert_ranks(completion_ids: list[int], texts: list[str]) -> dict[str, int]:
    """Dense ranks (0 best) of the verified traces: ending with a full stop first, then fewer characters."""
    keys = [(0 if prefers(t) else 1, len(t.strip())) for t in texts]
    levels = sorted(set(keys))
    return {str(cid): levels.index(k) for cid, k in zip(completion_ids, keys)}


def _rlhf(*args: str, log: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    out = open(log, "w") if log else subprocess.DEVNULL
    try:
        return subprocess.run(["rlhf", *args], check=check, env=ENV, stdout=out, stderr=subprocess.STDOUT)
    finally:
        if log:
            out.close()


def warm_start(policy: Path) -> Path:
    """The demo's trained policy (``configs/demo.yaml``, as ``benchmarks/demo_run.py`` runs it),
    trained into ``policy``'s run directory first when absent."""
    run = policy.parent
    if not (policy / "model.safetensors").exists():
        run.mkdir(parents=True, exist_ok=True)
        _rlhf("run", "--config", str(ROOT / "configs" / "demo.yaml"), "--out", str(run), log=run / "run.log")
    return policy


def latest_version(db: Path) -> int:
    if not db.exists():
        return -1
    with sqlite3.connect(db) as c:
        row = c.execute("select max(id) from policy_versions").fetchone()
    return -1 if row[0] is None else int(row[0])


def submitted_per_round(db: Path) -> dict[int, int]:
    """Round -> the expert's stored submissions (a resumed run goes on from there)."""
    if not db.exists():
        return {}
    with sqlite3.connect(db) as c:
        if not c.execute("select 1 from sqlite_master where name = 'annotations'").fetchone():
            return {}
        return dict(c.execute("select r.round, count(*) from annotations a join rollouts r on r.id = a.rollout_id "
                              "where a.status = 'submitted' group by r.round").fetchall())


def expert_run(run: Path, overrides: list[str], rounds: int, per_round: int, timeout: float) -> dict:
    """One `rlhf serve --with-worker` run with the scripted expert: ``per_round`` submissions a
    round through the HTTP API, then wait for the next round. Returns submissions per round."""
    run.mkdir(parents=True, exist_ok=True)
    _rlhf("user", "add", "expert", "--role", "annotator", "--password", PASSWORD, "--config",
          str(ROOT / "configs" / "annotate.yaml"), "--out", str(run), *overrides, check=False)
    port = free_port()
    log = run / "serve.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(["rlhf", "serve", "--config", str(ROOT / "configs" / "annotate.yaml"), "--out",
                                 str(run), "--port", str(port), "--with-worker", *overrides],
                                stdout=fh, stderr=subprocess.STDOUT, env=ENV)
    url, t0, per = f"http://127.0.0.1:{port}", time.time(), submitted_per_round(run / "workbench.db")
    try:
        wait_until_up(url, proc, log, timeout=1200)
        session = HttpSession(url, "expert")
        while latest_version(run / "workbench.db") < rounds:
            if time.time() - t0 > timeout or proc.poll() is not None:
                raise RuntimeError(f"stopped early (server rc={proc.poll()}); see {log}")
            try:
                item = json.loads(session.call("next_item") or "null")
                if not item or per.get(item["round"], 0) >= per_round:
                    time.sleep(1.0)
                    continue
                status = session.call("submit", item["rollout_id"], item["task_id"],
                                      json.dumps(expert_ranks(item["completion_ids"], item["texts"])),
                                      "scripted expert: ends with a full stop, then shorter", "[]", item["revision"],
                                      "[]")
            except (OSError, RuntimeError, httpx.HTTPError) as e:  # a call timed out on a loaded machine: the stored state decides
                print(f"{run.name}: {type(e).__name__} {str(e)[:100]}; retrying", flush=True)
                time.sleep(5.0)
                per = submitted_per_round(run / "workbench.db")
                continue
            if str(status).startswith("ok"):
                per[item["round"]] = per.get(item["round"], 0) + 1
        deadline = time.time() + 1200
        while not (run / "summary.json").exists() and time.time() < deadline:
            time.sleep(1.0)
        session.close()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {"submitted_per_round": per, "wall_seconds": round(time.time() - t0, 1)}


def run_curve(run: Path, rounds: int) -> dict:
    """Per version 0..rounds: rankings consumed so far, held-out preference score and accuracy,
    and the per-prompt outcomes of the first and last version (for the paired tests)."""
    with sqlite3.connect(run / "workbench.db") as c:
        consumed = dict(c.execute("select consumed_round, count(*) from annotations where status = 'submitted' "
                                  "and consumed_round is not null group by consumed_round").fetchall())
        round_s = [round(v, 1) for v, in c.execute("select value from metrics where name = 'time/round_s' "
                                                    "and round <= ? order by round", (rounds,))]
    xs, pref, acc, ends = [], [], [], {}
    for v in range(rounds + 1):
        ev = json.loads((run / "eval" / f"v{v}.json").read_text())
        p = [prefers(t) for t in ev["completions"]]
        xs.append(sum(n for r, n in consumed.items() if r <= v))
        pref.append(float(np.mean(p)))
        acc.append(float(np.mean(ev["correct"])))
        if v in (0, rounds):
            ends[v] = {"task_ids": ev["task_ids"], "prefers": p, "correct": [bool(x) for x in ev["correct"]]}
    return {"rankings": xs, "score": pref, "accuracy": acc, "round_wall_s": round_s, "first": ends[0],
            "last": ends[rounds]}


def rankings_to_reach(xs: list[float], ys: list[float], target: float) -> float:
    """Rankings at which a curve first reaches ``target`` (linear interpolation between points;
    ``inf`` if it never does). ``xs`` non-decreasing rankings given, ``ys`` held-out scores."""
    if ys[0] >= target:
        return float(xs[0])
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if y1 >= target:
            return float(x0 + (x1 - x0) * (target - y0) / (y1 - y0)) if y1 > y0 else float(x1)
    return float("inf")


def ratio_at(curves: dict[str, list[dict]], seeds: list[int], target: float) -> dict:
    """Random's rankings / active's rankings to first reach the held-out score ``target`` on the
    seed-mean curves of the seeds ``seeds`` (indices, repeats allowed).

    A strategy that never reaches it within the budget is *censored*: it would need more than
    its last point's rankings, so the ratio is reported as a bound (``bound: "lower"`` when random
    never reaches it: ratio >= budget / active's; ``"upper"`` when active never does); ``ratio``
    is None when neither does."""
    mean = {s: (np.mean([curves[s][i]["rankings"] for i in seeds], 0), np.mean([curves[s][i]["score"] for i in seeds], 0))
            for s in STRATEGIES}
    need = {s: rankings_to_reach(list(mean[s][0]), list(mean[s][1]), target) for s in STRATEGIES}
    budget = {s: float(mean[s][0][-1]) for s in STRATEGIES}
    r, a = need["random"], need["uncertainty"]
    out = {"target": target, "random": None if np.isinf(r) else r, "active": None if np.isinf(a) else a,
           "budget": budget["random"], "bound": None}
    if np.isinf(r) and np.isinf(a):
        return {**out, "ratio": None}
    if np.isinf(r):
        return {**out, "ratio": budget["random"] / max(a, 1e-9), "bound": "lower"}
    if np.isinf(a):
        return {**out, "ratio": r / budget["uncertainty"], "bound": "upper"}
    return {**out, "ratio": r / a if a > 0 else None}


def bootstrap_ratio(curves: dict[str, list[dict]], target: float, n_boot: int = 2000, seed: int = 0) -> dict:
    """Percentile 95 % interval of :func:`ratio_at` over seeds resampled with replacement (jointly for
    both strategies: a seed fixes both runs' prompts). A censored resample contributes its bound
    (conservative for a lower bound); resamples where neither strategy reaches the target are left
    out and counted."""
    n = len(curves["random"])
    rng = np.random.default_rng(seed)
    vals, undefined, censored = [], 0, 0
    for _ in range(n_boot):
        res = ratio_at(curves, list(rng.integers(0, n, n)), target)
        if res["ratio"] is None:
            undefined += 1
        else:
            vals.append(res["ratio"])
            censored += res["bound"] is not None
    if not vals:
        return {"ci_low": None, "ci_high": None, "undefined_resamples": undefined, "n_boot": n_boot}
    lo, hi = np.quantile(np.array(vals), [0.025, 0.975], method="inverted_cdf")
    return {"ci_low": float(lo), "ci_high": float(hi), "censored_resamples": censored,
            "undefined_resamples": undefined, "n_boot": n_boot}


def paired_tests(curves: list[dict]) -> dict:
    """Exact McNemar on the preference, before (version 0) vs after (last version), pooled over
    held-out prompt x seed; also on correctness, and on the preference among prompts answered
    correctly both before and after."""
    before = [x for c in curves for x in c["first"]["prefers"]]
    after = [x for c in curves for x in c["last"]["prefers"]]
    cb = [x for c in curves for x in c["first"]["correct"]]
    ca = [x for c in curves for x in c["last"]["correct"]]
    both = [i for i, (a, b) in enumerate(zip(cb, ca)) if a and b]
    return {"test": "exact McNemar (two-sided), held-out prompt x seed, version 0 vs last",
            "n": len(before), "preference_before": float(np.mean(before)), "preference_after": float(np.mean(after)),
            "preference": mcnemar_exact(before, after),
            "accuracy_before": float(np.mean(cb)), "accuracy_after": float(np.mean(ca)),
            "accuracy": mcnemar_exact(cb, ca),
            "preference_among_correct_both": {"n": len(both), **mcnemar_exact([before[i] for i in both],
                                                                               [after[i] for i in both])}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "active-learning")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=3, help="expert rounds per run")
    p.add_argument("--per-round", type=int, default=2, help="rankings the expert gives per round")
    p.add_argument("--prompts", type=int, default=8, help="prompts sampled per round (x 8 traces)")
    p.add_argument("--heldout", type=int, default=32, help="held-out prompts scored greedily after every round")
    p.add_argument("--warm-start", type=Path, default=ROOT / "runs" / "bench-demo" / "policy")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--timeout", type=float, default=3600.0, help="per expert run, seconds")
    p.add_argument("--parallel", type=int, default=1, help="runs at the same time (one server process each)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (OMP_NUM_THREADS; default: torch's)")
    p.add_argument("--note", default="", help="free text stored in the result (how the runs were made)")
    p.add_argument("--analyse-only", action="store_true",
                   help="run nothing: analyse the run directories up to the last version every run has evaluated")
    p.add_argument("--result", type=Path, default=_common.RESULTS / "active_learning.json")
    args = p.parse_args(argv)
    load_before = os.getloadavg()
    t0 = time.time()
    common = ["--set", f"tasks.max_heldout={args.heldout}", "--set", f"eval.round_subset={args.heldout}",
              "--set", "eval.kl_samples=0", "--set", f"optim.lr={args.lr}", "--set", "keep_checkpoints=1"]
    warm = args.warm_start if args.analyse_only else warm_start(args.warm_start)
    t_warm = time.time() - t0
    if args.threads:
        ENV.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    jobs = [(seed, strategy) for seed in args.seeds for strategy in STRATEGIES]

    def job(seed_strategy):
        seed, strategy = seed_strategy
        run = args.out / f"{strategy}-s{seed}"
        ov = common + ["--set", f"model.name={warm}", "--set", f"seed={seed}", "--set", f"rounds={args.rounds}",
                       "--set", f"feedback.selection={strategy}", "--set", f"feedback.min_rankings={args.per_round}",
                       "--set", f"rollout.prompts_per_round={args.prompts}"]
        if (run / "summary.json").exists():
            return {}
        return expert_run(run, ov, args.rounds, args.per_round, args.timeout)

    if args.analyse_only:  # runs stopped early, or made by several invocations: what is stored
        infos = [{"submitted_per_round": submitted_per_round(args.out / f"{st}-s{sd}" / "workbench.db")}
                 for sd, st in jobs]
        done = min(args.rounds, *(max((int(f.stem[1:]) for f in (args.out / f"{st}-s{sd}" / "eval").glob("v*.json")),
                                      default=0) for sd, st in jobs))
        if done < 1:
            raise SystemExit("--analyse-only: some run has not evaluated any version after round 1 yet")
        args.rounds = done
    else:
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:  # each run's work is in its own server process
            infos = list(pool.map(job, jobs))
    curves: dict[str, list[dict]] = {s: [] for s in STRATEGIES}
    runs = []
    for (seed, strategy), info in zip(jobs, infos):
        curve = run_curve(args.out / f"{strategy}-s{seed}", args.rounds)
        curves[strategy].append(curve)
        runs.append({"strategy": strategy, "seed": seed, **info,
                     **{k: curve[k] for k in ("rankings", "score", "accuracy", "round_wall_s")}})
        print(f"{strategy} seed {seed}: rankings {curve['rankings']} score {curve['score']} "
              f"acc {curve['accuracy']}", flush=True)
    ratios = {}
    for target in (0.25, 0.5, 0.75):
        ratios[target] = {**ratio_at(curves, list(range(len(args.seeds))), target), **bootstrap_ratio(curves, target)}
    mean_curves = {s: {"rankings": np.mean([c["rankings"] for c in curves[s]], 0).tolist(),
                       "score": np.mean([c["score"] for c in curves[s]], 0).tolist(),
                       "accuracy": np.mean([c["accuracy"] for c in curves[s]], 0).tolist()} for s in STRATEGIES}
    result = {
        "hidden_preference": prefers.__doc__.strip().splitlines()[0] + " " + prefers.__doc__.strip().splitlines()[1].strip(),
        "note": args.note,
        "rounds_analysed": args.rounds,
        "setup": {"model": "smollm2-135m, warm start: the demo's trained policy (configs/demo.yaml)",
                  "tasks": "bundled:arithmetic", "seeds": args.seeds, "rounds": args.rounds,
                  "rankings_per_round": args.per_round, "prompts_per_round": args.prompts, "num_generations": 8,
                  "heldout_prompts": args.heldout, "lr": args.lr, "algorithm": "grpo (ranking_weight 1.0)",
                  "parallel_runs": args.parallel, "threads_per_run": args.threads},
        "ratios": {"rankings_to_target": {**ratios[0.5], "definition": "rankings random selection needs / "
                                          "rankings uncertainty selection needs to first reach a held-out score of "
                                          "0.5 (half the held-out replies in the preferred style) on the seed-mean "
                                          "curves, linear interpolation; bound: lower = random never reached it "
                                          "(ratio >= budget / active's); 95 % percentile bootstrap over seeds"},
                   "at_target_0.25": ratios[0.25], "at_target_0.75": ratios[0.75]},
        "curves": mean_curves,
        "paired_tests": {s: paired_tests(curves[s]) for s in STRATEGIES},
        "runs": runs,
        "wall_seconds": {"total": round(time.time() - t0, 1), "warm_start": round(t_warm, 1)},
        "cpu_seconds_children": None if args.analyse_only else round(
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime + resource.getrusage(resource.RUSAGE_CHILDREN).ru_stime, 1),
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "processor": _common.processor_info(),
    }
    _common.write_result(result, args.result)
    print(json.dumps({k: result[k] for k in ("ratios", "curves", "paired_tests")}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
