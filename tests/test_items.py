"""No duplicate work: identical traces are one entry, and its rank goes to every copy."""

import pytest
from sqlalchemy import select

from rlhf_workbench.human.accounts import create_user
from rlhf_workbench.human.annotation import claim_item, human_scores
from rlhf_workbench.config import ModelConfig
from rlhf_workbench.human.duplicates import expand_to_copies, group_traces, save_grouped, shown_entries
from rlhf_workbench.human.items import normalise
from rlhf_workbench.model.loading import load_policy
from rlhf_workbench.store import Annotation, Store
from rlhf_workbench.tasks.task import Task

from conftest import seed_rollout

TASKS = [Task(id=f"q{i}", question=f"What is {i} + {i}?", answer=str(2 * i)) for i in range(1, 3)]


@pytest.fixture()
def seeded(tiny_model_dir, tmp_path):
    store = Store(run_dir=tmp_path)
    store.add_tasks(TASKS, "train")
    store.publish_version(0, None, "base", None, {}, 0)
    pair = load_policy(ModelConfig(name=str(tiny_model_dir), mixed_precision="no"))
    texts = {"q1": ["1 + 1 = 2\nAnswer: 2", "Answer: 2", "  Answer:   2\n", "Answer: 999"],
             "q2": ["Answer: 4", "Then:\nAnswer: 4", "Answer: 5"]}
    rid = seed_rollout(store, pair, texts)
    return store, rid, create_user(store, "alice", "correct horse")


def test_normalise_and_group():
    assert normalise("  a \n\t b  ") == "a b"
    from rlhf_workbench.human.items import Trace
    entries = group_traces([Trace(1, "x  y", ""), Trace(2, "z", ""), Trace(3, " x y\n", "")])
    assert [(e.trace.completion_id, e.completion_ids, e.count) for e in entries] == [(1, [1, 3], 2), (2, [2], 1)]
    ranks, flagged, wrong = expand_to_copies(entries, {"1": 0, 2: 1}, [3], [])
    assert ranks == {"1": 0, 2: 1, 3: 0} and sorted(flagged) == [1, 3] and wrong == []
    assert expand_to_copies(entries, {1: 0, 3: 1}, [], [])[0] == {1: 0, 3: 1}  # explicit ranks kept


def test_collapsed_entry_rank_applies_to_every_copy(seeded):
    store, rid, alice = seeded
    claim_item(store, alice, rid, "q1")
    entries = shown_entries(store, alice, rid, "q1")
    assert sorted(e.count for e in entries) == [1, 2]
    dup = next(e for e in entries if e.count == 2)
    # one rank per shown entry: the duplicated entry ranked best, and marked flagged on one copy
    a = save_grouped(store, alice, rid, "q1", "submitted", [0 if e is dup else 1 for e in entries],
                     flagged=[dup.completion_ids[1]])
    with store.session() as s:
        a = s.scalars(select(Annotation)).one()
    assert {int(k): v for k, v in a.ranks.items()} == {
        **{cid: 0 for cid in dup.completion_ids},
        **{cid: 1 for e in entries if e is not dup for cid in e.completion_ids}}
    assert sorted(a.flagged) == sorted(dup.completion_ids)
    scores, flagged, n = human_scores(store, store.rollout_for_round(1))
    assert n == 1 and len({scores["q1"][cid] for cid in dup.completion_ids}) == 1


def test_per_id_ranks_of_one_copy_fill_the_other(seeded):
    store, rid, alice = seeded
    claim_item(store, alice, rid, "q1")
    entries = shown_entries(store, alice, rid, "q1")
    ranks = {str(e.completion_ids[0]): i for i, e in enumerate(entries)}  # a scripted client ranks one copy
    save_grouped(store, alice, rid, "q1", "submitted", ranks)
    with store.session() as s:
        stored = {int(k): v for k, v in s.scalars(select(Annotation)).one().ranks.items()}
    assert stored == {cid: i for i, e in enumerate(entries) for cid in e.completion_ids}
