"""The ``rlhf eval`` report: one model on the selected questions, every metric with a confidence
interval from :mod:`rlhf_workbench.stats` (Wilson for proportions, seeded bootstrap for means).

Metrics (``report["metrics"]``, each an :meth:`~rlhf_workbench.stats.Estimate.to_dict`):

* ``pass@1`` (greedy decoding, strict verifier), ``lenient_pass@1`` (the lenient reading),
  ``format_rate``, ``clipped_rate`` (hit ``max_new_tokens``): proportions, Wilson.
* ``length``: greedy completion tokens (EOS included when generated), bootstrap.
* With sampling (``k > 1`` or ``n_samples``): ``n = n_samples or k`` samples per question
  at ``temperature``/``top_p`` (torch seeded with ``seed``); ``pass@1_sampled`` (c/n),
  ``pass@k`` (unbiased, :func:`~rlhf_workbench.stats.pass_at_k`, Chen et al. 2021 eq. 1) and
  ``maj@k`` (:func:`~rlhf_workbench.stats.maj_at_k`): means over questions, bootstrap; ``maj@k``
  is a Wilson proportion when ``n == k`` (0/1 per question).
* With ``reference`` (same vocabulary): ``kl_token`` (Σ KL / Σ tokens over the greedy
  completions, ratio bootstrap) and ``kl_seq`` (mean per-completion KL sum, bootstrap),
  exact full-vocabulary KL(π || π_ref) in nats
  (:func:`~rlhf_workbench.evaluation.heldout.token_kl_per_completion`).
* With ``reward_model``: ``reward`` (mean reward of the greedy answers, bootstrap); with a
  reference too, the reference's greedy answers are generated and scored: ``reward_reference``,
  ``reference_pass@1`` (Wilson) and ``win_rate`` (mean of
  :func:`~rlhf_workbench.evaluation.scoring.win_value`: 1 if the model's answer scores higher,
  0.5 for a tie, bootstrap), with the paired McNemar test of the two greedy accuracies in
  ``report["vs_reference"]``.
* Open tasks (no answer key, e.g. the held-out prompts of a preference file): the
  accuracy-type metrics (``pass@1``, ``lenient_pass@1``, ``format_rate``, the sampled ones,
  ``reference_pass@1``, McNemar) count the questions with a key only, and without any are
  "not applicable" (method ``"not applicable"``, value and interval null; McNemar None), not 0;
  ``report["accuracy_applicable"]`` and ``report["n_open"]`` say so.
* With ``judge`` and a reference: ``win_rate_judge``, the same win rate judged by an LLM
  (:func:`~rlhf_workbench.evaluation.scoring.judge_wins`, position-swapped; bootstrap), counts
  under ``report["vs_reference"]["llm_judge"]``.

Paired comparisons of two models (``rlhf compare``) live in :mod:`rlhf_workbench.evaluation.compare`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from rlhf_workbench.evaluation.heldout import EvalResult, answer_record, greedy_verified, token_kl_per_completion
from rlhf_workbench.evaluation.scoring import TIE_TOL, judge_wins, load_scorer, win_value
from rlhf_workbench.evaluation.selection import TaskSelection, load_eval_model, same_model
from rlhf_workbench.model.loading import PolicyPair
from rlhf_workbench.model.rollout import generate
from rlhf_workbench.stats import (BOOT_SEED, CONFIDENCE, N_BOOT, Estimate, maj_at_k, majority_vote, mcnemar_exact,
                                  mean_estimate, pass_at_k, proportion_estimate, ratio_estimate)
from rlhf_workbench.tasks.task import Task
from rlhf_workbench.verify import verify

NOT_APPLICABLE = Estimate(math.nan, math.nan, math.nan, "not applicable", 0)
"""An accuracy-type metric on questions without an answer key (open tasks): no value, no interval."""


def _keyed_proportion(flags: Sequence[bool], keyed: Sequence[bool], confidence: float) -> Estimate:
    """Wilson proportion of ``flags`` over the questions with an answer key (``keyed``), or
    :data:`NOT_APPLICABLE` when none has one (an open task is neither right nor wrong)."""
    n = sum(keyed)
    if not n:
        return NOT_APPLICABLE
    return proportion_estimate(sum(f for f, k in zip(flags, keyed) if k), n, confidence)


def _mcnemar_dict(before: list[bool], after: list[bool]) -> dict[str, Any]:
    """:func:`mcnemar_exact` with named counts: ``improved`` (wrong before, right after) and
    ``regressed`` (right before, wrong after)."""
    m = mcnemar_exact(before, after)
    return {"test": "exact McNemar: two-sided binomial test on the discordant pairs (reference -> model)",
            "improved": int(m["b"]), "regressed": int(m["c"]), "p_value": m["p_value"]}


@dataclass
class _Eval:
    """One :func:`eval_report` in progress: the questions, the settings every step shares, and the
    metrics, per-question records and notes the steps add."""

    tasks: list[Task]
    max_new_tokens: int
    batch_size: int
    mixed_precision: str
    lenient: bool
    confidence: float
    n_boot: int
    progress: Callable | None
    notes: list[str]
    metrics: dict[str, Estimate] = field(default_factory=dict)
    questions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def keyed(self) -> list[bool]:
        """Per question: whether it has an answer key."""
        return [not t.is_open for t in self.tasks]

    def bar(self, label: str, total: int):
        """A progress callback ``advance(n)`` for one step, or None without a progress factory."""
        return self.progress(label, total) if self.progress else None

    def mean(self, values: Sequence[float]) -> Estimate:
        """Mean with its percentile-bootstrap interval."""
        return mean_estimate(values, confidence=self.confidence, n_boot=self.n_boot)

    def keyed_rate(self, flags: Sequence[bool]) -> Estimate:
        """A proportion over the questions with an answer key; not applicable without any."""
        return _keyed_proportion(flags, self.keyed, self.confidence)

    def greedy(self, model, tokenizer, label: str):
        """:func:`~rlhf_workbench.evaluation.heldout.greedy_verified` on the questions, with a progress bar."""
        return greedy_verified(model, tokenizer, self.tasks, self.max_new_tokens, self.batch_size,
                               self.mixed_precision, self.bar(label, len(self.tasks)), self.lenient)


def eval_report(model: str, selection: TaskSelection, reference: str | None = None, reward_model: str | None = None,
                k: int = 1, n_samples: int | None = None, temperature: float = 0.7, top_p: float = 1.0,
                max_new_tokens: int = 64, batch_size: int = 32, mixed_precision: str = "no", seed: int = 0,
                confidence: float = CONFIDENCE, n_boot: int = N_BOOT, judge=None,
                progress: Callable | None = None, lenient: bool = False) -> dict:
    """Evaluate one model on the selected questions, every metric with a confidence interval (the
    metrics are listed in this module's docstring). Correctness is the strict verifier's, or the
    lenient reading with ``lenient=True``.

    Args:
        model: checkpoint directory, preset or hub id (:func:`~rlhf_workbench.evaluation.selection.load_eval_model`).
        selection: the questions (:func:`~rlhf_workbench.evaluation.selection.select_tasks`).
        reference: model to measure KL and win rate against (None: skip those metrics).
        reward_model: reward-model directory or name (None: skip reward and win rate).
        judge: a :class:`rlhf_workbench.feedback.judge.PairwiseJudge`
            (:func:`~rlhf_workbench.evaluation.scoring.make_judge`) for the LLM-judged win rate
            against the reference (None: skipped).
        k, n_samples, temperature, top_p: sampling settings (``n_samples >= k``).
        max_new_tokens, batch_size, mixed_precision: generation settings.
        seed: sampling seed.
        confidence, n_boot: interval coverage and bootstrap resamples (bootstrap seed fixed at
            :data:`~rlhf_workbench.stats.BOOT_SEED`).
        progress: optional ``progress(label, total) -> advance(n)`` factory for progress bars.

    Returns:
        A JSON-serialisable dict: ``schema``, ``model``, ``model_path``, ``reference``,
        ``reward_model``, ``tasks`` (:meth:`TaskSelection.to_dict`), ``settings``, ``metrics``,
        ``vs_reference``, ``notes``, ``seconds`` and ``questions`` (one record per question:
        ``id``, ``question``, ``answer``, ``greedy``, ``samples``, ``reward``, ``reference``,
        ``win``, ``win_judge``, ``kl``).

    Raises:
        ValueError: bad settings (``k < 1``, ``n_samples < k``, temperature <= 0) or a model
            that cannot be loaded.
    """
    n, sampling = _sample_count(k, n_samples, temperature)
    t0 = time.time()
    ev = _Eval(selection.tasks, max_new_tokens, batch_size, mixed_precision, lenient, confidence, n_boot, progress,
               list(selection.notes))
    policy, tok, path = load_eval_model(model)
    greedy = _greedy_metrics(ev, policy, tok)
    if sampling:
        _sampled_metrics(ev, policy, tok, n, k, temperature, top_p, seed)
    ref_model, ref_tok, ref_name = _load_reference(ev, reference, path)
    if ref_model is not None:
        _kl_metrics(ev, PolicyPair(policy, ref_model, tok), ref_tok, greedy, reference)
    score, rewards = _reward_metrics(ev, reward_model, greedy)
    vs_reference = None
    if ref_model is not None and (score is not None or judge is not None):
        vs_reference = _vs_reference(ev, ref_model, ref_tok, greedy, score, rewards, judge)
    elif ref_model is not None:
        ev.notes.append("no --reward-model or judge: no reward and no win rate against the reference")
    elif judge is not None:
        ev.notes.append("no reference: the LLM judge has nothing to compare with")
    if not any(ev.keyed):
        ev.notes.append("open tasks (no answer key): pass@1, format rate and the other accuracies are not applicable; "
                        "judge the answers with --reward-model or an LLM judge (win rate vs the reference)")
    settings = {"k": k, "n_samples": n if sampling else 0, "temperature": temperature if sampling else None,
                "top_p": top_p if sampling else None, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                "mixed_precision": mixed_precision, "seed": seed, "confidence": confidence, "n_boot": n_boot,
                "bootstrap_seed": BOOT_SEED, "tie_tolerance": TIE_TOL}
    return {
        "schema": "rlhf-eval/1",
        "model": str(model), "model_path": path, "reference": ref_name, "reward_model": reward_model,
        "accuracy_applicable": any(ev.keyed), "n_open": len(ev.tasks) - sum(ev.keyed),
        "tasks": selection.to_dict(), "settings": settings,
        "metrics": {name: e.to_dict() for name, e in ev.metrics.items()},
        "vs_reference": vs_reference, "notes": ev.notes, "seconds": round(time.time() - t0, 1),
        "questions": ev.questions,
    }


def _sample_count(k: int, n_samples: int | None, temperature: float) -> tuple[int, bool]:
    """``(n, sampling)``: samples per question (``n_samples``, default ``k``) and whether to sample.

    Raises:
        ValueError: ``k < 1``, ``n < k`` or a non-positive temperature for sampling.
    """
    if k < 1:
        raise ValueError(f"--k must be at least 1, got {k}")
    n = n_samples if n_samples is not None else k
    if n < k:
        raise ValueError(f"--n-samples ({n}) must be at least --k ({k}): pass@k needs n >= k samples")
    sampling = k > 1 or n_samples is not None
    if sampling and temperature <= 0:
        raise ValueError(f"--temperature must be positive for sampling, got {temperature}")
    return n, sampling


def _greedy_metrics(ev: _Eval, policy, tok) -> EvalResult:
    """Greedy answers: pass@1, lenient pass@1, format and clipped rates, length; one question record each."""
    greedy, vers = ev.greedy(policy, tok, "greedy")
    comps = greedy.completions
    ev.metrics.update({
        "pass@1": ev.keyed_rate(greedy.correct),
        "lenient_pass@1": ev.keyed_rate(greedy.lenient_correct),
        "format_rate": ev.keyed_rate(greedy.format_ok),
        "clipped_rate": proportion_estimate(sum(not c.finished for c in comps), len(ev.tasks), ev.confidence),
        "length": ev.mean(greedy.lengths),
    })
    ev.questions[:] = [{"id": t.id, "question": t.question, "answer": t.answer, "greedy": answer_record(c, v),
                        "samples": None, "reward": None, "reference": None, "win": None, "win_judge": None, "kl": None}
                       for t, c, v in zip(ev.tasks, comps, vers)]
    return greedy


def _sampled_metrics(ev: _Eval, policy, tok, n: int, k: int, temperature: float, top_p: float, seed: int) -> None:
    """``n`` samples per question (torch seeded with ``seed``): pass@1 (sampled), unbiased pass@k and maj@k."""
    torch.manual_seed(seed)
    sampled = generate(policy, tok, ev.tasks, num_generations=n, do_sample=True, temperature=temperature, top_p=top_p,
                       max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size, mixed_precision=ev.mixed_precision,
                       progress=ev.bar(f"sampling n={n}", len(ev.tasks) * n))
    pk, p1, mk = [], [], []  # over the questions with an answer key
    for i, (t, keyed) in enumerate(zip(ev.tasks, ev.keyed)):
        group = sampled[i * n : (i + 1) * n]
        sv = [verify(c.text, t, ev.lenient) for c in group]
        answers, correct = [v.extracted for v in sv], [v.correct for v in sv]
        c = sum(correct)
        winner, votes = majority_vote(answers)
        scores = (pass_at_k(n, c, k), c / n, maj_at_k(answers, correct, k, seed=seed))
        if keyed:
            pk.append(scores[0]), p1.append(scores[1]), mk.append(scores[2])
        ev.questions[i]["samples"] = {"n": n, "correct": c, "pass@k": scores[0], "maj@k": scores[2], "vote": winner,
                                      "votes": votes, "extracted": answers, "verdicts": correct,
                                      "texts": [x.text for x in group], "tokens": [len(x.token_ids) for x in group]}
    if not p1:
        ev.metrics.update(dict.fromkeys(("pass@1_sampled", "pass@k", "maj@k"), NOT_APPLICABLE))
        return
    ev.metrics["pass@1_sampled"] = ev.mean(p1)
    ev.metrics["pass@k"] = ev.mean(pk)
    ev.metrics["maj@k"] = proportion_estimate(int(sum(mk)), len(mk), ev.confidence) if n == k else ev.mean(mk)


def _load_reference(ev: _Eval, reference: str | None, path: str):
    """``(model, tokenizer, name)`` of the reference; the model is None without one or when it is the
    evaluated model itself (noted), and the name is None then too."""
    if reference is None:
        return None, None, None
    ref_model, ref_tok, ref_path = load_eval_model(reference)
    if same_model(ref_path, path):
        ev.notes.append(f"the reference {reference} is the model itself: KL is 0 and no win rate is computed")
        return None, ref_tok, None
    return ref_model, ref_tok, reference


def _kl_metrics(ev: _Eval, pair: PolicyPair, ref_tok, greedy: EvalResult, reference: str) -> None:
    """Exact token KL of the greedy answers to the reference (``kl_token``, ``kl_seq``), when the
    two share a vocabulary (else a note)."""
    if ref_tok.get_vocab() != pair.tokenizer.get_vocab():
        ev.notes.append(f"reference {reference} has another vocabulary: no token KL")
        return
    per = token_kl_per_completion(pair, greedy.completions, max(1, min(ev.batch_size, 16)), ev.mixed_precision)
    kept = [(s, m) for s, m in per if m]
    ev.metrics["kl_token"] = ratio_estimate([s for s, _ in kept], [m for _, m in kept], confidence=ev.confidence,
                                            n_boot=ev.n_boot)
    ev.metrics["kl_seq"] = ev.mean([s for s, _ in kept])
    for q, (s, m) in zip(ev.questions, per):
        q["kl"] = {"sum": s, "tokens": m}


def _reward_metrics(ev: _Eval, reward_model: str | None, greedy: EvalResult):
    """``(score, rewards)``: the reward model's scorer and the greedy answers' rewards (``reward``
    metric), or ``(None, None)`` without a reward model."""
    if reward_model is None:
        return None, None
    score, note = load_scorer(reward_model)
    if note:
        ev.notes.append(note)
    rewards = score(ev.tasks, [c.text for c in greedy.completions])
    ev.metrics["reward"] = ev.mean(rewards)
    for q, r in zip(ev.questions, rewards):
        q["reward"] = r
    return score, rewards


def _vs_reference(ev: _Eval, ref_model, ref_tok, greedy: EvalResult, score, rewards, judge) -> dict[str, Any]:
    """The reference's greedy answers (``reference_pass@1``, McNemar) and the win rates against them
    by the reward model (``score``) and/or the LLM ``judge``; returns ``report["vs_reference"]``."""
    ref_res, ref_vers = ev.greedy(ref_model, ref_tok, "reference greedy")
    keyed = ev.keyed
    ev.metrics["reference_pass@1"] = ev.keyed_rate(ref_res.correct)
    vs_reference = {"mcnemar": _mcnemar_dict([c for c, x in zip(ref_res.correct, keyed) if x],
                                             [c for c, x in zip(greedy.correct, keyed) if x]) if any(keyed) else None}
    for q, c, v in zip(ev.questions, ref_res.completions, ref_vers):
        q["reference"] = answer_record(c, v)
    comps, ref_comps = greedy.completions, ref_res.completions
    if score is not None:
        ref_rewards = score(ev.tasks, [c.text for c in ref_comps])
        wins = [win_value(r, rr, c.text == rc.text) for r, rr, c, rc in zip(rewards, ref_rewards, comps, ref_comps)]
        ev.metrics["reward_reference"] = ev.mean(ref_rewards)
        ev.metrics["win_rate"] = ev.mean(wins)
        vs_reference["reward_model"] = {"wins": wins.count(1.0), "ties": wins.count(0.5), "losses": wins.count(0.0)}
        for q, rr, w in zip(ev.questions, ref_rewards, wins):
            q["reference"]["reward"] = rr
            q["win"] = w
    if judge is not None:
        points, jstats = judge_wins(judge, ev.tasks, [c.text for c in comps], [c.text for c in ref_comps],
                                    ev.bar("LLM judge", len(ev.tasks)))
        ev.metrics["win_rate_judge"] = ev.mean(points)
        vs_reference["llm_judge"] = {"wins": points.count(1.0), "ties": points.count(0.5),
                                     "losses": points.count(0.0), **jstats}
        for q, w in zip(ev.questions, points):
            q["win_judge"] = w
    return vs_reference


EVAL_ROWS: tuple[tuple[str, str], ...] = (
    ("pass@1", "pass@1 (greedy)"), ("lenient_pass@1", "lenient pass@1 (last number)"), ("format_rate", "format rate"),
    ("pass@1_sampled", "pass@1 (sampled)"), ("pass@k", "pass@{k} (unbiased)"), ("maj@k", "maj@{k}"),
    ("reward", "reward (RM)"), ("reward_reference", "reward of reference (RM)"),
    ("reference_pass@1", "reference pass@1 (greedy)"), ("win_rate", "win rate vs reference (RM)"),
    ("win_rate_judge", "win rate vs reference (LLM judge)"),
    ("kl_token", "KL to reference / token"), ("kl_seq", "KL to reference / answer"),
    ("length", "length (tokens)"), ("clipped_rate", "clipped at max tokens"),
)


def _method_text(m: dict) -> str:
    return {"wilson": "Wilson", "bootstrap": "bootstrap", "bootstrap-ratio": "bootstrap (ratio)",
            "newcombe-paired": "Newcombe paired"}.get(m["method"], m["method"])


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def print_eval_report(report: dict, console) -> None:
    """Print an :func:`eval_report` as a rich table: metric, estimate, 95% interval, method."""
    from rich.markup import escape
    from rich.table import Table

    s, t = report["settings"], report["tasks"]
    conf = int(round(100 * s["confidence"]))
    table = Table(title=escape(f"{report['model']} on {t['n']} {t['split']} questions of {t['source']}"),
                  title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column(f"{conf}% CI", no_wrap=True)
    table.add_column("CI method")
    for key, label in EVAL_ROWS:
        m = report["metrics"].get(key)
        if m is None:
            continue
        digits = 1 if key == "length" else (4 if key.startswith("kl") else 3)
        ci = "n/a" if m["ci_low"] is None else f"[{m['ci_low']:.{digits}f}, {m['ci_high']:.{digits}f}]"
        table.add_row(label.format(k=s["k"]), _fmt(m["value"], digits), ci, _method_text(m))
    console.print(table)
    bits = [f"reference: {escape(str(report['reference'] or 'none'))}"]
    if s["n_samples"]:
        bits.append(f"{s['n_samples']} samples/question at T={s['temperature']}")
    vs = report.get("vs_reference")
    if vs:
        mc = vs["mcnemar"]  # None when no question has an answer key
        if "reward_model" in vs:
            w = vs["reward_model"]
            bits.append(f"reward model: {w['wins']} wins / {w['ties']} ties / {w['losses']} losses")
        if "llm_judge" in vs:
            j = vs["llm_judge"]
            bits.append(f"LLM judge: {j['wins']} wins / {j['ties']} ties / {j['losses']} losses "
                        f"({j['consistent']} consistent pairs, {j['unparsed']} unparsed replies)")
        if mc is not None:
            bits.append(f"McNemar vs reference: {mc['improved']} improved, {mc['regressed']} regressed, "
                        f"p={mc['p_value']:.3g}")
    console.print("; ".join(bits))
    for note in report["notes"]:
        console.print(f"[yellow]note[/]: {escape(note)}")


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_report(report: dict, path: str | Path) -> Path:
    """Write an :func:`eval_report` / :func:`~rlhf_workbench.evaluation.compare.compare_report` as strict JSON (NaN and inf -> null),
    creating parent directories.

    Raises:
        OSError: the file cannot be written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(report), indent=1, ensure_ascii=False, allow_nan=False) + "\n")
    return path
