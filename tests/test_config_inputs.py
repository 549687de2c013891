"""Bad configs and overrides are refused with an error naming the field; nothing is written."""

import pytest
from typer.testing import CliRunner

from rlhf_workbench.cli import app
from rlhf_workbench.config import ConfigError, load_config

runner = CliRunner()


def invoke(*args):
    r = runner.invoke(app, [str(a) for a in args])
    r.text = " ".join(r.output.split())  # rich wraps long lines at the terminal width
    return r


@pytest.mark.parametrize("field,value", [
    ("eval.round_subset", -3),   # was accepted: heldout[:-3] evaluated all but the last three
    ("eval.round_subset", 0),
    ("tasks.max_heldout", 0),    # was accepted and meant "no cap"; now refused (None means all)
    ("tasks.max_heldout", -1),
    ("tasks.limit", 0),
])
def test_counts_below_one_are_refused(tmp_path, field, value):
    p = tmp_path / "c.yaml"
    p.write_text("rounds: 1\n")
    with pytest.raises(ConfigError, match=rf"field {field}: Input should be greater than or equal to 1"):
        load_config(p, {field: value})
    section, leaf = field.split(".")
    assert getattr(getattr(load_config(p, {field: None}), section), leaf) is None  # None: no cap


def test_override_into_a_scalar_names_the_field(tmp_path):
    """``--set rounds.x=1`` was an uncaught TypeError ('int' object does not support item assignment)."""
    p = tmp_path / "c.yaml"
    p.write_text("rounds: 2\ntasks:\n  path: t.jsonl\n")
    with pytest.raises(ConfigError, match=r"override rounds\.x: field rounds holds the value 2, not a section"):
        load_config(p, {"rounds.x": 1})
    with pytest.raises(ConfigError, match=r"override tasks\.path\.deeper: field tasks\.path holds"):
        load_config(p, {"tasks.path.deeper": 1})
    out = tmp_path / "run"
    r = invoke("run", "--config", p, "--out", out, "--set", "rounds.x=1")
    assert r.exit_code == 2 and "field rounds holds the value 2, not a section" in r.text
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert not out.exists()


@pytest.mark.parametrize("item,msg", [("=1", "dotted field path"), ("a..b=1", "dotted field path"),
                                      ("rounds=[1", "not valid YAML"), ("rounds", "expects key=value")])
def test_malformed_set_items(tmp_path, item, msg):
    p = tmp_path / "c.yaml"
    p.write_text("rounds: 1\n")
    r = invoke("run", "--config", p, "--out", tmp_path / "run", "--set", item)
    assert r.exit_code == 2 and msg in r.text
    assert not (tmp_path / "run").exists()


def test_binary_task_file_through_the_cli(tmp_path):
    """``rlhf run`` on a binary task file exits 2 naming the file and line, before writing anything."""
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_bytes(b'{"id": "a", "question": "q", "answer": "1"}\n\x00\x01\x02\xff\n')
    p = tmp_path / "c.yaml"
    p.write_text(f"rounds: 1\ntasks:\n  path: {tasks}\n")
    out = tmp_path / "run"
    r = invoke("run", "--config", p, "--out", out)
    assert r.exit_code == 2 and "tasks.jsonl: line 2: not UTF-8 text" in r.text
    assert not out.exists()
