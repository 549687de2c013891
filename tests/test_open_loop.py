"""The loop without a verifier: open tasks (no answer key) ranked by the feedback sources."""

from __future__ import annotations

import json

from sqlalchemy import select

from conftest import seed_rollout
from rlhf_workbench.run import loop as loop_mod
from rlhf_workbench.config import ModelConfig, RunConfig
from rlhf_workbench.feedback.sources import rankable
from rlhf_workbench.model.loading import load_policy
from rlhf_workbench.store import CompletionRow, PreferencePair, RankingRow, Store
from rlhf_workbench.tasks.loading import load_tasks
from rlhf_workbench.tasks.task import Task
from rlhf_workbench.verify import NO_KEY_REASON, verify

OPEN = [
    {"id": "o1", "prompt": "Say something kind.", "metadata": {"split": "train"}},
    {"id": "o2", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                              {"role": "user", "content": "Tell me about tea."}], "metadata": {"split": "train"}},
    {"id": "o3", "prompt": "Describe the sea.", "metadata": {"split": "heldout"}},
    {"id": "o4", "prompt": "Name a colour.", "metadata": {"split": "heldout"}},
]


def _task_file(tmp_path):
    path = tmp_path / "open.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in OPEN), encoding="utf-8")
    return path


def _cfg(model_dir, task_file, algorithm="grpo") -> RunConfig:
    return RunConfig.model_validate({
        "algorithm": algorithm, "rounds": 1, "seed": 3,
        "model": {"name": str(model_dir), "mixed_precision": "no"},
        "tasks": {"path": str(task_file), "instruction": "End with 'Answer: <number>'."},
        "rollout": {"num_generations": 2, "prompts_per_round": 2, "max_new_tokens": 8, "batch_size": 8},
        "optim": {"lr": 1e-3, "micro_batch_size": 4},
        "eval": {"max_new_tokens": 6, "batch_size": 8, "kl_samples": 2},
        "feedback": {"sources": [{"name": "length", "weight": 1.0}]},
    })


def test_open_task_verdict_and_rankable():
    t = Task("x", "Say hi.", "", "open")
    v = verify("Answer: 3", t)
    assert (v.correct, v.extracted, v.reason) == (False, None, NO_KEY_REASON)
    assert t.prompt() == "Say hi."  # no final-answer instruction, even with one configured
    assert rankable(False, False, True) and not rankable(False, True, True)
    assert rankable(True, False, False) and not rankable(False, False, False) and not rankable(True, True, False)


def test_grpo_round_on_open_tasks(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    summary = loop_mod.run(_cfg(tiny_model_dir, _task_file(tmp_path)), out)
    store = Store(run_dir=out)
    with store.session() as s:
        comps = list(s.scalars(select(CompletionRow)))
        rankings = list(s.scalars(select(RankingRow)))
        assert len(comps) == 4 and {c.task_id for c in comps} == {"o1", "o2"}
        assert all(c.verification.reason == NO_KEY_REASON and not c.verification.correct for c in comps)
        assert len(rankings) == 2
        for rk in rankings:
            assert all(r is not None for r in rk.ranks.values())  # every unflagged trace is ranked
            assert all(x > 0 for x in rk.rewards.values())
    for k in ("eval_before", "eval_after"):
        assert summary[k]["accuracy_applicable"] is False and summary[k]["n_open"] == 2
        assert summary[k]["completion_length"] > 0
    assert "train/loss" in store.metrics()


def test_dpo_pairs_from_open_rankings(tiny_model_dir, tmp_path):
    tasks = load_tasks(_task_file(tmp_path))
    store = Store(run_dir=tmp_path / "run")
    store.add_tasks([t for t in tasks if t.metadata["split"] == "train"], "train")
    store.publish_version(0, None, "base", None, {}, 0)
    pair = load_policy(ModelConfig(name=str(tiny_model_dir), mixed_precision="no"))
    texts = {"o1": ["You are kind.", "You are a very kind and thoughtful person, truly."],
             "o2": ["Tea is a drink made from leaves, loved all over the world.", "Tea is nice."]}
    seed_rollout(store, pair, texts)
    cfg = _cfg(tiny_model_dir, _task_file(tmp_path), algorithm="dpo")
    rollout = store.rollout_for_round(1)
    scores, _ = loop_mod._rule_scores(rollout, cfg, {t.id: t for t in tasks}, set())
    loop_mod._record_rankings(store, rollout, "rules", scores, set(), cfg)
    with store.session() as s:
        pairs = list(s.scalars(select(PreferencePair)))
        assert len(pairs) == 2
        for p in pairs:  # length rule: the shorter reply is better-ranked, so chosen
            chosen, rejected = s.get(CompletionRow, p.chosen_id), s.get(CompletionRow, p.rejected_id)
            assert chosen.task_id == rejected.task_id
            assert len(chosen.token_ids) < len(rejected.token_ids)
    batch, stats = loop_mod._round_batch(store, store.rollout_for_round(1), cfg, "dpo")
    assert len(batch) == 2 and stats["pairs"] == 2.0
    # a flagged trace is never ranked, and is the rejected one
    with store.session() as s:
        s.query(PreferencePair).delete()
        s.query(RankingRow).delete()
        s.commit()
    flagged = {c.id for c in store.rollout_for_round(1).completions if c.text == "You are kind."}
    scores, _ = loop_mod._rule_scores(rollout, cfg, {t.id: t for t in tasks}, flagged)
    loop_mod._record_rankings(store, store.rollout_for_round(1), "rules", scores, flagged, cfg)
    with store.session() as s:
        rk = s.scalars(select(RankingRow).where(RankingRow.task_id == "o1")).one()
        assert [rk.ranks[str(c)] for c in flagged] == [None]
        p = s.scalars(select(PreferencePair).join(RankingRow).where(RankingRow.task_id == "o1")).one()
        assert p.rejected_id in flagged


def test_kto_and_sft_batches_on_open_tasks(tiny_model_dir, tmp_path):
    tasks = load_tasks(_task_file(tmp_path))
    store = Store(run_dir=tmp_path / "run")
    store.add_tasks([t for t in tasks if t.metadata["split"] == "train"], "train")
    store.publish_version(0, None, "base", None, {}, 0)
    pair = load_policy(ModelConfig(name=str(tiny_model_dir), mixed_precision="no"))
    seed_rollout(store, pair, {"o1": ["Short.", "A bit longer reply.", "The longest reply of the three here."]})
    cfg = _cfg(tiny_model_dir, _task_file(tmp_path), algorithm="kto")
    rollout = store.rollout_for_round(1)
    scores, _ = loop_mod._rule_scores(rollout, cfg, {t.id: t for t in tasks}, set())
    loop_mod._record_rankings(store, rollout, "rules", scores, set(), cfg)
    rollout = store.rollout_for_round(1)
    by_len = sorted(rollout.completions, key=lambda c: len(c.token_ids))
    kto, stats = loop_mod._round_batch(store, rollout, cfg, "kto")
    assert (stats["desirable"], stats["undesirable"]) == (1.0, 1.0)
    labels = {tuple(s.token_ids): s.label for s in kto}
    assert labels == {tuple(by_len[0].token_ids): True, tuple(by_len[-1].token_ids): False}
    sft, stats = loop_mod._round_batch(store, rollout, cfg, "sft")
    assert [tuple(s.token_ids) for s in sft] == [tuple(by_len[0].token_ids)]


def test_experts_rank_open_items(tiny_model_dir, tmp_path):
    from rlhf_workbench.human.accounts import create_user
    from rlhf_workbench.human.annotation import consume_human_rankings, next_item, open_item_count, save_annotation

    tasks = load_tasks(_task_file(tmp_path))
    store = Store(run_dir=tmp_path / "run")
    store.add_tasks([t for t in tasks if t.metadata["split"] == "train"], "train")
    store.publish_version(0, None, "base", None, {}, 0)
    pair = load_policy(ModelConfig(name=str(tiny_model_dir), mixed_precision="no"))
    rid = seed_rollout(store, pair, {"o1": ["Kind words.", "You matter."]})
    alice = create_user(store, "alice", "correct horse")
    rollout = store.rollout_for_round(1)
    assert open_item_count(store, rollout) == 1
    item = next_item(store, alice)  # an open item: every trace is shown for ranking
    assert item.task.id == "o1" and len(item.verified) == 2 and not item.rejected
    ranks = {t.completion_id: i for i, t in enumerate(item.verified)}
    save_annotation(store, alice, rid, "o1", "submitted", ranks)
    cfg = _cfg(tiny_model_dir, _task_file(tmp_path), algorithm="dpo")
    consume_human_rankings(store, rollout, lambda s, scores, flagged: loop_mod._record_rankings(
        store, rollout, "human", scores, flagged, cfg, session=s))
    with store.session() as s:
        p = s.scalars(select(PreferencePair)).one()
        assert (ranks[p.chosen_id], ranks[p.rejected_id]) == (0, 1)


def test_app_shows_open_items_without_a_ground_truth_panel():
    from rlhf_workbench.app.render import task_md, trace_md
    from rlhf_workbench.verify import Verification

    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Tell me about tea."}]
    md = task_md(Task("o2", "Tell me about tea.", "", "open", metadata={"messages": messages}))
    assert "Ground truth" not in md and "**Assistant:** Hello" in md and "no answer key" in md
    keyed = task_md(Task("k", "What is 2 + 2?", "4"))
    assert "**Ground truth:** `4`" in keyed
    trace = Verification(correct=False, extracted=None, format_ok=False, reason=NO_KEY_REASON)
    shown = trace_md(1, type("T", (), {"text": "Green tea.", "reason": trace.reason})())
    assert "verifier" not in shown and "Green tea." in shown
    assert "verifier: _ok_" in trace_md(1, type("T", (), {"text": "4", "reason": "ok"})())
