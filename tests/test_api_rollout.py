"""The API trace source (rlhf_workbench.model.api_rollout) over real HTTP on loopback, against an
endpoint that answers 429, 503 and hangs past the timeout on a plan (tests/teacher_endpoint.py)."""

from __future__ import annotations

import pytest

from teacher_endpoint import ByOrder, TeacherEndpoint

from rlhf_workbench.config import RunConfig, TeacherConfig
from rlhf_workbench.model.api_rollout import APIRollout, APIRolloutError, parse_logprobs, request_seed
from rlhf_workbench.tasks.task import Task

M, ROUND, SEED = 3, 2, 5


def _tasks(n: int) -> list[Task]:
    return [Task(id=f"t{i}", question=f"What is {10 + i} + {20 + i}?", answer=str(30 + 2 * i)) for i in range(n)]


def _cfg(url: str, **kw) -> TeacherConfig:
    return TeacherConfig(**{"base_url": url, "model": "teacher", "num_generations": M, "max_concurrency": 4,
                            "timeout_s": 0.5, "max_retries": 3, "backoff_s": 0.01, **kw})


PLANS = [[], ["429"], ["503", "429"], ["hang"]]  # a quarter of the traces answered at once, the others after a
# 429, after a 503 then a 429, or after hanging past the client's timeout


def test_every_trace_arrives_exactly_once_through_429_503_and_timeouts():
    tasks = _tasks(8)
    faulty = ByOrder(PLANS)
    with TeacherEndpoint(plan=faulty, hang_s=1.5) as ep:
        client = APIRollout(_cfg(ep.base_url), max_tokens=32)
        traces, usage = client.sample(tasks, ROUND, SEED)
        client.close()
    # one trace per (task, j), in task order, each the answer of the one 200 the client received
    assert [(t.task_id, t.index) for t in traces] == [(task.id, j) for task in tasks for j in range(M)]
    keys = [request_seed(SEED, ROUND, t.task_id, t.index) for t in traces]
    assert len(set(keys)) == len(keys)
    for t, key in zip(traces, keys):
        assert ep.answered[key] == [t.text]
        assert t.text.endswith(f"Answer: {sum(int(x) for x in t.text.split(' = ')[0].split(' + '))}")
        assert t.logprobs is None and t.finish_reason == "stop"  # this endpoint returns no log-probs
    faults = [f for _, _, f in ep.received]
    assert (faults.count("429"), faults.count("503"), faults.count("hang")) == (12, 6, 6)  # 24 traces: 6 per plan
    expected_failures = sum(faulty.failures(k) for k in keys)
    assert usage.requests == len(ep.received) == len(keys) + expected_failures
    assert usage.retries == expected_failures
    assert (usage.rate_limited, usage.server_errors, usage.timeouts) == (
        faults.count("429"), faults.count("503"), faults.count("hang"))
    assert usage.traces == len(tasks) * M and usage.traces_with_logprobs == 0
    assert usage.prompt_tokens == sum(len(ep.body_of[k]["messages"][-1]["content"].split()) for k in keys) > 0
    assert usage.completion_tokens == sum(len(ep.answered[k][0].split()) for k in keys)
    assert 1 < ep.max_inflight <= 4  # concurrent, and bounded by max_concurrency
    body = ep.bodies[0]
    assert (body["model"], body["n"], body["logprobs"], body["max_tokens"]) == ("teacher", 1, True, 32)


def test_a_retried_request_asks_for_the_same_sample_and_retries_are_bounded():
    tasks = _tasks(2)
    doomed = request_seed(SEED, ROUND, "t1", 2)
    with TeacherEndpoint(plan=lambda key, attempt: "503" if key == doomed else None) as ep:
        client = APIRollout(_cfg(ep.base_url, max_retries=2), max_tokens=16)
        with pytest.raises(APIRolloutError, match=r"task 't1', answer 2\).*failed after 3 attempts.*HTTP 503"):
            client.sample(tasks, ROUND, SEED)
        client.close()
    assert [a for k, a, _ in ep.received if k == doomed] == [1, 2, 3]  # the same seed on every attempt


def test_a_refused_request_stops_at_once_naming_the_task():
    bad = request_seed(SEED, ROUND, "t0", 0)
    with TeacherEndpoint(plan=lambda key, attempt: "400" if key == bad else None) as ep:
        client = APIRollout(_cfg(ep.base_url), max_tokens=16)
        with pytest.raises(APIRolloutError, match=r"task 't0', answer 0\): HTTP 400"):
            client.sample(_tasks(1), ROUND, SEED)
    assert [a for k, a, _ in ep.received if k == bad] == [1]  # a 400 is not retried


def test_the_key_comes_from_the_named_variable_and_is_never_shown(monkeypatch):
    monkeypatch.setenv("TEACHER_TEST_KEY", "s3cret-value")
    with TeacherEndpoint(usage=False) as ep:
        client = APIRollout(_cfg(ep.base_url, api_key_env="TEACHER_TEST_KEY"), max_tokens=16)
        traces, usage = client.sample(_tasks(1), ROUND, SEED)
        assert "s3cret" not in repr(client) and "s3cret" not in str(client.cfg.model_dump())
    assert set(ep.auth) == {"Bearer s3cret-value"}
    assert usage.responses_without_usage == M and usage.prompt_tokens == 0  # absent usage is not estimated
    monkeypatch.delenv("TEACHER_TEST_KEY")
    with pytest.raises(APIRolloutError, match="TEACHER_TEST_KEY is not set"):
        APIRollout(_cfg(ep.base_url, api_key_env="TEACHER_TEST_KEY"), max_tokens=16)


def test_logprobs_are_read_when_returned_and_none_otherwise():
    choice = {"logprobs": {"content": [{"token": "Answer", "logprob": -0.25, "bytes": [], "top_logprobs": []},
                                       {"token": ":", "logprob": -1.5}]}}
    assert parse_logprobs(choice) == {"tokens": ["Answer", ":"], "logprobs": [-0.25, -1.5]}
    for absent in ({}, {"logprobs": None}, {"logprobs": {"content": None}}, {"logprobs": {"content": []}}):
        assert parse_logprobs(absent) is None


def test_teacher_config_errors_name_the_field():
    with pytest.raises(ValueError, match="api_key_env"):
        TeacherConfig(base_url="http://x/v1", model="m", api_key_env="sk-live-123")
    with pytest.raises(ValueError, match="base_url"):
        TeacherConfig(base_url="ftp://x", model="m")
    teacher = {"base_url": "http://127.0.0.1:1/v1", "model": "m"}
    with pytest.raises(ValueError, match="needs rollout.teacher"):
        RunConfig.model_validate({"algorithm": "none"})
    with pytest.raises(ValueError, match="constitution: needs a local policy"):
        RunConfig.model_validate({"algorithm": "none", "rollout": {"teacher": teacher},
                                  "feedback": {"constitution": {}}})
    with pytest.raises(ValueError, match="uncertainty"):
        RunConfig.model_validate({"rollout": {"teacher": teacher}, "feedback": {"selection": "uncertainty"}})
