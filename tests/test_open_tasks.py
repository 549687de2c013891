"""Open-ended tasks (no answer key): prompt / messages records and HH-RLHF dialogues."""

from __future__ import annotations

import gzip
import json

import pytest

from rlhf_workbench.tasks.open import parse_hh_dialogue
from rlhf_workbench.tasks.loading import detect_format, load_tasks, save_tasks
from rlhf_workbench.tasks.task import TaskFormatError


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_prompt_and_messages_records_load_as_open(tmp_path):
    path = _jsonl(tmp_path / "open.jsonl", [
        {"prompt": "Explain what a placebo is."},
        {"id": "m1", "messages": [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "Hi"},
                                  {"role": "assistant", "content": "Hello!"},
                                  {"role": "user", "content": "What is sepsis?"}]},
        {"id": "q1", "question": "Summarise the benefits of sleep.", "answer_type": "open"},
        {"id": "num", "question": "What is 2 + 2?", "answer": "4"},
    ])
    tasks = load_tasks(path)
    a, b, c, keyed = tasks
    assert (a.id, a.answer_type, a.answer, a.is_open) == ("open-1", "open", "", True)
    assert a.prompt() == "Explain what a placebo is."  # no final-answer instruction
    assert a.chat_messages() == [{"role": "user", "content": "Explain what a placebo is."}]
    assert b.question == "What is sepsis?"
    assert [m["role"] for m in b.chat_messages()] == ["system", "user", "assistant", "user"]
    assert c.is_open and c.id == "q1"
    assert not keyed.is_open and keyed.answer == "4"
    # round trip through save_tasks keeps the conversation
    again = load_tasks(save_tasks(tasks, tmp_path / "again.jsonl"))
    assert [t.chat_messages() for t in again] == [t.chat_messages() for t in tasks]
    assert [t.answer_type for t in again] == ["open", "open", "open", "number"]


def test_trl_conversational_prompt_and_hf_file(tmp_path):
    path = _jsonl(tmp_path / "conv.jsonl", [
        {"prompt": [{"role": "user", "content": "Tell me a joke."}]},
        {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"},
                    {"role": "user", "content": "How are you?"}]},
    ])
    tasks = load_tasks(path)
    assert tasks[0].chat_messages() == [{"role": "user", "content": "Tell me a joke."}]
    assert len(tasks[1].chat_messages()) == 3
    hf = tasks_hf = load_tasks(path, format="hf")
    assert [t.chat_messages() for t in hf] == [t.chat_messages() for t in tasks]
    assert all(t.is_open for t in tasks_hf)


@pytest.mark.parametrize("record, field, problem", [
    ({"messages": []}, "messages", "non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages", "role 'robot'"),
    ({"messages": [{"role": "user", "content": ""}]}, "messages", "content must be"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "messages", "last message"),
    ({"answer_type": "open"}, "prompt", "missing required field"),
    ({"prompt": "x", "answer_type": "open", "answer": "4"}, "answer", "has no answer"),
    ({"prompt": "x", "metadata": [1]}, "metadata", "must be an object"),
])
def test_malformed_open_records_name_file_line_field(tmp_path, record, field, problem):
    path = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, record])
    with pytest.raises(TaskFormatError) as e:
        load_tasks(path)
    msg = str(e.value)
    assert str(path) in msg and "line 2" in msg and f"field '{field}'" in msg and problem in msg


def _hh(chosen_reply="Sure, here you go.", rejected_reply="No."):
    head = "\n\nHuman: hi there\n\nAssistant: Hello, how can I help?\n\nHuman: give me a tip"
    return {"chosen": head + "\n\nAssistant: " + chosen_reply, "rejected": head + "\n\nAssistant: " + rejected_reply}


def test_hh_records_are_multi_turn_prompts(tmp_path):
    path = tmp_path / "hh.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps(_hh()) + "\n" + json.dumps(_hh("Drink water.", "Whatever.")) + "\n")
    assert detect_format(path) == "hh"
    t = load_tasks(path)[0]
    assert t.is_open and t.question == "give me a tip"
    assert t.chat_messages() == [{"role": "user", "content": "hi there"},
                                 {"role": "assistant", "content": "Hello, how can I help?"},
                                 {"role": "user", "content": "give me a tip"}]
    assert (t.metadata["chosen"], t.metadata["rejected"]) == ("Sure, here you go.", "No.")
    assert t.id.startswith("hh-1-")


def test_malformed_hh_records(tmp_path):
    bad_prompt = dict(_hh(), rejected=_hh()["rejected"].replace("hi there", "other"))
    for record, field, problem in [
        ({"chosen": _hh()["chosen"]}, "rejected", "missing required field"),
        (dict(_hh(), chosen="no turns here"), "chosen", "Human"),
        (bad_prompt, "rejected", "shares no Human turn"),
        (dict(_hh(), chosen=_hh()["chosen"] + "\n\nHuman: more?"), "chosen", "Assistant"),
    ]:
        path = _jsonl(tmp_path / "bad.jsonl", [_hh(), record])
        with pytest.raises(TaskFormatError) as e:
            load_tasks(path, format="hh")
        msg = str(e.value)
        assert "line 2" in msg and f"field '{field}'" in msg and problem in msg, msg


def test_parse_hh_dialogue():
    assert parse_hh_dialogue("\n\nHuman: a\n\nAssistant: b") == [{"role": "user", "content": "a"},
                                                              {"role": "assistant", "content": "b"}]
    with pytest.raises(ValueError):
        parse_hh_dialogue("Assistant: b")


def test_open_task_renders_with_chat_template(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    from rlhf_workbench.model.rollout import render_prompt

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    path = _jsonl(tmp_path / "hh.jsonl", [_hh()])
    t = load_tasks(path)[0]
    text = tok.decode(render_prompt(tok, t))
    assert text.index("hi there") < text.index("Hello, how can I help?") < text.index("give me a tip")
    assert text.rstrip().endswith("assistant")  # the policy continues as the assistant
    assert "Answer:" not in text


def test_hh_from_shared_data(shared_data):
    path = shared_data / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    tasks = load_tasks(path, limit=20)
    assert len(load_tasks(path)) > 2000  # every record of the file loads
    assert len(tasks) == 20 and len({t.id for t in tasks}) == 20
    for t in tasks:
        assert t.is_open and t.answer == ""
        msgs = t.chat_messages()
        assert msgs[-1]["role"] == "user" and msgs[-1]["content"] == t.question
        assert t.metadata["chosen"] != t.metadata["rejected"] or t.metadata["chosen"]
        assert t.metadata["source"] == "hh-rlhf"


def test_transcript_for_scorers(tmp_path):
    multi = load_tasks(_jsonl(tmp_path / "hh.jsonl", [_hh()]))[0]
    assert multi.transcript() == "User: hi there\n\nAssistant: Hello, how can I help?\n\nUser: give me a tip"
    plain = load_tasks(_jsonl(tmp_path / "p.jsonl", [{"prompt": "Plain question?"}]))[0]
    assert plain.transcript() == plain.prompt() == "Plain question?"


def test_hh_record_diverging_before_the_final_reply(tmp_path):
    record = dict(_hh(), rejected=_hh()["rejected"].replace("give me a tip", "other"))
    t = load_tasks(_jsonl(tmp_path / "hh.jsonl", [record]), format="hh")[0]
    assert t.chat_messages() == [{"role": "user", "content": "hi there"}]
    assert t.metadata["diverges_early"] is True
    assert t.metadata["chosen"] == "Hello, how can I help?\n\nHuman: give me a tip\n\nAssistant: Sure, here you go."
    assert t.metadata["rejected"].endswith("Human: other\n\nAssistant: No.")
