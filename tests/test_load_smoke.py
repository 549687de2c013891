"""Smoke run of benchmarks/load_annotators.py: 3 annotators for ~5 s against the real app on
loopback; every acknowledged submission must be in the database, and nothing else."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "load_annotators.py"


def test_load_smoke(tmp_path):
    try:
        import rlhf_workbench.app  # noqa: F401
    except Exception as e:  # noqa: BLE001 - the app is optional for this test
        pytest.skip(f"rlhf_workbench.app does not import: {e}")
    from rlhf_workbench.models import bundled_gguf_path

    try:
        bundled_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    out = tmp_path / "load.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--annotators", "3", "--seconds", "5", "--tasks", "30",
                           "--out", str(out)], capture_output=True, text=True, timeout=420,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["annotators"] == 3 and r["hung_clients"] == 0
    assert r["acknowledged"] > 0, r
    assert r["lost"] == 0, r
    assert r["stored"] == r["acknowledged"], r
    assert r["stored_unacknowledged"] == 0, r
    assert r["errors"] == 0, r["error_examples"]
    assert {"connect", "next_item", "submit", "page"} <= set(r["latency_ms"])
