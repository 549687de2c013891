"""Task loaders, splitting and the bundled task sets."""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from rlhf_workbench.tasks.files import bundled_path
from rlhf_workbench.tasks.loading import detect_format, load_tasks, save_tasks
from rlhf_workbench.tasks.split import generate_arithmetic, split_tasks
from rlhf_workbench.tasks.task import ANSWER_TYPES, Task, TaskFormatError


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def assert_disjoint(train: list[Task], heldout: list[Task]) -> None:
    assert not {t.id for t in train} & {t.id for t in heldout}
    assert not {t.question for t in train} & {t.question for t in heldout}


# ---- bundled sets ----------------------------------------------------------------------


def test_bundled_clinical():
    tasks = load_tasks("bundled:clinical")
    assert len(tasks) == 120
    assert [t.id for t in tasks] == [f"clin-{i:03d}" for i in range(1, 121)]
    assert len({t.question for t in tasks}) == 120
    for t in tasks:
        assert t.answer_type == "choice"
        assert list(t.choices) == ["A", "B", "C", "D"]
        assert t.answer in t.choices
        assert len(set(t.choices.values())) == 4
        assert t.metadata["topic"] and t.metadata["split"] in ("train", "heldout")
    assert Counter(t.answer for t in tasks) == {"A": 30, "B": 30, "C": 30, "D": 30}
    train, heldout = split_tasks(tasks)
    assert (len(train), len(heldout)) == (88, 32)
    assert Counter(t.answer for t in heldout) == {"A": 8, "B": 8, "C": 8, "D": 8}
    assert Counter(t.answer for t in train) == {"A": 22, "B": 22, "C": 22, "D": 22}
    assert_disjoint(train, heldout)
    # the metadata split wins over a requested fraction
    assert split_tasks(tasks, heldout_fraction=0.5) == (train, heldout)


def test_bundled_clinical_no_length_bias():
    tasks = load_tasks("bundled:clinical")
    longest = sum(max(t.choices, key=lambda k: len(t.choices[k])) == t.answer for t in tasks)
    assert longest <= 40  # chance is 30 of 120


def test_bundled_arithmetic():
    tasks = load_tasks("bundled:arithmetic")
    assert len(tasks) == 1000
    assert tasks[0].id == "add-0000" and tasks[-1].id == "add-0999"
    for t in tasks:
        a, b = t.metadata["a"], t.metadata["b"]
        assert 10 <= a <= 99 and 10 <= b <= 99
        assert t.question == f"What is {a} + {b}?"
        assert t.answer == str(a + b) and t.answer_type == "number"
    train, heldout = split_tasks(tasks)
    assert (len(train), len(heldout)) == (872, 128)
    assert train == tasks[:872] and heldout == tasks[872:]
    assert_disjoint(train, heldout)


def test_bundled_arithmetic_equals_generator():
    generated = generate_arithmetic(1000, 1234, 128)
    bundled = load_tasks("bundled:arithmetic")
    assert bundled == generated
    assert [t.metadata for t in bundled] == [t.metadata for t in generated]  # metadata is compare=False


def test_generate_arithmetic_deterministic_and_unique():
    a = generate_arithmetic(200, seed=7, heldout=20)
    assert a == generate_arithmetic(200, seed=7, heldout=20)
    assert a != generate_arithmetic(200, seed=8, heldout=20)
    assert len({t.question for t in a}) == 200
    assert [t.metadata["split"] for t in a] == ["train"] * 180 + ["heldout"] * 20
    with pytest.raises(ValueError):
        generate_arithmetic(10, seed=1, heldout=11)


def test_bundled_path():
    assert bundled_path("clinical").name == "clinical.jsonl"
    assert bundled_path("arithmetic").is_file()
    with pytest.raises(ValueError, match="unknown bundled"):
        bundled_path("nope")


# ---- shared data sets --------------------------------------------------------------------


def test_gsm8k(shared_data):
    path = shared_data / "gsm8k" / "train.jsonl"
    tasks = load_tasks(path, limit=50)
    assert detect_format(path) == "gsm8k"
    assert len(tasks) == 50
    assert tasks[0].id == "gsm8k-1"
    assert len({t.id for t in tasks}) == 50
    for t in tasks:
        assert t.answer_type == "number"
        assert re.fullmatch(r"-?\d+(\.\d+)?", t.answer), t.answer
        assert "####" not in t.metadata["solution"] and t.metadata["solution"]
    assert tasks[0].answer == "72"
    # "1,234"-style final answers: find some in the full file and check they are canonical numbers
    raw = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    comma = [i for i, r in enumerate(raw, 1) if "," in r["answer"].rpartition("####")[2]]
    assert comma, "expected comma-formatted answers in GSM8K"
    tasks = load_tasks(path, format="gsm8k", limit=comma[0])
    t = tasks[-1]
    assert t.id == f"gsm8k-{comma[0]}"
    expected = raw[comma[0] - 1]["answer"].rpartition("####")[2].strip().replace(",", "")
    assert t.answer == expected and float(t.answer) >= 1000


def test_pubmedqa(shared_data):
    path = shared_data / "pubmedqa" / "pqal_train.json"
    assert detect_format(path) == "pubmedqa"
    tasks = load_tasks(path, limit=25)
    assert len(tasks) == 25
    raw = json.loads(path.read_text())
    first_pmid = next(iter(raw))
    assert tasks[0].id == f"pubmedqa-{first_pmid}"
    assert tasks[0].question == raw[first_pmid]["QUESTION"]
    for t in tasks:
        assert t.answer_type == "yes_no_maybe"
        assert t.answer in ("yes", "no", "maybe")
        assert t.context and t.context.strip()
        assert t.id.startswith("pubmedqa-")
    assert "Context:" in tasks[0].prompt()


# ---- other formats -------------------------------------------------------------------


def test_jsonl_schema_roundtrip_and_gz(tmp_path):
    tasks = [
        Task("q1", "What is 2+2?", "4"),
        Task("q2", "Pick one", "B", "choice", choices={"A": "x", "B": "y"}, metadata={"k": 1}),
        Task("q3", "Is it?", "maybe", "yes_no_maybe", context="Some context."),
        Task("q4", "Name it", "Paris", "text"),
    ]
    for name in ("t.jsonl", "t.jsonl.gz"):
        path = save_tasks(tasks, tmp_path / name)
        loaded = load_tasks(path)
        assert loaded == tasks
        assert [t.metadata for t in loaded] == [t.metadata for t in tasks]
    with gzip.open(tmp_path / "t.jsonl.gz", "rt") as f:
        assert json.loads(f.readline())["id"] == "q1"


def test_jsonl_defaults_and_aliases(tmp_path):
    path = write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"id": "n", "prompt": "How many?", "answer": "1,234"},
            "",
            {"id": 7, "question": "Which?", "choices": ["red", "blue"], "answer": "b"},
            {"id": "y", "question": "Yes?", "answer": "YES", "answer_type": "yes_no_maybe"},
        ],
    )
    n, c, y = load_tasks(path, format="jsonl")
    assert (n.question, n.answer, n.answer_type) == ("How many?", "1234", "number")
    assert (c.id, c.answer_type, c.answer, c.choices) == ("7", "choice", "B", {"A": "red", "B": "blue"})
    assert y.answer == "yes"
    assert [t.id for t in load_tasks(path, limit=2)] == ["n", "7"]


def test_mcq_list_options_index_and_text_answers(tmp_path):
    path = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"question": "Capital of France?", "options": ["Berlin", "Paris", "Rome"], "answer": 1},
            {"question": "2+2?", "options": ["3", "4", "5"], "answer": "4"},
            {"question": "Colour of the sky?", "options": {"A": "Green", "B": "Blue"}, "answer": "blue", "src": "x"},
            {"id": "m4", "question": "Largest?", "choices": ["ant", "whale"], "answer": "B"},
        ],
    )
    assert detect_format(path) == "mcq"
    tasks = load_tasks(path)
    assert [t.answer for t in tasks] == ["B", "B", "B", "B"]
    assert [t.id for t in tasks] == ["mcq-1", "mcq-2", "mcq-3", "m4"]
    assert tasks[0].choices == {"A": "Berlin", "B": "Paris", "C": "Rome"}
    assert all(t.answer_type == "choice" for t in tasks)
    assert tasks[2].metadata == {"src": "x"}


def test_csv_via_hf(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(
        "id,question,answer,answer_type,choices\n"
        "001,What is 1000 + 234?,\"1,234\",number,\n"
        'c1,Pick,B,choice,"{""A"": ""no"", ""B"": ""yes""}"\n'
        "y1,Is water wet?,yes,yes_no_maybe,\n"
    )
    assert detect_format(path) == "hf"
    tasks = load_tasks(path)
    assert [t.id for t in tasks] == ["001", "c1", "y1"]
    assert tasks[0].answer == "1234" and tasks[0].answer_type == "number"
    assert tasks[1].choices == {"A": "no", "B": "yes"} and tasks[1].answer == "B"
    assert tasks[2].answer == "yes"
    assert load_tasks(path, format="hf", limit=1) == tasks[:1]


def test_csv_via_hf_bad_row(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("id,question,answer\na,Q1,1\nb,Q2,lots\n")
    with pytest.raises(TaskFormatError) as e:
        load_tasks(path, format="hf")
    msg = str(e.value)
    assert "bad.csv" in msg and "row 2" in msg and "'answer'" in msg


# ---- split_tasks -----------------------------------------------------------------------


def test_split_tasks_deterministic():
    tasks = [Task(f"t{i}", f"q{i}", str(i)) for i in range(100)]
    train, heldout = split_tasks(tasks, heldout_fraction=0.2, seed=3)
    assert len(heldout) == 20 and len(train) == 80
    assert_disjoint(train, heldout)
    assert split_tasks(list(reversed(tasks)), heldout_fraction=0.2, seed=3)[1] == list(reversed(heldout))
    assert {t.id for t in split_tasks(tasks, heldout_fraction=0.2, seed=4)[1]} != {t.id for t in heldout}
    assert len(split_tasks(tasks, heldout_size=7)[1]) == 7
    # stable across machines: pinned to the sha256 ranking
    assert [t.id for t in split_tasks(tasks[:10], heldout_size=2, seed=0)[1]] == _expected_sha_heldout(tasks[:10], 2, 0)
    with pytest.raises(ValueError):
        split_tasks(tasks, heldout_fraction=0.1, heldout_size=3)
    with pytest.raises(ValueError):
        split_tasks(tasks, heldout_fraction=1.5)


def _expected_sha_heldout(tasks, k, seed):
    import hashlib

    ranked = sorted(tasks, key=lambda t: hashlib.sha256(f"{seed}:{t.id}".encode()).hexdigest())
    chosen = {t.id for t in ranked[:k]}
    return [t.id for t in tasks if t.id in chosen]


def test_split_tasks_honours_metadata():
    pinned = [Task("p1", "a", "1", metadata={"split": "heldout"}), Task("p2", "b", "2", metadata={"split": "train"})]
    free = [Task(f"f{i}", f"q{i}", "1") for i in range(10)]
    train, heldout = split_tasks(pinned + free, heldout_size=10)
    assert pinned[0] in heldout and pinned[1] in train
    assert len(heldout) == 11 and len(train) == 1


# ---- bad input -----------------------------------------------------------------------

GOOD = {"id": "ok", "question": "What is 1+1?", "answer": "2"}


@pytest.mark.parametrize(
    "bad, fmt, field",
    [
        ({"question": "q", "answer": "1"}, "jsonl", "id"),
        ({"id": "x", "answer": "1"}, "jsonl", "question"),
        ({"id": "x", "question": "q"}, "jsonl", "answer"),
        ({"id": "x", "question": "q", "answer": "1", "answer_type": "float"}, "jsonl", "answer_type"),
        ({"id": "x", "question": "q", "answer": "E", "choices": ["a", "b", "c", "d"]}, "jsonl", "answer"),
        ({"id": "x", "question": "q", "answer": "C", "answer_type": "choice"}, "jsonl", "choices"),
        ({"id": "x", "question": "q", "answer": "perhaps", "answer_type": "yes_no_maybe"}, "jsonl", "answer"),
        ({"id": "x", "question": "q", "answer": "twelve"}, "jsonl", "answer"),
        ({"id": "x", "question": "q", "answer": "1", "metadata": [1]}, "jsonl", "metadata"),
        ({"id": "ok", "question": "dup", "answer": "3"}, "jsonl", "id"),
        ({"question": "q", "answer": "The answer is 5"}, "gsm8k", "answer"),
        ({"question": "q", "answer": "so\n#### lots"}, "gsm8k", "answer"),
        ({"answer": "x\n#### 5"}, "gsm8k", "question"),
        ({"question": "q", "options": ["a", "b"], "answer": 5}, "mcq", "answer"),
        ({"question": "q", "options": ["a", "b"], "answer": "zebra"}, "mcq", "answer"),
        ({"question": "q", "answer": "A"}, "mcq", "options"),
    ],
)
def test_bad_records(tmp_path, bad, fmt, field):
    good = GOOD if fmt != "gsm8k" else {"question": "q", "answer": "x\n#### 5"}
    if fmt == "mcq":
        good = {"question": "q", "options": ["a", "b"], "answer": "A"}
    path = write_jsonl(tmp_path / "bad_tasks.jsonl", [good, "", bad])  # bad record on line 3
    with pytest.raises(TaskFormatError) as e:
        load_tasks(path, format=fmt)
    msg = str(e.value)
    assert "bad_tasks.jsonl" in msg
    assert "line 3" in msg
    assert f"'{field}'" in msg


def test_bad_auto_detected_gsm8k(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "a\n#### 1,500"}, {"question": "q2", "answer": "no marker"}])
    with pytest.raises(TaskFormatError, match=r"g\.jsonl: line 2: field 'answer'.*####"):
        load_tasks(path)


def test_malformed_json_line(tmp_path):
    path = write_jsonl(tmp_path / "broken.jsonl", [GOOD, '{"id": "x", "question": '])
    with pytest.raises(TaskFormatError) as e:
        load_tasks(path, format="jsonl")
    assert "broken.jsonl" in str(e.value) and "line 2" in str(e.value) and "malformed JSON" in str(e.value)


def test_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "list.jsonl", ["[1, 2]"])
    with pytest.raises(TaskFormatError, match=r"list\.jsonl: line 1"):
        load_tasks(path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(TaskFormatError, match=r"empty\.jsonl.*no tasks"):
        load_tasks(path)


def test_duplicate_ids_name_both_lines(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [GOOD, {**GOOD, "question": "other"}])
    with pytest.raises(TaskFormatError) as e:
        load_tasks(path)
    msg = str(e.value)
    assert "dup.jsonl" in msg and "line 2" in msg and "'id'" in msg and "line 1" in msg


def _pubmedqa_record(**overrides):
    record = {"QUESTION": "Does X help?", "CONTEXTS": ["Background.", "Results."], "final_decision": "yes"}
    record.update(overrides)
    return record


@pytest.mark.parametrize(
    "bad, field",
    [
        (_pubmedqa_record(final_decision="probably"), "final_decision"),
        (_pubmedqa_record(CONTEXTS=[]), "CONTEXTS"),
        ({"CONTEXTS": ["c"], "final_decision": "no"}, "QUESTION"),
    ],
)
def test_bad_pubmedqa(tmp_path, bad, field):
    path = tmp_path / "pq.json"
    path.write_text(json.dumps({"111": _pubmedqa_record(), "222": bad}))
    with pytest.raises(TaskFormatError) as e:
        load_tasks(path, format="pubmedqa")
    msg = str(e.value)
    assert "pq.json" in msg and "'222'" in msg and f"'{field}'" in msg


def test_pubmedqa_auto_and_context(tmp_path):
    path = tmp_path / "pq.json"
    path.write_text(json.dumps({"111": _pubmedqa_record(final_decision="Maybe", LONG_ANSWER="Long.")}))
    (t,) = load_tasks(path)
    assert (t.id, t.answer, t.answer_type) == ("pubmedqa-111", "maybe", "yes_no_maybe")
    assert t.context == "Background.\nResults." and t.metadata["long_answer"] == "Long."


def test_bad_arguments(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD])
    with pytest.raises(ValueError):
        load_tasks(path, format="xml")
    with pytest.raises(ValueError):
        load_tasks(path, limit=0)
    with pytest.raises(FileNotFoundError):
        load_tasks(tmp_path / "missing.jsonl")


def test_answer_types_cover_instructions():
    assert set(ANSWER_TYPES) == {"number", "choice", "yes_no_maybe", "text", "open"}


def _twin_key(task) -> tuple:
    """What makes two tasks the same exercise: the unordered operands of an addition, else the
    normalised question text with its options."""
    if "a" in task.metadata and "b" in task.metadata:
        return ("add", min(task.metadata["a"], task.metadata["b"]), max(task.metadata["a"], task.metadata["b"]))
    return ("q", " ".join(task.question.lower().split()), tuple(sorted((task.choices or {}).values())))


@pytest.mark.parametrize("name", ["arithmetic", "clinical"])
def test_bundled_heldout_has_no_twin_in_train(name):
    """a + b and b + a (or the same question twice) never sit on both sides of the split."""
    train, heldout = split_tasks(load_tasks(f"bundled:{name}"))
    assert heldout
    shared = {_twin_key(t) for t in train} & {_twin_key(t) for t in heldout}
    assert not shared, sorted(shared)[:5]


def test_generate_arithmetic_keeps_commuted_twins_on_one_side():
    tasks = generate_arithmetic(3000, seed=3, heldout=500)  # dense enough that twins are drawn
    train, heldout = split_tasks(tasks)
    ordered = {(t.metadata["a"], t.metadata["b"]) for t in train}
    twins_in_train = sum((b, a) in ordered for a, b in ordered if a < b)
    assert twins_in_train > 0  # twins exist, so the check below is not vacuous
    assert not {_twin_key(t) for t in train} & {_twin_key(t) for t in heldout}


# ---- binary and mis-encoded files -------------------------------------------------------

_GOOD_LINE = json.dumps({"id": "a", "question": "What is 1 + 1?", "answer": "2"}).encode() + b"\n"


@pytest.mark.parametrize("name,data,fmt,where", [
    ("random.jsonl", bytes(range(256)) * 4, "auto", "line 1"),           # a binary file
    ("latin1.jsonl", _GOOD_LINE + b"\n" + '{"id": "é"}\n'.encode("latin-1"), "jsonl", "line 3"),
    ("blob.json", b"[\n" + b"\x89PNG\r\n\x1a\n", "auto", "line 2"),
    ("pmq.json", b'{"1": {"QUESTION": "\xff"}}', "pubmedqa", "line 1"),
    ("t.csv", b"id,question,answer\n1,\xfe\xff,2\n", "hf", "line 2"),
    ("z.jsonl.gz", gzip.compress(_GOOD_LINE + b"\x00\xc3\x28\n"), "jsonl", "line 2"),
])
def test_binary_task_file_names_file_and_line(tmp_path, name, data, fmt, where):
    """A binary or non-UTF-8 task file is a TaskFormatError naming the file and the line of the
    first bad byte (was a bare UnicodeDecodeError with neither)."""
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(TaskFormatError) as e:
        load_tasks(path, format=fmt)
    assert str(path) in str(e.value) and f"{where}:" in str(e.value) and "not UTF-8" in str(e.value)


def test_corrupt_gzip_task_file(tmp_path):
    path = tmp_path / "t.jsonl.gz"
    path.write_bytes(gzip.compress(_GOOD_LINE * 50)[:40])  # truncated
    with pytest.raises(TaskFormatError, match=r"t\.jsonl\.gz: not a readable gzip file"):
        load_tasks(path)
    path.write_bytes(b"not gzip at all")
    with pytest.raises(TaskFormatError, match=r"t\.jsonl\.gz: not a readable gzip file"):
        load_tasks(path)
