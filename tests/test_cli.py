"""The `rlhf user add` and `rlhf export` commands through typer's test runner."""

import json

import pytest
from typer.testing import CliRunner

from rlhf_workbench.human.accounts import authenticate
from rlhf_workbench.cli import app
from rlhf_workbench.store import Store

runner = CliRunner()


@pytest.fixture
def config(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("rounds: 1\nfeedback:\n  source: human\n")
    return p


def invoke(*args, input=None):
    r = runner.invoke(app, [str(a) for a in args], input=input)
    r.text = " ".join(r.output.split())  # rich wraps long lines at the terminal width
    return r


def test_user_add(config, tmp_path):
    out = tmp_path / "run"
    r = invoke("user", "add", "ann", "--role", "annotator", "--config", config, "--out", out,
               "--password", "correct-horse")
    assert r.exit_code == 0, r.output
    assert "created annotator 'ann'" in r.text
    store = Store(run_dir=out)
    user = authenticate(store, "ann", "correct-horse")
    assert user is not None and user.role == "annotator"
    assert authenticate(store, "ann", "wrong-horse") is None

    # Prompted twice with hidden input when --password is omitted.
    r = invoke("user", "add", "root", "--role", "admin", "--config", config, "--out", out,
               input="admin-pass-1\nadmin-pass-1\n")
    assert r.exit_code == 0, r.output
    assert "admin-pass-1" not in r.output  # hidden
    assert authenticate(store, "root", "admin-pass-1").role == "admin"


def test_user_add_errors(config, tmp_path):
    out = tmp_path / "run"
    assert invoke("user", "add", "ann", "--config", config, "--out", out, "--password", "password-1").exit_code == 0
    r = invoke("user", "add", "ann", "--config", config, "--out", out, "--password", "password-2")
    assert r.exit_code == 2 and "already exists" in r.text
    r = invoke("user", "add", "bob", "--config", config, "--out", out, "--password", "short")
    assert r.exit_code == 2 and "at least 8 characters" in r.text
    r = invoke("user", "add", "bob", "--role", "owner", "--config", config, "--out", out, "--password", "password-3")
    assert r.exit_code == 2 and "--role must be one of annotator, admin" in r.text
    r = invoke("user", "add", "bob", "--config", tmp_path / "missing.yaml", "--out", out, "--password", "password-3")
    assert r.exit_code == 2 and "config file not found" in r.text
    store = Store(run_dir=out)
    assert authenticate(store, "bob", "password-3") is None and authenticate(store, "ann", "password-1")


def test_export_command(tmp_path):
    from test_export import build_store, expected_rows

    store, ids1, ids2 = build_store(tmp_path)  # writes tmp_path/run/workbench.db
    out = tmp_path / "export"
    r = invoke("export", "--out-dir", out, "--run", tmp_path / "run")
    assert r.exit_code == 0, r.output
    assert "wrote 3 preference pairs (human 1, rules 2)" in r.text
    rows = [json.loads(x) for x in (out / "preferences.jsonl").read_text().splitlines()]
    assert rows == expected_rows(ids1, ids2)
    assert (out / "preferences_conversational.jsonl").exists() and (out / "dataset" / "state.json").exists()

    r = invoke("export", "--out-dir", tmp_path / "h", "--db-url", store.url, "--source", "human")
    assert r.exit_code == 0, r.output
    assert [json.loads(x)["source"] for x in (tmp_path / "h" / "preferences.jsonl").read_text().splitlines()] == ["human"]


def test_export_errors(tmp_path):
    r = invoke("export", "--out-dir", tmp_path / "x")
    assert r.exit_code == 2 and "exactly one of --run" in r.text
    r = invoke("export", "--out-dir", tmp_path / "x", "--run", tmp_path / "nowhere")
    assert r.exit_code == 2 and "workbench.db not found" in r.text
    assert not (tmp_path / "nowhere").exists()  # no empty database created
    r = invoke("export", "--out-dir", tmp_path / "x", "--db-url", f"sqlite:///{tmp_path / 'd.db'}", "--source", "crowd")
    assert r.exit_code == 2 and "--source must be one of" in r.text


def test_worker_forces_human_feedback(tmp_path, monkeypatch):
    import rlhf_workbench.run.loop as loop_mod

    seen = {}
    monkeypatch.setattr(loop_mod, "run", lambda cfg, out, console=None: seen.update(cfg=cfg, out=out))
    p = tmp_path / "rules.yaml"
    p.write_text("rounds: 2\nfeedback:\n  source: rules\n")
    r = invoke("worker", "--config", p, "--out", tmp_path / "run", "--set", "feedback.min_rankings=3")
    assert r.exit_code == 0, r.output
    assert seen["cfg"].feedback.source == "human" and seen["cfg"].feedback.min_rankings == 3
    assert seen["out"] == tmp_path / "run"
    p.write_text("rounds: -1\n")
    r = invoke("worker", "--config", p)
    assert r.exit_code == 2 and "field rounds" in r.text
