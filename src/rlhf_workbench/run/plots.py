"""The run's ``report.md`` and its PNG plots (matplotlib) of held-out accuracy, reward, KL and
loss per round, written when the loop finishes (this module was ``report.py`` before the stage
packages)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rlhf_workbench.store import Store  # noqa: E402

PLOTS = {
    "accuracy": (["eval/accuracy", "eval/lenient_accuracy"], "held-out accuracy (greedy pass@1)"),
    "reward": (["train/reward", "train/acceptance_rate"], "rollout reward and acceptance rate"),
    "kl": (["eval/kl", "train/kl"], "KL to the reference (nats/token)"),
    "loss": (["train/loss"], "training loss"),
    "win_rate": (["eval/win_rate", "eval/win_rate_ci_low", "eval/win_rate_ci_high"],
                 "held-out win rate vs the reference (gold reward model)"),
}


def plot_metrics(metrics: dict[str, list[tuple[int, float]]], out_dir: Path) -> list[Path]:
    """One PNG per entry of :data:`PLOTS` (metrics not logged are left out); returns the paths."""
    paths = []
    for name, (keys, title) in PLOTS.items():
        series = [(k, metrics[k]) for k in keys if metrics.get(k)]
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        for k, pts in series:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=k)
        ax.set_xlabel("round")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_rewards(metrics: dict[str, list[tuple[int, float]]], out_dir: Path) -> Path | None:
    """``rewards.png``: the held-out proxy reward (the model the policy optimises) and the gold
    reward (a model trained on pairs the proxy never saw) per round, side by side, so reward
    over-optimisation (proxy up, gold down: Gao et al. 2022) is visible; None without both."""
    proxy, gold = metrics.get("eval/reward_proxy"), metrics.get("eval/reward_gold")
    if not proxy or not gold:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), dpi=100)
    for ax, pts, title in ((axes[0], proxy, "proxy reward (optimised)"), (axes[1], gold, "gold reward (held apart)")):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label="policy")
        ax.set_xlabel("round")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    ref = metrics.get("eval/reward_gold_reference")
    if ref:  # the reference's answers on the same tasks (intermediate rounds score a subset)
        axes[1].plot([p[0] for p in ref], [p[1] for p in ref], linestyle="--", marker=".", label="reference")
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "rewards.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_gold_vs_length(metrics: dict[str, list[tuple[int, float]]], out_dir: Path) -> Path | None:
    """``gold_vs_length.png``: the held-out gold reward against the mean answer length (tokens), one
    point per evaluated round, joined in round order and labelled with the round: a policy that
    buys gold reward with length (a reward model's length bias, Singhal et al. 2023) moves to the
    right as it moves up. None without both metrics."""
    gold, length = dict(metrics.get("eval/reward_gold", [])), dict(metrics.get("eval/completion_length", []))
    rounds = sorted(set(gold) & set(length))
    if not rounds:
        return None
    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=100)
    xs, ys = [length[r] for r in rounds], [gold[r] for r in rounds]
    ax.plot(xs, ys, marker="o")
    for r, x, y in zip(rounds, xs, ys):
        ax.annotate(str(r), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("mean answer length (tokens)")
    ax.set_ylabel("gold reward")
    ax.set_title("gold reward vs length, per round", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / "gold_vs_length.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(out: Path, store: Store, summary: dict) -> Path:
    """Write ``out/report.md`` (summary table, significance, per-round table, plots)."""
    plots_dir = out / "plots"
    plots_dir.mkdir(exist_ok=True)
    metrics = store.metrics()
    pngs = plot_metrics(metrics, plots_dir)
    pngs += [p for p in [plot_rewards(metrics, plots_dir), plot_gold_vs_length(metrics, plots_dir)] if p is not None]
    b, a, sig = summary["eval_before"], summary["eval_after"], summary["significance"]
    lines = [
        "# Online RLHF run report", "",
        f"Model `{summary['model']}`, tasks `{summary['tasks']}`, algorithm **{summary['algorithm']}**, "
        f"{summary['rounds']} rounds, {summary['wall_seconds']:.0f} s wall.", "",
        "| held-out (greedy pass@1) | before | after |", "|---|---|---|",
        f"| accuracy | {b['accuracy']:.3f} [{b['accuracy_ci_low']:.3f}, {b['accuracy_ci_high']:.3f}] "
        f"| {a['accuracy']:.3f} [{a['accuracy_ci_low']:.3f}, {a['accuracy_ci_high']:.3f}] |",
        f"| lenient accuracy (last number) | {b['lenient_accuracy']:.3f} | {a['lenient_accuracy']:.3f} |",
        f"| n | {b['n']} | {a['n']} |",
        *([f"| win rate vs reference (gold RM) | - | {a['win_rate']:.3f} [{a['win_rate_ci_low']:.3f}, "
           f"{a['win_rate_ci_high']:.3f}] |"] if "win_rate" in a else []),
        *([f"| {k.replace('_', ' ')} | {b[k]:.3f} | {a[k]:.3f} |" for k in ("reward_proxy", "reward_gold")
           if k in a and k in b]), "",
        f"{sig['test']}: {int(sig['b'])} tasks improved, {int(sig['c'])} regressed, p = {sig['p_value']:.3g} "
        "(95% Wilson intervals in brackets).", "",
        "## Per round", "",
    ]
    keys = ["eval/accuracy", "eval/lenient_accuracy", "train/reward", "train/acceptance_rate", "train/loss",
            "eval/kl", "eval/reward_proxy", "eval/reward_gold", "eval/win_rate", "eval/completion_length",
            "train/refit/heldout_agreement", "time/round_s"]
    keys = [k for k in keys if k in metrics]
    lines += ["| round | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    rounds = sorted({r for k in keys for r, _ in metrics[k]})
    for r in rounds:
        vals = {k: dict(metrics[k]).get(r) for k in keys}
        lines.append(f"| {r} | " + " | ".join("" if v is None else f"{v:.4g}" for v in vals.values()) + " |")
    lines += ["", "## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in pngs]
    lines += ["", "<details><summary>summary.json</summary>", "", "```json", json.dumps(summary, indent=2), "```",
              "", "</details>", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
