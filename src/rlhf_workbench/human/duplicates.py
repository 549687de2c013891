"""No duplicate work: identical traces of an item are shown once, with a count.

Two verified traces are *identical* when their texts are equal after whitespace normalisation
(runs of whitespace collapsed to one space, ends stripped:
:func:`rlhf_workbench.human.items.normalise`). The annotation
page and the HTTP API show one *entry* per distinct text (in the annotator's blind order, at the
place of its first copy), and the expert's rank, flag and "verified answer is actually wrong"
mark for the entry apply to every copy when stored (:func:`expand_to_copies`). The stored
:class:`rlhf_workbench.store.Annotation` keeps per-completion ids, so training and export see
every copy ranked (copies tie).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf_workbench.human.annotation import save_annotation
from rlhf_workbench.human.errors import AnnotationError
from rlhf_workbench.human.items import Trace, blind_order, item_traces, normalise, trace_of
from rlhf_workbench.store import Annotation, Store


@dataclass
class Entry:
    """One distinct trace text as shown: its first copy, the ids of every copy and who wrote them
    (``sources``: ``Trace.source`` of the copies, distinct, in order; a policy sample and a teacher
    trace with the same text are one entry)."""

    trace: Trace
    completion_ids: list[int]
    sources: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        """How many identical traces this entry stands for."""
        return len(self.completion_ids)


def group_traces(traces: list[Trace]) -> list[Entry]:
    """Identical traces (after :func:`normalise`) as one entry each, in order of first appearance."""
    entries: dict[str, Entry] = {}
    for tr in traces:
        key = normalise(tr.text)
        if key in entries:
            entries[key].completion_ids.append(tr.completion_id)
            if tr.source not in entries[key].sources:
                entries[key].sources.append(tr.source)
        else:
            entries[key] = Entry(tr, [tr.completion_id], [tr.source])
    return list(entries.values())


def count_label(count: int) -> str:
    """What the page shows beside an entry standing for several copies ("" for one)."""
    return f"×{count} identical traces" if count > 1 else ""


def shown_entries(store: Store, user_id: int, rollout_id: int, task_id: str) -> list[Entry]:
    """The entries of an item as this annotator sees them (their blind order, copies grouped)."""
    verified, _ = item_traces(store, rollout_id, task_id)
    order = blind_order(len(verified), user_id, rollout_id, task_id)
    return group_traces([trace_of(verified[i]) for i in order])


def entry_ranks(entries: list[Entry], ranks: list) -> dict[int, int]:
    """Ranks given per shown entry (0 best; None for an unranked entry) as completion id -> rank
    for every copy.

    Raises:
        AnnotationError: not one rank per entry.
    """
    if len(ranks) != len(entries):
        raise AnnotationError(f"give one rank per shown entry: {len(entries)} entries, got {len(ranks)} ranks")
    return {cid: r for e, r in zip(entries, ranks) if r is not None for cid in e.completion_ids}


def expand_to_copies(entries: list[Entry], ranks: dict, flagged: list, wrong: list) -> tuple[dict, list, list]:
    """Apply a rank, flag or wrong mark given to one copy of an entry to every copy of it.

    A copy ranked explicitly keeps its own rank; an unranked copy takes the rank of the first
    ranked copy of its entry. Ids that belong to no entry pass through unchanged (and are refused
    by :func:`rlhf_workbench.human.annotation.save_annotation`). Keys of ``ranks`` may be ints or
    strings of digits (JSON object keys).
    """
    group_of = {cid: e for e in entries for cid in e.completion_ids}

    def key(x):
        try:
            return int(x)
        except (TypeError, ValueError):
            return x

    out = dict(ranks or {})
    given = {key(k) for k in out}
    for k, v in list(out.items()):
        e = group_of.get(key(k))
        for cid in e.completion_ids if e is not None else ():
            if cid not in given:
                out[cid] = v
                given.add(cid)

    def spread(ids):
        ids = list(ids or [])
        more = [c for x in ids if key(x) in group_of for c in group_of[key(x)].completion_ids]
        return list(dict.fromkeys([*ids, *more]))

    return out, spread(flagged), spread(wrong)


def save_grouped(store: Store, user_id: int, rollout_id: int, task_id: str, status: str,
                 ranks: dict | list | None = None, rationale: str = "", flagged: list | None = None,
                 revision: int | None = None, annotators_per_item: int | None = None,
                 verifier_wrong: list | None = None, claim_seconds: float | None = None,
                 complete: bool = True) -> Annotation:
    """:func:`rlhf_workbench.human.annotation.save_annotation` with identical traces grouped.

    ``ranks`` is either a list, one rank per shown entry (the order of :func:`shown_entries`;
    None for an unranked entry in a draft), or a dict completion id -> rank as before (a rank
    given to one copy applies to the others). ``flagged`` and ``verifier_wrong`` name completion
    ids; a mark on one copy applies to every copy.
    """
    entries = shown_entries(store, user_id, rollout_id, task_id)
    if isinstance(ranks, list):
        ranks = entry_ranks(entries, ranks)
    ranks, flagged, verifier_wrong = expand_to_copies(entries, ranks or {}, flagged or [], verifier_wrong or [])
    kwargs = {} if claim_seconds is None else {"claim_seconds": claim_seconds}
    return save_annotation(store, user_id, rollout_id, task_id, status, ranks, rationale, flagged, revision,
                           annotators_per_item, verifier_wrong, complete=complete, **kwargs)
