"""Annotation guidelines: loading, and the per-user acknowledgement keyed by the text's hash."""

import hashlib

import pytest

from rlhf_workbench.human.accounts import create_user
from rlhf_workbench.human.guidelines import acknowledge, guidelines_path, has_acknowledged, load_guidelines
from rlhf_workbench.store import Store


def test_load_guidelines(tmp_path):
    assert load_guidelines(None) is None
    assert guidelines_path("bundled:clinical_guidelines").name == "clinical_guidelines.md"
    p = tmp_path / "g.md"
    p.write_text("# Rank by reasoning\n")
    g = load_guidelines(str(p))
    assert g.text == "# Rank by reasoning\n" and g.sha256 == hashlib.sha256(b"# Rank by reasoning\n").hexdigest()
    with pytest.raises(FileNotFoundError,
                       match="feedback.guidelines: .*missing.md not found.*bundled:clinical_guidelines"):
        load_guidelines(str(tmp_path / "missing.md"))
    (tmp_path / "empty.md").write_text("  \n")
    with pytest.raises(ValueError, match="feedback.guidelines: .*empty"):
        load_guidelines(str(tmp_path / "empty.md"))
    with pytest.raises(ValueError, match="not a bundled name"):
        load_guidelines("bundled:../secrets")


def test_acknowledgement_is_per_user_and_per_version(tmp_path):
    store = Store(run_dir=tmp_path / "run")
    ann, bob = create_user(store, "ann", "correct horse"), create_user(store, "bob", "correct horse")
    p = tmp_path / "g.md"
    p.write_text("v1")
    v1 = load_guidelines(str(p))
    assert has_acknowledged(store, ann, None)  # no guidelines: nothing to acknowledge
    assert not has_acknowledged(store, ann, v1)
    acknowledge(store, ann, v1)
    acknowledge(store, ann, v1)  # idempotent
    assert has_acknowledged(store, ann, v1) and not has_acknowledged(store, bob, v1)
    p.write_text("v2: a new rule")
    assert not has_acknowledged(store, ann, load_guidelines(str(p)))  # changed guidelines: read again


def test_serve_refuses_a_missing_guidelines_file(tmp_path, monkeypatch):
    from pathlib import Path

    from typer.testing import CliRunner

    from rlhf_workbench.cli import app

    config = Path(__file__).resolve().parents[1] / "configs" / "clinical_annotate.yaml"
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["serve", "--config", str(config), "--out", "run",
                                 "--set", "feedback.guidelines=nope.md"])
    text = " ".join(r.output.split())  # rich wraps long lines
    assert r.exit_code == 2, r.output
    assert "feedback.guidelines: nope.md not found" in text and "bundled:clinical_guidelines" in text
    assert not (tmp_path / "run").exists()  # refused before anything was created
