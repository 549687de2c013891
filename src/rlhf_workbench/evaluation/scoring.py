"""Scoring answers for ``rlhf eval`` / ``rlhf compare`` and the loop's held-out evaluation: a
reward model (:func:`load_scorer`, :func:`win_value`) and a pairwise LLM judge (:func:`make_judge`,
:func:`judge_wins`)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from rlhf_workbench.feedback.judge import PairwiseJudge, make_backend, task_question, task_reference
from rlhf_workbench.model.loading import resolve_model_path
from rlhf_workbench.tasks.task import Task
from rlhf_workbench.train.reward_model import load_reward_model, score_texts


TIE_TOL = 1e-5  # reward differences at most this large (absolute) count as ties


def load_scorer(path: str, batch_size: int = 8):
    """A reward model for scoring answers (:func:`rlhf_workbench.train.reward_model.load_reward_model`).

    Returns:
        ``(score, note)``: ``score(tasks, texts) -> list[float]`` scores ``task.transcript() +
        "\\n\\n" + text`` (the format the reward model is trained on, see
        :class:`~rlhf_workbench.train.reward_model.RewardModelRanker`); ``note`` warns when the
        directory is not a trained sequence-classification model (its scalar head is then
        freshly initialised, seeded with 0, and the scores mean nothing), else None.

    Raises:
        ValueError: the model cannot be loaded.
    """
    from transformers import AutoConfig  # slow import: only when a reward model is loaded

    try:
        arch = AutoConfig.from_pretrained(resolve_model_path(path)).architectures or []
        torch.manual_seed(0)
        model, tokenizer = load_reward_model(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load reward model {path!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    note = None
    if not any(a.endswith("ForSequenceClassification") for a in arch):
        note = (f"--reward-model {path} is not a trained reward model ({', '.join(arch) or 'unknown architecture'}): "
                "its score head is random, so rewards and win rates are meaningless")

    def score(tasks: Sequence[Task], texts: Sequence[str]) -> list[float]:
        return score_texts(model, tokenizer, [t.transcript() + "\n\n" for t in tasks], list(texts), batch_size)

    return score, note


def win_value(mine: float, theirs: float, same_text: bool = False) -> float:
    """1 when ``mine > theirs``, 0 when lower, 0.5 for a tie (identical texts, or rewards within
    :data:`TIE_TOL`, which absorbs the float noise of scoring in different padded batches)."""
    if same_text or abs(mine - theirs) <= TIE_TOL:
        return 0.5
    return 1.0 if mine > theirs else 0.0


def make_judge(model: str | None = None, url: str | None = None, api_model: str | None = None,
               api_key_env: str | None = None):
    """An LLM judge (:class:`rlhf_workbench.feedback.judge.PairwiseJudge`, position-swapped, Zheng et al.
    2023) on a local chat model (``model``: preset, hub id or checkpoint) or an OpenAI-compatible
    endpoint (``url``, with ``api_model`` and the API key read from the environment variable
    ``api_key_env``).

    Raises:
        ValueError: neither or both of ``model`` and ``url``.
        rlhf_workbench.feedback.judge.JudgeError: the endpoint cannot be reached or the key is unset.
    """
    return PairwiseJudge(make_backend(url, model, api_model, api_key_env))


def judge_wins(judge, tasks: Sequence[Task], mine: Sequence[str], theirs: Sequence[str],
               progress=None) -> tuple[list[float], dict[str, Any]]:
    """Per-question points of ``mine`` against ``theirs`` from a pairwise LLM judge.

    Each pair is judged twice with the positions swapped (:meth:`PairwiseJudge.compare`, Zheng
    et al. 2023 §3.4); ``mine`` scores 1 when picked in both orders, 0 when ``theirs`` is, and
    0.5 otherwise (inconsistent or unparsable verdicts, identical texts). The judge sees the
    task's prompt and its ground-truth answer (:func:`rlhf_workbench.feedback.judge.task_reference`).

    Returns:
        ``(points, stats)``: one value in {0, 0.5, 1} per question, and ``calls``,
        ``consistent`` (pairs both orders agreed on), ``unparsed`` (replies without a verdict),
        ``identical`` (pairs not sent: same text).
    """
    points: list[float] = []
    stats = {"calls": 0, "consistent": 0, "unparsed": 0, "identical": 0}
    for t, x, y in zip(tasks, mine, theirs):
        v = judge.compare(task_question(t), x, y, task_reference(t))
        points.append(v.points[0])
        stats["calls"] += v.calls
        if v.calls == 0:
            stats["identical"] += 1
        else:
            stats["consistent"] += int(v.consistent)
            stats["unparsed"] += (v.first is None) + (v.second is None)
        if progress:
            progress(1)
    return points, stats
