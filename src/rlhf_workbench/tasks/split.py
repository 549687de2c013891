"""Splitting tasks into train and held-out sets, and the generator of the bundled arithmetic set."""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence

from rlhf_workbench.tasks.task import Task


def split_tasks(
    tasks: Sequence[Task],
    heldout_fraction: float | None = None,
    heldout_size: int | None = None,
    seed: int = 0,
) -> tuple[list[Task], list[Task]]:
    """Split tasks into train and held-out sets, deterministically.

    A task whose ``metadata["split"]`` is ``"train"`` or ``"heldout"`` goes there. The other
    ("free") tasks are ranked by ``sha256(f"{seed}:{id}")`` (stable across runs, machines and
    Python versions) and the first ``heldout_size`` of them, or ``round(heldout_fraction *
    number of free tasks)``, are held out; with neither given all free tasks go to train.
    Input order is preserved within each list.

    Args:
        tasks: the tasks (ids are expected to be unique).
        heldout_fraction: fraction in [0, 1] of the free tasks to hold out.
        heldout_size: number of free tasks to hold out (0 .. number of free tasks).
        seed: changes which free tasks are held out.

    Returns:
        ``(train, heldout)``, disjoint, together containing every task once.

    Raises:
        ValueError: both ``heldout_fraction`` and ``heldout_size`` given, or either out of
            range.
    """
    if heldout_fraction is not None and heldout_size is not None:
        raise ValueError("give heldout_fraction or heldout_size, not both")
    if heldout_fraction is not None and not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
    free = [t for t in tasks if t.metadata.get("split") not in ("train", "heldout")]
    if heldout_size is not None:
        if not 0 <= heldout_size <= len(free):
            raise ValueError(f"heldout_size must be in [0, {len(free)}] (tasks without a fixed split), got {heldout_size}")
        n_heldout = heldout_size
    elif heldout_fraction is not None:
        n_heldout = math.floor(heldout_fraction * len(free) + 0.5)
    else:
        n_heldout = 0
    ranked = sorted(free, key=lambda t: (hashlib.sha256(f"{seed}:{t.id}".encode()).hexdigest(), t.id))
    heldout_ids = {t.id for t in ranked[:n_heldout]}
    train, heldout = [], []
    for t in tasks:
        split = t.metadata.get("split")
        if split == "heldout" or (split != "train" and t.id in heldout_ids):
            heldout.append(t)
        else:
            train.append(t)
    return train, heldout



def generate_arithmetic(n: int = 1000, seed: int = 1234, heldout: int = 128) -> list[Task]:
    """Generate two-digit addition tasks ("What is 47 + 38?"), as in the bundled set.

    ``a`` and ``b`` are drawn uniformly from 10..99 with ``random.Random(seed)``; a pair whose
    question text was already generated is dropped and drawn again, so every question is
    unique. The first ``n - heldout`` tasks get ``metadata["split"] = "train"``, the last
    ``heldout`` get ``"heldout"``; a held-out draw whose commuted twin (``b + a``) is in train
    is dropped too, so no held-out sum is seen in training in either order. Metadata also
    holds ``a`` and ``b``. Ids are ``add-0000``, ``add-0001``...

    Args:
        n: number of tasks (1 .. 8100, the number of distinct pairs).
        seed: random seed.
        heldout: number of tasks (taken from the end) in the held-out split.

    Returns:
        ``n`` tasks with ``answer_type="number"`` and the sum as the answer string.

    Raises:
        ValueError: ``n`` or ``heldout`` out of range.
    """
    if not 1 <= n <= 90 * 90:
        raise ValueError(f"n must be in [1, 8100], got {n}")
    if not 0 <= heldout <= n:
        raise ValueError(f"heldout must be in [0, {n}], got {heldout}")
    rng = random.Random(seed)
    width = max(4, len(str(n - 1)))
    seen: set[str] = set()
    train_pairs: set[tuple[int, int]] = set()
    tasks: list[Task] = []
    while len(tasks) < n:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        question = f"What is {a} + {b}?"
        i = len(tasks)
        split = "train" if i < n - heldout else "heldout"
        if question in seen or (split == "heldout" and (min(a, b), max(a, b)) in train_pairs):
            continue
        seen.add(question)
        if split == "train":
            train_pairs.add((min(a, b), max(a, b)))
        tasks.append(
            Task(
                id=f"add-{i:0{width}d}",
                question=question,
                answer=str(a + b),
                answer_type="number",
                metadata={"split": split, "a": a, "b": b},
            )
        )
    return tasks
