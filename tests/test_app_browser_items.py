"""Identical traces collapsed and pairwise judgments, in headless Chromium.

A hand-written round 1 in which one item has two identical verified traces (up to whitespace):
the page shows them as one entry with "×2 identical traces", and the rank typed for it is
stored for both copies. In pairwise mode, key 1 ("A is better") stores A's traces ranked 0
and B's ranked 1, the item's other traces unranked.
"""

from __future__ import annotations

import pytest
from sqlalchemy import select

from conftest import seed_rollout
from test_app_browser import PASSWORD, USER, _free_port, api_call, browser, make_cfg, write_tasks  # noqa: F401


@pytest.fixture
def served(request, browser, tiny_model_dir, tmp_path):  # noqa: F811
    """The app on a loopback port over a hand-written round 1 (``feedback.mode`` the fixture's
    parameter, ranking by default); yields (page, store, user_id, rollout_id)."""
    from rlhf_workbench.human.accounts import create_user
    from rlhf_workbench.app.build import launch

    out = tmp_path / "run"
    out.mkdir()
    cfg = make_cfg(tiny_model_dir, write_tasks(tmp_path / "tasks.jsonl"), rounds=1)
    cfg.feedback.min_verified = 2
    cfg.feedback.mode = getattr(request, "param", "ranking")
    store, rid = seed_item(cfg, out, tiny_model_dir)
    uid = create_user(store, USER, PASSWORD, role="annotator")
    port = _free_port()
    demo = launch(cfg, out, "127.0.0.1", port, block=False)
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(20_000)
        page.goto(f"http://127.0.0.1:{port}/")
        page.get_by_label("username").fill(USER)
        page.get_by_label("password").fill(PASSWORD)
        page.get_by_role("button", name="Login").click()
        yield page, store, uid, rid
    finally:
        demo.close()


def seed_item(cfg, out, model_dir):
    """A store in ``out`` holding round 1 of one task (q0) with four traces: two identical up to
    whitespace (one collapsed entry), one more verified, one wrong. Returns (store, rollout_id)."""
    from rlhf_workbench.config import ModelConfig
    from rlhf_workbench.model.loading import load_policy
    from rlhf_workbench.store import Store

    store = Store(cfg.db_url, out)
    store.add_tasks(_tasks(cfg), "train")
    store.publish_version(0, None, "base", None, {}, 0)
    pair = load_policy(ModelConfig(name=str(model_dir), mixed_precision="no"))
    rid = seed_rollout(store, pair, {"q0": ["12 + 30 = 42\nAnswer: 42", "Answer: 42", "Answer:   42\n",
                                            "Answer: 52"]})
    return store, rid


def _tasks(cfg):
    import json

    from rlhf_workbench.tasks.task import Task

    with open(cfg.tasks.path) as f:
        return [Task(id=r["id"], question=r["question"], answer=r["answer"]) for r in map(json.loads, f)][:1]


@pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")
def test_identical_traces_are_one_entry_in_the_page(served):
    from playwright.sync_api import expect

    from rlhf_workbench.human.duplicates import shown_entries
    from rlhf_workbench.store import Annotation

    page, store, uid, rid = served
    expect(page.locator("#item-header")).to_contain_text("policy v0 · round 1")
    expect(page.locator("#trace-2")).to_be_visible()
    expect(page.locator("#trace-3")).to_be_hidden()  # three verified traces, two of them identical
    entries = shown_entries(store, uid, rid, "q0")
    dup = next(i for i, e in enumerate(entries, 1) if e.count == 2)
    expect(page.locator(f"#trace-text-{dup}")).to_contain_text("×2 identical traces")
    page.locator("#keys-help").click()
    page.keyboard.press("1" if dup == 1 else "2")
    page.keyboard.press("2" if dup == 1 else "1")
    page.keyboard.press("Enter")
    expect(page.locator("#annotate-status")).to_contain_text("Submitted (task q0,")
    with store.session() as s:
        ranks = {int(k): v for k, v in s.scalars(select(Annotation)).one().ranks.items()}
    assert ranks == {cid: (0 if i == dup else 1) for i, e in enumerate(entries, 1) for cid in e.completion_ids}


@pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")
@pytest.mark.parametrize("served", ["pairwise"], indirect=True)
def test_pairwise_mode_key_1_stores_a_over_b(served):
    import json

    import httpx
    from playwright.sync_api import expect

    from rlhf_workbench.human.pairwise import choose_pair
    from rlhf_workbench.store import Annotation

    page, store, uid, rid = served
    expect(page.locator("#item-header")).to_contain_text("policy v0 · round 1")
    expect(page.locator("#pair-a-btn")).to_be_visible()  # feedback.mode: pairwise opens the page in it
    page.get_by_label("Full ranking").check()  # the switch goes both ways
    expect(page.locator("#submit-btn")).to_be_visible()
    page.get_by_label("Pairwise: A, B or tie").check()
    expect(page.locator("#pair-a-btn")).to_be_visible()
    expect(page.locator("#submit-btn")).to_be_hidden()
    a, b = choose_pair(store, uid, rid, "q0")
    expect(page.locator("#pair-a-text")).to_contain_text(a.trace.text.splitlines()[0].split()[0])
    expect(page.locator("#pair-b-text")).to_contain_text(b.trace.text.splitlines()[0].split()[0])
    dup = a if a.count == 2 else b if b.count == 2 else None
    if dup is not None:
        expect(page.locator("#pair-a-text" if dup is a else "#pair-b-text")).to_contain_text("×2 identical traces")
    # the HTTP API serves the same item and pair to this annotator
    with httpx.Client(base_url=page.url.rstrip("/"), timeout=30, trust_env=False) as http:
        http.post("/login", data={"username": USER, "password": PASSWORD}).raise_for_status()
        served_pair = json.loads(api_call(http, "next_pair"))
        assert served_pair["task_id"] == "q0" and served_pair["a"]["completion_ids"] == a.completion_ids
        assert served_pair["b"]["completion_ids"] == b.completion_ids
        page.locator("#pair-keys-help").click()
        page.keyboard.press("1")
        expect(page.locator("#annotate-status")).to_contain_text("Submitted (task q0,")
        with store.session() as s:
            ranks = {int(k): v for k, v in s.scalars(select(Annotation)).one().ranks.items()}
        assert ranks == {**{c: 0 for c in a.completion_ids}, **{c: 1 for c in b.completion_ids}}
        expect(page.locator("#item-header")).to_contain_text("Nothing to rank")
        again = api_call(http, "submit_pair", rid, "q0", json.dumps(a.completion_ids), json.dumps(b.completion_ids),
                         "tie", "", -1)
        assert again == "error: you already submitted this item", again
