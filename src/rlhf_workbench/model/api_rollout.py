"""Traces from an API model: any OpenAI-compatible chat endpoint as a second rollout source.

    rollout:
      teacher: {base_url: https://api.openai.com/v1, model: gpt-4o-mini, api_key_env: OPENAI_API_KEY,
                num_generations: 4}

:class:`APIRollout` asks the endpoint (``POST {base_url}/chat/completions``, OpenAI's schema) for
M traces per prompt, one request per trace (``n: 1``: every OpenAI-compatible server takes it, and
a retry re-asks for one trace only), with at most ``max_concurrency`` requests in flight (a thread
pool over one ``httpx.Client``). A request that times out (``timeout_s``), fails to connect or is
answered 429 or 5xx is retried up to ``max_retries`` times after an exponential backoff with jitter
(``backoff_s * 2**attempt``, scaled by a uniform factor in [0.5, 1], at least the ``Retry-After``
the server asked for, at most :data:`MAX_BACKOFF_S`); any other HTTP error stops the round with
:class:`APIRolloutError` naming the task and the answer. Each (prompt, j) job keeps exactly one
answer, so a retry never duplicates a trace and a request that failed for good loses the round,
never one trace of it.

:class:`APIUsage` counts requests, retries (and why: timeouts, 429, 5xx, connection errors, bad
bodies) and the ``usage`` tokens the endpoint reports (``prompt_tokens``, ``completion_tokens``;
responses without ``usage`` are counted apart, never estimated). With ``logprobs: true`` the
sampled tokens' log-probabilities (``choices[0].logprobs.content[*].logprob``, under the
endpoint's own tokenizer) are kept; an endpoint that returns none leaves them None, never invented.

:func:`teacher_completions` turns the answers into :class:`~rlhf_workbench.model.rollout.Completion`
objects under the *policy's* tokenizer (chat-templated prompt as the policy sees it, the answer text
tokenised, EOS appended when the teacher ended the answer), so the policy can train on them; their
``logps`` are empty (the policy's behaviour log-probs of a text it did not sample are unknown).
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from email.utils import parsedate_to_datetime
from typing import Callable
from urllib.parse import urlparse

import httpx

from rlhf_workbench.config import TeacherConfig
from rlhf_workbench.model.rollout import Completion, render_prompt
from rlhf_workbench.tasks.task import Task

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})  # answers worth asking again
MAX_BACKOFF_S = 60.0  # longest wait between two attempts, Retry-After included
TEACHER_ORIGIN = "teacher"  # CompletionRow.origin of a teacher trace


class APIRolloutError(RuntimeError, ValueError):
    """The endpoint refused a request for good (a 4xx other than 408/429, or retries spent), or
    the API key's environment variable is unset; the message names the task and the answer. Also a
    ``ValueError``, so ``rlhf run`` reports it in one line (exit code 2): most causes are settings
    (the key, the model name, the base URL)."""


@dataclass
class APIUsage:
    """What the teacher cost: HTTP requests sent (retries included), retries and their causes,
    and the tokens the endpoint reported in ``usage``.

    Attributes:
        requests: ``POST /chat/completions`` requests sent, retries included.
        retries: requests that were attempts after a failed one.
        timeouts, rate_limited, server_errors, connection_errors, bad_responses: failed attempts
            by cause (past ``timeout_s``; HTTP 429; HTTP 408 or 5xx; no connection; a 200 whose body
            has no ``choices[0].message``).
        prompt_tokens, completion_tokens: summed ``usage`` of the answers kept.
        responses_without_usage: answers kept whose body had no ``usage`` (their tokens are not counted).
        traces: answers kept (one per prompt and j).
        traces_with_logprobs: of those, the ones the endpoint returned log-probs for.
    """

    requests: int = 0
    retries: int = 0
    timeouts: int = 0
    rate_limited: int = 0
    server_errors: int = 0
    connection_errors: int = 0
    bad_responses: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    responses_without_usage: int = 0
    traces: int = 0
    traces_with_logprobs: int = 0

    def add(self, other: "APIUsage | dict") -> "APIUsage":
        """This usage plus ``other`` (an :class:`APIUsage` or its :meth:`as_dict`), as a new object."""
        other = other if isinstance(other, dict) else asdict(other)
        return APIUsage(**{f.name: getattr(self, f.name) + int(other.get(f.name, 0)) for f in fields(self)})

    def as_dict(self) -> dict[str, int]:
        """The counters by name (JSON-ready)."""
        return asdict(self)


@dataclass(frozen=True)
class APITrace:
    """One answer of the API model.

    Attributes:
        task_id: the task it answers; ``index``: its position among the task's M answers (0..M-1).
        text: the answer (``choices[0].message.content``; ``""`` when the endpoint sent null).
        finish_reason: OpenAI's ``"stop"`` (the model ended it) or ``"length"`` (cut by max_tokens).
        logprobs: ``{"tokens": [...], "logprobs": [...]}`` from the endpoint (its tokenizer, nats), or
            None when it returned none.
        model: the model name the endpoint reported (or the one asked for).
    """

    task_id: str
    index: int
    text: str
    finish_reason: str
    logprobs: dict | None
    model: str


def request_seed(seed: int, round: int, task_id: str, index: int) -> int:
    """The ``seed`` sent with one request: fixed by the run's seed, the round, the task and the
    answer's index (sha256, the same on every machine), so a retry asks for the same sample."""
    digest = hashlib.sha256(f"{seed}:{round}:{task_id}:{index}".encode()).digest()
    return int.from_bytes(digest[:6], "big")


def retry_after_s(value: str | None) -> float:
    """Seconds a ``Retry-After`` header asks to wait (delta seconds or an HTTP date); 0 without one."""
    if not value:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return 0.0


def parse_logprobs(choice: dict) -> dict | None:
    """``{"tokens", "logprobs"}`` from an OpenAI choice's ``logprobs.content`` list, or None when the
    endpoint returned none (absent, null, or an empty list)."""
    content = (choice.get("logprobs") or {}).get("content") if isinstance(choice.get("logprobs"), dict) else None
    if not isinstance(content, list) or not content:
        return None
    try:
        return {"tokens": [str(t["token"]) for t in content], "logprobs": [float(t["logprob"]) for t in content]}
    except (KeyError, TypeError, ValueError):
        return None


class APIRollout:
    """M traces per prompt from an OpenAI-compatible endpoint (see the module docstring).

    Args:
        cfg: the ``rollout.teacher`` section.
        max_tokens: completion cap when ``cfg.max_tokens`` is None (the loop passes
            ``rollout.max_new_tokens``).
        stop: stop strings sent with every request (OpenAI takes at most 4; more are refused).

    Attributes:
        usage: the counters of every request this object sent (:class:`APIUsage`).

    Raises:
        APIRolloutError: ``cfg.api_key_env`` names an unset or empty variable, or ``stop`` holds
            more than 4 strings.
    """

    def __init__(self, cfg: TeacherConfig, max_tokens: int, stop: list[str] | None = None):
        headers = {}
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise APIRolloutError(f"rollout.teacher.api_key_env: environment variable {cfg.api_key_env} is "
                                      "not set or empty")
            headers["Authorization"] = f"Bearer {key}"  # kept in the client only, never logged or stored
        stop = [s for s in (stop or []) if s]
        if len(stop) > 4:
            raise APIRolloutError(f"rollout.stop: an OpenAI-compatible endpoint takes at most 4 stop strings, got "
                                  f"{len(stop)}")
        self.cfg, self.stop = cfg, stop
        self.max_tokens = cfg.max_tokens or max_tokens
        loopback = urlparse(cfg.base_url).hostname in ("127.0.0.1", "localhost", "::1")
        self._client = httpx.Client(
            base_url=cfg.base_url + "/", headers=headers, timeout=httpx.Timeout(cfg.timeout_s),
            limits=httpx.Limits(max_connections=cfg.max_concurrency), trust_env=not loopback)
        self.usage = APIUsage()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"APIRollout(base_url={self.cfg.base_url!r}, model={self.cfg.model!r})"

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                setattr(self.usage, k, getattr(self.usage, k) + v)

    def body(self, task: Task, seed: int) -> dict:
        """The request body for one answer to ``task`` (OpenAI's chat completions schema)."""
        body = {"model": self.cfg.model, "messages": task.chat_messages(), "temperature": self.cfg.temperature,
                "top_p": self.cfg.top_p, "max_tokens": self.max_tokens, "n": 1, "seed": seed}
        if self.stop:
            body["stop"] = self.stop
        if self.cfg.logprobs:
            body["logprobs"] = True
        return body

    def sample(self, tasks: list[Task], round: int, seed: int,
               progress: Callable[[int], None] | None = None) -> tuple[list[APITrace], APIUsage]:
        """``cfg.num_generations`` answers to each task, grouped by task in task order.

        Returns:
            ``(traces, usage)``: ``len(tasks) * M`` :class:`APITrace` objects and the counters of
            this call alone (:attr:`usage` keeps the total).

        Raises:
            APIRolloutError: a request refused for good or failing after ``max_retries`` retries
                (the other requests are cancelled; nothing of the round is returned).
        """
        before = APIUsage().add(self.usage)
        jobs = [(t, j) for t in tasks for j in range(self.cfg.num_generations)]
        pool = ThreadPoolExecutor(max_workers=self.cfg.max_concurrency, thread_name_prefix="api-rollout")
        try:
            futures = [pool.submit(self._answer, t, j, request_seed(seed, round, t.id, j)) for t, j in jobs]
            traces = []
            for f in futures:
                traces.append(f.result())
                if progress:
                    progress(1)
        finally:  # after a failure: the queued requests are dropped, the ones in flight end by themselves
            pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            spent = APIUsage(**{k: v - getattr(before, k) for k, v in self.usage.as_dict().items()})
        return traces, spent

    def _answer(self, task: Task, index: int, seed: int) -> APITrace:
        """One answer, with retries (see the module docstring)."""
        body, cfg = self.body(task, seed), self.cfg
        where = f"{cfg.base_url}/chat/completions (task {task.id!r}, answer {index})"
        for attempt in range(cfg.max_retries + 1):
            self._count(requests=1, retries=int(attempt > 0))
            wait = 0.0
            try:
                r = self._client.post("chat/completions", json=body)
            except httpx.TimeoutException as e:
                self._count(timeouts=1)
                error = f"no answer within {cfg.timeout_s:g} s ({type(e).__name__})"
            except httpx.TransportError as e:
                self._count(connection_errors=1)
                error = f"{type(e).__name__}: {e}"
            else:
                if r.status_code == 200:
                    trace = self._parse(r, task, index)
                    if trace is not None:
                        return trace
                    self._count(bad_responses=1)
                    error = f"HTTP 200 without choices[0].message: {r.text[:300]}"
                elif r.status_code in RETRY_STATUS:
                    self._count(**({"rate_limited": 1} if r.status_code == 429 else {"server_errors": 1}))
                    error, wait = f"HTTP {r.status_code}: {r.text[:300]}", retry_after_s(r.headers.get("retry-after"))
                else:
                    raise APIRolloutError(f"{where}: HTTP {r.status_code}: {r.text[:500]}")
            if attempt == cfg.max_retries:
                raise APIRolloutError(f"{where}: failed after {attempt + 1} attempts; last: {error}")
            backoff = cfg.backoff_s * 2 ** attempt * (0.5 + random.random() / 2)
            time.sleep(min(MAX_BACKOFF_S, max(wait, backoff)))
        raise AssertionError("unreachable")

    def _parse(self, r: httpx.Response, task: Task, index: int) -> APITrace | None:
        """The trace in a 200 answer, its usage counted; None for a body without ``choices[0].message``."""
        try:
            data = r.json()
            choice = data["choices"][0]
            text = choice["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            return None
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else None
        logprobs = parse_logprobs(choice)
        if usage is None:
            self._count(responses_without_usage=1)
        else:
            self._count(prompt_tokens=int(usage.get("prompt_tokens") or 0),
                        completion_tokens=int(usage.get("completion_tokens") or 0))
        self._count(traces=1, traces_with_logprobs=int(logprobs is not None))
        return APITrace(task.id, index, str(text), str(choice.get("finish_reason") or "stop"), logprobs,
                        str(data.get("model") or self.cfg.model))

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._client.close()


def teacher_completions(traces: list[APITrace], tasks_by_id: dict[str, Task], tokenizer,
                        first_index: int = 0) -> list[Completion]:
    """The teacher's answers as completions under the policy's ``tokenizer``.

    ``prompt_ids`` is the task's chat-templated prompt as the policy sees it
    (:func:`~rlhf_workbench.model.rollout.render_prompt`), ``token_ids`` the answer text tokenised
    without special tokens, plus the policy's EOS when the teacher ended the answer
    (``finish_reason`` other than ``"length"``), so the policy learns to stop where the teacher did;
    ``logps`` is empty (the policy did not sample the text); ``index`` is ``first_index + j``
    (after the policy's K samples). ``extra`` holds ``origin`` (``"teacher"``), the teacher's
    ``model`` and its ``api_logprobs`` (or None).
    """
    prompts: dict[str, list[int]] = {}
    eos = tokenizer.eos_token_id
    out = []
    for tr in traces:
        task = tasks_by_id[tr.task_id]
        if task.id not in prompts:
            prompts[task.id] = render_prompt(tokenizer, task)
        finished = tr.finish_reason != "length"
        ids = list(tokenizer(tr.text, add_special_tokens=False)["input_ids"])
        if finished and eos is not None:
            ids.append(eos)
        out.append(Completion(task_id=tr.task_id, index=first_index + tr.index, prompt_ids=prompts[task.id],
                              token_ids=ids, logps=[], text=tr.text, finished=finished,
                              extra={"origin": TEACHER_ORIGIN, "model": tr.model, "api_logprobs": tr.logprobs}))
    return out


def sample_traces(cfg: TeacherConfig, tasks: list[Task], round: int, seed: int, max_tokens: int,
                  stop: list[str] | None = None, progress: Callable[[int], None] | None = None
                  ) -> tuple[list[APITrace], dict[str, int]]:
    """One round's answers from a fresh :class:`APIRollout` (closed afterwards): ``(traces, usage)``,
    the usage as a dict. Touches no tokenizer, so it can run in a background thread
    (:func:`sample_in_background`).

    Raises:
        APIRolloutError: as :class:`APIRollout` and :meth:`APIRollout.sample`.
    """
    client = APIRollout(cfg, max_tokens, stop)
    try:
        traces, usage = client.sample(tasks, round, seed, progress)
    finally:
        client.close()
    return traces, usage.as_dict()


def sample_in_background(cfg: TeacherConfig, tasks: list[Task], round: int, seed: int, max_tokens: int,
                         stop: list[str] | None = None) -> Future:
    """:func:`sample_traces` started in a thread of its own, so the API model answers while the local
    policy samples; ``.result()`` returns ``(traces, usage)`` or raises its :class:`APIRolloutError`.
    (The HTTP requests release the GIL; the policy's tokenizer is left to the caller's thread.)"""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="api-rollout-round")
    future = pool.submit(sample_traces, cfg, tasks, round, seed, max_tokens, stop)
    pool.shutdown(wait=False)  # the thread ends with the round's requests
    return future


def teacher_rollout(cfg: TeacherConfig, tasks: list[Task], tokenizer, round: int, seed: int, max_tokens: int,
                    stop: list[str] | None = None, first_index: int = 0,
                    progress: Callable[[int], None] | None = None) -> tuple[list[Completion], dict[str, int]]:
    """One round's teacher traces: :meth:`APIRollout.sample` (M answers per task of ``tasks``)
    turned into completions under the policy's ``tokenizer`` by :func:`teacher_completions`.

    Returns:
        ``(completions, usage)``: grouped by task in task order, indices from ``first_index``; the
        round's :class:`APIUsage` as a dict.

    Raises:
        APIRolloutError: as :class:`APIRollout` and :meth:`APIRollout.sample`.
    """
    traces, usage = sample_traces(cfg, tasks, round, seed, max_tokens, stop, progress)
    return teacher_completions(traces, {t.id: t for t in tasks}, tokenizer, first_index), usage
