"""An LLM judge: which of two traces of the same question is better, with position swapping.

Backends implement one method, ``chat(messages, max_tokens) -> str`` (:class:`ChatBackend`),
and always decode greedily:

- :class:`LocalChat`: a causal LM loaded like the policy, prompted with its chat template
  (the same code path as ``rlhf serve-model``, so both give the same verdicts).
- :class:`OpenAIChat`: any OpenAI-compatible ``POST {base_url}/chat/completions`` over httpx
  (``rlhf serve-model``, vLLM, llama.cpp's server, a hosted API). The API key is read from
  an environment variable named in the config, never from the config itself.

:class:`PairwiseJudge` asks for a single letter ("A" or "B") and cancels the judge's order
bias by **position swapping** (Zheng et al. 2023, "Judging LLM-as-a-Judge with MT-Bench and
Chatbot Arena", NeurIPS Datasets and Benchmarks, §3.3 "Limitations of LLM-as-a-Judge:
position bias" and §3.4 "Addressing limitations: swapping positions"): every pair is judged
twice, once in each order, and a trace wins only when both verdicts agree; otherwise (the
verdict followed the position, or could not be parsed) the pair is a tie worth 0.5 to each.

:class:`JudgeRanker` turns that into a :class:`rlhf_workbench.feedback.sources.Ranker`: a round-robin
tournament among one prompt's verified-correct traces whose score is each trace's win rate
(Copeland-style; ties count half), optionally on a deterministic random subset of the pairs.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import time
from dataclasses import dataclass, field
from typing import Protocol, Sequence
from urllib.parse import urlparse

from rlhf_workbench.model.chat import ChatModel, load_served_model
from rlhf_workbench.model.rollout import Completion
from rlhf_workbench.tasks.task import Task


class JudgeError(RuntimeError):
    """A judge backend failed: HTTP error, malformed response, missing API key."""


class ChatBackend(Protocol):
    """A chat model that answers greedily (temperature 0)."""

    def chat(self, messages: list[dict[str, str]], max_tokens: int = 16) -> str:
        """The assistant's reply to ``messages`` (OpenAI ``{"role", "content"}`` dicts), at most
        ``max_tokens`` tokens."""
        ...


# --------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------


class LocalChat:
    """A chat model run in this process (greedy, chat template; the ``serve-model`` code path).

    Args:
        model: a causal LM.
        tokenizer: its tokenizer, with a chat template.
        name: a label for logs.

    Attributes:
        calls: number of :meth:`chat` calls so far.
    """

    def __init__(self, model, tokenizer, name: str = "local"):
        self._chat = ChatModel(model, tokenizer, name)
        self.name = name
        self.calls = 0

    @classmethod
    def load(cls, name: str, dtype: str = "fp32", cache_dir: str | None = None) -> "LocalChat":
        """Load a model by preset name, hub id, local path or run checkpoint
        (:func:`rlhf_workbench.model.chat.load_served_model`)."""
        model, tokenizer = load_served_model(name, dtype, cache_dir)
        return cls(model, tokenizer, name)

    def chat(self, messages: list[dict[str, str]], max_tokens: int = 16) -> str:
        """Greedy reply (EOS or ``max_tokens``), special tokens removed."""
        self.calls += 1
        return self._chat.complete(messages, max_tokens, temperature=0).choices[0].text


class OpenAIChat:
    """Any OpenAI-compatible chat completions endpoint, called with ``temperature=0``.

    Args:
        base_url: the API root including the version, e.g. ``http://127.0.0.1:8001/v1`` or
            ``https://api.openai.com/v1``; requests go to ``{base_url}/chat/completions``.
        model: the model name sent with each request; None asks ``GET {base_url}/models`` and
            takes the first id listed.
        api_key_env: name of the environment variable holding the API key (sent as
            ``Authorization: Bearer``); None sends no key. The key is kept only in the HTTP
            client's headers, never in the config or in ``repr``.
        timeout: seconds per HTTP request.
        retries: extra attempts after a connection error or HTTP 429/5xx (1 s, 2 s, ... apart).

    Attributes:
        calls: number of ``POST /chat/completions`` requests sent (retries included).

    Raises:
        JudgeError: the key variable is unset or empty, or ``/models`` lists no model.
    """

    def __init__(self, base_url: str, model: str | None = None, api_key_env: str | None = None,
                 timeout: float = 60.0, retries: int = 2):
        import httpx

        headers = {}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise JudgeError(f"judge api_key_env: environment variable {api_key_env} is not set")
            headers["Authorization"] = f"Bearer {key}"
        self.base_url = base_url.rstrip("/")
        loopback = urlparse(self.base_url).hostname in ("127.0.0.1", "localhost", "::1")
        # proxies from the environment are honoured except on loopback
        self._client = httpx.Client(base_url=self.base_url + "/", headers=headers, timeout=timeout,
                                    trust_env=not loopback)
        self.retries = retries
        self.calls = 0
        self.model = model or self._first_model()

    def __repr__(self) -> str:
        return f"OpenAIChat(base_url={self.base_url!r}, model={self.model!r})"

    def _request(self, method: str, path: str, **kwargs):
        import httpx

        for attempt in range(self.retries + 1):
            try:
                if path == "chat/completions":
                    self.calls += 1
                r = self._client.request(method, path, **kwargs)
            except httpx.TransportError as e:
                if attempt == self.retries:
                    raise JudgeError(f"{self.base_url}/{path}: {type(e).__name__}: {e}") from e
            else:
                if r.status_code == 200:
                    return r.json()
                if r.status_code not in (429, 500, 502, 503, 504) or attempt == self.retries:
                    raise JudgeError(f"{self.base_url}/{path}: HTTP {r.status_code}: {r.text[:500]}")
            time.sleep(1.0 * (attempt + 1))
        raise AssertionError("unreachable")

    def _first_model(self) -> str:
        data = self._request("GET", "models").get("data") or []
        if not data:
            raise JudgeError(f"{self.base_url}/models lists no model; set the judge's api_model")
        return data[0]["id"]

    def chat(self, messages: list[dict[str, str]], max_tokens: int = 16) -> str:
        """The first choice's content, requested with ``temperature=0``.

        Raises:
            JudgeError: HTTP error (after retries) or a response without ``choices[0].message``.
        """
        data = self._request("POST", "chat/completions", json={
            "model": self.model, "messages": messages, "temperature": 0, "max_tokens": max_tokens, "n": 1})
        try:
            return data["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError) as e:
            raise JudgeError(f"{self.base_url}/chat/completions: unexpected response {str(data)[:300]}") from e

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._client.close()


# --------------------------------------------------------------------------------------------
# the pairwise judge
# --------------------------------------------------------------------------------------------

SYSTEM_PROMPT = (
    "You are an impartial expert judge. You compare two answers to the same question and decide "
    "which one is better. Judge correctness of every step, clarity and relevance. Do not let the "
    "order in which the answers are shown or their length influence you."
)

USER_TEMPLATE = """[Question]
{question}
{reference}
[Answer A]
{a}
[End of Answer A]

[Answer B]
{b}
[End of Answer B]

Which answer is better? Reply with exactly one letter: A or B."""

_BRACKET = re.compile(r"\[\[\s*([AB])\s*\]\]")
_LABELLED = re.compile(r"\b(?:answer|verdict|winner|choice|better|final)\b[^A-Za-z0-9\n]{0,3}(?:is\s+)?(?:answer\s+|trace\s+)?"
                       r"\(?\b([AB])\b", re.IGNORECASE)
_NAMED = re.compile(r"\b(?:answer|trace|response|option)\s+\(?([AB])\)?(?![A-Za-z0-9])", re.IGNORECASE)
_ALONE = re.compile(r"(?<![A-Za-z0-9])([AB])(?![A-Za-z0-9])")


def parse_verdict(text: str) -> str | None:
    """``"A"``, ``"B"`` or None from a judge's reply.

    Tried in order, the first match wins: ``[[A]]`` (MT-Bench's format); a labelled letter
    (``Answer: B``, ``Verdict - A``, ``the better is B``, ``Final: (A)``; case-insensitive);
    a named one (``Trace A``, ``Answer B``, ``Response (A)``); the first standalone capital ``A``
    or ``B`` (not part of a word). A reply that is just the letter counts in either case. Anything
    else, e.g. ``"tie"`` or ``"both"``, is None. Known limit: an article, as in ``"A better one is
    B"``, reads as ``A``; the prompt asks for the letter alone, and position swapping turns such
    misreadings into ties rather than wins.
    """
    bare = text.strip().strip(".()[]*'\"` ").upper()
    if bare in ("A", "B"):  # the whole reply is the letter, in either case
        return bare
    for rx in (_BRACKET, _LABELLED, _NAMED):
        m = rx.search(text)
        if m:
            return m.group(1).upper()
    m = _ALONE.search(text)
    return m.group(1) if m else None


@dataclass(frozen=True)
class PairVerdict:
    """The two position-swapped verdicts on traces ``x`` and ``y``.

    Attributes:
        first: verdict with ``x`` shown as A and ``y`` as B (None: unparsed).
        second: verdict with ``y`` shown as A and ``x`` as B (None: unparsed).
        raw_first, raw_second: the judge's replies.
        winner: 0 when ``x`` won both orders (``first == "A"`` and ``second == "B"``), 1 when
            ``y`` did, None for a tie (inconsistent or unparsed verdicts, or identical texts).
        calls: judge calls made (2, or 0 for identical texts).
    """

    first: str | None
    second: str | None
    raw_first: str
    raw_second: str
    winner: int | None
    calls: int = 2

    @property
    def consistent(self) -> bool:
        """Both orders picked the same trace."""
        return self.winner is not None

    @property
    def points(self) -> tuple[float, float]:
        """Points of ``(x, y)``: 1/0, 0/1 or 0.5/0.5; they always sum to 1."""
        return (0.5, 0.5) if self.winner is None else ((1.0, 0.0) if self.winner == 0 else (0.0, 1.0))


class PairwiseJudge:
    """Compares two traces of one question with a chat model, in both orders.

    Args:
        backend: a :class:`ChatBackend` (greedy).
        max_tokens: reply length cap; the prompt asks for one letter.
        system_prompt: the system message (None: send the user message only).
    """

    def __init__(self, backend: ChatBackend, max_tokens: int = 16, system_prompt: str | None = SYSTEM_PROMPT):
        self.backend, self.max_tokens, self.system_prompt = backend, max_tokens, system_prompt

    def messages(self, question: str, trace_a: str, trace_b: str, reference: str | None = None) -> list[dict[str, str]]:
        """The chat messages asking whether ``trace_a`` (shown as A) or ``trace_b`` (B) is better.

        ``reference`` (the ground-truth answer) is shown after the question when given.
        """
        ref = f"\n[Reference answer]\n{reference}\n" if reference else ""
        user = USER_TEMPLATE.format(question=question.strip(), reference=ref, a=trace_a.strip(), b=trace_b.strip())
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return msgs + [{"role": "user", "content": user}]

    def judge_once(self, question: str, trace_a: str, trace_b: str, reference: str | None = None) -> tuple[str | None, str]:
        """One call: ``(verdict, raw reply)`` for this order."""
        raw = self.backend.chat(self.messages(question, trace_a, trace_b, reference), self.max_tokens)
        return parse_verdict(raw), raw

    def compare(self, question: str, x: str, y: str, reference: str | None = None) -> PairVerdict:
        """Judge ``(x, y)`` then ``(y, x)``; ``x`` wins only if picked in both orders.

        Identical texts are a tie without calling the judge.
        """
        if x.strip() == y.strip():
            return PairVerdict(None, None, "", "", None, calls=0)
        v1, raw1 = self.judge_once(question, x, y, reference)
        v2, raw2 = self.judge_once(question, y, x, reference)
        winner = 0 if (v1, v2) == ("A", "B") else 1 if (v1, v2) == ("B", "A") else None
        return PairVerdict(v1, v2, raw1, raw2, winner)


def task_question(task: Task) -> str:
    """What the judge is shown as the question: the policy's own user message (:meth:`Task.prompt`),
    or the whole conversation of a multi-turn open task (:meth:`Task.transcript`)."""
    return task.transcript()


def task_reference(task: Task) -> str:
    """The ground-truth answer as shown to the judge (with the option text for a choice)."""
    if task.choices and task.answer in task.choices:
        return f"{task.answer}. {task.choices[task.answer]}"
    return task.answer


@dataclass
class JudgeStats:
    """Counters of a :class:`JudgeRanker`, cumulative over its calls.

    Attributes:
        prompts: groups ranked.
        pairs: pairs compared (identical-text pairs included).
        calls: judge calls (two per pair of distinct texts).
        consistent: pairs whose two orders picked the same trace.
        unparsed: replies from which no verdict could be parsed.
        identical: pairs of identical texts (ties, not sent to the judge).
    """

    prompts: int = 0
    pairs: int = 0
    calls: int = 0
    consistent: int = 0
    unparsed: int = 0
    identical: int = 0

    @property
    def consistency_rate(self) -> float:
        """``consistent / judged pairs`` (identical-text pairs excluded; 0.0 before any)."""
        judged = self.pairs - self.identical
        return self.consistent / judged if judged else 0.0

    def as_dict(self, prefix: str = "judge/") -> dict[str, float]:
        """Metrics for logging, e.g. ``{"judge/calls": 12.0, "judge/consistency_rate": 0.5, ...}``."""
        d = {"prompts": self.prompts, "pairs": self.pairs, "calls": self.calls, "consistent": self.consistent,
             "unparsed": self.unparsed, "consistency_rate": self.consistency_rate}
        return {prefix + k: float(v) for k, v in d.items()}


@dataclass(frozen=True)
class PairRecord:
    """One judged pair of a group: trace indices ``i < j`` (positions in the ranker's input) and
    the verdict with ``i`` as ``x`` and ``j`` as ``y``."""

    task_id: str
    i: int
    j: int
    verdict: PairVerdict


@dataclass
class JudgeRanker:
    """Scores one prompt's verified-correct traces by their win rate in judged pairs.

    Round robin: every pair of eligible traces (verification ``correct``, or a ``None``
    verification) is judged by :meth:`PairwiseJudge.compare` (two calls, both orders). A win
    gives the winner 1 point, a tie 0.5 to each, so each pair distributes exactly 1 point;
    a trace's score is ``points / games`` in [0, 1] (Copeland-style win rate). With
    ``max_pairs`` set and more pairs than that, a uniformly random subset of that size is
    judged, drawn with ``random.Random(f"{seed}:{task_id}")`` (deterministic per prompt); an
    eligible trace left out of every judged pair scores 0.5. Ineligible traces score 0.0 and
    are never shown to the judge.

    Args:
        judge: the pairwise judge.
        max_pairs: cap on pairs per prompt (None: all ``n (n-1) / 2``).
        seed: seed of the pair subset.
        use_reference: show the task's ground-truth answer to the judge.

    Attributes:
        stats: cumulative :class:`JudgeStats`.
        last: the :class:`PairRecord` of the most recent call.
    """

    judge: PairwiseJudge
    max_pairs: int | None = None
    seed: int = 0
    use_reference: bool = True
    stats: JudgeStats = field(default_factory=JudgeStats)
    last: list[PairRecord] = field(default_factory=list)

    def select_pairs(self, eligible: Sequence[int], task_id: str) -> list[tuple[int, int]]:
        """The pairs ``(i, j)``, ``i < j``, of ``eligible`` indices to judge, in sorted order."""
        pairs = list(itertools.combinations(sorted(eligible), 2))
        if self.max_pairs is not None and len(pairs) > self.max_pairs:
            pairs = sorted(random.Random(f"{self.seed}:{task_id}").sample(pairs, self.max_pairs))
        return pairs

    def __call__(self, completions: Sequence[Completion], verifications: Sequence, task: Task | None = None) -> list[float]:
        """Win rates of ``completions`` (one prompt's traces).

        Raises:
            ValueError: ``task`` is None (the judge needs the question) or lengths differ.
        """
        if task is None:
            raise ValueError("JudgeRanker needs task= (the judge is shown the question)")
        if len(completions) != len(verifications):
            raise ValueError(f"JudgeRanker: {len(completions)} completions but {len(verifications)} verifications")
        eligible = [i for i, v in enumerate(verifications) if v is None or bool(v.correct)]
        question = task_question(task)
        reference = task_reference(task) if self.use_reference else None
        points = [0.0] * len(completions)
        games = [0] * len(completions)
        self.last = []
        for i, j in self.select_pairs(eligible, task.id):
            verdict = self.judge.compare(question, completions[i].text, completions[j].text, reference)
            self.last.append(PairRecord(task.id, i, j, verdict))
            pi, pj = verdict.points
            points[i] += pi
            points[j] += pj
            games[i] += 1
            games[j] += 1
            self.stats.pairs += 1
            self.stats.calls += verdict.calls
            if verdict.calls == 0:
                self.stats.identical += 1
            else:
                self.stats.consistent += verdict.consistent
                self.stats.unparsed += (verdict.first is None) + (verdict.second is None)
        self.stats.prompts += 1
        ok = set(eligible)
        return [points[k] / games[k] if games[k] else (0.5 if k in ok else 0.0) for k in range(len(completions))]


def make_backend(url: str | None = None, model: str | None = None, api_model: str | None = None,
                 api_key_env: str | None = None, timeout: float = 60.0) -> ChatBackend:
    """The backend a judge feedback source describes: :class:`OpenAIChat` for ``url``, else
    :class:`LocalChat` loading ``model``.

    Raises:
        ValueError: neither or both of ``url`` and ``model``.
    """
    if (url is None) == (model is None):
        raise ValueError("judge: give exactly one of url or model")
    if url is not None:
        return OpenAIChat(url, api_model, api_key_env, timeout)
    return LocalChat.load(model)
