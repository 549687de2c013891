"""Playground thumbs become KTO examples, end to end in headless Chromium.

A KTO run with the tiny policy publishes v1 (one round on rule feedback). A ``playground`` user
logs in, asks a question, gives the current policy's answer (v1) a thumbs up and the reference
answer (v0) a thumbs down. The loop's next round (round 2, the real ``loop.run``) then trains on
both: its training batch ends with the two thumbed answers as KTO samples, with the labels the
user gave, the texts the models wrote (an independent greedy generation from v1 and from the base
model) and the prompt rendered as the loop renders that question; the rows are marked consumed by
round 2 with the policy versions that wrote them, and the round's metrics count them.
"""

from __future__ import annotations

import pytest
from sqlalchemy import select

from test_app_browser import INSTRUCTION, _free_port, browser, make_cfg, write_tasks  # noqa: F401

USER, PASSWORD = "visitor", "thumbs up thumbs down"
QUESTION = "What is 12 + 30?"


def _lively_model(tiny_model_dir, out):
    """The tiny model with its weight matrices scaled by 10, so that its greedy answers are varied
    words (the fixture's small initialisation answers every prompt with newlines)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10.0)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def _kto_cfg(model_dir, tasks_path, rounds: int):
    """test_app_browser's run settings with KTO on rule feedback (no annotators needed) and a
    learning rate large enough for round 1 to change the greedy answer."""
    from rlhf_workbench.config import RunConfig

    base = make_cfg(model_dir, tasks_path, rounds).model_dump()
    base["algorithm"] = "kto"
    base["feedback"] = {**base["feedback"], "source": "rules"}
    base["optim"] = {**base["optim"], "lr": 0.05}
    return RunConfig.model_validate(base)


def _greedy_answer(cfg, checkpoint, task) -> str:
    """The answer the playground shows for ``task`` from a checkpoint (None: the base model)."""
    from rlhf_workbench.model.loading import load_policy
    from rlhf_workbench.model.rollout import generate

    pair = load_policy(cfg.model, checkpoint=checkpoint)
    return generate(pair.policy.eval(), pair.tokenizer, [task], num_generations=1, do_sample=False,
                    max_new_tokens=cfg.eval.max_new_tokens, mixed_precision=cfg.model.mixed_precision)[0].text


@pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")
def test_playground_thumbs_train_the_next_kto_round(browser, tiny_model_dir, tmp_path, monkeypatch):  # noqa: F811
    from playwright.sync_api import expect

    from rlhf_workbench.run import loop as loop_mod
    from rlhf_workbench.human.accounts import create_user
    from rlhf_workbench.app.build import launch
    from rlhf_workbench.model.loading import load_tokenizer
    from rlhf_workbench.model.rollout import render_prompt
    from rlhf_workbench.store import BinaryFeedback, Store
    from rlhf_workbench.tasks.task import Task

    out = tmp_path / "run"
    tasks_path = write_tasks(tmp_path / "tasks.jsonl")
    model_dir = _lively_model(tiny_model_dir, tmp_path / "model")
    loop_mod.run(_kto_cfg(model_dir, tasks_path, rounds=1), out)  # v0, then round 1 publishes v1
    cfg = _kto_cfg(model_dir, tasks_path, rounds=2)
    store = Store(cfg.db_url, out)
    assert store.latest_version().id == 1
    create_user(store, USER, PASSWORD, role="playground")

    port = _free_port()
    demo = launch(cfg, out, "127.0.0.1", port, block=False)
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(20_000)
        expect.set_options(timeout=20_000)
        page.goto(f"http://127.0.0.1:{port}/")
        page.get_by_label("username").fill(USER)
        page.get_by_label("password").fill(PASSWORD)
        page.get_by_role("button", name="Login").click()
        page.get_by_role("tab", name="Playground").click()
        expect(page.locator("#pg-instruction textarea")).to_have_value(INSTRUCTION)
        page.locator("#pg-question textarea").fill(QUESTION)
        page.locator("#ask-btn").click()
        status = page.locator("#pg-status")
        expect(status).to_contain_text("Rate each answer")
        page.locator("#policy-up").click()
        expect(status).to_contain_text("Recorded thumbs up for the policy answer (v1)")
        page.locator("#reference-down").click()
        expect(status).to_contain_text("Recorded thumbs down for the reference answer (v0)")
    finally:
        demo.close()

    task = Task(id="playground", question=QUESTION, answer="", answer_type="text", instruction=INSTRUCTION)
    policy_text = _greedy_answer(cfg, store.checkpoint_dir(store.latest_version()), task)
    reference_text = _greedy_answer(cfg, None, task)
    with store.session() as s:
        stored = [(b.label, b.policy_version_id, b.completion, b.consumed_round)
                  for b in s.scalars(select(BinaryFeedback).order_by(BinaryFeedback.id))]
    assert stored == [(True, 1, policy_text, None), (False, 0, reference_text, None)]
    assert policy_text.strip() and reference_text.strip() and policy_text != reference_text

    # The loop's next round, through its own code path; the batch it trains on is recorded.
    batches = []
    real_update = loop_mod._update

    def recording_update(algorithm, pair, critic, optimizer, accelerator, batch, cfg_):
        batches.append((algorithm, list(batch)))
        return real_update(algorithm, pair, critic, optimizer, accelerator, batch, cfg_)

    monkeypatch.setattr(loop_mod, "_update", recording_update)
    loop_mod.run(cfg, out)
    assert [a for a, _ in batches] == ["kto"]
    batch = batches[0][1]
    tok = load_tokenizer(str(model_dir))
    thumbs = batch[-2:]
    assert [(s.label, tok.decode(s.token_ids, skip_special_tokens=True)) for s in thumbs] == [
        (True, policy_text), (False, reference_text)]
    assert all(s.prompt_ids == render_prompt(tok, task) for s in thumbs)  # as the loop renders the question
    assert all(s.old_logps is None for s in thumbs) and all(s.label is not None for s in batch)
    with store.session() as s:
        assert [(b.policy_version_id, b.consumed_round) for b in s.scalars(
            select(BinaryFeedback).order_by(BinaryFeedback.id))] == [(1, 2), (0, 2)]
    metrics = store.metrics()
    assert metrics["train/thumbs_desirable"] == [(1, 0.0), (2, 1.0)]
    assert metrics["train/thumbs_undesirable"] == [(1, 0.0), (2, 1.0)]
    assert metrics["train/undesirable"][-1][1] + metrics["train/desirable"][-1][1] == len(batch) - 2
