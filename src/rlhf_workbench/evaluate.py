"""Evaluation on held-out tasks: greedy pass@1 accuracy, mean verifier reward, format rate,
KL of the policy to the reference, and the paired significance test between two evaluations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .models import PolicyPair
from .rollout import Completion, autocast, generate, pad_batch
from .tasks import Task
from .verify import Verification, verify


@dataclass
class EvalResult:
    """Per-task outcomes of one greedy evaluation (same task order as the input)."""

    task_ids: list[str]
    correct: list[bool]
    format_ok: list[bool]
    lengths: list[int]
    completions: list[Completion]
    kl: float | None = None  # mean per-token KL(π || π_ref), nats
    kl_seq: float | None = None  # mean per-completion KL (sum over tokens), nats

    @property
    def n(self) -> int:
        """Number of evaluated tasks."""
        return len(self.correct)

    @property
    def accuracy(self) -> float:
        """pass@1 with greedy decoding: fraction of tasks whose extracted answer is correct."""
        return sum(self.correct) / max(1, self.n)

    @property
    def strict_accuracy(self) -> float:
        """Fraction correct *and* given on an explicit answer line (``Answer:`` / ``\\boxed{}``)."""
        return sum(c and f for c, f in zip(self.correct, self.format_ok)) / max(1, self.n)

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        """Flat metrics dict: accuracy, strict accuracy (= correct answer on a well-formed line),
        format rate, reward (mean verifier reward), mean completion length, KL, Wilson 95% CI."""
        lo, hi = wilson_interval(sum(self.correct), self.n)
        m = {
            "accuracy": self.accuracy, "accuracy_ci_low": lo, "accuracy_ci_high": hi,
            "strict_accuracy": self.strict_accuracy, "format_rate": sum(self.format_ok) / max(1, self.n),
            "reward": self.accuracy, "completion_length": sum(self.lengths) / max(1, self.n), "n": self.n,
        }
        if self.kl is not None:
            m["kl"] = self.kl
            m["kl_seq"] = self.kl_seq
        return {prefix + k: float(v) for k, v in m.items()}


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927); ``(0, 1)`` when ``n == 0``."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(before: list[bool], after: list[bool]) -> dict[str, float]:
    """Exact McNemar test (two-sided binomial test on the discordant pairs) for paired outcomes.

    Args:
        before, after: per-task correctness on the same tasks, same order.

    Returns:
        ``{"b": improved, "c": regressed, "p_value": p}`` where ``b`` counts tasks wrong
        before and right after.

    Raises:
        ValueError: the lists differ in length.
    """
    if len(before) != len(after):
        raise ValueError(f"mcnemar_exact: {len(before)} vs {len(after)} outcomes")
    from scipy.stats import binomtest

    b = sum((not x) and y for x, y in zip(before, after))
    c = sum(x and (not y) for x, y in zip(before, after))
    p = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue
    return {"b": float(b), "c": float(c), "p_value": float(p)}


@torch.no_grad()
def token_kl(pair: PolicyPair, completions: list[Completion], micro_batch_size: int = 8,
             mixed_precision: str = "no") -> tuple[float, float]:
    """Exact per-position KL(π || π_ref) = Σ_v π(v)(log π(v) − log π_ref(v)), averaged over the
    tokens of the given completions, and its per-completion sum averaged over completions.

    Args:
        pair: policy and reference.
        completions: held-out completions (e.g. the greedy evaluation outputs).

    Returns:
        ``(kl_per_token, kl_per_sequence)`` in nats; ``(0, 0)`` for no tokens.
    """
    pad_id = pair.tokenizer.pad_token_id
    total, tokens, seqs = 0.0, 0, 0
    items = [c for c in completions if c.token_ids]
    for i in range(0, len(items), micro_batch_size):
        chunk = items[i : i + micro_batch_size]
        ids, mask, cmask = pad_batch([c.prompt_ids for c in chunk], [c.token_ids for c in chunk], pad_id)
        T = cmask.shape[1]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)

        def logits(model):
            with autocast(mixed_precision):
                out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                            logits_to_keep=T + 1).logits[:, :-1]
            return torch.log_softmax(out.float(), -1)

        lp = logits(pair.policy)
        with pair.reference_context():
            lr = logits(pair.ref_model)
        kl = (lp.exp() * (lp - lr)).sum(-1) * cmask
        total += kl.sum().item()
        tokens += int(cmask.sum())
        seqs += len(chunk)
    if tokens == 0:
        return 0.0, 0.0
    return total / tokens, total / seqs


def evaluate(pair: PolicyPair, tasks: list[Task], max_new_tokens: int = 64, batch_size: int = 64,
             mixed_precision: str = "no", kl_samples: int = 0, progress=None) -> EvalResult:
    """Greedy pass@1 on ``tasks`` (plus the KL to the reference on the first ``kl_samples``
    completions when ``kl_samples > 0``).

    Returns:
        An :class:`EvalResult`.
    """
    comps = generate(pair.policy, pair.tokenizer, tasks, num_generations=1, do_sample=False,
                     max_new_tokens=max_new_tokens, batch_size=batch_size, mixed_precision=mixed_precision,
                     compute_logps=False, progress=progress)
    vers: list[Verification] = [verify(c.text, t) for c, t in zip(comps, tasks)]
    result = EvalResult(task_ids=[t.id for t in tasks], correct=[v.correct for v in vers],
                        format_ok=[v.format_ok for v in vers], lengths=[len(c.token_ids) for c in comps],
                        completions=comps)
    if kl_samples > 0:
        result.kl, result.kl_seq = token_kl(pair, comps[:kl_samples], mixed_precision=mixed_precision)
    return result
