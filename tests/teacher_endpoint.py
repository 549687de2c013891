"""A loopback OpenAI-compatible endpoint for the teacher tests: an arithmetic teacher of its own, or a
proxy in front of a real server (``rlhf serve-model``), that injects faults on a plan.

Each request is keyed by its ``seed`` (the client sends one per trace, fixed by task and index) and
its attempt number; ``plan(key, attempt)`` says what that attempt gets: ``None`` (an answer),
``"429"``, ``"503"``, ``"400"`` or ``"hang"`` (no answer for ``hang_s`` seconds, then one that the
client, having timed out, never reads). Every request and every 200 sent are recorded, so a test can
check the client's counters against what the server saw.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

SUM = re.compile(r"What is (\d+) \+ (\d+)\?")


def arithmetic_answer(content: str, key: int, wrong_every: int | None) -> str:
    """A worked answer to "What is a + b?" (wrong, off by one, when ``key % wrong_every == 0``)."""
    m = SUM.search(content)
    if m is None:
        return "I cannot tell."
    a, b = int(m.group(1)), int(m.group(2))
    result = a + b + (1 if wrong_every and key % wrong_every == 0 else 0)
    return f"{a} + {b} = {result}\nAnswer: {result}"


class ByOrder:
    """A fault plan: the n-th distinct request key (in arrival order) gets ``plans[n % len(plans)]``,
    a list of faults for its first attempts (then answers), so every kind of fault occurs."""

    def __init__(self, plans: list[list[str]]):
        self.plans, self.position, self.lock = plans, {}, threading.Lock()

    def __call__(self, key: int, attempt: int) -> str | None:
        with self.lock:
            n = self.position.setdefault(key, len(self.position))
        plan = self.plans[n % len(self.plans)]
        return plan[attempt - 1] if attempt <= len(plan) else None

    def failures(self, key: int) -> int:
        """How many failed attempts ``key`` gets before its answer."""
        return len(self.plans[self.position[key] % len(self.plans)])


class TeacherEndpoint:
    """The endpoint (see the module docstring); use as a context manager; ``base_url`` ends in /v1.

    Args:
        plan: ``(key, attempt) -> fault or None``; attempts count from 1 per key.
        upstream: base URL of a real server to forward answered requests to; None answers itself.
        hang_s: how long a "hang" holds the request.
        strip_logprobs: answer without ``logprobs`` (an endpoint that returns none).
        usage: include ``usage`` in its own answers.
        wrong_every: its own answers: those whose key (seed) is a multiple of n are off by one.
    """

    def __init__(self, plan=None, upstream: str | None = None, hang_s: float = 1.0, strip_logprobs: bool = False,
                 usage: bool = True, wrong_every: int | None = None):
        self.plan = plan or (lambda key, attempt: None)
        self.upstream, self.hang_s, self.strip_logprobs = upstream, hang_s, strip_logprobs
        self.usage, self.wrong_every = usage, wrong_every
        self.lock = threading.Lock()
        self.attempts: dict[int, int] = {}
        self.received: list[tuple[int, int, str]] = []  # (key, attempt, outcome)
        self.answered: dict[int, list[str]] = {}  # key -> texts sent with 200
        self.auth: list[str | None] = []
        self.bodies: list[dict] = []
        self.body_of: dict[int, dict] = {}  # key -> its request body (the same on every attempt)
        self.inflight = self.max_inflight = 0  # requests being answered at once (hung ones not counted)
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
                status, payload, headers = endpoint.handle(body, self.headers.get("authorization"))
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``."""
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def handle(self, body: dict, auth: str | None) -> tuple[int, dict, dict]:
        """``(status, JSON payload, headers)`` for one request, recorded."""
        key = int(body.get("seed", -1))
        with self.lock:
            attempt = self.attempts[key] = self.attempts.get(key, 0) + 1
            self.auth.append(auth)
            self.bodies.append(body)
            self.body_of[key] = body
        fault = self.plan(key, attempt)
        with self.lock:
            self.received.append((key, attempt, fault or "200"))
            counted = fault != "hang"  # a hung request outlives the client's wait: not the client's concurrency
            self.inflight += counted
            self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            return self.answer(body, key, fault)
        finally:
            with self.lock:
                self.inflight -= counted

    def answer(self, body: dict, key: int, fault: str | None) -> tuple[int, dict, dict]:
        """The answer to one attempt under its ``fault``."""
        time.sleep(0.01)  # long enough for concurrent requests to overlap
        if fault == "429":
            return 429, {"error": {"message": "rate limited"}}, {"Retry-After": "0"}
        if fault in ("503", "400"):
            return int(fault), {"error": {"message": f"injected {fault}"}}, {}
        if fault == "hang":
            time.sleep(self.hang_s)
        payload = self.forward(body) if self.upstream else self.own_answer(body, key)
        if self.strip_logprobs:
            for c in payload.get("choices", []):
                c.pop("logprobs", None)
        if fault != "hang":  # a hung answer is sent after the client gave up: never received
            with self.lock:
                self.answered.setdefault(key, []).append(payload["choices"][0]["message"]["content"])
        return 200, payload, {}

    def forward(self, body: dict) -> dict:
        """The upstream server's answer to ``body``."""
        r = httpx.post(self.upstream + "/chat/completions", json=body, timeout=120, trust_env=False)
        r.raise_for_status()
        return r.json()

    def own_answer(self, body: dict, key: int) -> dict:
        """Its own arithmetic answer, OpenAI-shaped (no log-probs: it has none)."""
        content = body["messages"][-1]["content"]
        text = arithmetic_answer(content, key, self.wrong_every)
        payload = {"id": f"x-{key}", "object": "chat.completion", "model": "arithmetic-teacher",
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                "finish_reason": "stop"}]}
        if self.usage:
            payload["usage"] = {"prompt_tokens": len(content.split()), "completion_tokens": len(text.split()),
                                "total_tokens": len(content.split()) + len(text.split())}
        return payload

    def __enter__(self) -> "TeacherEndpoint":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
