"""The web app's Dashboard tab: how the run and the experts are doing.

Held-out accuracy, reward, KL, loss and acceptance per round (from the ``metrics`` table);
rankings per hour per annotator; inter-annotator agreement; preference drift
(:mod:`rlhf_workbench.human.drift`); the verifier's audited precision
(:func:`rlhf_workbench.human.annotation.verifier_audit`); the worker's status and the current
policy version. Everything is read from the database on each refresh, and only for users whose
role allows the dashboard (checked in every handler: admins).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Callable

import gradio as gr
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sqlalchemy import select

from rlhf_workbench.human.agreement import agreement_summary
from rlhf_workbench.human.annotation import verifier_audit
from rlhf_workbench.human.drift import FLOOR, MAX_DROP, WINDOW, drift_summary
from rlhf_workbench.human.errors import AnnotationError
from rlhf_workbench.human.selection import queue_md
from rlhf_workbench.store import Annotation, Store, User


def _status_text(status: dict | None) -> str:
    if not status:
        return "Worker status: not started (no status recorded yet)."
    state = status.get("state", "?")
    rnd = status.get("round")
    if state == "waiting":
        left = max(0, status.get("need", 0) - status.get("have", 0))
        return (f"Worker status: **waiting for {left} more ranking{'s' if left != 1 else ''}** "
                f"(round {rnd}: {status.get('have', 0)} of {status.get('need', 0)} submitted).")
    return f"Worker status: **{state}**" + (f" (round {rnd})." if rnd is not None else ".")


def _line_plot(title: str, series: dict[str, list[tuple[int, float]]], ylabel: str = "") -> Figure:
    fig = Figure(figsize=(5, 3.2), tight_layout=True)
    ax = fig.add_subplot()
    rounds = [r for points in series.values() for r, _ in points]
    for name, points in series.items():
        if points:
            ax.plot([r for r, _ in points], [v for _, v in points], marker="o", label=name)
    if rounds:
        ax.set_xlim(min(rounds) - 0.5, max(rounds) + 0.5)
    else:
        ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes, color="gray")
    if rounds and len(series) > 1:
        ax.legend(fontsize=8)
    ax.set_title(title)
    ax.set_xlabel("round")
    if 0 < len(set(rounds)) <= 12:
        ax.set_xticks(sorted(set(rounds)))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig


def submissions_by_hour(store: Store) -> dict[str, list[tuple[datetime, int]]]:
    """Submitted rankings per clock hour (UTC) per annotator, from the annotations table."""
    with store.session() as s:
        rows = s.execute(select(User.username, Annotation.updated_at).join(User, User.id == Annotation.user_id)
                         .where(Annotation.status == "submitted")).all()
    counts: dict[str, dict[datetime, int]] = {}
    for name, ts in rows:
        hour = ts.replace(minute=0, second=0, microsecond=0, tzinfo=ts.tzinfo or timezone.utc)
        counts.setdefault(name, {}).setdefault(hour, 0)
        counts[name][hour] += 1
    return {name: sorted(per.items()) for name, per in counts.items()}


def _rankings_plot(store: Store) -> Figure:
    data = submissions_by_hour(store)
    fig = Figure(figsize=(5, 3.2), tight_layout=True)
    ax = fig.add_subplot()
    if not data:
        ax.text(0.5, 0.5, "no rankings yet", ha="center", va="center", transform=ax.transAxes, color="gray")
    hours = sorted({h for points in data.values() for h, _ in points})[-12:]  # the last 12 active hours
    width = 0.8 / max(1, len(data))
    for j, (name, points) in enumerate(sorted(data.items())):
        per = dict(points)
        ax.bar([i + j * width for i in range(len(hours))], [per.get(h, 0) for h in hours], width, label=name)
    if data:
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(hours))],
                      [h.strftime("%m-%d %H:00") for h in hours], rotation=30, ha="right", fontsize=8)
        ax.legend(fontsize=8)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(-0.5, max(len(hours), 4) - 0.5)
    ax.set_title("rankings per hour per annotator")
    ax.set_xlabel("hour (UTC)")
    ax.grid(alpha=0.3, axis="y")
    return fig


def _agreement_md(store: Store) -> str:
    try:
        summary = agreement_summary(store)
    except Exception as e:  # noqa: BLE001 - the dashboard must render whatever the data
        return f"**Inter-annotator agreement:** n/a ({e})"
    if not summary:
        return "**Inter-annotator agreement:** n/a (no item ranked by two annotators yet)"

    def fmt(v):
        if isinstance(v, float):
            return "n/a" if v != v else f"{v:.3f}"
        if isinstance(v, (dict, list)):
            return f"`{json.dumps(v)[:200]}`"
        return "n/a" if v is None else str(v)

    rows = "\n".join(f"| {k} | {fmt(v)} |" for k, v in summary.items())
    return f"**Inter-annotator agreement**\n\n| measure | value |\n|---|---|\n{rows}"


def _annotator_table(store: Store) -> str:
    with store.session() as s:
        rows = s.execute(select(User.username, Annotation.status, Annotation.updated_at)
                         .join(User, User.id == Annotation.user_id)).all()
    per: dict[str, dict] = {}
    for name, status, ts in rows:
        d = per.setdefault(name, {"submitted": 0, "skipped": 0, "draft": 0, "times": []})
        d[status] = d.get(status, 0) + 1
        if status == "submitted":
            d["times"].append(ts)
    if not per:
        return "_No annotations yet._"
    lines = ["**Annotators** (rate: submitted per hour between their first and last submission)\n",
             "| annotator | submitted | skipped | drafts | per hour |", "|---|---|---|---|---|"]
    for name, d in sorted(per.items()):
        t = d["times"]
        span_h = max((max(t) - min(t)).total_seconds() / 3600, 1 / 60) if len(t) > 1 else None
        rate = f"{len(t) / span_h:.1f}" if span_h else "n/a"
        lines.append(f"| {name} | {d['submitted']} | {d['skipped']} | {d['draft']} | {rate} |")
    return "\n".join(lines)


def audit_md(store: Store) -> str:
    """The verifier's audited precision as one line, e.g. "Verifier audited precision: 97.5 %
    (95 % CI 91.3–99.3 %, 80 traces audited, 2 marked wrong)", or "no audits yet"."""
    a = verifier_audit(store)
    if not a["audited"]:
        return ("**Verifier audited precision:** no audits yet (experts audit the verified traces they rank "
                "and mark any whose answer is actually wrong).")
    n, w = a["audited"], a["wrong"]
    return (f"**Verifier audited precision: {100 * a['precision']:.1f} %** (95 % CI {100 * a['ci_low']:.1f}–"
            f"{100 * a['ci_high']:.1f} %, {n} trace{'s' if n != 1 else ''} audited, {w} marked wrong)")


def drift_md(store: Store) -> str:
    """Preference drift (:mod:`rlhf_workbench.human.drift`) as a table, overall and per annotator, with a
    visible warning line for every series whose recent agreement dropped."""
    rows = drift_summary(store)
    if rows[0]["n_rankings"] == 0:
        return "**Preference drift:** no rankings yet."

    def cell(r, m):
        recent, earlier = r[f"{m}_recent"], r[f"{m}_earlier"]
        if recent is None:
            return f"n/a ({r[f'{m}_n']} of {WINDOW})"
        return f"{recent:.2f}" + (f" (earlier {earlier:.2f})" if earlier is not None else "")

    warnings = [f"⚠️ **Drift: {r['name']}**, agreement with {what}: {r[f'{m}_warning']}"
                for r in rows for m, what in (("model", "the model's scores"), ("peer", "earlier rankings"))
                if r[f"{m}_warning"]]
    lines = [f"**Preference drift** (rolling Kendall τ-b, mean of the last {WINDOW} rankings; warns below "
             f"{FLOOR:g} or on a drop of more than {MAX_DROP:g})\n", *[w + "  " for w in warnings],
             "" if warnings else "No drift warning.", "",
             "| annotator | rankings | τ with model scores | τ with earlier rankings |", "|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['n_rankings']} | {cell(r, 'model')} | {cell(r, 'peer')} |" for r in rows]
    return "\n".join(lines)


def version_md(store: Store) -> str:
    """The current (latest published) policy version and when it was published."""
    latest = store.latest_version()
    if latest is None:
        return "### Current policy: none published yet"
    when = latest.created_at.strftime("%Y-%m-%d %H:%M") if latest.created_at else ""
    return f"### Current policy: v{latest.id}\n\npublished {when} UTC ({latest.algorithm})"


def dashboard_tab(demo: gr.Blocks, store: Store, tab: gr.Tab, check: Callable[[gr.Request], object]) -> None:
    """Lay out the Dashboard inside ``tab`` (the current context) and wire its refreshes: the
    version and worker status on page load and every 15 s, everything on Refresh and when the
    tab is selected.

    ``check(request)`` raises :class:`~rlhf_workbench.human.errors.AnnotationError` unless the
    logged-in user may see the dashboard; every handler calls it first. A refused refresh is an
    error; the periodic status update quietly changes nothing."""

    def status(request: gr.Request):
        try:
            check(request)
        except AnnotationError:
            return gr.skip(), gr.skip()
        return version_md(store), _status_text(store.get_meta("status"))

    def refresh(request: gr.Request):
        try:
            check(request)
        except AnnotationError as e:
            raise gr.Error(str(e)) from None
        m = store.metrics()
        acc = _line_plot("held-out accuracy", {"accuracy (strict)": m.get("eval/accuracy", []),
                                               "lenient": m.get("eval/lenient_accuracy", [])})
        rew = {"reward": m.get("train/reward", [])}
        if "train/rewards/margins" in m:
            rew["DPO reward margin"] = m["train/rewards/margins"]
        reward = _line_plot("reward", rew)
        kl = _line_plot("KL(policy ‖ reference), held-out", {"kl": m.get("eval/kl", [])}, "nats / token")
        loss = _line_plot("training loss", {"loss": m.get("train/loss", [])})
        accept = _line_plot("acceptance rate (verified / sampled)", {"acceptance": m.get("train/acceptance_rate", [])})
        return (version_md(store), _status_text(store.get_meta("status")), acc, reward, kl, loss, accept,
                _rankings_plot(store), _annotator_table(store),
                _agreement_md(store), audit_md(store), drift_md(store))

    with gr.Row():
        current = gr.Markdown(elem_id="current-version")
        train_status = gr.Markdown(elem_id="training-status")
        refresh_btn = gr.Button("Refresh", elem_id="refresh-btn", scale=0)
    with gr.Row():
        p_acc = gr.Plot(label="accuracy", show_label=False, elem_id="plot-accuracy")
        p_reward = gr.Plot(label="reward", show_label=False, elem_id="plot-reward")
        p_kl = gr.Plot(label="KL", show_label=False, elem_id="plot-kl")
    with gr.Row():
        p_loss = gr.Plot(label="loss", show_label=False, elem_id="plot-loss")
        p_accept = gr.Plot(label="acceptance", show_label=False, elem_id="plot-acceptance")
        p_rank = gr.Plot(label="rankings per hour", show_label=False, elem_id="plot-rankings")
    with gr.Row():
        annotators = gr.Markdown(elem_id="annotators")
        with gr.Column():
            agreement = gr.Markdown(elem_id="agreement")
            audit = gr.Markdown(elem_id="verifier-audit")
    drift = gr.Markdown(elem_id="drift")
    outputs = [current, train_status, p_acc, p_reward, p_kl, p_loss, p_accept, p_rank, annotators, agreement, audit,
               drift]
    demo.load(status, None, [current, train_status], api_visibility="private")
    refresh_btn.click(refresh, None, outputs, api_visibility="private")
    tab.select(refresh, None, outputs, api_visibility="private")
    gr.Timer(15).tick(status, None, [current, train_status], api_visibility="private", concurrency_limit=None,
                      show_progress="hidden")

    def selection_queue(request: gr.Request):
        """Why the open round's items are served in this order (feedback.selection, selection.py)."""
        try:
            check(request)
        except AnnotationError as e:
            raise gr.Error(str(e)) from None
        return queue_md(store)

    queue = gr.Markdown(elem_id="selection-queue")
    refresh_btn.click(selection_queue, None, queue, api_visibility="private")
    tab.select(selection_queue, None, queue, api_visibility="private")
