"""Export the collected rankings as a preference dataset (prompt / chosen / rejected).

Every row of ``preference_pairs`` (written by :func:`rlhf_workbench.run.loop._record_rankings`
for rule rankings and, once the worker has consumed them, for expert rankings) becomes one
example. Two forms, as TRL's ``DPOTrainer`` and Hub preference datasets use them:

- plain: ``prompt``, ``chosen``, ``rejected`` are strings;
- conversational: ``prompt`` is ``[{"role": "user", "content": ...}]``, ``chosen`` and
  ``rejected`` are ``[{"role": "assistant", "content": ...}]``.

The prompt is :meth:`Task.prompt` of the stored task with the run's ``tasks.instruction``
(read from the stored config) applied, i.e. the user message the policy saw. Provenance
columns: ``task_id``, ``source`` (``human`` or ``rules``), ``annotator`` (the usernames
that submitted the item, joined by ``","``; None for rules), ``policy_version`` that sampled
the traces, ``round``, ``rationale`` (the annotators' rationales joined; None for rules),
``chosen_id``, ``rejected_id`` (completion ids in the database), ``chosen_origin``,
``rejected_origin`` (who wrote the trace: ``sample`` the policy, ``teacher`` the API model of
``rollout.teacher``, ``revision`` a constitutional revision). A collection-only run
(``algorithm: none``) exports the teacher's ranked traces this way, for ``rlhf train --algorithm dpo``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import aliased

from rlhf_workbench.store import Annotation, CompletionRow, PreferencePair, RankingRow, Rollout, Store, User

SOURCES = ("human", "rules", "all")
RATIONALE_SEP = "\n\n"


def preference_rows(store: Store, source: str = "all") -> list[dict]:
    """The preference pairs of the store as plain-form rows, in pair id order.

    Args:
        source: ``human``, ``rules`` or ``all``.

    Raises:
        ValueError: unknown ``source``.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    chosen, rejected = aliased(CompletionRow), aliased(CompletionRow)
    q = (select(PreferencePair.id, PreferencePair.chosen_id, PreferencePair.rejected_id, RankingRow.source,
                RankingRow.rollout_id, RankingRow.task_id, Rollout.round, Rollout.policy_version_id,
                chosen.text, rejected.text, chosen.origin, rejected.origin)
         .join(RankingRow, RankingRow.id == PreferencePair.ranking_id)
         .join(Rollout, Rollout.id == RankingRow.rollout_id)
         .join(chosen, chosen.id == PreferencePair.chosen_id)
         .join(rejected, rejected.id == PreferencePair.rejected_id)
         .order_by(PreferencePair.id))
    if source != "all":
        q = q.where(RankingRow.source == source)
    with store.session() as s:
        pairs = s.execute(q).all()
        annotations: dict[tuple[int, str], list[tuple[str, str]]] = {}
        for rollout_id, task_id, user, rationale in s.execute(
                select(Annotation.rollout_id, Annotation.task_id, User.username, Annotation.rationale)
                .join(User, User.id == Annotation.user_id)
                .where(Annotation.status == "submitted").order_by(Annotation.id)):
            annotations.setdefault((rollout_id, task_id), []).append((user, rationale or ""))
    prompts = store.prompts({p.task_id for p in pairs})
    rows = []
    for p in pairs:
        human = p.source == "human"
        subs = annotations.get((p.rollout_id, p.task_id), []) if human else []
        rows.append({
            "prompt": prompts[p.task_id], "chosen": p[8], "rejected": p[9],
            "task_id": p.task_id, "source": p.source,
            "annotator": ",".join(u for u, _ in subs) if human else None,
            "policy_version": p.policy_version_id, "round": p.round,
            "rationale": RATIONALE_SEP.join(r for _, r in subs if r.strip()) if human else None,
            "chosen_id": p.chosen_id, "rejected_id": p.rejected_id, "chosen_origin": p[10], "rejected_origin": p[11],
        })
    return rows


def conversational(row: dict) -> dict:
    """A plain-form row in TRL's conversational preference form (metadata columns kept)."""
    return {**row, "prompt": [{"role": "user", "content": row["prompt"]}],
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}]}


def export_preferences(store: Store, out_dir: str | Path, source: str = "all") -> dict:
    """Write ``preferences.jsonl`` (plain), ``preferences_conversational.jsonl`` and a
    ``datasets`` copy of the plain form (``dataset/``, ``datasets.load_from_disk``) to ``out_dir``.

    Returns:
        ``{"pairs": n, "out_dir": str, "by_source": {source: n}}``.
    """
    import datasets

    rows = preference_rows(store, source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "preferences.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(out / "preferences_conversational.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(conversational(r), ensure_ascii=False) + "\n")
    features = datasets.Features({
        "prompt": datasets.Value("string"), "chosen": datasets.Value("string"), "rejected": datasets.Value("string"),
        "task_id": datasets.Value("string"), "source": datasets.Value("string"),
        "annotator": datasets.Value("string"), "policy_version": datasets.Value("int64"),
        "round": datasets.Value("int64"), "rationale": datasets.Value("string"),
        "chosen_id": datasets.Value("int64"), "rejected_id": datasets.Value("int64"),
        "chosen_origin": datasets.Value("string"), "rejected_origin": datasets.Value("string"),
    })
    columns = {k: [r[k] for r in rows] for k in features}
    target = out / "dataset"
    if (target / "state.json").exists():  # a previous export: replace it, leave nothing stale
        shutil.rmtree(target)
    datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(out / "dataset"))
    by_source: dict[str, int] = {}
    for r in rows:
        by_source[r["source"]] = by_source.get(r["source"], 0) + 1
    return {"pairs": len(rows), "out_dir": str(out), "by_source": by_source}
