"""What the updates train on: a :class:`Sample` (one prompt and one completion as token ids) and a
:class:`SampleGroup` (one prompt's K completions, the unit of GRPO's and RLOO's baselines).

Kept below every algorithm module so that the feedback sources (``feedback/thumbs.py``), the
pipeline stages (``run/stages.py``) and offline training (``train/offline.py``) build samples
without importing an update.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Sample:
    """A prompt and one completion as token ids, with what the losses need.

    ``old_logps`` are the sampling policy's per-token log-probs recorded at rollout
    (temperature-scaled; the ratio's denominator only when they are not recomputed, see
    :func:`rlhf_workbench.train.engine.recompute_old_logps`); ``advantage`` is used by GRPO;
    ``reward`` is the sequence-level score (PPO's score, RLOO's reward); ``label`` is KTO's
    desirable (True) / undesirable (False) tag.
    """

    prompt_ids: list[int]
    token_ids: list[int]
    old_logps: list[float] | None = None
    advantage: float = 0.0
    reward: float = 0.0
    label: bool | None = None


@dataclass
class SampleGroup:
    """One prompt's K completions (one stored ranking covers one task's completions): the unit
    over which GRPO and RLOO compute their baselines.

    Attributes:
        samples: the group's samples, in rollout order.
    """

    samples: list[Sample] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def rewards(self) -> list[float]:
        """``Sample.reward`` of each member, in order."""
        return [s.reward for s in self.samples]


def as_groups(batch: list[Sample] | list[SampleGroup], group_size: int, who: str) -> list[SampleGroup]:
    """``batch`` as groups: returned as is when it already holds :class:`SampleGroup` objects;
    a flat list of samples is read as contiguous groups of ``group_size`` (the layout of a
    rollout batch, K completions per prompt).

    Raises:
        ValueError: a flat list whose length is not a multiple of ``group_size`` (``who`` names
            the caller in the message).
    """
    if not batch or isinstance(batch[0], SampleGroup):
        return list(batch)
    if len(batch) % group_size:
        raise ValueError(f"{who}: {len(batch)} samples is not a multiple of num_generations K={group_size}")
    return [SampleGroup(list(batch[i : i + group_size])) for i in range(0, len(batch), group_size)]


def group_size(groups: list[SampleGroup], who: str) -> int:
    """The common size ``K`` of ``groups`` (the advantage functions take equal-sized groups).

    Raises:
        ValueError: groups of different sizes.
    """
    sizes = {len(g) for g in groups}
    if len(sizes) > 1:
        raise ValueError(f"{who}: groups of different sizes {sorted(sizes)}; every prompt needs K completions")
    return sizes.pop() if sizes else 1


def flatten(groups: list[SampleGroup]) -> list[Sample]:
    """Every sample of ``groups``, group after group (the global batch of the update)."""
    return [s for g in groups for s in g.samples]
