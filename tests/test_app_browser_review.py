"""Guidelines, pairwise judgments of a collapsed duplicate, and an adjudication, in headless Chromium.

A hand-written round 1 (``feedback.mode: pairwise``, two annotators per item, guidelines and
``adjudication_threshold: 0``) in which the one item has three verified traces, two of them
identical (shown as one entry "×2 identical traces"). An annotator logs in and gets the
guidelines, not an item; "Start annotating" stores the acknowledgement and serves the item in
pairwise mode; the Guidelines tab shows them again on demand. Her "A is better" (key 1) and a
second annotator's opposite judgment make the item disputed: an admin sees both rankings in the
Adjudicate tab and submits his own. The worker's consumption (the loop's ``_record_rankings``
inside :func:`rlhf_workbench.human.annotation.consume_human_rankings`) then records the admin's order
and nothing of the two annotators'.
"""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from test_app_browser import PASSWORD, USER, _free_port, browser, make_cfg, write_tasks  # noqa: F401
from test_app_browser_items import seed_item

GUIDE = "# Team guidelines\n\nRank **sound reasoning** above a bare answer.\n"


def _login(page, port: int, user: str) -> None:
    page.set_default_timeout(20_000)
    page.goto(f"http://127.0.0.1:{port}/")
    page.get_by_label("username").fill(user)
    page.get_by_label("password").fill(PASSWORD)
    page.get_by_role("button", name="Login").click()


@pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")
def test_guidelines_pairwise_duplicate_and_adjudication(browser, tiny_model_dir, tmp_path):  # noqa: F811
    from playwright.sync_api import expect

    from rlhf_workbench.human.adjudication import ADJUDICATED
    from rlhf_workbench.human.accounts import create_user
    from rlhf_workbench.human.annotation import claim_item, consume_human_rankings
    from rlhf_workbench.app.build import launch
    from rlhf_workbench.human.guidelines import has_acknowledged, load_guidelines
    from rlhf_workbench.human.duplicates import shown_entries
    from rlhf_workbench.run.loop import _record_rankings
    from rlhf_workbench.human.pairwise import save_pairwise
    from rlhf_workbench.store import Annotation, ItemClaim, RankingRow, Store

    out = tmp_path / "run"
    out.mkdir()
    (tmp_path / "guide.md").write_text(GUIDE)
    cfg = make_cfg(tiny_model_dir, write_tasks(tmp_path / "tasks.jsonl"), rounds=1)
    fb = cfg.feedback
    fb.min_verified, fb.mode, fb.annotators_per_item = 2, "pairwise", 2
    fb.guidelines, fb.adjudication_threshold = str(tmp_path / "guide.md"), 0.0
    store, rid = seed_item(cfg, out, tiny_model_dir)
    ada = create_user(store, USER, PASSWORD, role="annotator")
    bob = create_user(store, "dr.bob", PASSWORD, role="annotator")
    chief = create_user(store, "chief", PASSWORD, role="admin")
    port = _free_port()
    demo = launch(cfg, out, "127.0.0.1", port, block=False)
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        _login(page, port, USER)
        # the guidelines come first (the tab opens once the login's role check is done), and no
        # item is served before "Start annotating"
        expect(page.locator("#guidelines-text")).to_be_visible()
        expect(page.locator("#guidelines-text")).to_contain_text("Rank sound reasoning above a bare answer.")
        page.get_by_role("tab", name="Annotate").click()
        expect(page.locator("#item-header")).to_contain_text("Read the guidelines first")
        expect(page.locator("#pair-a-btn")).to_be_hidden()
        with store.session() as s:
            assert s.scalars(select(ItemClaim)).all() == []
        page.get_by_role("tab", name="Guidelines").click()
        page.locator("#guidelines-start").click()
        expect(page.locator("#item-header")).to_contain_text("policy v0 · round 1 · pairwise")
        assert has_acknowledged(store, ada, load_guidelines(fb.guidelines))
        # the collapsed duplicate is one side of the pair, with its count
        expect(page.locator("#pair-a-btn")).to_be_visible()
        expect(page.locator("#pair-view")).to_contain_text("×2 identical traces")
        # the guidelines on demand, then back to the item
        page.get_by_role("tab", name="Guidelines").click()
        expect(page.locator("#guidelines-text")).to_contain_text("Team guidelines")
        page.get_by_role("tab", name="Annotate").click()
        page.locator("#pair-keys-help").click()
        page.keyboard.press("1")
        expect(page.locator("#annotate-status")).to_contain_text("Submitted (task q0,")
        with store.session() as s:
            ada_ranks = {int(k): v for k, v in s.scalars(select(Annotation).where(Annotation.user_id == ada)).one()
                         .ranks.items()}
        a_ids = [c for c, r in ada_ranks.items() if r == 0]
        b_ids = [c for c, r in ada_ranks.items() if r == 1]
        assert len(a_ids) + len(b_ids) == 3 and {len(a_ids), len(b_ids)} == {1, 2}  # both copies ranked
        # a second annotator judges the same pair the other way: tau = -1, the item is disputed
        claim_item(store, bob, rid, "q0", annotators_per_item=2)
        save_pairwise(store, bob, rid, "q0", b_ids, a_ids, "a")

        admin = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
        _login(admin, port, "chief")
        expect(admin.locator("#guidelines-text")).to_be_visible()  # admins annotate too: guidelines first
        admin.get_by_role("tab", name="Adjudicate").click()
        expect(admin.locator("#adj-queue")).to_contain_text("1 item to adjudicate · task q0")
        item = admin.locator("#adj-item")
        expect(item).to_contain_text("dr.ada")
        expect(item).to_contain_text("dr.bob")
        expect(item).to_contain_text("-1.00")
        entries = shown_entries(store, chief, rid, "q0")
        dup = next(i for i, e in enumerate(entries, 1) if e.count == 2)
        expect(admin.locator(f"#adj-trace-text-{dup}")).to_contain_text("×2 identical traces")
        # the admin prefers the worked trace over the bare answer (the copies)
        for i, e in enumerate(entries, 1):
            admin.locator(f"#adj-rank-{i} input").fill("2" if e.count == 2 else "1")
        admin.locator("#adj-rationale textarea").fill("the worked sum is better")
        admin.locator("#adj-submit").click()
        expect(admin.locator("#adj-status")).to_contain_text("Adjudicated task q0")
        expect(admin.locator("#adj-queue")).to_contain_text("No disagreements to adjudicate")
    finally:
        demo.close()

    with store.session() as s:
        adj = s.scalars(select(Annotation).where(Annotation.status == ADJUDICATED)).one()
    worked = next(e for e in entries if e.count == 1).completion_ids[0]
    copies = next(e for e in entries if e.count == 2).completion_ids
    assert adj.user_id == chief and adj.rationale == "the worked sum is better"
    assert {int(k): v for k, v in adj.ranks.items()} == {worked: 0, copies[0]: 1, copies[1]: 1}
    # the worker's consumption trains on the adjudicated ranking only
    rollout = store.rollout_for_round(1)
    n = consume_human_rankings(store, rollout, lambda s, scores, flagged: _record_rankings(
        store, rollout, "human", scores, flagged, cfg, session=s), fb.adjudication_threshold)
    assert n == 1
    ranking = store.rankings_for_rollout(rid)
    assert len(ranking) == 1
    ranks = {int(k): v for k, v in ranking[0].ranks.items()}
    wrong = next(c.id for c in rollout.completions if c.text == "Answer: 52")
    assert ranks == {worked: 0, copies[0]: 1, copies[1]: 1, wrong: None}
    with store.session() as s:
        consumed = {a.user_id: a.consumed_round for a in s.scalars(select(Annotation))}
        assert s.scalars(select(RankingRow)).one().source == "human"
    assert consumed == {ada: None, bob: None, chief: 1}


@pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")
def test_guidelines_and_adjudicate_handlers_check_the_role(tmp_path):
    """Called directly through the queue API (no page): Start needs the annotate role, the
    Adjudicate tab's handlers the admin role."""
    from test_app_security import PASSWORD as PW, _refused, client, queue_call

    from rlhf_workbench.human.accounts import create_user
    from rlhf_workbench.app.build import launch
    from rlhf_workbench.config import RunConfig
    from rlhf_workbench.human.guidelines import has_acknowledged, load_guidelines
    from rlhf_workbench.store import Store

    out = tmp_path / "run"
    cfg = RunConfig.model_validate({"feedback": {"source": "human", "guidelines": "bundled:clinical_guidelines",
                                                 "adjudication_threshold": 0.0, "annotators_per_item": 2}})
    store = Store(cfg.db_url, out)
    ids = {name: create_user(store, name, PW, role) for name, role in
           (("ann", "annotator"), ("viewer", "playground"), ("boss", "admin"))}
    port = _free_port()
    demo = launch(cfg, out, "127.0.0.1", port, block=False)
    try:
        fns = {name: [i for i, f in demo.fns.items() if f.fn.__name__ == name] for name in ("ack", "show", "send")}
        assert len(fns["ack"]) == 1 and len(fns["show"]) == 2 and len(fns["send"]) == 1  # show: tab select, refresh
        url = f"http://127.0.0.1:{port}"
        with client(url, "ann") as http:
            for i in fns["show"] + fns["send"]:
                assert _refused(queue_call(http, i, [None] * len(demo.fns[i].inputs)))
            assert queue_call(http, fns["ack"][0], [])["success"]
        assert has_acknowledged(store, ids["ann"], load_guidelines(cfg.feedback.guidelines))
        with client(url, "viewer") as http:
            assert _refused(queue_call(http, fns["ack"][0], []))
        assert not has_acknowledged(store, ids["viewer"], load_guidelines(cfg.feedback.guidelines))
        with client(url, "boss") as http:
            msg = queue_call(http, fns["show"][0], [])
            assert msg["success"] and "No disagreements to adjudicate" in json.dumps(msg["output"]["data"])
    finally:
        demo.close()
