"""The experts' web app end to end in headless Chromium.

A run with a tiny policy and a hand-written first rollout (real token ids, real per-token
log-probs of the tiny policy, verified by the verifier) is served on a loopback port. An
expert (role admin: annotates, and sees the dashboard and the playground) logs in, ranks three items with the keyboard (digits + Enter), marks one verified
trace "verified answer is actually wrong" and skips one item (S); the database must hold
exactly those rankings, the mark and the skip. The worker (the loop with
``feedback.source: human``) then trains on them (marking each submission consumed) and publishes
v1, which samples round 2: the
dashboard shows v1 and the verifier's audited precision, the marked trace was never chosen,
and the next item on the Annotate page comes from policy v1. The HTTP API ``/submit`` refuses
a "wrong" mark on a trace of another item and still takes the older six-argument call. Screenshots of
the three pages go to ``<run>/screenshots/`` and ``docs/screenshots/``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import socket
import time
from pathlib import Path

import pytest
from conftest import gradio_api_call

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
REPO = Path(__file__).resolve().parents[1]
INSTRUCTION = "Reply with the result only, as 'Answer: <number>'."
USER, PASSWORD = "dr.ada", "correct horse battery"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tasks(path: Path) -> Path:
    """Six training additions and two held-out ones, in the project's JSONL schema."""
    pairs = [(12, 30), (25, 17), (41, 8), (33, 33), (19, 26), (50, 44), (7, 61), (28, 15)]
    with path.open("w") as f:
        for i, (a, b) in enumerate(pairs):
            f.write(json.dumps({"id": f"q{i}", "question": f"What is {a} + {b}?", "answer": str(a + b),
                                "metadata": {"split": "train" if i < 6 else "heldout", "a": a, "b": b}}) + "\n")
    return path


def make_cfg(model_dir: Path, tasks_path: Path, rounds: int):
    from rlhf_workbench.config import RunConfig

    return RunConfig.model_validate({
        "algorithm": "grpo", "rounds": rounds, "seed": 0,
        "model": {"name": str(model_dir), "mixed_precision": "no"},
        "tasks": {"path": str(tasks_path), "instruction": INSTRUCTION},
        "rollout": {"num_generations": 4, "prompts_per_round": 4, "max_new_tokens": 6, "batch_size": 16},
        # min_verified 0: round 2's traces from the tiny random policy are all wrong, and its items
        # must still reach the page.
        "feedback": {"source": "human", "min_rankings": 3, "annotators_per_item": 1, "min_verified": 0,
                     "poll_seconds": 0.2},
        "optim": {"lr": 1e-3, "micro_batch_size": 8},
        "eval": {"max_new_tokens": 6, "batch_size": 8, "kl_samples": 2},
    })


def hand_written_traces(a: int, b: int) -> list[str]:
    """Three correct traces (one with LaTeX) and one wrong one."""
    s = a + b
    return [f"{a} + {b} = {s}.\nAnswer: {s}",
            f"Add the tens, then the units: $${a} + {b} = {s}$$\nAnswer: {s}",
            f"Answer: {s}",
            f"{a} + {b} = {s + 10}\nAnswer: {s + 10}"]


def api_call(http, api_name: str, *args):
    """One call of a named endpoint through Gradio's HTTP API (POST, then the event stream)."""
    event, data = gradio_api_call(http, api_name, list(args))
    assert event == "complete", data
    return data[0]


def seed_first_rollout(cfg, out: Path) -> int:
    """Store round 1 (policy v0) with hand-written traces: real token ids and real per-token
    log-probs of the tiny policy at the rollout temperature, verified by the verifier."""
    import torch

    from rlhf_workbench.model.logprobs import completion_logps
    from rlhf_workbench.run.loop import store_rollout
    from rlhf_workbench.model.loading import load_policy
    from rlhf_workbench.model.rollout import Completion, pad_batch, render_prompt
    from rlhf_workbench.store import Store

    store = Store(cfg.db_url, out)
    tasks = [t for t in store.tasks("train")][: cfg.rollout.prompts_per_round]
    tasks = [dataclasses.replace(t, instruction=INSTRUCTION) for t in tasks]
    pair = load_policy(cfg.model)
    tok = pair.tokenizer
    comps = []
    for t in tasks:
        prompt = render_prompt(tok, t)
        texts = hand_written_traces(t.metadata["a"], t.metadata["b"])
        token_ids = [tok.encode(x, add_special_tokens=False) + [tok.eos_token_id] for x in texts]
        ids, mask, cmask = pad_batch([prompt] * len(texts), token_ids, tok.pad_token_id)
        with torch.no_grad():
            lp = completion_logps(pair.policy, ids, mask, cmask.shape[1], cfg.rollout.temperature)
        for k, (text, tids) in enumerate(zip(texts, token_ids)):
            comps.append(Completion(t.id, k, prompt, tids, lp[k, : len(tids)].tolist(), text, True))
    settings = {**cfg.rollout.model_dump(), "do_sample": False, "source": "hand-written test traces"}
    return store_rollout(store, 1, 0, settings, {t.id: t for t in tasks}, comps)


@pytest.fixture
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found")
    sync_api = pytest.importorskip("playwright.sync_api")
    pytest.importorskip("gradio")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")  # pandas deprecations inside gradio
def test_annotate_train_publish_in_browser(browser, tiny_model_dir, tmp_path, monkeypatch):
    from playwright.sync_api import expect
    from sqlalchemy import select

    from rlhf_workbench.run import loop as loop_mod
    from rlhf_workbench.human.accounts import create_user
    from rlhf_workbench.human.annotation import next_item
    from rlhf_workbench.app.build import launch
    from rlhf_workbench.stats import wilson_interval
    from rlhf_workbench.store import Annotation, PreferencePair, RankingRow, Store

    t0 = time.time()
    out = tmp_path / "run"
    tasks_path = write_tasks(tmp_path / "tasks.jsonl")
    loop_mod.run(make_cfg(tiny_model_dir, tasks_path, rounds=0), out)  # v0: the base policy, evaluated
    cfg = make_cfg(tiny_model_dir, tasks_path, rounds=2)
    rollout_id = seed_first_rollout(cfg, out)
    store = Store(cfg.db_url, out)
    user_id = create_user(store, USER, PASSWORD, role="admin")  # annotates, and sees the dashboard and playground

    port = _free_port()
    demo = launch(cfg, out, "127.0.0.1", port, block=False)
    shots = out / "screenshots"
    shots.mkdir()
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(20_000)
        expect.set_options(timeout=20_000)
        page.goto(f"http://127.0.0.1:{port}/")
        page.get_by_label("username").fill(USER)
        page.get_by_label("password").fill(PASSWORD)
        page.get_by_role("button", name="Login").click()

        header, status = page.locator("#item-header"), page.locator("#annotate-status")
        ranks = [page.locator(f"#rank-{i} input") for i in (1, 2, 3)]
        focus_page = page.locator("#keys-help").click  # focus on the page, not in a text box
        entered: dict[str, list[int]] = {}
        orders: dict[str, list[int]] = {}
        keys = [["2", "1", "3"], ["1", "1", "2"], ["3", "2", "1"]]  # 1 = best; ties allowed
        for n, digits in enumerate(keys):
            expect(header).to_contain_text("policy v0 · round 1")
            expect(page.locator("#trace-3")).to_be_visible()
            task_id = re.search(r"task (q\d+)", page.locator("#item-question").inner_text()).group(1)
            item = next_item(store, user_id, 1, 0)  # what the page shows: same item, same blind order
            assert item.task.id == task_id and len(item.verified) == 3 and len(item.rejected) == 1
            orders[task_id] = [tr.completion_id for tr in item.verified]
            for i, tr in enumerate(item.verified, 1):
                expect(page.locator(f"#trace-text-{i}")).to_contain_text(tr.text.split("$$")[0].splitlines()[0].strip())
                expect(page.locator(f"#trace-text-{i}")).to_contain_text(f"verifier: {tr.reason.split(' from ')[0]}")
            if n == 0:
                # Keys typed in the rationale stay there: no rank, no skip.
                page.locator("#rationale textarea").fill("")
                page.locator("#rationale textarea").press_sequentially("s1 clearest first")
                page.wait_for_timeout(300)
                expect(ranks[0]).to_have_value("")
                expect(header).to_contain_text("policy v0 · round 1")
                # A draft with one rank, then a stale draft (saved elsewhere meanwhile) is refused.
                focus_page()
                page.keyboard.press(digits[0])
                page.locator("#draft-btn").click()
                expect(status).to_contain_text("Draft saved")
                expect(header).to_contain_text("draft revision 0")
                expect(ranks[0]).to_have_value(digits[0])
                expect(page.locator("#rationale textarea")).to_have_value("s1 clearest first")
                with store.session() as s, s.begin():
                    s.scalars(select(Annotation)).one().revision += 1
                focus_page()
                for d in digits[1:]:
                    page.keyboard.press(d)
                page.keyboard.press("Enter")
                expect(status).to_contain_text("Not saved: stale draft")
                with store.session() as s:
                    assert s.scalars(select(Annotation)).one().status == "draft"
                page.locator("#reload-btn").click()
                expect(header).to_contain_text("draft revision 1")
                expect(ranks[0]).to_have_value(digits[0])
                expect(ranks[1]).to_have_value("")
                focus_page()
                for d in digits[1:]:
                    page.keyboard.press(d)
            elif n == 1:
                # Out of range is refused and changes nothing; Backspace clears ranks from the end.
                focus_page()
                for d in "911":
                    page.keyboard.press(d)
                page.keyboard.press("Enter")
                expect(status).to_contain_text("Not saved: Trace 1: a rank must be a whole number from 1 to 3")
                for _ in range(3):
                    page.keyboard.press("Backspace")
                for r in ranks:
                    expect(r).to_have_value("")
                for d in digits:
                    page.keyboard.press(d)
            else:
                focus_page()
                for d in digits:
                    page.keyboard.press(d)
            for r, d in zip(ranks, digits):
                expect(r).to_have_value(d)
            if n == 2:  # the expert finds the first verified trace's answer actually wrong
                page.locator("#wrong-1 input").check()
                expect(page.locator("#wrong-1 input")).to_be_checked()
                marked_wrong = (task_id, orders[task_id][0])
                focus_page()
            if n == 2:  # a clean page for the docs: the earlier checks' warnings dismissed
                page.evaluate("document.querySelectorAll('[data-testid=toast-body]').forEach(e => e.remove())")
                page.screenshot(path=str(shots / "annotate.png"), full_page=True)
            page.keyboard.press("Enter")
            expect(status).to_contain_text(f"Submitted (task {task_id},")
            entered[task_id] = [int(d) for d in digits]
        skipped = re.search(r"task (q\d+)", page.locator("#item-question").inner_text()).group(1)
        focus_page()
        page.keyboard.press("s")
        expect(status).to_contain_text(f"Skipped (task {skipped},")
        expect(header).to_contain_text("Nothing to rank")

        # The database holds exactly the three rankings as entered (0-based, by displayed trace) and one skip.
        with store.session() as s:
            rows = list(s.scalars(select(Annotation).order_by(Annotation.id)))
        assert [(a.task_id, a.status) for a in rows] == [*((t, "submitted") for t in entered), (skipped, "skipped")]
        for a in rows[:3]:
            want = {cid: r - 1 for cid, r in zip(orders[a.task_id], entered[a.task_id])}
            assert {int(k): v for k, v in a.ranks.items()} == want and a.user_id == user_id
        assert rows[0].rationale == "s1 clearest first" and rows[0].revision == 2
        assert [a.verifier_wrong for a in rows] == [[], [], [marked_wrong[1]], []]
        assert rows[2].task_id == marked_wrong[0] and rows[2].flagged == []
        assert rows[3].ranks == {} and next_item(store, user_id, 1, 0) is None

        # The worker trains on them, publishes v1, samples round 2 with v1 and is stopped while it
        # waits there. (Round 2's traces from the tiny policy are all wrong: nothing in it can be
        # ranked, so the real worker would not wait; this keeps round 2 open for the checks below.)
        real_wait = loop_mod.wait_for_human_rankings

        def wait_once(store_, rollout, cfg_, console=None, timeout=None):
            if rollout.round == 2:
                store_.set_meta("status", {"state": "waiting", "have": 0, "need": 3, "round": 2})
                raise TimeoutError("stopped while waiting for round 2")
            return real_wait(store_, rollout, cfg_, console, timeout=30.0)

        monkeypatch.setattr(loop_mod, "wait_for_human_rankings", wait_once)
        with pytest.raises(TimeoutError, match="stopped while waiting for round 2"):
            loop_mod.run(cfg, out)
        assert [v.id for v in store.versions()] == [0, 1]
        assert [r.source for r in store.rankings_for_rollout(rollout_id)] == ["human"] * 4
        assert store.rollout_for_round(2).policy_version_id == 1
        with store.session() as s:
            assert s.scalar(select(RankingRow.id).where(RankingRow.rollout_id != rollout_id)) is None
            chosen = set(s.scalars(select(PreferencePair.chosen_id)))
        ranking = next(r for r in store.rankings_for_rollout(rollout_id) if r.task_id == marked_wrong[0])
        assert ranking.ranks[str(marked_wrong[1])] is None and ranking.rewards[str(marked_wrong[1])] == 0.0
        assert chosen and marked_wrong[1] not in chosen
        with store.session() as s:  # the worker marked every submission it trained on
            assert sorted(a.consumed_round for a in s.scalars(select(Annotation).where(
                Annotation.rollout_id == rollout_id, Annotation.status == "submitted"))) == [1, 1, 1]

        page.get_by_role("tab", name="Dashboard").click()
        page.locator("#refresh-btn").click()
        expect(page.locator("#current-version")).to_contain_text(re.compile(r"\bv1\b"))
        expect(page.locator("#training-status")).to_contain_text("waiting for 3 more rankings")
        expect(page.locator("#plot-accuracy")).to_be_visible()
        low, high = wilson_interval(8, 9)  # 3 submitted items x 3 verified traces, 1 marked wrong
        expect(page.locator("#verifier-audit")).to_contain_text(
            f"Verifier audited precision: 88.9 % (95 % CI {100 * low:.1f}–{100 * high:.1f} %, 9 traces audited, "
            "1 marked wrong)")
        page.wait_for_timeout(500)
        page.screenshot(path=str(shots / "dashboard.png"), full_page=True)

        page.get_by_role("tab", name="Annotate").click()
        page.locator("#reload-btn").click()
        expect(header).to_contain_text("policy v1 · round 2")

        # The HTTP API: a "wrong" mark on a trace of another item is refused and stores nothing;
        # gradio_client's six-argument call of older scripts still works (wrong_json defaults to "[]").
        import httpx
        from gradio_client import Client

        item2 = next_item(store, user_id, 1, 0)
        ranks2 = json.dumps({str(t.completion_id): 0 for t in item2.verified})
        args = (item2.rollout_id, item2.task.id, ranks2, "", "[]", -1)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30, trust_env=False) as http:
            http.post("/login", data={"username": USER, "password": PASSWORD}).raise_for_status()
            refused = api_call(http, "submit", *args, json.dumps([marked_wrong[1]]))
        assert refused.startswith(f"error: trace ids [{marked_wrong[1]}] cannot be marked"), refused
        with store.session() as s:
            assert s.scalar(select(Annotation).where(Annotation.rollout_id == item2.rollout_id)) is None
        client = Client(f"http://127.0.0.1:{port}/", auth=(USER, PASSWORD), verbose=False, download_files=False)
        try:
            assert client.predict(*args, api_name="/submit").startswith("ok: submitted")
        finally:
            client.close()
        with store.session() as s:
            assert s.scalars(select(Annotation).where(Annotation.rollout_id == item2.rollout_id)).one().verifier_wrong == []

        page.get_by_role("tab", name="Playground").click()
        page.locator("#pg-question textarea").fill("What is 12 + 30?")
        page.locator("#ask-btn").click()
        expect(page.locator("#pg-status")).to_contain_text("Rate each answer")
        page.locator("#policy-up").click()
        expect(page.locator("#pg-status")).to_contain_text("Recorded thumbs up for the policy answer (v1)")
        page.screenshot(path=str(shots / "playground.png"), full_page=True)
        from rlhf_workbench.store import BinaryFeedback

        with store.session() as s:
            fb = s.scalars(select(BinaryFeedback)).one()
        assert fb.label is True and fb.policy_version_id == 1 and "What is 12 + 30?" in fb.prompt
    finally:
        demo.close()
    docs = REPO / "docs" / "screenshots"
    docs.mkdir(parents=True, exist_ok=True)
    for name in ("annotate.png", "dashboard.png", "playground.png"):
        assert (shots / name).stat().st_size > 10_000
        shutil.copy(shots / name, docs / name)
    assert time.time() - t0 < 180

