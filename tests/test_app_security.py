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
        import hashlib

        from sqlalchemy import update

        from rlhf_workbench.store import WebSession

        tokens = demo.server_app.tokens
        token = next(t for t in http.cookies.values() if tokens.get(t) == "ann")
        with tokens.store.session() as s, s.begin():  # logged in longer ago than app.session_max_age_s
            s.execute(update(WebSession).where(WebSession.token_sha256 == hashlib.sha256(token.encode()).hexdigest())
                      .values(issued_at=WebSession.issued_at - 601))
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
            # boss logged in from this address before, so the per-user lock spares it (issue 24:
            # failures from elsewhere must not lock the owner out); the address's lock holds.
            assert re.match(r"too many failed logins for address 127.0.0.1 \(5 within 300 s\): try again in \d+ s",
                            r.json()["detail"]), r.text
            # The address made five failures too: another account from it waits as well.
            r = http.post("/login", data={"username": "ann", "password": PASSWORD})
            assert r.status_code == 429 and "address 127.0.0.1" in r.json()["detail"]
    finally:
        with store.session() as s, s.begin():
            s.execute(delete(LoginAttempt))
    with client(url, "boss"):
        pass


# --- issue 24, findings 4, 5, 6, 7, 8: the route x role matrix of what the app refuses -------------
# (path, method, {role: expected status}); None is "no session". Add a route here to cover it.
ROUTE_MATRIX = [
    ("/gradio_api/upload", "POST", {None: 401, "ann": 403, "viewer": 403, "boss": 403}),
    ("/gradio_api/info", "GET", {None: 401, "ann": 200, "viewer": 200, "boss": 200}),
    ("/monitoring", "GET", {None: 401, "ann": 403, "viewer": 403}),
    ("/monitoring/summary", "GET", {None: 401, "ann": 403, "viewer": 403}),
    ("/gradio_api/call/no_such_handler", "POST", {None: 401, "ann": 404, "viewer": 404, "boss": 404}),
]


@pytest.mark.parametrize("path,method,expected", ROUTE_MATRIX)
def test_route_role_matrix(app, path, method, expected):
    """Uploads were open to every role (3 x 10 MB accepted, readable by all); an unknown handler
    name was a 500; annotators read the API description and /monitoring/summary."""
    _, url, _ = app
    for user, status in expected.items():
        with client(url, user) as http:
            kw = {"files": {"files": ("x.txt", b"x" * 1000)}} if "upload" in path else \
                {"json": {"data": []}} if method == "POST" else {}
            r = http.request(method, path, **kw)
            assert r.status_code == status, (user, path, r.status_code, r.text[:200])


def test_the_login_page_does_not_embed_the_api_description(app):
    _, url, _ = app
    with client(url) as http:
        page = http.get("/").text + http.get("/config").text
    for name in ("api_next_item", "api_submit", "next_item", "submit_pair"):
        assert name not in page, name


def test_a_spoofed_forwarded_for_changes_nothing(app):
    """X-Forwarded-For from a peer that is not a configured proxy (none by default) is ignored:
    rotating it neither escapes the address lock nor makes a 20-user spray pass unthrottled."""
    from sqlalchemy import delete

    from rlhf_workbench.store import LoginAttempt

    _, url, store = app
    try:
        with client(url) as http:
            codes = [http.post("/login", data={"username": f"sprayed{i}", "password": "Summer2026!"},
                               headers={"X-Forwarded-For": f"203.0.113.{i}"}).status_code for i in range(20)]
        assert codes == [400] * 5 + [429] * 15, codes
        with store.session() as s:
            assert {a.address for a in s.query(LoginAttempt)} == {"127.0.0.1"}
    finally:
        with store.session() as s, s.begin():
            s.execute(delete(LoginAttempt))


def test_an_admin_session_survives_a_restart_and_works_on_a_second_process(app, tmp_path):
    """Sessions lived in one process: a second app over the same database refused the admin's
    cookie, and a restart logged everyone out."""
    from rlhf_workbench.app.build import launch
    from rlhf_workbench.config import RunConfig

    demo, url, store = app
    cfg = RunConfig.model_validate({"feedback": {"source": "human"}, "app": {"session_max_age_s": 600},
                                    "db_url": store.url})
    with client(url, "boss") as http:
        assert http.get("/gradio_api/info").status_code == 200
        cookies = dict(http.cookies)
    port = _free_port()
    second = launch(cfg, store.run_dir, "127.0.0.1", port, block=False)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30, trust_env=False, cookies=cookies) as http:
            assert http.get("/gradio_api/info").status_code == 200  # same cookie, other process
            assert http.get("/gradio_api/info", cookies={k: "forged" for k in cookies}).status_code == 401
    finally:
        second.close()


# --- issue 24, finding 7: Gradio's monitoring routes are the admin's, and only an admin's request
# makes the server print the monitoring key ------------------------------------------------------
MONITORING = [("/monitoring", {None: 401, "ann": 403, "viewer": 403, "boss": 200}),
              ("/monitoring/summary", {None: 401, "ann": 403, "viewer": 403, "boss": 200}),
              ("/monitoring/not-the-key", {None: 401, "ann": 403, "viewer": 403, "boss": 403})]


def _analytics_key(demo) -> str:
    key = getattr(demo.server_app, "analytics_key", None)
    assert isinstance(key, str) and len(key) >= 16, key
    return key


def test_monitoring_is_for_admins_and_only_they_make_the_server_log_its_key(app, capfd):
    """An admin reads /monitoring (200; Gradio then prints the monitoring URL with its key, as it is
    built to); no session is 401, annotators and playground users 403, and none of their requests
    puts the key in the server's output (stdout and stderr of this process, where the app runs)."""
    demo, url, _ = app
    key = _analytics_key(demo)
    capfd.readouterr()
    for path, expected in MONITORING:
        for user in (None, "ann", "viewer"):
            with client(url, user) as http:
                r = http.get(path)
                assert r.status_code == expected[user], (user, path, r.status_code, r.text[:200])
                assert key not in r.text
    out, err = capfd.readouterr()
    assert key not in out + err, "a non-admin request made the server log the monitoring key"
    for path, expected in MONITORING:
        with client(url, "boss") as http:
            r = http.get(path)
            assert r.status_code == expected["boss"], (path, r.status_code, r.text[:200])
    out, err = capfd.readouterr()
    assert f"/monitoring/{key}" in out + err  # the capture sees what the server prints
