"""Online reward model: refit every round on the experts' rankings of the policy's own samples,
to score the groups no expert ranked (``feedback.refit``).

Why: on prompts without an answer key the rankings are the whole signal, and a reward model
trained once on static pairs does not know what the experts prefer among *this* policy's
answers (on HH-RLHF the static proxy's and the gold model's scores of the policy's samples
correlated at r = 0.09, and the policy optimising the proxy did not move the gold model). So each
round, with ``feedback.source: human`` and an expert budget of ``feedback.min_rankings`` items:

1. **agreement, before the refit**: the current head scores the round's expert-ranked groups,
   samples it never saw, and :meth:`OnlineRewardModel.agreement` counts the expert pairs it orders
   the same way (``refit/heldout_agreement``; in round 1 this is the starting head's agreement:
   the proxy's, or chance for a zero head);
2. **refit**: a fresh linear head (:func:`rlhf_workbench.train.rm_features.fit_head`: Bradley–Terry
   loss, Ouyang et al. 2022 eq. 1) on the frozen backbone's pooled features of every expert pair so
   far (:func:`rlhf_workbench.train.reward_model.pairs_from_rankings`, source ``human``), plus, with
   ``refit.prior``, the proxy stage's static training pairs. Features are cached per token row,
   so a refit forwards only the round's new texts (seconds);
3. **fill**: the refit head scores every group of the round that no expert ranked; the loop records
   those rankings with source ``reward_model`` (the experts' keep source ``human``).

Texts are ``task.transcript() + "\\n\\n" + completion`` for the expert pairs and for scoring, the
format of the pipeline's reward models (:func:`rlhf_workbench.run.stages.task_pairs`), so the
prior pairs and the policy's samples share one format. Decision: the head is refit from scratch
each round (standardised features, seeded) rather than fine-tuned from the last round's, so a
resumed run refits the same head from the same stored rankings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch

from rlhf_workbench.config import RefitConfig
from rlhf_workbench.tasks.task import Task
from rlhf_workbench.train.reward_model import RewardPair, load_reward_model, pairs_from_rankings
from rlhf_workbench.train.rm_features import PooledRewardModel, RewardHead, extract_features, fit_head
from rlhf_workbench.train.rm_inputs import encode_texts

REFIT_SOURCE = "reward_model"  # the source the filled-in rankings are recorded under


@dataclass
class OnlineRewardModel:
    """A frozen-backbone pooled reward model whose head is refit on the experts' rankings.

    Attributes:
        model: the :class:`~rlhf_workbench.train.rm_features.PooledRewardModel` (backbone frozen;
            its ``head`` is replaced by every :meth:`refit`).
        tokenizer: its tokenizer.
        cfg: the ``feedback.refit`` settings.
        prior: static pairs added to every refit (empty without ``refit.prior``).
        fitted: whether the head was fit by :meth:`refit` or loaded trained (a zero head is not).
    """

    model: PooledRewardModel
    tokenizer: object
    cfg: RefitConfig
    prior: list[RewardPair] = field(default_factory=list)
    fitted: bool = False
    _cache: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, path: str, cfg: RefitConfig, prior: Sequence[RewardPair] = ()) -> "OnlineRewardModel":
        """The backbone, pooling and window of the pooled reward model saved at ``path`` (its
        trained head scores until the first refit), or, for any other model name or directory, a
        new frozen backbone with a zero head (``mean_last`` pooling of the final layer, 128 tokens).

        Raises:
            ValueError: ``path`` is a full (non-pooled) reward model, which has no cached features.
        """
        model, tokenizer = load_reward_model(path, pooling="mean_last")
        if not isinstance(model, PooledRewardModel):
            raise ValueError(f"feedback.refit.path: {path} is not a frozen-backbone (pooled) reward model")
        trained = bool(model.head.linear.weight.abs().sum() > 0)
        return cls(model, tokenizer, cfg, list(prior) if cfg.prior else [], fitted=trained)

    def features(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """``[N, F]`` pooled features of ``prompt + completion + eos`` texts (left-truncated to the
        model's window), each distinct token row forwarded once and cached for later calls."""
        rows = [tuple(r[-self.model.max_tokens:] if self.model.max_tokens else r)
                for r in encode_texts(self.tokenizer, list(prompts), list(completions))]
        new = list(dict.fromkeys(r for r in rows if r not in self._cache))
        if new:
            feats = extract_features(self.model, [list(r) for r in new], self.tokenizer.pad_token_id)
            self._cache.update(zip(new, feats))
        if not rows:
            return torch.zeros(0, self.model.head.linear.in_features)
        return torch.stack([self._cache[r] for r in rows])

    def scores(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """Rewards (unitless head logits), one per ``(prompt, completion)``."""
        with torch.no_grad():
            return self.model.head(self.features(prompts, completions).to(self._device())).tolist()

    def agreement(self, pairs: Sequence[RewardPair]) -> tuple[float, int]:
        """``(agreed, total)``: pairs the current head scores higher on the chosen side, a tie
        counting one half (so a zero head agrees on half: chance)."""
        if not pairs:
            return 0.0, 0
        r = self.scores([p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs])
        n = len(pairs)
        return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(r[:n], r[n:])), n

    def refit(self, pairs: Sequence[RewardPair], seed: int = 0) -> dict[str, float]:
        """Fit a fresh head on ``pairs`` plus the prior pairs (see the module docstring).

        Returns:
            ``{"pairs", "expert_pairs", "train_accuracy", "loss", "seconds"}`` (``train_accuracy`` on
            the pairs fitted; ``loss`` the last epoch's mean Bradley–Terry loss, nats).

        Raises:
            ValueError: no pairs at all (no expert pairs and no prior).
        """
        every = list(self.prior) + list(pairs)
        if not every:
            raise ValueError("feedback.refit: no expert rankings (and no prior pairs) to fit the reward model on")
        t0 = time.time()
        prompts = [p.prompt for p in every]
        chosen = self.features(prompts, [p.chosen for p in every]).to(self._device())
        rejected = self.features(prompts, [p.rejected for p in every]).to(self._device())
        torch.manual_seed(seed)
        head = RewardHead(chosen.shape[1]).to(self._device())
        records = fit_head(head, chosen, rejected, self.cfg.epochs, self.cfg.lr, self.cfg.weight_decay, seed=seed)
        self.model.head = head
        self.fitted = True
        return {"pairs": float(len(every)), "expert_pairs": float(len(pairs)),
                "train_accuracy": records[-1]["accuracy"], "loss": records[-1]["loss"],
                "seconds": time.time() - t0}

    def save(self, path: Path) -> None:
        """Save as a pooled reward model directory (``rlhf eval``, ``load_scorer`` and a feedback
        source's ``path`` read it; the backbone is referenced, not copied)."""
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    def _device(self) -> torch.device:
        return self.model.head.feature_mean.device


def expert_pairs(store, tasks_by_id: Mapping[str, Task], completion_ids: set[int] | None = None) -> list[RewardPair]:
    """The pairs every stored expert (``human``) ranking implies, with the pipeline's prompt format
    (``task.transcript() + "\\n\\n"``); only pairs between ``completion_ids`` (one rollout's
    completions, say) when given.

    Raises:
        KeyError: a ranked task is not in ``tasks_by_id`` (the run's training tasks).
    """
    return [RewardPair(tasks_by_id[p.task_id].transcript() + "\n\n", p.chosen, p.rejected, task_id=p.task_id,
                       chosen_id=p.chosen_id, rejected_id=p.rejected_id)
            for p in pairs_from_rankings(store, source="human")
            if completion_ids is None or p.chosen_id in completion_ids]


def refit_round(online: OnlineRewardModel, store, rollout, tasks_by_id: Mapping[str, Task],
                seed: int = 0) -> tuple[dict[str, dict[int, float]], dict[str, float]]:
    """One round of the online reward model, after the experts' rankings of ``rollout`` are stored:
    agreement on the round's expert pairs (before the refit: samples the head never saw), refit on
    every expert pair so far (skipped while there is none and no prior), scores of the groups no
    ranking of this rollout covers yet.

    Args:
        online: the run's :class:`OnlineRewardModel` (its head is replaced).
        store: the run's :class:`~rlhf_workbench.store.Store`.
        rollout: the round's stored rollout (``completions`` with ``task_id``, ``text``).
        tasks_by_id: the run's training tasks by id.
        seed: the refit's seed (the loop passes ``cfg.seed + round``).

    Returns:
        ``(scores, stats)``: per unranked task ``{completion id: reward}`` (the loop records them as
        rankings of source :data:`REFIT_SOURCE`), and ``refit/*`` statistics: ``heldout_agreement``
        and ``heldout_pairs`` (when the experts ranked pairs this round), ``pairs``,
        ``expert_pairs``, ``train_accuracy``, ``loss``, ``seconds``, ``filled_groups``.
    """
    ids = {c.id for c in rollout.completions}
    stats: dict[str, float] = {}
    agreed, n = online.agreement(expert_pairs(store, tasks_by_id, ids))
    if n:
        stats.update({"refit/heldout_agreement": agreed / n, "refit/heldout_pairs": float(n)})
    pairs = expert_pairs(store, tasks_by_id)
    if pairs or online.prior:  # nothing to fit yet (every expert ranking a tie): the head scores as it is
        stats.update({f"refit/{k}": v for k, v in online.refit(pairs, seed).items()})
    ranked = {r.task_id for r in store.rankings_for_rollout(rollout.id)}
    rows = [c for c in rollout.completions if c.task_id not in ranked]
    rewards = online.scores([tasks_by_id[c.task_id].transcript() + "\n\n" for c in rows], [c.text for c in rows])
    scores: dict[str, dict[int, float]] = {}
    for c, r in zip(rows, rewards):
        scores.setdefault(c.task_id, {})[c.id] = r
    stats["refit/filled_groups"] = float(len(scores))
    return scores, stats
