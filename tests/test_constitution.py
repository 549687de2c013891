"""Constitutional self-critique and revision (rlhf_workbench.feedback.constitution): loading a constitution,
keeping a (revision > original) pair only with evidence, storing it and training DPO on it.

The critic here is a small callable that writes fixed critique/revision TEXT, so that which
revision verifies is chosen by the test; every log-prob comes from a real forward pass of the
tiny policy."""

from __future__ import annotations

import json
import re

import pytest
import torch
from accelerate import Accelerator
from sqlalchemy import select

from conftest import seed_rollout
from rlhf_workbench.run import loop as loop_mod
from rlhf_workbench.config import ConfigError, ModelConfig, RunConfig, load_config
from rlhf_workbench.feedback.constitution import (ConstitutionError, clean_revision, critique_and_revise, load_constitution,
                                         select_originals)
from rlhf_workbench.feedback.judge import PairwiseJudge
from rlhf_workbench.model.logprobs import completion_logps
from rlhf_workbench.model.loading import load_policy
from rlhf_workbench.store import CompletionRow, PreferencePair, Store
from rlhf_workbench.tasks.task import Task
from rlhf_workbench.train.dpo import dpo_update

TASKS = [Task("t1", "What is 2 + 3?", "5", "number"), Task("t2", "What is 4 + 4?", "8", "number")]
REVISIONS = {"2 + 3": "2 plus 3 makes 5.\nAnswer: 5", "4 + 4": "4 plus 4 makes 9.\nAnswer: 9"}


def _reply(messages):
    """A critique for a critique request (one user turn), else a fixed revision by question."""
    if len(messages) == 1:
        return "The final answer does not follow from the question."
    question = next(k for k in REVISIONS if k in messages[0]["content"])
    return "Revision: " + REVISIONS[question]


def fake_critic(conversations, max_tokens):
    """A critic writing fixed text (batched: one reply per conversation)."""
    return [_reply(m) for m in conversations]


def _cfg(model_dir, **constitution) -> RunConfig:
    return RunConfig.model_validate({
        "algorithm": "dpo", "rounds": 1, "seed": 1,
        "model": {"name": str(model_dir), "mixed_precision": "no"},
        "rollout": {"num_generations": 2, "prompts_per_round": 2, "max_new_tokens": 8, "batch_size": 8},
        "optim": {"lr": 1e-3, "micro_batch_size": 4},
        "eval": {"max_new_tokens": 6, "batch_size": 8, "kl_samples": 2},
        "dpo": {"beta": 0.1},
        "feedback": {"constitution": {"max_new_tokens": 8, **constitution}},
    })


def _seeded(tiny_model_dir, tmp_path, texts):
    store = Store(run_dir=tmp_path / "run")
    store.add_tasks(TASKS, "train")
    store.publish_version(0, None, "base", None, {}, 0)
    pair = load_policy(ModelConfig(name=str(tiny_model_dir), mixed_precision="no"))
    seed_rollout(store, pair, texts)
    cfg = _cfg(tiny_model_dir)
    tasks_by_id = {t.id: t for t in TASKS}
    rollout = store.rollout_for_round(1)
    scores, _ = loop_mod._rule_scores(rollout, cfg, tasks_by_id, set())
    loop_mod._record_rankings(store, rollout, "rules", scores, set(), cfg)
    return store, pair, cfg, tasks_by_id


def _margin(pair, beta, chosen, rejected) -> float:
    """β [(log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r))], summed token log-probs (DPO eq. 7)."""
    def logp(model, row):
        full = torch.tensor([list(row.prompt_ids) + list(row.token_ids)])
        with torch.no_grad():
            return completion_logps(model, full, torch.ones_like(full), len(row.token_ids))[0].sum().item()
    return beta * ((logp(pair.policy, chosen) - logp(pair.reference, chosen))
                   - (logp(pair.policy, rejected) - logp(pair.reference, rejected)))


def test_bundled_constitution_is_illustrative_and_parses():
    c = load_constitution("bundled:medical")
    assert [p.name for p in c.principles] == ["evidence", "uncertainty", "safety", "clarity", "answer"]
    assert all(p.critique.startswith("Identify") or p.critique.startswith("Check") for p in c.principles)
    assert all(p.revision.startswith("Rewrite") for p in c.principles)
    from rlhf_workbench.feedback.constitution import resolve_constitution

    assert "NOT CLINICAL GUIDANCE" in resolve_constitution("bundled:medical").read_text()
    assert clean_revision("  **Revised response:** Answer: 5 ") == "Answer: 5"


@pytest.mark.parametrize("text, problem", [
    ("# nothing here\n", ": no principles"),
    ("## a\nCritique: x\n", ":1: principle 'a' has no 'Revision:' line"),
    ("## a\nCritique: x\nRevision: y\n## a\nCritique: x\nRevision: y\n", ":4: principle 'a' is defined twice"),
    ("## a\nCritique: x\nCritique: z\nRevision: y\n", ":3: principle 'a' has a second 'Critique:' line"),
    ("## a\nstray text\nCritique: x\nRevision: y\n", ":2: text in principle 'a' before"),
])
def test_bad_constitution_file_names_file_and_line(tmp_path, text, problem):
    path = tmp_path / "const.md"
    path.write_text(text)
    with pytest.raises(ConstitutionError, match=re.escape(str(path) + problem)):
        load_constitution(path)


def test_missing_constitution_and_config_errors(tmp_path):
    with pytest.raises(ConstitutionError, match=r"feedback.constitution.path: .*nope.md: file not found"):
        load_constitution(tmp_path / "nope.md")
    with pytest.raises(ConstitutionError, match=r"no bundled constitution 'legal' \(available: medical\)"):
        load_constitution("bundled:legal")
    (tmp_path / "bad.bin").write_bytes(b"## a\n\xff\xfe")
    with pytest.raises(ConstitutionError, match="bad.bin: not UTF-8"):
        load_constitution(tmp_path / "bad.bin")
    cfg = tmp_path / "run.yaml"
    cfg.write_text("feedback:\n  constitution:\n    critic: judge\n")
    with pytest.raises(ConfigError, match=r"field feedback: .*critic: 'judge' needs a judge source"):
        load_config(cfg)
    cfg.write_text("feedback:\n  constitution:\n    max_revisions_per_round: 0\n")
    with pytest.raises(ConfigError, match=r"field feedback.constitution.max_revisions_per_round"):
        load_config(cfg)
    assert RunConfig().feedback.constitution is None  # off by default


def test_verified_revision_is_stored_and_trained_a_failed_one_is_not(tiny_model_dir, tmp_path):
    # every sampled trace is wrong: the round's ranking gives no pair, only revisions can
    store, pair, cfg, tasks_by_id = _seeded(tiny_model_dir, tmp_path, {"t1": ["2 + 3 = 6.\nAnswer: 6", "Answer: 7"],
                                                                       "t2": ["Answer: 5", "4 + 4 = 7.\nAnswer: 7"]})
    assert store.pairs_for_rollout(store.rollout_for_round(1).id) == []
    rollout = store.rollout_for_round(1)
    revisions = critique_and_revise(store, rollout, tasks_by_id, load_constitution("bundled:medical"), fake_critic,
                                    pair.policy, pair.tokenizer, max_revisions=8, seed=1)
    by_task = {r.task_id: r for r in revisions}
    assert set(by_task) == {"t1", "t2"}
    assert by_task["t1"].kept and by_task["t1"].why == "verified" and by_task["t1"].text == REVISIONS["2 + 3"]
    assert not by_task["t2"].kept and by_task["t2"].why.startswith("not verified")
    assert by_task["t2"].revision_id is None
    # the originals are the first trace of each task (both unranked, stored order)
    originals = {c.id: c for c in rollout.completions}
    assert {originals[r.original_id].index for r in revisions} == {0}

    rollout = store.rollout_for_round(1)
    with store.session() as s:
        revs = list(s.scalars(select(CompletionRow).where(CompletionRow.origin == "revision")))
        assert [(c.task_id, c.text, c.index) for c in revs] == [("t1", REVISIONS["2 + 3"], 2)]
        rev = revs[0]
        assert rev.verification.correct and rev.prompt_ids == originals[by_task["t1"].original_id].prompt_ids
        assert len(rev.logps) == len(rev.token_ids) and rev.token_ids[-1] == pair.tokenizer.eos_token_id
        assert all(x < 0 for x in rev.logps)
        p = s.scalars(select(PreferencePair)).one()
        assert (p.chosen_id, p.rejected_id) == (rev.id, by_task["t1"].original_id)
    meta = store.get_meta("constitution/round_1")
    assert {m["task_id"]: m["kept"] for m in meta} == {"t1": True, "t2": False}
    assert all(m["principle"] in {"evidence", "uncertainty", "safety", "clarity", "answer"} for m in meta)

    batch, stats = loop_mod._round_batch(store, rollout, cfg, "dpo")
    assert stats["pairs"] == 1.0
    assert stats["acceptance_rate"] == 0.0  # the revision is not one of the K samples
    assert batch[0][0].token_ids == rev.token_ids and batch[0][1].token_ids == originals[p.rejected_id].token_ids
    # GRPO reads the rankings: the revision is not an on-policy sample and stays out
    grpo, _ = loop_mod._round_batch(store, rollout, cfg, "grpo")
    assert len(grpo) == 4 and all(s.token_ids != rev.token_ids for s in grpo)

    before = _margin(pair, cfg.dpo.beta, rev, originals[p.rejected_id])
    assert before == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(pair.policy.parameters(), lr=1e-3)
    pair.train_module, optimizer = accelerator.prepare(pair.policy, optimizer)
    out = dpo_update(pair, optimizer, accelerator, batch, cfg)
    assert out["steps"] == 1.0
    after = _margin(pair, cfg.dpo.beta, rev, originals[p.rejected_id])
    assert after > before + 1e-3


class _Judge:
    """A judge backend whose verdict text picks the answer containing ``word`` (or always ``A``)."""

    def __init__(self, word=None):
        self.word, self.calls = word, 0

    def chat(self, messages, max_tokens=16):
        self.calls += 1
        a = messages[-1]["content"].split("[Answer A]")[1].split("[End of Answer A]")[0]
        return "A" if self.word is None or self.word in a else "B"


def test_open_task_revision_kept_only_when_judge_prefers_it_in_both_orders(tiny_model_dir, tmp_path):
    store = Store(run_dir=tmp_path / "run")
    task = Task("o1", "Describe a healthy breakfast.", "", "open")
    store.add_tasks([task], "train")
    store.publish_version(0, None, "base", None, {}, 0)
    pair = load_policy(ModelConfig(name=str(tiny_model_dir), mixed_precision="no"))
    seed_rollout(store, pair, {"o1": ["Eggs.", "Porridge with fruit and some nuts."]}, tasks={"o1": task})
    cfg = _cfg(tiny_model_dir)
    rollout = store.rollout_for_round(1)
    scores, _ = loop_mod._rule_scores(rollout, cfg, {"o1": task}, set())
    loop_mod._record_rankings(store, rollout, "rules", scores, set(), cfg)
    rollout = store.rollout_for_round(1)
    n_pairs = len(store.pairs_for_rollout(rollout.id))
    # the length rule ranks the longer reply worst: that one is revised
    (orig, _), = select_originals(rollout, store.rankings_for_rollout(rollout.id), {"o1"}, 8, 0)
    assert orig.text.startswith("Porridge")
    critic = lambda convs, n: ["Too vague." if len(m) == 1 else "Porridge with fruit, kindly portioned." for m in convs]
    const = load_constitution("bundled:medical")
    biased = critique_and_revise(store, rollout, {"o1": task}, const, critic, pair.policy, pair.tokenizer,
                                 judge=PairwiseJudge(_Judge()))
    assert [(r.kept, r.why) for r in biased] == [(False, "judge: A/A (revision first/second)")]
    assert len(store.pairs_for_rollout(rollout.id)) == n_pairs  # the ranking's best-vs-worst pair only
    no_judge = critique_and_revise(store, rollout, {"o1": task}, const, critic, pair.policy, pair.tokenizer)
    assert not no_judge[0].kept and "no judge" in no_judge[0].why
    safety = lambda texts: ["pattern 'kindly'" if "kindly" in t else None for t in texts]
    unsafe = critique_and_revise(store, rollout, {"o1": task}, const, critic, pair.policy, pair.tokenizer,
                                 judge=PairwiseJudge(_Judge("kindly")), safety=safety)
    assert not unsafe[0].kept and unsafe[0].why.startswith("safety filter")
    prefers = critique_and_revise(store, rollout, {"o1": task}, const, critic, pair.policy, pair.tokenizer,
                                  judge=PairwiseJudge(_Judge("kindly")))
    assert [(r.kept, r.why) for r in prefers] == [(True, "judge: A/B (revision first/second)")]
    with store.session() as s:
        new = s.scalars(select(PreferencePair).where(PreferencePair.chosen_id == prefers[0].revision_id)).one()
        assert new.rejected_id == orig.id
        assert s.get(CompletionRow, prefers[0].revision_id).origin == "revision"


def test_loop_round_with_the_policy_as_critic(tiny_model_dir, tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"id": f"q{i}", "question": f"What is {i} + 1?", "answer": str(i + 1),
                                         "metadata": {"split": "heldout" if i >= 4 else "train"}}) + "\n" for i in range(6)))
    cfg = _cfg(tiny_model_dir, max_revisions_per_round=2, temperature=0.0)
    cfg = cfg.model_copy(update={"tasks": cfg.tasks.model_copy(update={"path": str(tasks)})})
    loop_mod.run(cfg, tmp_path / "run")
    store = Store(run_dir=tmp_path / "run")
    metrics = {k: v for k, v in store.metrics().items() if k.startswith("train/constitution/")}
    meta = store.get_meta("constitution/round_1")
    # a random tiny policy writes no answer line: its revisions are revised and recorded, none verifies
    assert metrics["train/constitution/revisions"] == [(1, float(len(meta)))] and 1 <= len(meta) <= 2
    assert metrics["train/constitution/kept"] == [(1, 0.0)]
    assert all(not m["kept"] and m["why"] != "" for m in meta)


def test_origin_column_added_to_an_older_database(db_url):
    """A database written before completions had ``origin`` gets it when opened (SQLite and
    PostgreSQL), and its completions read as sampled ones."""
    from sqlalchemy import text

    from rlhf_workbench.model.rollout import Completion

    store = Store(db_url)
    store.add_tasks(TASKS[:1], "train")
    store.publish_version(0, None, "base", None, {}, round=0)
    loop_mod.store_rollout(store, 1, 0, {}, {"t1": TASKS[0]}, [Completion("t1", 0, [1, 2], [5], [-0.5], "Answer: 5", True)])
    with store.engine.begin() as conn:
        conn.execute(text("ALTER TABLE completions DROP COLUMN origin"))
    store.engine.dispose()
    again = Store(db_url)
    with again.session() as s:
        assert [c.origin for c in s.scalars(select(CompletionRow))] == ["sample"]
    again.engine.dispose()
