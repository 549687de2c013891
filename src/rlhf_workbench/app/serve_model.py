"""Serve the project's own model behind an OpenAI-compatible chat API.

    rlhf serve-model --model smollm2-135m --port 8001
    curl http://127.0.0.1:8001/v1/chat/completions -H 'content-type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "What is 2 + 3?"}], "temperature": 0}'

Endpoints (the subset of the OpenAI Chat Completions API that a judge or an evaluation
harness needs; https://platform.openai.com/docs/api-reference/chat):

- ``POST /v1/chat/completions``: ``messages`` (required), ``model``, ``temperature`` (0 is
  greedy), ``top_p``, ``max_tokens`` (``max_completion_tokens`` is accepted as an alias), ``n``,
  ``stop`` (a string or a list of strings; cut from the returned text, as OpenAI does),
  ``seed`` and ``logprobs`` (true: each choice's ``logprobs.content`` lists its generated tokens
  with their log-probabilities under the model, raw logits at temperature 1; ``top_logprobs`` is
  not supported and left empty). Unknown fields are ignored, ``stream: true`` is refused. The answer follows the
  OpenAI schema: ``id``, ``object: "chat.completion"``, ``created``, ``model``,
  ``choices[{index, message{role, content}, finish_reason}]`` (``"stop"`` when the model
  emitted EOS or a stop string, ``"length"`` when it hit ``max_tokens``) and ``usage``
  (``prompt_tokens``, ``completion_tokens`` summed over the choices, ``total_tokens``).
- ``GET /v1/models``: the one served model.
- ``POST /v1/feedback`` (only with a feedback store: ``rlhf serve-model --run RUNDIR`` or
  ``--db URL``): ``{"id": "<response id>", "label": true|false}`` (or ``"thumbs": "up"|"down"``;
  ``"index"`` picks a choice of an ``n > 1`` response, default 0) stores a thumbs up / down on a
  served answer, tagged with the policy version served; with ``algorithm: kto`` the run's next
  round trains on it (:mod:`rlhf_workbench.feedback.thumbs`). With a store every served completion is
  recorded (response id, messages, rendered prompt, text, ``finish_reason``, policy version)
  before it is returned. Errors: 404 for an unknown ``id`` or ``index``, 400 for a bad or
  missing label or when this server has no feedback store, 409 for a vote a round already
  trained on.

The model answers through :class:`rlhf_workbench.model.chat.ChatModel` (loaded by
:func:`rlhf_workbench.model.chat.load_served_model`): the prompt is the tokenizer's chat template
applied to ``messages`` with the generation prompt appended, exactly as
:func:`rlhf_workbench.model.rollout.render_prompt` renders a task, so the served model answers as
it does in the loop. One model serves all requests: generation is serialised with a lock. Invalid requests get HTTP 400 with an OpenAI-style error whose
``message`` and ``param`` name the field at fault; an unknown ``model`` gets 404.

Operating limits (:class:`ServeLimits`, ``rlhf serve-model`` options):

- **Authentication**: with an API key (``--api-key-env VAR`` names the environment variable
  holding it; the key never appears on the command line) every request needs
  ``Authorization: Bearer <key>``, else 401. Without a key the command serves on a loopback
  address only (``--host 0.0.0.0`` is refused) and prints a warning: any local process can
  call it.
- **A bounded queue**: at most ``max_queue`` requests are in the server at once (one
  generating, the others waiting for the model); one more is refused at once with 503 and
  ``Retry-After``, instead of waiting behind minutes of generation.
- **Per-request limits**: ``n`` <= ``max_n``, ``max_tokens`` <= ``max_tokens``, the prompt <=
  ``max_prompt_tokens`` tokens (messages over 16 characters per allowed token are refused
  before tokenizing); over a limit is 400 naming the field and the limit.
- **Request shape** (checked before the request waits for the model, so a hostile request
  cannot hold the model lock): at most 4 ``stop`` strings of at most ``max_stop_chars``
  characters each (a stop string is matched token by token inside generation, and its cost grows
  with its length: four 100,000-character strings used to hold the model for over ten minutes),
  ``seed`` in ``[0, 2**63 - 1]`` (what torch's generator takes), every string valid Unicode
  (a lone surrogate such as ``"\\ud800"`` cannot be encoded as UTF-8), and a body of at most
  ``max_body_bytes`` (413 beyond it, read no further). Each is a 400 (413) naming the field.
- **Shutdown** waits at most ``SHUTDOWN_GRACE_S`` seconds for requests in flight (uvicorn's
  graceful-shutdown timeout); generation is bounded by ``max_tokens``.
"""

from __future__ import annotations

import hmac
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from rlhf_workbench.feedback.thumbs import ThumbsError, record_served, record_served_feedback
from rlhf_workbench.model.chat import ChatModel, ContextLengthError

DEFAULT_MAX_TOKENS = 256
MAX_SEED = 2**63 - 1  # torch.manual_seed takes a 64-bit seed; OpenAI's seed is an int64
SHUTDOWN_GRACE_S = 5  # seconds a stopping server waits for requests in flight
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServeLimits:
    """What one ``serve-model`` server accepts (see the module docstring).

    Attributes:
        api_key: the bearer token every request must carry; None serves without authentication.
        max_queue: requests in the server at once (generating or waiting); more get 503.
        max_n: choices per request.
        max_tokens: ``max_tokens`` per request (also caps the default).
        max_prompt_tokens: prompt length in tokens (after the chat template).
        max_stop_chars: characters per ``stop`` string.
        max_body_bytes: size of a request body in bytes (413 beyond it).
    """

    api_key: str | None = None
    max_queue: int = 8
    max_n: int = 4
    max_tokens: int = 512
    max_prompt_tokens: int = 2048
    max_stop_chars: int = 64
    max_body_bytes: int = 1_000_000

    def __post_init__(self):
        for name in ("max_queue", "max_n", "max_tokens", "max_prompt_tokens", "max_stop_chars", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key is empty")


class ChatMessage(BaseModel):
    """One chat turn. ``content`` is a string or a list of OpenAI content parts (text parts only)."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        """The turn's text (text parts joined)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")


class ChatRequest(BaseModel):
    """Body of ``POST /v1/chat/completions`` (OpenAI's field names and meanings)."""

    model_config = ConfigDict(extra="ignore")
    messages: list[ChatMessage] = Field(..., min_length=1)
    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=128)  # the server's own cap is ServeLimits.max_n
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    logprobs: bool = False
    stream: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        if isinstance(v, str):
            v = [v]
        if v is not None and (len(v) > 4 or any(not s for s in v)):
            raise ValueError("at most 4 non-empty stop strings")
        return v


class FeedbackRequest(BaseModel):
    """Body of ``POST /v1/feedback``: the served response's ``id``, its choice ``index`` and the
    vote, as ``label`` (JSON true = thumbs up) or ``thumbs`` (``"up"`` / ``"down"``), exactly one."""

    model_config = ConfigDict(extra="ignore")
    id: str = Field(..., min_length=1, max_length=100)
    index: int = Field(0, ge=0)
    label: StrictBool | None = None
    thumbs: Literal["up", "down"] | None = None

    @model_validator(mode="after")
    def _one_vote(self):
        if (self.label is None) == (self.thumbs is None):
            raise ValueError("give exactly one of label (true / false) and thumbs ('up' / 'down')")
        return self

    @property
    def vote(self) -> bool:
        """True for thumbs up."""
        return self.label if self.label is not None else self.thumbs == "up"


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type_


def _error_body(message: str, param: str | None, type_: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": None}}


class _Admission:
    """Counts the requests in the server; :meth:`enter` refuses one beyond ``limit`` with 503."""

    def __init__(self, limit: int):
        self.limit, self.inside, self._lock = limit, 0, threading.Lock()

    def enter(self) -> None:
        """Admit a request, or raise :class:`APIError` 503 when ``limit`` are already inside."""
        with self._lock:
            if self.inside >= self.limit:
                raise APIError(503, f"server busy: {self.inside} requests are queued or generating (limit "
                                    f"{self.limit}); retry later", None, "server_busy")
            self.inside += 1

    def leave(self) -> None:
        """A request admitted by :meth:`enter` is done."""
        with self._lock:
            self.inside -= 1


def _check_text(req: ChatRequest) -> None:
    """400 naming the field of the first string that is not valid Unicode (a lone surrogate from a
    JSON ``\\udXXX`` escape cannot be encoded as UTF-8, so the tokenizer would fail with a 500)."""
    fields = [("model", req.model)] + [(f"stop.{i}", s) for i, s in enumerate(req.stop or [])]
    for i, m in enumerate(req.messages):
        parts = [m.content] if isinstance(m.content, str) else [str(p.get("text", "")) for p in m.content]
        fields += [(f"messages.{i}.content", p) for p in parts]
    for field, text in fields:
        if text is None:
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise APIError(400, f"{field}: not valid Unicode text (character {e.start} is a lone surrogate "
                                f"{text[e.start]!r}); send UTF-8 text", field) from e


def _check_limits(req: ChatRequest, chat: ChatModel, limits: ServeLimits) -> None:
    """400 for a request over one of ``limits`` or with text that is not valid Unicode (checked
    before it waits for the model)."""
    _check_text(req)
    for i, s in enumerate(req.stop or []):
        if len(s) > limits.max_stop_chars:
            raise APIError(400, f"stop.{i}: at most {limits.max_stop_chars} characters per stop string on this "
                                f"server, got {len(s)}", f"stop.{i}")
    if req.n > limits.max_n:
        raise APIError(400, f"n: at most {limits.max_n} choices per request on this server, got {req.n}", "n")
    for field in ("max_tokens", "max_completion_tokens"):
        value = getattr(req, field)
        if value is not None and value > limits.max_tokens:
            raise APIError(400, f"{field}: at most {limits.max_tokens} tokens per request on this server, got "
                                f"{value}", field)
    chars = sum(len(m.text()) for m in req.messages)
    if chars > 16 * limits.max_prompt_tokens:
        raise APIError(400, f"messages: the prompt is {chars} characters, over this server's limit of "
                            f"{limits.max_prompt_tokens} tokens", "messages")
    n_prompt = len(chat.prompt_ids(_messages(req)))
    if n_prompt > limits.max_prompt_tokens:
        raise APIError(400, f"messages: the prompt is {n_prompt} tokens, over this server's limit of "
                            f"{limits.max_prompt_tokens}", "messages")


def make_app(model, tokenizer, model_name: str, limits: ServeLimits | None = None, feedback=None) -> FastAPI:
    """The FastAPI app serving ``model`` as ``model_name`` (see the module docstring).

    Args:
        model: a causal LM (e.g. ``models.load_policy(cfg).policy``).
        tokenizer: its tokenizer (with a chat template).
        model_name: id reported by ``/v1/models`` and in responses; a request naming another
            model gets 404.
        limits: authentication, queue and per-request limits (default :class:`ServeLimits`():
            no key, 8 requests in the server, n <= 4, max_tokens <= 512, prompt <= 2048 tokens).
        feedback: a :class:`rlhf_workbench.feedback.thumbs.FeedbackStore` (database and served policy
            version): every completion is stored and ``POST /v1/feedback`` takes thumbs on it;
            None: nothing is stored and the feedback route answers 400.

    Raises:
        ValueError: the tokenizer has no chat template.
    """
    limits = limits or ServeLimits()
    chat = ChatModel(model, tokenizer, model_name)
    app = FastAPI(title=f"rlhf serve-model: {model_name}")
    app.state.chat, app.state.limits, app.state.feedback = chat, limits, feedback
    app.state.admission = admission = _Admission(limits.max_queue)
    _add_error_handling(app, limits)
    app.add_middleware(_BodyLimit, max_bytes=limits.max_body_bytes)

    @app.get("/v1/models")
    def list_models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "rlhf-workbench"}]}

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatRequest) -> dict:  # sync: runs in the thread pool, the lock serialises
        return _chat_completions(req, chat, limits, admission, feedback)

    @app.post("/v1/feedback")
    def post_feedback(req: FeedbackRequest) -> dict:
        return _post_feedback(req, feedback)

    return app


class _BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` (by ``Content-Length`` or as it streams
    in) is answered 413 without reading the rest."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self, size: int | None) -> JSONResponse:
        got = f"{size} bytes" if size is not None else "more"
        return JSONResponse(status_code=413, content=_error_body(
            f"body: request body of {got}, over this server's limit of {self.max_bytes} bytes", "body"))

    async def __call__(self, scope, receive, send):
        """Handle one ASGI connection."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self._too_large(int(length) if length.isdigit() else None)(scope, receive, send)
            return
        seen, refused = 0, False

        async def counted():
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # answer now; the app sees a client that went away
                    refused = True
                    await self._too_large(None)(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def tracked(message):
            if not refused:
                await send(message)

        await self.app(scope, counted, tracked)


def _add_error_handling(app: FastAPI, limits: ServeLimits) -> None:
    """The bearer-key check (401) and the OpenAI-style error bodies (400 for an invalid request,
    :class:`APIError`'s status otherwise, 503 with ``Retry-After``)."""
    expected = f"Bearer {limits.api_key}".encode() if limits.api_key else None

    @app.middleware("http")
    async def _authenticate(request: Request, call_next):
        if expected is not None:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):  # constant time
                body = _error_body(f"{'invalid' if given else 'missing'} API key: send the header "
                                   "'Authorization: Bearer <key>'", None)
                body["error"]["code"] = "invalid_api_key"
                return JSONResponse(status_code=401, content=body, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        msgs, param = [], None
        for err in exc.errors():
            loc = [str(x) for x in err.get("loc", ()) if x != "body"]
            field = "body" if err.get("type") == "json_invalid" else ".".join(loc) or "body"
            param = param or field
            msgs.append(f"{field}: {err.get('msg')}")
        return JSONResponse(status_code=400, content=_error_body("invalid request: " + "; ".join(msgs), param))

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        headers = {"Retry-After": "5"} if exc.status == 503 else None
        return JSONResponse(status_code=exc.status, content=_error_body(exc.message, exc.param, exc.type),
                            headers=headers)


def _chat_completions(req: ChatRequest, chat: ChatModel, limits: ServeLimits, admission: _Admission,
                      feedback) -> dict:
    """``POST /v1/chat/completions``: check, wait for the model, answer (stored when ``feedback``)."""
    if req.stream:
        raise APIError(400, "stream: streaming is not supported; send stream=false", "stream")
    if req.model is not None and req.model != chat.name:
        raise APIError(404, f"model: {req.model!r} is not served here; available: {chat.name!r}", "model",
                       "not_found_error")
    _check_limits(req, chat, limits)
    admission.enter()  # 503 when max_queue requests are already queued or generating
    try:
        if req.max_tokens is None and req.max_completion_tokens is None:
            req = req.model_copy(update={"max_tokens": min(DEFAULT_MAX_TOKENS, limits.max_tokens)})
        messages = _messages(req)
        response = _complete(chat, req, messages)
        if feedback is not None:  # stored before it is returned, so a thumbs on its id finds it
            record_served(feedback, response, messages, chat.prompt_text(messages))
        return response
    finally:
        admission.leave()


def _messages(req: ChatRequest) -> list[dict[str, str]]:
    """The request's turns as ``{"role", "content"}`` dicts (text parts joined)."""
    return [{"role": m.role, "content": m.text()} for m in req.messages]


def _complete(chat: ChatModel, req: ChatRequest, messages: list[dict[str, str]]) -> dict:
    """Generate the answer to ``req``; returns the OpenAI response object (a dict)."""
    max_new = req.max_tokens or req.max_completion_tokens or DEFAULT_MAX_TOKENS
    try:
        done = chat.complete(messages, max_new, temperature=req.temperature, top_p=req.top_p, n=req.n,
                             stop=req.stop, seed=req.seed, logprobs=req.logprobs)
    except ContextLengthError as e:
        raise APIError(400, str(e), "max_tokens") from e
    choices = [{"index": i, "message": {"role": "assistant", "content": c.text},
                "logprobs": None if c.logprobs is None else {"content": [
                    {"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []} for t, lp in c.logprobs]},
                "finish_reason": c.finish_reason} for i, c in enumerate(done.choices)]
    completion_tokens = sum(c.n_tokens for c in done.choices)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
        "model": chat.name, "choices": choices,
        "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": done.prompt_tokens + completion_tokens},
    }


def _post_feedback(req: FeedbackRequest, feedback) -> dict:
    """``POST /v1/feedback``: store a thumbs up / down on a served answer."""
    if feedback is None:
        raise APIError(400, "feedback is not collected by this server: start it with --run RUNDIR or --db URL "
                            "to store completions and thumbs", None)
    try:
        fid = record_served_feedback(feedback.store, req.id, req.index, req.vote)
    except ThumbsError as e:
        raise APIError(e.status, e.message, e.param, "not_found_error" if e.status == 404 else
                       "invalid_request_error") from e
    return {"object": "feedback", "id": req.id, "index": req.index, "label": req.vote, "feedback_id": fid,
            "policy_version": feedback.policy_version}


class ServerThread:
    """A uvicorn server running an app in a daemon thread (for tests and in-process judges).

    Use as a context manager or call :meth:`start` / :meth:`stop`. With ``port=0`` the OS
    picks a free port; :attr:`port` and :attr:`base_url` (``http://host:port/v1``) are set once
    the server accepts connections.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        self.host = host
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                                    timeout_graceful_shutdown=SHUTDOWN_GRACE_S))
        self.thread = threading.Thread(target=self.server.run, name="rlhf-serve-model", daemon=True)
        self.port: int | None = None

    @property
    def base_url(self) -> str:
        """``http://host:port/v1``, the base URL an OpenAI client takes."""
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        """Start serving and wait until the socket is bound.

        Raises:
            RuntimeError: the server did not start within ``timeout`` seconds (e.g. port in use).
        """
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"serve-model: server on {self.host} did not start within {timeout:.0f}s")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the server to exit and wait for its thread."""
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(model, tokenizer, model_name: str, host: str = "127.0.0.1", port: int = 8001,
          limits: ServeLimits | None = None, feedback=None) -> None:
    """Serve ``model`` on ``host:port`` until interrupted (blocking; ``rlhf serve-model``);
    ``feedback`` as in :func:`make_app`.

    Raises:
        ValueError: ``host`` is not a loopback address and ``limits`` has no API key.
    """
    limits = limits or ServeLimits()
    if limits.api_key is None and host not in LOOPBACK_HOSTS:
        raise ValueError(f"--host {host}: serving beyond loopback needs an API key (--api-key-env VAR)")
    uvicorn.run(make_app(model, tokenizer, model_name, limits, feedback), host=host, port=port, log_level="info",
                timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
