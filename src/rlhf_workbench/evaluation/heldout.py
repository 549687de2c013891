"""Evaluation on held-out tasks: greedy pass@1 accuracy, mean verifier reward, format rate and
the exact token KL of the policy to the reference (:func:`evaluate`, run by the loop after each
round), plus the greedy, verified answers ``rlhf eval`` and ``rlhf compare`` build on.

The rest of evaluation: choosing the model and the questions (:mod:`rlhf_workbench.evaluation.selection`),
reward-model and LLM-judge scoring (:mod:`rlhf_workbench.evaluation.scoring`), the ``rlhf eval``
report with confidence intervals (:mod:`rlhf_workbench.evaluation.report`) and the paired
comparison of two models (:mod:`rlhf_workbench.evaluation.compare`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from rlhf_workbench.model.logprobs import scale_logits
from rlhf_workbench.model.loading import PolicyPair
from rlhf_workbench.model.rollout import Completion, autocast, generate, pad_batch
from rlhf_workbench.stats import wilson_interval
from rlhf_workbench.tasks.task import Task
from rlhf_workbench.verify import Verdict, Verification, verify


@dataclass
class EvalResult:
    """Per-task outcomes of one greedy evaluation (same task order as the input)."""

    task_ids: list[str]
    correct: list[bool]  # the strict verdict (explicit, unambiguous, equal to the key)
    format_ok: list[bool]
    lengths: list[int]
    completions: list[Completion]
    lenient_correct: list[bool] = field(default_factory=list)  # the lenient reading (a separate metric)
    ambiguous: list[bool] = field(default_factory=list)
    unparsed: list[bool] = field(default_factory=list)  # the answer statement did not parse (verify/ "Verdicts")
    kl: float | None = None  # mean per-token KL(π || π_ref), nats
    kl_seq: float | None = None  # mean per-completion KL (sum over tokens), nats
    open: list[bool] = field(default_factory=list)  # the task has no answer key (accuracy not applicable)
    scores: dict[str, float] = field(default_factory=dict)  # reward-model metrics (rlhf_workbench.run.stages.score_eval)
    task_scores: dict[str, list[float]] = field(default_factory=dict)  # their per-task values, same order

    @property
    def n(self) -> int:
        """Number of evaluated tasks."""
        return len(self.correct)

    @property
    def n_keyed(self) -> int:
        """Number of evaluated tasks with an answer key (the denominator of the accuracies)."""
        return self.n - sum(self.open)

    @property
    def accuracy_applicable(self) -> bool:
        """Whether any evaluated task has an answer key; with open tasks only, accuracy means nothing."""
        return self.n_keyed > 0

    @property
    def accuracy(self) -> float:
        """Greedy pass@1 as a grader sees it: an explicit, unambiguous final answer equal to the key
        (over the tasks with a key; 0.0 when there are none, see :attr:`accuracy_applicable`)."""
        return sum(self.correct) / max(1, self.n_keyed)

    @property
    def lenient_accuracy(self) -> float:
        """Fraction whose lenient reading (last number / label, no ambiguity check) is correct."""
        return sum(self.lenient_correct) / max(1, self.n_keyed)

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        """Flat metrics dict: accuracy (strict verifier) with its Wilson 95% CI, lenient accuracy,
        format rate (explicit answer marker), ambiguous and unparsed rates, reward (mean verifier reward), mean
        completion length, KL. Accuracies count the tasks with a key only; ``accuracy_applicable``
        is 0.0 when every task is open (no key), ``n_open`` counts those tasks."""
        lo, hi = wilson_interval(sum(self.correct), self.n_keyed)
        m = {
            "accuracy": self.accuracy, "accuracy_ci_low": lo, "accuracy_ci_high": hi,
            "lenient_accuracy": self.lenient_accuracy, "format_rate": sum(self.format_ok) / max(1, self.n),
            "ambiguous_rate": sum(self.ambiguous) / max(1, self.n),
            "unparsed_rate": sum(self.unparsed) / max(1, self.n),
            "accuracy_applicable": float(self.accuracy_applicable), "n_open": sum(self.open),
            "reward": self.accuracy, "completion_length": sum(self.lengths) / max(1, self.n), "n": self.n,
        }
        if self.kl is not None:
            m["kl"] = self.kl
            m["kl_seq"] = self.kl_seq
        m.update(self.scores)
        return {prefix + k: float(v) for k, v in m.items()}


@torch.no_grad()
def token_kl_per_completion(pair: PolicyPair, completions: list[Completion], micro_batch_size: int = 8,
                            mixed_precision: str = "no") -> list[tuple[float, int]]:
    """Exact KL(π || π_ref) summed over the tokens of each completion, with its token count.

    At every completion position the full-vocabulary KL Σ_v π(v)(log π(v) − log π_ref(v)) of
    the next-token distributions is computed (no sampling estimator), conditioned on the
    completion's prompt and preceding tokens.

    Args:
        pair: policy and reference (same tokenizer: ``prompt_ids``/``token_ids`` index both).
        completions: completions sampled or decoded from the policy.
        micro_batch_size: sequences per forward pass.
        mixed_precision: ``"bf16"`` runs the forward passes under autocast.

    Returns:
        One ``(kl_sum_nats, n_tokens)`` per completion, in input order; ``(0.0, 0)`` for an
        empty completion.
    """
    pad_id = pair.tokenizer.pad_token_id
    out: list[tuple[float, int]] = [(0.0, 0)] * len(completions)
    items = [i for i, c in enumerate(completions) if c.token_ids]
    for s in range(0, len(items), micro_batch_size):
        idx = items[s : s + micro_batch_size]
        chunk = [completions[i] for i in idx]
        ids, mask, cmask = pad_batch([c.prompt_ids for c in chunk], [c.token_ids for c in chunk], pad_id)
        T = cmask.shape[1]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)

        def logits(model):
            with autocast(mixed_precision):
                out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                            logits_to_keep=T + 1).logits[:, :-1]
            return torch.log_softmax(scale_logits(out), -1)

        lp = logits(pair.policy)
        with pair.reference_context():
            lr = logits(pair.ref_model)
        kl = ((lp.exp() * (lp - lr)).sum(-1) * cmask).sum(-1)
        for j, i in enumerate(idx):
            out[i] = (float(kl[j]), int(cmask[j].sum()))
    return out


def token_kl(pair: PolicyPair, completions: list[Completion], micro_batch_size: int = 8,
             mixed_precision: str = "no") -> tuple[float, float]:
    """Exact per-position KL(π || π_ref) = Σ_v π(v)(log π(v) − log π_ref(v)), averaged over the
    tokens of the given completions, and its per-completion sum averaged over completions.

    Args:
        pair: policy and reference.
        completions: held-out completions (e.g. the greedy evaluation outputs).

    Returns:
        ``(kl_per_token, kl_per_sequence)`` in nats; ``(0, 0)`` for no tokens. Empty
        completions count in neither average.
    """
    per = [x for x in token_kl_per_completion(pair, completions, micro_batch_size, mixed_precision) if x[1]]
    tokens = sum(n for _, n in per)
    if tokens == 0:
        return 0.0, 0.0
    total = sum(k for k, _ in per)
    return total / tokens, total / len(per)


def evaluate(pair: PolicyPair, tasks: list[Task], max_new_tokens: int = 64, batch_size: int = 64,
             mixed_precision: str = "no", kl_samples: int = 0, progress=None, lenient: bool = False) -> EvalResult:
    """Greedy pass@1 on ``tasks`` (plus the KL to the reference on the first ``kl_samples``
    completions when ``kl_samples > 0``). ``correct`` is the strict verifier's verdict, or the
    lenient reading with ``lenient=True`` (:func:`rlhf_workbench.verify.verify`).

    Returns:
        An :class:`EvalResult`.
    """
    comps = generate(pair.policy, pair.tokenizer, tasks, num_generations=1, do_sample=False,
                     max_new_tokens=max_new_tokens, batch_size=batch_size, mixed_precision=mixed_precision, progress=progress)
    vers: list[Verification] = [verify(c.text, t, lenient) for c, t in zip(comps, tasks)]
    result = EvalResult(task_ids=[t.id for t in tasks], correct=[v.correct for v in vers],
                        format_ok=[v.format_ok for v in vers], lengths=[len(c.token_ids) for c in comps],
                        completions=comps, lenient_correct=[v.lenient_correct for v in vers],
                        ambiguous=[v.ambiguous for v in vers], open=[t.is_open for t in tasks],
                        unparsed=[v.verdict == Verdict.UNPARSED for v in vers])
    if kl_samples > 0:
        result.kl, result.kl_seq = token_kl(pair, comps[:kl_samples], mixed_precision=mixed_precision)
    return result


def greedy_verified(model, tokenizer, tasks: list[Task], max_new_tokens: int, batch_size: int,
                    mixed_precision: str, progress=None, lenient: bool = False) -> tuple[EvalResult, list[Verification]]:
    """Greedy evaluation of one model (:func:`evaluate`, the model as its own reference, no KL) plus
    each completion's :class:`~rlhf_workbench.verify.Verification` (the strict verdict, or the
    lenient reading with ``lenient=True``), for ``rlhf eval`` and ``rlhf compare``.

    Returns:
        ``(result, verifications)``, both in task order.
    """
    res = evaluate(PolicyPair(model, model, tokenizer), tasks, max_new_tokens=max_new_tokens, batch_size=batch_size,
                   mixed_precision=mixed_precision, kl_samples=0, progress=progress, lenient=lenient)
    return res, [verify(c.text, t, lenient) for c, t in zip(res.completions, tasks)]


def answer_record(c: Completion, v: Verification) -> dict[str, Any]:
    """The per-question record of one answer in an eval or compare report: its ``text``, the
    ``extracted`` answer, the verdicts (``correct``, ``lenient_correct``, ``format_ok``,
    ``ambiguous``, ``verdict``, ``reason``), ``tokens`` (completion length) and ``finished`` (ended with EOS)."""
    return {"text": c.text, "extracted": v.extracted, "correct": v.correct, "lenient_correct": v.lenient_correct,
            "format_ok": v.format_ok, "ambiguous": v.ambiguous, "verdict": str(v.verdict), "reason": v.reason,
            "tokens": len(c.token_ids), "finished": c.finished}
