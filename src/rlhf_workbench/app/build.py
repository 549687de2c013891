"""The experts' web app (Gradio): rank verified traces, watch the run, try the policy.

Tabs behind a login (accounts from :mod:`rlhf_workbench.human.accounts`), one module each:

- **Annotate** (:mod:`rlhf_workbench.app.annotate`): one item at a time, ranked in full or judged
  as a pair.
- **Dashboard** (:mod:`rlhf_workbench.app.dashboard`): held-out accuracy, reward, KL, loss and
  acceptance per round, rankings per hour per annotator, inter-annotator agreement, the
  verifier's audited precision, the worker's status and the current version.
- **Playground** (:mod:`rlhf_workbench.app.playground`): one question answered greedily by the
  current policy and by the reference (base) model side by side, with thumbs up/down stored as
  binary feedback.
- **Guidelines** (with ``feedback.guidelines``) and **Adjudicate** (admins, with
  ``feedback.adjudication_threshold``): :mod:`rlhf_workbench.app.review`. An annotator who has not
  acknowledged the current guidelines gets the Guidelines tab, not an item, until they click
  "Start annotating".

Each user sees the tabs their role allows, and every handler checks the role again on the
server (:mod:`rlhf_workbench.app.auth`: annotators annotate, admins also see the dashboard, the
playground needs the ``playground`` or ``admin`` role), so a handler called directly through the
queue API refuses what the page would not show. Logins are throttled and sessions expire
(``app:`` in the run config).

The database is the only channel to the worker (the loop with ``feedback.source: human``).
Scripted clients use the HTTP API (:mod:`rlhf_workbench.app.api`: ``/next_item``, ``/submit``,
``/next_pair``, ``/submit_pair``).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
from fastapi import HTTPException  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402

from rlhf_workbench.app.annotate import AnnotatePage, annotate_tab  # noqa: E402
from rlhf_workbench.app.api import AnnotationAPI  # noqa: E402
from rlhf_workbench.app.auth import (CLIENT_ADDRESS, LoginPolicy, LoginThrottled, SessionMiddleware, allowed,  # noqa: E402
                                     login, request_user, request_username, role_of)
from rlhf_workbench.app.dashboard import dashboard_tab  # noqa: E402
from rlhf_workbench.app.page_keys import CSS, KEYBOARD_JS  # noqa: E402
from rlhf_workbench.app.playground import Playground, PlaygroundModels, playground_tab  # noqa: E402
from rlhf_workbench.app.render import task_md  # noqa: E402
from rlhf_workbench.app.review import adjudicate_tab, guidelines_tab  # noqa: E402
from rlhf_workbench.config import RunConfig  # noqa: E402
from rlhf_workbench.human.guidelines import Guidelines, has_acknowledged, load_guidelines  # noqa: E402
from rlhf_workbench.store import Store  # noqa: E402


def trace_slots(cfg: RunConfig) -> int:
    """Traces an item can hold: the policy's K samples (none when collecting only) plus the
    teacher's M (``rollout.teacher``)."""
    teacher = cfg.rollout.teacher.num_generations if cfg.rollout.teacher is not None else 0
    return (0 if cfg.algorithm == "none" else cfg.rollout.num_generations) + teacher


def build_app(cfg: RunConfig, out_dir: Path) -> gr.Blocks:
    """The Blocks app for a run (``Store(cfg.db_url, out_dir)``); launch with :func:`launch`.

    Raises:
        FileNotFoundError, ValueError: ``feedback.guidelines`` names no readable guidelines.
    """
    store = Store(cfg.db_url, out_dir)
    fb = cfg.feedback
    guidelines = load_guidelines(fb.guidelines)  # FileNotFoundError / ValueError naming feedback.guidelines
    show_source = cfg.rollout.teacher is not None and cfg.rollout.teacher.show_source
    page = AnnotatePage(store, fb, trace_slots(cfg), guidelines, show_source)
    check = functools.partial(request_user, store)  # check(request, action) -> user id
    with gr.Blocks(title="RLHF workbench", analytics_enabled=False) as demo:
        gr.Markdown("## Online RLHF workbench")
        with gr.Tabs() as tabs:
            with gr.Tab("Annotate", id="annotate", elem_id="tab-annotate") as annotate:
                mode = annotate_tab(demo, page)
            guide_tab = adj_tab = None
            if guidelines is not None:
                with gr.Tab("Guidelines", id="guidelines", elem_id="tab-guidelines") as guide_tab:
                    started = guidelines_tab(store, guidelines, check, tabs)
                started.success(page.load_next, [mode], page.outputs, api_visibility="private", concurrency_limit=None)
            if fb.adjudication_threshold is not None:
                with gr.Tab("Adjudicate", id="adjudicate", elem_id="tab-adjudicate") as adj_tab:
                    adjudicate_tab(store, adj_tab, fb.adjudication_threshold, page.n_slots, check,
                                   lambda row: task_md(row.to_task()))
            with gr.Tab("Dashboard", id="dashboard", elem_id="tab-dashboard") as dash_tab:
                dashboard_tab(demo, store, dash_tab, lambda request: check(request, "dashboard"))
            with gr.Tab("Playground", id="playground", elem_id="tab-playground") as pg_tab:
                playground_tab(Playground(store, PlaygroundModels(cfg)), cfg.tasks.instruction)
        optional = [t for t in (guide_tab, adj_tab) if t is not None]
        demo.load(role_tabs(store, guidelines, guide_tab is not None, adj_tab is not None), None,
                  [tabs, annotate, dash_tab, pg_tab, *optional], api_visibility="private", concurrency_limit=None)
        AnnotationAPI(store, fb, show_source).register()
    demo.queue(default_concurrency_limit=8)
    demo.workbench_store = store  # for launch()'s login check
    return demo


def role_tabs(store: Store, guidelines: Guidelines | None, has_guidelines: bool, has_adjudicate: bool):
    """The page-load handler ``tabs_for_role(request)``: updates for the Tabs (the first tab the
    role allows selected; Guidelines for an annotator who has not acknowledged them) and for the
    Annotate, Dashboard and Playground tabs, then Guidelines and Adjudicate where they exist,
    each shown only when the user's role allows it."""

    def tabs_for_role(request: gr.Request):
        """Only the tabs the user's role allows; the first of them selected."""
        role = role_of(store, request_username(request))
        shown = {name: allowed(role, action) for name, action in
                 (("annotate", "annotate"), ("dashboard", "dashboard"), ("playground", "playground"))}
        first = next((name for name, ok in shown.items() if ok), "annotate")
        extra = []
        if has_guidelines:
            uid = request_user(store, request) if shown["annotate"] else None
            if uid is not None and not has_acknowledged(store, uid, guidelines):
                first = "guidelines"  # before the first item
            extra.append(gr.Tab(visible=True if shown["annotate"] else "hidden"))
        if has_adjudicate:
            extra.append(gr.Tab(visible=True if allowed(role, "adjudicate") else "hidden"))
        # "hidden" hides the tab's button too (Gradio 6; False leaves the button).
        return (gr.Tabs(selected=first), *(gr.Tab(visible=True if shown[name] else "hidden")
                                           for name in ("annotate", "dashboard", "playground")), *extra)

    return tabs_for_role


def launch(cfg: RunConfig, out_dir: Path, host: str = "127.0.0.1", port: int = 7860, block: bool = True,
           demo: gr.Blocks | None = None) -> gr.Blocks:
    """Build (unless given) and serve the app with a login backed by the accounts table.

    Logins are throttled per username and per client address, and sessions expire after
    ``cfg.app.session_max_age_s`` (:mod:`rlhf_workbench.app.auth`); a throttled login is answered
    HTTP 429 with the reason.

    Args:
        block: serve until interrupted; False returns at once with the server running in a thread
            (stop it with ``demo.close()``).
    """
    for key in ("NO_PROXY", "no_proxy"):  # gradio calls its own URL at start-up
        have = [x for x in os.environ.get(key, "").split(",") if x]
        os.environ[key] = ",".join(dict.fromkeys([*have, "127.0.0.1", "localhost"]))
    # uvicorn takes X-Forwarded-For only from these peers (its default trusts any loopback peer,
    # so any local client could claim another address and pass the per-address login limit)
    os.environ["FORWARDED_ALLOW_IPS"] = ",".join(cfg.app.trusted_proxies)
    demo = demo or build_app(cfg, out_dir)
    store = demo.workbench_store
    policy = LoginPolicy.from_config(cfg.app)

    def check(username: str, password: str) -> bool:
        try:
            return login(store, username, password, CLIENT_ADDRESS.get(), policy) is not None
        except LoginThrottled as e:
            raise HTTPException(status_code=429, detail=str(e), headers={"Retry-After": str(int(e.retry_after) + 1)})

    demo.launch(server_name=host, server_port=port, auth=check, ssr_mode=False, prevent_thread_lock=not block,
                auth_message=(f"Online RLHF workbench: log in with your account. After {policy.max_failures} failed "
                              f"logins within {policy.window_s / 60:g} min, logins are refused for "
                              f"{policy.lockout_s / 60:g} min."), head=KEYBOARD_JS,
                css=CSS, quiet=True, show_error=True,
                app_kwargs={"middleware": [Middleware(SessionMiddleware, max_age=cfg.app.session_max_age_s,
                                                      store=store)]})
    return demo
