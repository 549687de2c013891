"""What ``benchmarks/online_preferences.py`` reports about a finished arm, read from its run
directory: the final held-out evaluation (gold win rate, length-controlled win rate, lengths, KL),
the agreement of the training rankings with the gold model on the policy's own samples, the expert
rankings used, the per-round gold reward and length, and paired differences between arms.

    python benchmarks/online_preferences_analysis.py runs/online-preferences/online   # one arm, printed
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sqlalchemy import select

from rlhf_workbench.evaluation.scoring import load_scorer, win_value
from rlhf_workbench.model.loading import load_tokenizer
from rlhf_workbench.stats import length_controlled_estimate, mean_estimate
from rlhf_workbench.store import CompletionRow, RankingRow, Store

ROUND_KEYS = ("eval/win_rate", "eval/reward_gold", "eval/reward_proxy", "eval/completion_length", "eval/kl",
              "train/reward", "train/completions/mean_length", "train/refit/heldout_agreement",
              "train/refit/heldout_pairs", "train/refit/train_accuracy", "time/round_s")


def final_wins(run: Path, rounds: int) -> tuple[list[str], list[float], list[str], list[str]]:
    """``(task_ids, win values, answers, reference answers)`` of the final evaluation: per held-out
    prompt 1 / 0.5 / 0 under the gold model against the reference's (v0's) greedy answer."""
    last = json.loads((run / "eval" / f"v{rounds}.json").read_text())
    ref = json.loads((run / "eval" / "v0.json").read_text())
    by_id = dict(zip(ref["task_ids"], ref["completions"]))
    refs = [by_id[t] for t in last["task_ids"]]
    wins = [win_value(m, r, a == b) for m, r, a, b in zip(last["reward_gold"], last["reward_gold_reference"],
                                                          last["completions"], refs)]
    return last["task_ids"], wins, last["completions"], refs


def gold_agreement(run: Path) -> dict[str, dict[str, float]]:
    """Per ranking source (and ``all``): of the pairs of one group's traces that the stored training
    ranking orders (both ranked, different ranks), the fraction the gold model orders the same way
    (``agreement``), and how many pairs (``pairs``)."""
    store = Store(run_dir=run)
    score, _ = load_scorer(str(run / "gold_reward_model"))
    tasks = {t.id: t for t in store.tasks("train")}
    with store.session() as s:
        rankings = list(s.scalars(select(RankingRow)))
        comps = {c.id: c for c in s.scalars(select(CompletionRow))}
    ids = sorted({int(k) for r in rankings for k in r.ranks})
    gold = dict(zip(ids, score([tasks[comps[i].task_id] for i in ids], [comps[i].text for i in ids])))
    tally: dict[str, list[int]] = {}
    for r in rankings:
        ranked = [(int(k), v) for k, v in r.ranks.items() if v is not None]
        for i, (a, ra) in enumerate(ranked):
            for b, rb in ranked[i + 1:]:
                if ra == rb:
                    continue
                better, worse = (a, b) if ra < rb else (b, a)
                for key in (r.source, "all"):
                    t = tally.setdefault(key, [0, 0])
                    t[0] += gold[better] > gold[worse]
                    t[1] += 1
    return {k: {"agreement": a / n, "pairs": n} for k, (a, n) in tally.items()}


def expert_use(run: Path) -> dict[str, int]:
    """Rankings (items) and traces ranked per source across all rounds."""
    with Store(run_dir=run).session() as s:
        rankings = list(s.scalars(select(RankingRow)))
    out: dict[str, int] = {}
    for r in rankings:
        out[f"{r.source}_rankings"] = out.get(f"{r.source}_rankings", 0) + 1
        out[f"{r.source}_traces"] = out.get(f"{r.source}_traces", 0) + len(r.ranks)
    return out


def per_round(run: Path) -> list[dict[str, float]]:
    """The round metrics of :data:`ROUND_KEYS` from the database, one dict per round (1-based)."""
    metrics = Store(run_dir=run).metrics()
    rounds = sorted({r for k in ROUND_KEYS for r, _ in metrics.get(k, [])})
    return [{"round": r, **{k: v for k in ROUND_KEYS for rr, v in metrics.get(k, []) if rr == r}} for r in rounds]


def analyse_arm(run: Path, arm: str, rounds: int) -> dict:
    """Everything the result file holds about one finished arm (see the module docstring)."""
    summary = json.loads((run / "summary.json").read_text())
    after, before = summary["eval_after"], summary["eval_before"]
    tok = load_tokenizer(str(run / "sft_model")) if (run / "sft_model").exists() else None
    _, wins, texts, refs = final_wins(run, rounds)
    lengths = [len(tok(t, add_special_tokens=False).input_ids) for t in texts] if tok else []
    ref_lengths = [len(tok(t, add_special_tokens=False).input_ids) for t in refs] if tok else []
    win = mean_estimate(wins)
    lc = length_controlled_estimate(wins, [a - b for a, b in zip(lengths, ref_lengths)]) if tok else None
    stages = {name: json.loads((run / name / "stage.json").read_text()).get("seconds")
              for name in ("sft_model", "reward_model", "gold_reward_model") if (run / name / "stage.json").exists()}
    return {
        "arm": arm, "heldout_prompts": len(wins),
        "win_rate": win.value, "win_rate_ci": [win.low, win.high],
        "lc_win_rate": lc.value if lc else None, "lc_win_rate_ci": [lc.low, lc.high] if lc else None,
        "mean_length": sum(lengths) / max(1, len(lengths)), "reference_mean_length": sum(ref_lengths) / max(1, len(ref_lengths)),
        "kl": after.get("kl"), "reward_gold": after.get("reward_gold"), "reward_gold_before": before.get("reward_gold"),
        "reward_proxy": after.get("reward_proxy"), "summary_win_rate": after.get("win_rate"),
        "gold_agreement": gold_agreement(run), "rankings": expert_use(run), "rounds": per_round(run),
        "stage_seconds": stages,
    }


PAIRS = (("online", "offline"), ("oracle", "offline"), ("online", "oracle"))


def paired(out: Path, rounds: int) -> dict[str, dict]:
    """Paired bootstrap intervals (over the held-out prompts) of the win-rate difference of the arms
    in :data:`PAIRS` found under ``out`` (``"<a> - <b>"``: mean of per-prompt win(a) - win(b)).

    Raises:
        ValueError: two arms were evaluated on different held-out prompts.
    """
    res = {}
    for a, b in PAIRS:
        if not all((out / x / "eval" / f"v{rounds}.json").exists() for x in (a, b)):
            continue
        ids, wins_a = final_wins(out / a, rounds)[:2]
        ids_b, wins_b = final_wins(out / b, rounds)[:2]
        if set(ids) != set(ids_b):
            raise ValueError(f"arms {a} and {b} were evaluated on different held-out prompts")
        by_b = dict(zip(ids_b, wins_b))
        est = mean_estimate([w - by_b[t] for t, w in zip(ids, wins_a)])
        res[f"{a} - {b}"] = {"difference": est.value, "ci": [est.low, est.high], "n": est.n}
    return res

if __name__ == "__main__":
    run_dir = Path(sys.argv[1])
    print(json.dumps(analyse_arm(run_dir, run_dir.name, int(sys.argv[2]) if len(sys.argv) > 2 else 6), indent=1))
