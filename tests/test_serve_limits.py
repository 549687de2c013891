"""`rlhf serve-model` operating limits: bearer-token authentication, a bounded request queue, and
per-request limits on n, max_tokens and the prompt length (serve_model.ServeLimits), on the tiny
model through FastAPI's TestClient and over real HTTP on loopback."""

import json
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from rlhf_workbench.cli import app as cli_app
from rlhf_workbench.app.serve_model import ServeLimits, ServerThread, make_app
from rlhf_workbench.model.chat import load_served_model

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_served_model(str(tiny_model_dir))


def client(tiny, **limits) -> TestClient:
    model, tok = tiny
    return TestClient(make_app(model, tok, "tiny", ServeLimits(**limits)))


def test_api_key_required_when_set(tiny):
    """Without a key anyone could generate; with one every route needs the bearer token (401 otherwise)."""
    c = client(tiny, api_key="s3cret-key")
    body = {"messages": HI, "temperature": 0, "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"}):
        for r in (c.post("/v1/chat/completions", json=body, headers=headers), c.get("/v1/models", headers=headers)):
            assert r.status_code == 401, (headers, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
            assert "Authorization: Bearer <key>" in r.json()["error"]["message"]
    ok = {"Authorization": "Bearer s3cret-key"}
    assert c.post("/v1/chat/completions", json=body, headers=ok).status_code == 200
    assert c.get("/v1/models", headers=ok).json()["data"][0]["id"] == "tiny"
    assert client(tiny).post("/v1/chat/completions", json=body).status_code == 200  # no key configured


@pytest.mark.parametrize("body,param,text", [
    ({"n": 16, "temperature": 0.7}, "n", "at most 4 choices per request on this server, got 16"),
    ({"max_tokens": 480}, "max_tokens", "at most 64 tokens per request on this server, got 480"),
    ({"max_completion_tokens": 65}, "max_completion_tokens", "at most 64 tokens"),
    ({"messages": [{"role": "user", "content": "word " * 200}]}, "messages", "over this server's limit of 100"),
    ({"messages": [{"role": "user", "content": "x" * 5000}]}, "messages", "5000 characters, over this server's limit"),
])
def test_requests_over_a_limit_get_400_naming_it(tiny, body, param, text):
    """One request with n = 16 and max_tokens = 480 used to hold the model for 143 s."""
    c = client(tiny, max_n=4, max_tokens=64, max_prompt_tokens=100)
    r = c.post("/v1/chat/completions", json={"messages": HI, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and text in r.json()["error"]["message"]
    assert c.app.state.admission.inside == 0  # refused before queueing



def test_requests_at_the_limits_are_served(tiny):
    c = client(tiny, max_n=4, max_tokens=64, max_prompt_tokens=100)
    ok = c.post("/v1/chat/completions", json={"messages": HI, "n": 4, "temperature": 0.7, "max_tokens": 64})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 4


def test_default_max_tokens_respects_the_limit(tiny):
    c = client(tiny, max_tokens=3)
    r = c.post("/v1/chat/completions", json={"messages": HI, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3


def test_full_queue_is_refused_with_503(tiny):
    """With the model busy, ``max_queue`` requests wait; the next one is refused at once (503 with
    Retry-After) instead of waiting; once the model is free the waiting ones all complete."""
    model, tok = tiny
    app = make_app(model, tok, "tiny", ServeLimits(max_queue=2))
    body = {"messages": HI, "temperature": 0, "max_tokens": 2}
    with ServerThread(app) as srv:
        http = httpx.Client(base_url=srv.base_url + "/", timeout=60, trust_env=False)
        results = []
        app.state.chat.lock.acquire()  # the model is busy generating for someone else
        try:
            threads = [threading.Thread(target=lambda: results.append(http.post("chat/completions", json=body)))
                       for _ in range(2)]
            for t in threads:
                t.start()
            deadline = time.time() + 30
            while app.state.admission.inside < 2 and time.time() < deadline:
                time.sleep(0.02)
            assert app.state.admission.inside == 2
            t0 = time.time()
            r = http.post("chat/completions", json=body)
            assert r.status_code == 503 and time.time() - t0 < 5
            assert r.headers["retry-after"] == "5" and "server busy" in r.json()["error"]["message"]
        finally:
            app.state.chat.lock.release()
        for t in threads:
            t.join(60)
        assert [x.status_code for x in results] == [200, 200]
        assert app.state.admission.inside == 0
        assert http.post("chat/completions", json=body).status_code == 200


def test_cli_refuses_beyond_loopback_without_key(tiny_model_dir, monkeypatch):
    runner = CliRunner()
    r = runner.invoke(cli_app, ["serve-model", "--model", str(tiny_model_dir), "--host", "0.0.0.0"])
    assert r.exit_code == 2 and "needs an API key" in " ".join(r.output.split())
    monkeypatch.delenv("RLHF_TEST_KEY", raising=False)
    r = runner.invoke(cli_app, ["serve-model", "--model", str(tiny_model_dir), "--api-key-env", "RLHF_TEST_KEY"])
    assert r.exit_code == 2 and "RLHF_TEST_KEY is not set" in " ".join(r.output.split())
    r = runner.invoke(cli_app, ["serve-model", "--model", str(tiny_model_dir), "--max-n", "0"])
    assert r.exit_code == 2 and "max_n must be at least 1" in r.output

    served = {}
    import rlhf_workbench.app.serve_model as sm

    monkeypatch.setattr(sm, "serve", lambda *a: served.update(args=a))
    r = runner.invoke(cli_app, ["serve-model", "--model", str(tiny_model_dir)])
    assert r.exit_code == 0 and "warning" in r.output and "no authentication" in " ".join(r.output.split())
    assert served["args"][-1].api_key is None
    monkeypatch.setenv("RLHF_TEST_KEY", "k3y")
    r = runner.invoke(cli_app, ["serve-model", "--model", str(tiny_model_dir), "--host", "0.0.0.0",
                                "--api-key-env", "RLHF_TEST_KEY", "--max-queue", "3"])
    assert r.exit_code == 0 and "no authentication" not in r.output
    assert served["args"][-1] == ServeLimits(api_key="k3y", max_queue=3)


# --- hostile requests (issue 24, findings 1 and 6): refused before the model lock is taken ---------
HOSTILE_BODIES = [  # (body, status, param, text): add a case here to cover a new abuse
    ({"stop": ["x" * 100_000] * 4}, 400, "stop.0", "at most 64 characters per stop string"),
    ({"stop": "y" * 65}, 400, "stop.0", "got 65"),
    ({"seed": 2**70}, 400, "seed", "less than or equal to 9223372036854775807"),
    ({"seed": -1}, 400, "seed", "greater than or equal to 0"),
    ({"messages": [{"role": "user", "content": "a\ud800b"}]}, 400, "messages.0.content", "lone surrogate"),
    ({"stop": ["\udfff"]}, 400, "stop.0", "lone surrogate"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud83d"}]}]}, 400,
     "messages.0.content", "lone surrogate"),
]


@pytest.mark.parametrize("body,status,param,text", HOSTILE_BODIES)
def test_hostile_requests_are_refused_before_the_model_lock(tiny, body, status, param, text):
    """Four 100,000-character stop strings held the model for > 10 min; seed = 2**70 and a lone
    surrogate were 500s. Each is now a 400 naming the field, with the model lock held by someone
    else (so nothing waited for it) and in well under a second."""
    c = TestClient(client(tiny).app, raise_server_exceptions=False)
    c.app.state.chat.lock.acquire()
    threading.Timer(2.0, c.app.state.chat.lock.release).start()  # busy for 2 s, then free
    t0 = time.perf_counter()
    r = c.post("/v1/chat/completions", content=json.dumps({"messages": HI, "max_tokens": 2, **body}),
               headers={"content-type": "application/json"})  # ASCII JSON: lone surrogates as \\udXXX
    elapsed = time.perf_counter() - t0
    time.sleep(max(0.0, 2.1 - elapsed))
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param and text in r.json()["error"]["message"], r.text
    assert elapsed < 1.0 and c.app.state.admission.inside == 0


def test_an_oversized_body_is_refused_with_413(tiny):
    """A body over ``max_body_bytes`` is refused whether it declares its length or streams in."""
    c = client(tiny, max_body_bytes=10_000)
    big = {"messages": [{"role": "user", "content": "z" * 20_000}]}
    r = c.post("/v1/chat/completions", json=big)
    assert r.status_code == 413 and r.json()["error"]["param"] == "body", r.text
    assert "limit of 10000 bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: chunked transfer
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(30):
            yield b"z" * 1000
        yield b'"}]}'

    r = c.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    ok = c.post("/v1/chat/completions", json={"messages": HI, "temperature": 0, "max_tokens": 2})
    assert ok.status_code == 200


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_abuse_over_http_stays_fast_flat_and_shuts_down(tiny):
    """Over real HTTP: 10 requests with four 100,000-character stop strings and 10 with
    seed = 2**70 each get 400 in < 1 s, RSS stays flat, a normal request afterwards answers at
    once, and the server stops within the shutdown grace even with a request in flight."""
    model, tok = tiny
    app = make_app(model, tok, "tiny")
    srv = ServerThread(app).start()
    http = httpx.Client(base_url=srv.base_url + "/", timeout=60, trust_env=False)
    try:
        http.post("chat/completions", json={"messages": HI, "temperature": 0, "max_tokens": 2})  # warm up
        rss0, worst = _rss_mb(), 0.0
        for extra in [{"stop": ["x" * 100_000] * 4}] * 10 + [{"seed": 2**70}] * 10:
            t0 = time.perf_counter()
            r = http.post("chat/completions", json={"messages": HI, "max_tokens": 8, **extra})
            worst = max(worst, time.perf_counter() - t0)
            assert r.status_code == 400, r.text
        growth = _rss_mb() - rss0
        t0 = time.perf_counter()
        ok = http.post("chat/completions", json={"messages": HI, "temperature": 0, "max_tokens": 2})
        normal = time.perf_counter() - t0
        print(f"\nserve-model abuse: slowest 400 {worst * 1000:.0f} ms, RSS growth {growth:.1f} MB over 20 "
              f"requests, normal request after {normal * 1000:.0f} ms")
        assert worst < 1.0 and growth < 50 and ok.status_code == 200 and normal < 5
        app.state.chat.lock.acquire()  # a request in flight that will not finish by itself
        stuck = threading.Thread(target=lambda: http.post(
            "chat/completions", json={"messages": HI, "temperature": 0, "max_tokens": 2}), daemon=True)
        stuck.start()
        while app.state.admission.inside < 1:
            time.sleep(0.01)
    finally:
        t0 = time.perf_counter()
        srv.stop(timeout=30)
        stopped = time.perf_counter() - t0
        if app.state.chat.lock.locked():
            app.state.chat.lock.release()
    print(f"serve-model shutdown with a request in flight: {stopped:.1f} s")
    assert not srv.thread.is_alive() and stopped < 15
