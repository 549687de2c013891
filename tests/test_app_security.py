"""The web app on loopback, called the way a script would (issue 13, items 4 and 7): every route
but the login page answers 401 without a session; every handler checks the caller's role, also
when called directly through the queue API (``/gradio_api/queue/join`` by ``fn_index``, and
``/gradio_api/call/<name>``); logins are throttled over HTTP with a clear answer; an expired
session is refused.

No model is loaded: the playground's generation is never reached by these calls.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import uuid

import pytest

pytest.importorskip("gradio")
httpx = pytest.importorskip("httpx")

from conftest import gradio_api_call  # noqa: E402

PASSWORD = "password-123"
ROLES = {"ann": "annotator", "boss": "admin", "viewer": "playground"}
# Every event handler of the app and what it needs; a handler missing here fails the test.
HANDLERS = {"submit_ui": "annotate", "draft_ui": "annotate", "skip_ui": "annotate", "load_next": "annotate",
            "poll": "annotate", "pair_ui": "annotate", "api_next_item": "annotate", "api_submit": "annotate",
            "api_next_pair": "annotate", "api_submit_pair": "annotate",
            "status": "dashboard", "refresh": "dashboard", "selection_queue": "dashboard", "ask": "playground",
            "fn": "playground",
            "tabs_for_role": None}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from rlhf_workbench.human.accounts import create_user
    from rlhf_workbench.app.build import launch
    from rlhf_workbench.config import RunConfig
    from test_assignment import seed

    out = tmp_path_factory.mktemp("run")
    seed(f"sqlite:///{out / 'workbench.db'}", 3, 0)
    cfg = RunConfig.model_validate({"feedback": {"source": "human"}, "app": {"session_max_age_s": 600}})
    from rlhf_workbench.store import Store

    store = Store(cfg.db_url, out)
    for name, role in ROLES.items():
        create_user(store, name, PASSWORD, role)
    port = _free_port()
    demo = launch(cfg, out, "127.0.0.1", port, block=False)
    try:
        yield demo, f"http://127.0.0.1:{port}", store
    finally:
        demo.close()


@contextlib.contextmanager
def client(url: str, user: str | None = None):
    """An HTTP client, logged in as ``user`` when given."""
    with httpx.Client(base_url=url, timeout=30, trust_env=False) as http:
        if user is not None:
            http.post("/login", data={"username": user, "password": PASSWORD}).raise_for_status()
        yield http


def queue_call(http, fn_index: int, data: list) -> dict:
    """One event through the queue, as the page sends it: join by ``fn_index``, then read the
    session's event stream up to ``process_completed``."""
    session = uuid.uuid4().hex[:10]
    r = http.post("/gradio_api/queue/join", json={"data": data, "fn_index": fn_index, "session_hash": session,
                                                  "event_data": None, "trigger_id": None})
    r.raise_for_status()
    with http.stream("GET", f"/gradio_api/queue/data?session_hash={session}") as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                msg = json.loads(line[5:])
                if msg.get("msg") == "process_completed":
                    return msg
    raise AssertionError("no process_completed")




def _refused(msg: dict) -> bool:
    """A refusal: an error saying so, a result saying so, or a result that changes nothing."""
    if not msg["success"]:
        return "not allowed" in json.dumps(msg["output"])
    data = msg["output"]["data"]
    text = json.dumps(data)
    return "not allowed" in text or all(d in ({"__type__": "update"}, None) for d in data)  # None: a State


def _routes(routes):
    for r in routes:
        if hasattr(r, "original_router"):  # an included router (gradio_api)
            yield from _routes(r.original_router.routes)
        elif hasattr(r, "path"):
            for method in sorted(getattr(r, "methods", None) or {"GET"}):
                if method != "HEAD":
                    yield method, r.path


def test_unauthenticated_calls_to_every_route_are_401(app):
    from rlhf_workbench.app.auth import PUBLIC_PATHS, PUBLIC_PREFIXES

    demo, url, _ = app
    checked = []
    with client(url) as http:
        for method, path in _routes(demo.server_app.routes):
            if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
                continue
            concrete = re.sub(r"\{[^}]+\}", "x", path)
            r = http.request(method, concrete, json={} if method == "POST" else None)
            assert r.status_code == 401, (method, path, r.status_code, r.text[:200])
            checked.append(path)
        assert len(checked) > 40  # the whole gradio_api, not a sample
        for path in ("/gradio_api/info", "/gradio_api/call/next_item", "/gradio_api/queue/join", "/config"):
            assert http.request("POST" if "call" in path or "join" in path else "GET", path).status_code == 401
        # The login page itself is served.
        assert http.get("/").status_code == 200


def test_every_handler_checks_the_role_through_the_queue_api(app):
    demo, url, _ = app
    names = {i: f.fn.__name__ for i, f in demo.fns.items()}
    assert set(names.values()) == set(HANDLERS), "a new handler: say which role it needs in HANDLERS"
    for user, role in ROLES.items():
        with client(url, user) as http:
            for i, name in names.items():
                action = HANDLERS[name]
                if action is None or (name == "ask" and role in ("playground", "admin")):
                    continue  # tabs only; and an allowed "ask" would load the model
                msg = queue_call(http, i, [None] * len(demo.fns[i].inputs))
                ok = role == "admin" or (action == "annotate" and role == "annotator") or \
                    (action == "playground" and role == "playground")
                assert _refused(msg) != ok, (user, name, json.dumps(msg)[:300])


def test_an_annotator_gets_no_dashboard_data(app):
    """The audit's case: the dashboard handler (every annotator's name and rate) called by an
    annotator through the queue API, by fn_index and by name."""
    demo, url, _ = app
    refresh = next(i for i, f in demo.fns.items() if f.fn.__name__ == "refresh")
    with client(url, "ann") as http:
        msg = queue_call(http, refresh, [])
        assert not msg["success"] and "not allowed: the dashboard needs the role admin" in msg["output"]["error"]
        event, data = gradio_api_call(http, "refresh", [])
        assert event == "error" and "not allowed" in json.dumps(data)
        tabs = next(i for i, f in demo.fns.items() if f.fn.__name__ == "tabs_for_role")
        shown = [d.get("visible") for d in queue_call(http, tabs, [])["output"]["data"][1:]]
        assert shown == [True, "hidden", "hidden"]  # Annotate only
    with client(url, "boss") as http:
        msg = queue_call(http, refresh, [])
        assert msg["success"] and "Current policy" in msg["output"]["data"][0]


def test_the_annotation_api_still_works_for_annotators(app):
    _, url, store = app
    with client(url, "ann") as http:
        event, data = gradio_api_call(http, "next_item", [])
        item = json.loads(data[0])
        ranks = json.dumps({str(c): 0 for c in item["completion_ids"]})
        event, data = gradio_api_call(http, "submit", [item["rollout_id"], item["task_id"], ranks, "", "[]", -1, "[]"])
        assert data[0].startswith("ok: submitted")
        event, data = gradio_api_call(http, "submit", [item["rollout_id"], "t02", ranks, "", "[]", -1, "[]"])
        assert "not served to you" in data[0]  # only the item next_item served
    with client(url, "viewer") as http:
        event, data = gradio_api_call(http, "next_item", [])
        assert "not allowed" in json.loads(data[0])["error"]


def test_an_expired_session_is_refused(app):
    demo, url, _ = app
    with client(url, "ann") as http, client(url, "boss") as other:
        assert gradio_api_call(http, "next_item", [])[0] == "complete"
        tokens = demo.server_app.tokens
        token = next(t for t, u in dict.items(tokens) if u == "ann" and t in http.cookies.values())
        tokens.issued[token] -= 601  # logged in longer ago than app.session_max_age_s
        assert other.get("/logout", follow_redirects=False).status_code == 302  # walks every token, expired too
        assert http.post("/gradio_api/call/next_item", json={"data": []}).status_code == 401
        assert http.get("/config").status_code == 401  # the page falls back to the login form
        assert token not in tokens


def test_login_is_throttled_over_http(app):
    from sqlalchemy import delete

    from rlhf_workbench.store import LoginAttempt

    _, url, store = app
    try:
        with client(url) as http:
            for i in range(5):
                assert http.post("/login", data={"username": "boss", "password": f"guess {i}"}).status_code == 400
            r = http.post("/login", data={"username": "boss", "password": PASSWORD})
            assert r.status_code == 429 and int(r.headers["retry-after"]) > 250
            assert re.match(r"too many failed logins for user 'boss' \(5 within 300 s\): try again in \d+ s",
                            r.json()["detail"]), r.text
            # The address made five failures too: another account from it waits as well.
            r = http.post("/login", data={"username": "ann", "password": PASSWORD})
            assert r.status_code == 429 and "address 127.0.0.1" in r.json()["detail"]
    finally:
        with store.session() as s, s.begin():
            s.execute(delete(LoginAttempt))
    with client(url, "boss"):
        pass
