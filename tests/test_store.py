"""Store round trip: what is written reads back unchanged, from a second connection."""

import pytest
from sqlalchemy import select

from rlhf_workbench.config import RunConfig
from rlhf_workbench.loop import _record_rankings, _round_batch, _rule_scores, _store_rollout
from rlhf_workbench.rollout import Completion
from rlhf_workbench.store import RankingRow, Store
from rlhf_workbench.tasks import Task

TASKS = [Task(id="t1", question="What is 2 + 2?", answer="4"),
         Task(id="t2", question="Pick one", answer="B", answer_type="choice", choices={"A": "x", "B": "y"},
              metadata={"topic": "demo"})]


def test_round_trip(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    store = Store(url)
    store.add_tasks(TASKS[:1], "train")
    store.add_tasks(TASKS[1:], "heldout")
    store.add_tasks(TASKS[:1], "train")  # idempotent
    with pytest.raises(ValueError, match="t1"):
        store.add_tasks([Task(id="t1", question="other", answer="5")], "train")
    store.publish_version(0, None, "base", None, {"eval/accuracy": 0.25}, round=0)
    store.set_meta("config", {"a": [1, 2]})

    cfg = RunConfig()
    cfg.rollout.num_generations = 2
    comps = [Completion("t1", 0, [1, 2], [5, 6, 7], [-0.5, -1.25, -0.125], "2 + 2 = 4\nAnswer: 4", True),
             Completion("t1", 1, [1, 2], [8], [-2.0], "Answer: 5", True)]
    rid = _store_rollout(store, 1, 0, {"temperature": 0.7}, {"t1": TASKS[0]}, comps)
    _record_rankings(store, store.rollout_for_round(1), "rules", _rule_scores(store.rollout_for_round(1), cfg)[0], set(), cfg)

    again = Store(url)  # a fresh engine: everything came from the database
    assert again.tasks("train") == TASKS[:1] and again.tasks("heldout") == TASKS[1:]
    assert again.tasks("heldout")[0].choices == {"A": "x", "B": "y"}
    assert again.tasks("heldout")[0].metadata == {"topic": "demo"}
    assert [(v.id, v.algorithm, v.metrics) for v in again.versions()] == [(0, "base", {"eval/accuracy": 0.25})]
    assert again.metrics() == {"eval/accuracy": [(0, 0.25)]}
    assert again.get_meta("config") == {"a": [1, 2]} and again.get_meta("missing", 7) == 7
    rollout = again.rollout_for_round(1)
    assert rollout.id == rid and rollout.settings == {"temperature": 0.7} and rollout.policy_version_id == 0
    stored = [(c.token_ids, c.logps, c.text, c.verification.correct, c.verification.format_ok)
              for c in rollout.completions]
    assert stored == [([5, 6, 7], [-0.5, -1.25, -0.125], "2 + 2 = 4\nAnswer: 4", True, True),
                      ([8], [-2.0], "Answer: 5", False, True)]
    with again.session() as s:
        ranking = s.scalars(select(RankingRow)).one()
    ids = [str(c.id) for c in rollout.completions]
    assert ranking.ranks == {ids[0]: 0, ids[1]: None} and ranking.rewards[ids[1]] == 0.0
    pairs = again.pairs_for_rollout(rid)
    assert [(p.chosen_id, p.rejected_id) for p in pairs] == [(rollout.completions[0].id, rollout.completions[1].id)]
    samples, stats = _round_batch(again, rollout, cfg)
    assert stats["acceptance_rate"] == 0.5
    assert samples[0].advantage > 0 > samples[1].advantage
    assert samples[0].old_logps == [-0.5, -1.25, -0.125]
