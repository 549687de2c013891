"""`rlhf serve-model` operating limits: bearer-token authentication, a bounded request queue, and
per-request limits on n, max_tokens and the prompt length (serve_model.ServeLimits), on the tiny
model through FastAPI's TestClient and over real HTTP on loopback."""

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
