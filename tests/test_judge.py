"""`rlhf serve-model` over real HTTP on loopback, the LLM judge against it, and the position
swapping / win-rate logic with deterministic judge backends."""

from __future__ import annotations

import re
from collections import Counter

import httpx
import pytest
import torch
from typer.testing import CliRunner

from rlhf_workbench.feedback.judge import (JudgeError, JudgeRanker, LocalChat, OpenAIChat, PairwiseJudge, parse_verdict,
                                  task_question, task_reference)
from rlhf_workbench.model.rollout import Completion
from rlhf_workbench.app.serve_model import ServerThread, make_app
from rlhf_workbench.model.chat import load_served_model
from rlhf_workbench.tasks.task import Task
from rlhf_workbench.verify import Verification

NAME = "smollm2-135m"
TASK = Task(id="q1", question="What is 2 + 3?", answer="5")
OK = Verification(correct=True, extracted="5", format_ok=True, reason="")
WRONG = Verification(correct=False, extracted="6", format_ok=True, reason="")


def comps(texts: list[str]) -> list[Completion]:
    return [Completion("q1", k, [1], [2] * len(t), [0.0] * len(t), t, True) for k, t in enumerate(texts)]


def direct_greedy(model, tokenizer, messages, max_new_tokens: int) -> str:
    """What the model says to ``messages``, straight from ``model.generate`` (no server code)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    x = torch.tensor([list(ids)])
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                             do_sample=False, temperature=None, top_p=None, top_k=None,
                             pad_token_id=tokenizer.pad_token_id)
    new = out[0, x.shape[1]:].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new, skip_special_tokens=True)


@pytest.fixture(scope="module")
def real_model(single_thread):
    """The bundled SmolLM2-135M-Instruct (converted GGUF cache) and its tokenizer."""
    return load_served_model(NAME)


@pytest.fixture(scope="module")
def server(real_model):
    """``make_app`` on 127.0.0.1, port 0, with a counter of requests and their auth headers."""
    model, tok = real_model
    app = make_app(model, tok, NAME)
    seen: Counter = Counter()
    auth: list = []

    @app.middleware("http")
    async def count(request, call_next):
        seen[(request.method, request.url.path)] += 1
        auth.append(request.headers.get("authorization"))
        return await call_next(request)

    with ServerThread(app) as srv:
        srv.seen, srv.auth = seen, auth
        srv.client = httpx.Client(base_url=srv.base_url + "/", timeout=120, trust_env=False)
        yield srv


def post(server, body):
    return server.client.post("chat/completions", json=body)


# --------------------------------------------------------------------------------------------
# serve-model
# --------------------------------------------------------------------------------------------

def test_greedy_chat_completion_schema_and_text(server, real_model):
    model, tok = real_model
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    r = post(server, {"model": NAME, "messages": messages, "temperature": 0, "max_tokens": 12})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == NAME
    assert isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length")
    expected = direct_greedy(model, tok, messages, 12)
    assert choice["message"]["content"] == expected
    prompt_len = len(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    u = body["usage"]
    assert u["prompt_tokens"] == prompt_len and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert 1 <= u["completion_tokens"] <= 12

    # a stop string is cut from the text, finish_reason "stop"
    words = expected.split()
    if len(words) >= 2:
        stop = " " + words[1]
        r = post(server, {"messages": messages, "temperature": 0, "max_tokens": 12, "stop": stop})
        assert r.json()["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": expected[: expected.find(stop)]},
                                          "logprobs": None, "finish_reason": "stop"}


def test_max_tokens_length_and_n(server):
    messages = [{"role": "system", "content": "You are verbose."},
                {"role": "user", "content": "Write a long story about a cat."}]
    r = post(server, {"messages": messages, "temperature": 0, "max_tokens": 3})
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 3
    r = post(server, {"messages": messages, "temperature": 0.9, "top_p": 0.95, "n": 2, "max_tokens": 3, "seed": 7})
    body = r.json()
    assert r.status_code == 200 and [c["index"] for c in body["choices"]] == [0, 1]
    assert all(c["finish_reason"] == "length" for c in body["choices"]) and body["usage"]["completion_tokens"] == 6
    again = post(server, {"messages": messages, "temperature": 0.9, "top_p": 0.95, "n": 2, "max_tokens": 3, "seed": 7})
    assert [c["message"] for c in again.json()["choices"]] == [c["message"] for c in body["choices"]]  # seeded


def test_invalid_requests_name_the_field(server):
    r = post(server, {"model": NAME, "temperature": 0})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "messages"
    r = post(server, {"messages": [{"role": "user", "content": "hi"}], "temperature": -0.5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = post(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    r = post(server, {"messages": [{"role": "wizard", "content": "hi"}]})
    assert r.status_code == 400 and "messages.0.role" in r.json()["error"]["message"]
    r = post(server, {"messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"
    r = post(server, {"messages": [{"role": "user", "content": "hi"}], "model": "gpt-9"})
    assert r.status_code == 404 and "gpt-9" in r.json()["error"]["message"]
    r = server.client.post("chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"


def test_models_endpoint(server):
    r = server.client.get("models")
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == [NAME] and r.json()["object"] == "list"


# --------------------------------------------------------------------------------------------
# the judge on loopback, served by the project's own model
# --------------------------------------------------------------------------------------------

def test_judge_ranker_against_loopback_server(server, real_model, monkeypatch):
    model, tok = real_model
    monkeypatch.setenv("RLHF_TEST_JUDGE_KEY", "s3cret-token")
    backend = OpenAIChat(server.base_url, model=NAME, api_key_env="RLHF_TEST_JUDGE_KEY")
    assert "s3cret" not in repr(backend)
    judge = PairwiseJudge(backend, max_tokens=4)
    ranker = JudgeRanker(judge)
    texts = ["2 + 3 = 5.\nAnswer: 5", "Adding three to two gives five.\nAnswer: 5", "It is 6.\nAnswer: 6",
             "Five.\nAnswer: 5"]
    before = server.seen[("POST", "/v1/chat/completions")]
    n_auth = len(server.auth)
    scores = ranker(comps(texts), [OK, OK, WRONG, OK], task=TASK)
    pairs = ranker.last
    assert [(p.i, p.j) for p in pairs] == [(0, 1), (0, 3), (1, 3)]  # the wrong trace is never judged
    calls = server.seen[("POST", "/v1/chat/completions")] - before
    assert calls == 2 * len(pairs) == backend.calls == ranker.stats.calls
    assert set(server.auth[n_auth:]) == {"Bearer s3cret-token"}
    assert scores[2] == 0.0 and all(0.0 <= s <= 1.0 for s in scores)
    # each pair hands out exactly one point; every correct trace played the other two
    assert sum(scores[k] * 2 for k in (0, 1, 3)) == pytest.approx(len(pairs))
    # the recorded verdicts are what the model answers to those exact prompts, asked directly
    q, ref = task_question(TASK), task_reference(TASK)
    consistent = 0
    for p in pairs:
        raw1 = direct_greedy(model, tok, judge.messages(q, texts[p.i], texts[p.j], ref), 4)
        raw2 = direct_greedy(model, tok, judge.messages(q, texts[p.j], texts[p.i], ref), 4)
        assert (p.verdict.raw_first, p.verdict.raw_second) == (raw1, raw2)
        assert (p.verdict.first, p.verdict.second) == (parse_verdict(raw1), parse_verdict(raw2))
        consistent += p.verdict.consistent
    assert ranker.stats.consistency_rate == pytest.approx(consistent / len(pairs))
    # the in-process backend gives the same replies as the server
    assert LocalChat(model, tok).chat(judge.messages(q, texts[0], texts[1], ref), 4) == pairs[0].verdict.raw_first


def test_openai_chat_errors(server, monkeypatch):
    monkeypatch.delenv("RLHF_TEST_MISSING_KEY", raising=False)
    with pytest.raises(JudgeError, match="RLHF_TEST_MISSING_KEY"):
        OpenAIChat(server.base_url, NAME, api_key_env="RLHF_TEST_MISSING_KEY")
    assert OpenAIChat(server.base_url).model == NAME  # asks GET /models
    with pytest.raises(JudgeError, match="HTTP 404"):
        OpenAIChat(server.base_url, "gpt-9", retries=0).chat([{"role": "user", "content": "hi"}], 1)


# --------------------------------------------------------------------------------------------
# position swapping and win rates, with deterministic judge backends
# --------------------------------------------------------------------------------------------

class AlwaysA:
    """Pure position bias: always answers "A"."""

    def __init__(self):
        self.calls = 0

    def chat(self, messages, max_tokens=16):
        self.calls += 1
        return "A"


class PrefersShorter:
    """Picks the shorter answer wherever it is shown."""

    def __init__(self, style="{}"):
        self.calls, self.style = 0, style

    def chat(self, messages, max_tokens=16):
        self.calls += 1
        user = messages[-1]["content"]
        a = re.search(r"\[Answer A\]\n(.*?)\n\[End of Answer A\]", user, re.S).group(1)
        b = re.search(r"\[Answer B\]\n(.*?)\n\[End of Answer B\]", user, re.S).group(1)
        return self.style.format("A" if len(a) < len(b) else "B")


TEXTS = ["Answer: 5", "2 + 3 = 5, so:\nAnswer: 5", "Two and three make five, so:\nAnswer: 5",
         "We add 2 and 3, which makes 5 in total.\nAnswer: 5"]


def test_position_bias_alone_gives_ties():
    backend = AlwaysA()
    ranker = JudgeRanker(PairwiseJudge(backend))
    scores = ranker(comps(TEXTS), [OK] * 4, task=TASK)
    assert scores == [0.5] * 4
    assert backend.calls == 12 == ranker.stats.calls and ranker.stats.pairs == 6
    assert ranker.stats.consistency_rate == 0.0
    assert all(p.verdict.winner is None and p.verdict.points == (0.5, 0.5) for p in ranker.last)


@pytest.mark.parametrize("style", ["{}", "[[{}]]", "Answer: {}", "Trace {} is better.", "I think {}."])
def test_consistent_preference_wins(style):
    backend = PrefersShorter(style)
    ranker = JudgeRanker(PairwiseJudge(backend))
    scores = ranker(comps(TEXTS), [OK] * 4, task=TASK)
    assert scores == [1.0, 2 / 3, 1 / 3, 0.0]  # shortest wins all its 3 pairs, longest none
    assert ranker.stats.consistency_rate == 1.0 and ranker.stats.unparsed == 0
    assert ranker.stats.as_dict()["judge/calls"] == 12.0


def test_max_pairs_deterministic_and_identical_texts():
    ranker = JudgeRanker(PairwiseJudge(PrefersShorter()), max_pairs=3, seed=1)
    first = ranker(comps(TEXTS), [OK] * 4, task=TASK)
    chosen = [(p.i, p.j) for p in ranker.last]
    assert len(chosen) == 3 and ranker.stats.calls == 6
    assert ranker(comps(TEXTS), [OK] * 4, task=TASK) == first and [(p.i, p.j) for p in ranker.last] == chosen
    for k, s in enumerate(first):  # unplayed traces are neutral
        played = [p for p in ranker.last if k in (p.i, p.j)]
        assert (s == 0.5) if not played else 0.0 <= s <= 1.0
    # identical texts: a tie without calling the judge
    backend = PrefersShorter()
    ranker = JudgeRanker(PairwiseJudge(backend))
    assert ranker(comps(["same", "same"]), [OK, OK], task=TASK) == [0.5, 0.5] and backend.calls == 0
    with pytest.raises(ValueError, match="task="):
        ranker(comps(["a", "b"]), [OK, OK])


def test_parse_verdict():
    cases = {"A": "A", " b. ": "B", "[[B]]": "B", "Answer: B": "B", "The better answer is B": "B",
             "Trace A is better": "A", "Verdict - A": "A", "Final: (A)": "A", "I think B": "B",
             "tie": None, "Both are good": None, "": None, "ABBA": None}
    for text, want in cases.items():
        assert parse_verdict(text) == want, text


def test_judge_prompt_shows_question_reference_and_traces():
    task = Task(id="m1", question="Which drug?", answer="B", answer_type="choice", choices={"A": "x", "B": "y"})
    msgs = PairwiseJudge(AlwaysA()).messages(task_question(task), "first trace", "second trace", task_reference(task))
    user = msgs[-1]["content"]
    assert msgs[0]["role"] == "system" and "Which drug?" in user and "B. y" in user
    assert user.index("first trace") < user.index("second trace") and user.rstrip().endswith("A or B.")


def test_serve_model_command_and_run_dir_loading(tiny_model_dir, tmp_path):
    from rlhf_workbench.cli import app

    r = CliRunner().invoke(app, ["serve-model", "--model", str(tmp_path)])
    assert r.exit_code == 2 and "no model here" in " ".join(r.output.split())
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "run" / "checkpoints" / "v2")
    model, tok = load_served_model(str(tmp_path / "run"))
    assert model.config.hidden_size == 32 and tok.padding_side == "left"
