"""Paired comparison of two models on the same questions (``rlhf compare A B``).

Both models answer every question greedily; each question then gives a pair of outcomes.
Reported, with 95% intervals:

* the accuracy of each model: Wilson score interval (Wilson 1927);
* the difference ``acc(B) − acc(A)``: Newcombe's (1998) paired square-and-add score interval
  (method 10, :func:`rlhf_workbench.stats.newcombe_paired_diff_ci`) — the headline, chosen
  because it keeps its coverage for small n and empty cells — and, for reference, the
  percentile bootstrap over questions of the paired differences (fixed seed);
* the exact McNemar test (:func:`rlhf_workbench.stats.mcnemar_exact`: two-sided binomial
  test on the discordant pairs) with the counts of questions only A / only B got right;
* the same for lenient accuracy (the last number / label, as a separate metric);
* optionally the win rate of B over A judged by a reward model (1 if B's answer scores
  higher, 0.5 for a tie, percentile bootstrap) and/or by an LLM judge
  (:class:`rlhf_workbench.feedback.judge.PairwiseJudge`, both presentation orders, Zheng et al. 2023).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

from rlhf_workbench.evaluation.heldout import EvalResult, answer_record, greedy_verified
from rlhf_workbench.evaluation.scoring import judge_wins, load_scorer, win_value
from rlhf_workbench.evaluation.selection import TaskSelection, load_eval_model
from rlhf_workbench.stats import (
    CONFIDENCE,
    N_BOOT,
    BOOT_SEED,
    Estimate,
    bootstrap_ci,
    mcnemar_exact,
    mean_estimate,
    newcombe_paired_diff_ci,
    proportion_estimate,
)
from rlhf_workbench.tasks.task import Task


def paired_summary(a: list[bool], b: list[bool], confidence: float = CONFIDENCE, n_boot: int = N_BOOT) -> dict[str, Any]:
    """Accuracies, their difference and the McNemar test for paired per-question outcomes.

    Args:
        a, b: correctness of model A and model B on the same questions, same order.

    Returns:
        ``{"accuracy_a", "accuracy_b"}`` (Wilson :class:`Estimate` dicts), ``"difference"``
        (``acc_b − acc_a`` with the Newcombe paired interval and, under ``"bootstrap"``, the
        percentile bootstrap interval of the mean paired difference), ``"counts"`` (``both``,
        ``a_only``, ``b_only``, ``neither``) and ``"mcnemar"`` (``a_only``, ``b_only``,
        ``p_value``: exact two-sided test; 1.0 when there are no discordant pairs).

    Raises:
        ValueError: the lists differ in length.
    """
    if len(a) != len(b):
        raise ValueError(f"paired_summary: {len(a)} vs {len(b)} outcomes")
    n = len(a)
    counts = {"both": sum(x and y for x, y in zip(a, b)), "a_only": sum(x and not y for x, y in zip(a, b)),
              "b_only": sum(y and not x for x, y in zip(a, b)), "neither": sum(not x and not y for x, y in zip(a, b))}
    lo, hi = newcombe_paired_diff_ci(a, b, confidence)
    diff = (sum(b) - sum(a)) / n if n else float("nan")
    blo, bhi = bootstrap_ci([float(y) - float(x) for x, y in zip(a, b)], confidence, n_boot)
    mc = mcnemar_exact(a, b)  # b = wrong in A, right in B; c = right in A, wrong in B
    return {
        "accuracy_a": proportion_estimate(sum(a), n, confidence).to_dict(),
        "accuracy_b": proportion_estimate(sum(b), n, confidence).to_dict(),
        "difference": {**Estimate(diff, lo, hi, "newcombe-paired", n, confidence).to_dict(),
                       "bootstrap": {"ci_low": blo, "ci_high": bhi, "n_boot": n_boot, "seed": BOOT_SEED}},
        "counts": counts,
        "mcnemar": {"test": "exact McNemar: two-sided binomial test on the discordant pairs",
                    "a_only": int(mc["c"]), "b_only": int(mc["b"]), "p_value": mc["p_value"]},
    }


def compare_report(model_a: str, model_b: str, selection: TaskSelection, reward_model: str | None = None,
                   max_new_tokens: int = 64, batch_size: int = 32, mixed_precision: str = "no",
                   confidence: float = CONFIDENCE, n_boot: int = N_BOOT, examples: int = 3, judge=None,
                   progress: Callable | None = None, lenient: bool = False) -> dict:
    """Answer the selected questions greedily with two models and compare them pairwise
    (correctness by the strict verifier, or the lenient reading with ``lenient=True``).

    Args:
        model_a, model_b: checkpoint directories, presets or hub ids
            (:func:`~rlhf_workbench.evaluation.selection.load_eval_model`); A is the baseline.
        selection: the questions (:func:`~rlhf_workbench.evaluation.selection.select_tasks`).
        reward_model: reward model for the win rate of B over A (None: skipped).
        max_new_tokens, batch_size, mixed_precision: generation settings.
        confidence, n_boot: interval coverage and bootstrap resamples.
        examples: how many questions where the two differ to list under ``"examples"``.
        judge: a :class:`rlhf_workbench.feedback.judge.PairwiseJudge` for the LLM-judged win rate of B
            over A (None: skipped).
        progress: optional ``progress(label, total) -> advance(n)`` factory.

    Returns:
        A JSON-serialisable dict: ``schema``, ``a``/``b`` (``model``, ``path``), ``tasks``,
        ``settings``, ``n``, the :func:`paired_summary` fields, ``lenient`` (the same for
        lenient accuracy), ``length_a``/``length_b`` (bootstrap), ``win_rate`` (reward model, or None:
        ``win_rate_b``, ``wins_b``/``ties``/``wins_a``, ``reward_a``/``reward_b``),
        ``win_rate_judge`` (LLM judge, or None: ``win_rate_b``, counts, ``calls``,
        ``consistent``, ``unparsed``, ``identical``), ``examples`` (ids of questions where correctness
        differs, else where the extracted answers differ), ``notes``, ``seconds`` and
        ``questions`` (``id``, ``question``, ``answer``, ``a``, ``b``: text, extracted,
        correct, format_ok, tokens, finished, and ``reward`` when scored; ``win_b``,
        ``win_b_judge``).

    Raises:
        ValueError: a model cannot be loaded.
    """
    t0 = time.time()
    tasks = selection.tasks
    notes = list(selection.notes)
    n = len(tasks)

    def bar(label: str, total: int):
        return progress(label, total) if progress else None

    outs = {}
    for side, name in (("a", model_a), ("b", model_b)):
        model, tok, path = load_eval_model(name)
        res, vers = greedy_verified(model, tok, tasks, max_new_tokens, batch_size, mixed_precision,
                                    bar(f"greedy {side.upper()}", n), lenient)
        outs[side] = (path, res, vers)
        del model
    (path_a, ra, va), (path_b, rb, vb) = outs["a"], outs["b"]
    questions = [{"id": t.id, "question": t.question, "answer": t.answer,
                  "a": answer_record(ca, xa), "b": answer_record(cb, xb), "win_b": None, "win_b_judge": None}
                 for t, ca, xa, cb, xb in zip(tasks, ra.completions, va, rb.completions, vb)]
    win = None if reward_model is None else _reward_win(reward_model, tasks, ra, rb, questions, notes, confidence, n_boot)
    win_judge = None if judge is None else _judge_win(judge, tasks, ra, rb, questions, bar("LLM judge", n), confidence,
                                                      n_boot)
    differ = [q["id"] for q in questions if q["a"]["correct"] != q["b"]["correct"]]
    if not differ:
        differ = [q["id"] for q in questions if q["a"]["extracted"] != q["b"]["extracted"]]
    return {
        "schema": "rlhf-compare/1",
        "a": {"model": str(model_a), "path": path_a}, "b": {"model": str(model_b), "path": path_b},
        "tasks": selection.to_dict(),
        "settings": {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "mixed_precision": mixed_precision,
                     "decoding": "greedy", "confidence": confidence, "n_boot": n_boot, "bootstrap_seed": BOOT_SEED},
        "n": n,
        **paired_summary(ra.correct, rb.correct, confidence, n_boot),
        "lenient": paired_summary(ra.lenient_correct, rb.lenient_correct, confidence, n_boot),
        "length_a": mean_estimate(ra.lengths, confidence, n_boot).to_dict(),
        "length_b": mean_estimate(rb.lengths, confidence, n_boot).to_dict(),
        "win_rate": win, "win_rate_judge": win_judge,
        "examples": differ[:examples], "notes": notes,
        "seconds": round(time.time() - t0, 1),
        "questions": questions,
    }


def _reward_win(reward_model: str, tasks: Sequence[Task], ra: EvalResult, rb: EvalResult, questions: list[dict],
                notes: list[str], confidence: float, n_boot: int) -> dict[str, Any]:
    """The win rate of B over A under a reward model (``report["win_rate"]``); adds each question's
    rewards and ``win_b`` to ``questions`` and the scorer's warning, if any, to ``notes``."""
    score, note = load_scorer(reward_model)
    if note:
        notes.append(note)
    sa = score(tasks, [c.text for c in ra.completions])
    sb = score(tasks, [c.text for c in rb.completions])
    wins = [win_value(y, x, ca.text == cb.text) for x, y, ca, cb in zip(sa, sb, ra.completions, rb.completions)]
    for q, x, y, w in zip(questions, sa, sb, wins):
        q["a"]["reward"], q["b"]["reward"], q["win_b"] = x, y, w
    return {"win_rate_b": mean_estimate(wins, confidence, n_boot).to_dict(), "judge": "reward_model",
            "wins_b": wins.count(1.0), "ties": wins.count(0.5), "wins_a": wins.count(0.0),
            "reward_a": mean_estimate(sa, confidence, n_boot).to_dict(),
            "reward_b": mean_estimate(sb, confidence, n_boot).to_dict()}


def _judge_win(judge, tasks: Sequence[Task], ra: EvalResult, rb: EvalResult, questions: list[dict], progress,
               confidence: float, n_boot: int) -> dict[str, Any]:
    """The win rate of B over A judged by an LLM (``report["win_rate_judge"]``); adds ``win_b_judge``
    to each question."""
    points, jstats = judge_wins(judge, tasks, [c.text for c in rb.completions], [c.text for c in ra.completions],
                                progress)
    for q, w in zip(questions, points):
        q["win_b_judge"] = w
    return {"win_rate_b": mean_estimate(points, confidence, n_boot).to_dict(), "judge": "llm",
            "wins_b": points.count(1.0), "ties": points.count(0.5), "wins_a": points.count(0.0), **jstats}


def _ci(m: dict, digits: int = 3) -> str:
    return "n/a" if m["ci_low"] is None else f"[{m['ci_low']:.{digits}f}, {m['ci_high']:.{digits}f}]"


def _short(text: str | None, width: int = 70) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def print_compare_report(report: dict, console) -> None:
    """Print a :func:`compare_report`: accuracies, difference, McNemar, win rate, and examples."""
    from rich.markup import escape
    from rich.table import Table

    conf = int(round(100 * report["settings"]["confidence"]))
    t = report["tasks"]
    console.print(f"A = {escape(report['a']['model'])}\nB = {escape(report['b']['model'])}")
    table = Table(title=f"{report['n']} paired {t['split']} questions of {escape(t['source'])}", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column(f"{conf}% CI", no_wrap=True)
    table.add_column("CI method")
    for key, label in (("accuracy_a", "accuracy A"), ("accuracy_b", "accuracy B")):
        table.add_row(label, f"{report[key]['value']:.3f}", _ci(report[key]), "Wilson")
    d = report["difference"]
    table.add_row("B − A", f"{d['value']:+.3f}", _ci(d), "Newcombe paired")
    table.add_row("B − A", f"{d['value']:+.3f}", _ci(d["bootstrap"]), "bootstrap")
    for key, label in (("accuracy_a", "lenient accuracy A"), ("accuracy_b", "lenient accuracy B")):
        m = report["lenient"][key]
        table.add_row(label, f"{m['value']:.3f}", _ci(m), "Wilson")
    if report["win_rate"]:
        w = report["win_rate"]["win_rate_b"]
        table.add_row("win rate B over A (RM)", f"{w['value']:.3f}", _ci(w), "bootstrap")
    if report.get("win_rate_judge"):
        w = report["win_rate_judge"]["win_rate_b"]
        table.add_row("win rate B over A (LLM judge)", f"{w['value']:.3f}", _ci(w), "bootstrap")
    for key, label in (("length_a", "length A (tokens)"), ("length_b", "length B (tokens)")):
        table.add_row(label, f"{report[key]['value']:.1f}", _ci(report[key], 1), "bootstrap")
    console.print(table)
    mc, c = report["mcnemar"], report["counts"]
    console.print(f"McNemar exact: only A right {mc['a_only']}, only B right {mc['b_only']} "
                  f"(both {c['both']}, neither {c['neither']}), p = {mc['p_value']:.3g}")
    smc = report["lenient"]["mcnemar"]
    console.print(f"lenient: only A {smc['a_only']}, only B {smc['b_only']}, p = {smc['p_value']:.3g}")
    if report["win_rate"]:
        w = report["win_rate"]
        console.print(f"reward model: B wins {w['wins_b']}, ties {w['ties']}, A wins {w['wins_a']}")
    if report.get("win_rate_judge"):
        w = report["win_rate_judge"]
        console.print(f"LLM judge: B wins {w['wins_b']}, ties {w['ties']}, A wins {w['wins_a']} "
                      f"({w['consistent']} consistent pairs, {w['unparsed']} unparsed replies, {w['calls']} calls)")
    by_id = {q["id"]: q for q in report["questions"]}
    if report["examples"]:
        ex = Table(title="questions where they differ", title_justify="left", show_lines=True)
        for col in ("id", "question", "truth", "A", "B"):
            ex.add_column(col)
        for qid in report["examples"]:
            q = by_id[qid]
            mark = lambda s: f"{escape(str(s['extracted']))} {'✓' if s['correct'] else '✗'}"  # noqa: E731
            ex.add_row(escape(qid), escape(_short(q["question"])), escape(q["answer"]), mark(q["a"]), mark(q["b"]))
        console.print(ex)
    for note in report["notes"]:
        console.print(f"[yellow]note[/]: {escape(note)}")
