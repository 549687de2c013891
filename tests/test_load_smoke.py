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
    # only a missing optional dependency skips; the app failing to import is a failure
    pytest.importorskip("gradio", reason="the web app's optional dependency gradio is not installed")
    import rlhf_workbench.app.build  # noqa: F401
    from rlhf_workbench.model.loading import bundled_gguf_path

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


def _load_two_apps():
    import importlib.util

    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("load_two_apps", SCRIPT.parent / "load_two_apps.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_load_two_apps_postgres_worker_killed(postgres_url, tmp_path):
    """benchmarks/load_two_apps.py tiny: 3 annotators over two app processes on PostgreSQL, the
    worker running and killed -9 once mid-load, then restarted: acknowledged = stored = trained +
    pending, nothing lost, the per-item cap held, one rollout per round, one chain of versions."""
    out = tmp_path / "load2.json"
    proc = subprocess.run([sys.executable, str(SCRIPT.parent / "load_two_apps.py"), "--annotators", "3",
                           "--seconds", "6", "--apps", "2", "--db-url", postgres_url, "--with-worker",
                           "--kill-worker-after", "3", "--prompts-per-round", "3", "--min-rankings", "2",
                           "--annotators-per-item", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["database"] == "postgresql" and r["apps"] == 2
    assert r["acknowledged"] > 0, r
    assert r["lost"] == 0 and r["stored_unacknowledged"] == 0, r
    assert r["acknowledged"] == r["stored"] == r["trained"] + r["pending"], r
    assert r["identity_holds"], r
    assert r["consumed_without_rankings"] == 0 and r["pending_in_trained_round"] == 0, r
    assert r["max_submissions_on_an_item"] <= r["annotators_per_item"] == 1 and r["items_over_cap"] == 0, r
    assert r["rounds_sampled_twice"] == 0 and r["versions_chain_ok"], r
    assert r["worker_kill"]["exit_code"] == -9 and r["worker_starts"] == 2, r["worker_kill"]
    assert r["errors"] == 0 and r["hung_clients"] == 0, r["error_examples"]
    assert {"login", "next_item", "submit"} <= set(r["latency_ms"])
    assert all("already used for training" in x or "not open" in x or "served" in x for x in r["refused_examples"]), r
    assert r["ok"] and proc.returncode == 0, proc.stdout[-3000:]

    # The accounting can fail: the same database, counted against one acknowledgement it never stored.
    bench = _load_two_apps()
    from sqlalchemy import select

    from rlhf_workbench.store import Annotation, Store, User

    (tmp_path / "count").mkdir()
    store = Store(postgres_url, tmp_path / "count")
    with store.session() as s:
        acked = {(u, int(rid), str(t)) for u, rid, t in s.execute(
            select(User.username, Annotation.rollout_id, Annotation.task_id)
            .join(User, User.id == Annotation.user_id).where(Annotation.status == "submitted"))}
    store.engine.dispose()
    assert len(acked) == r["stored"]
    counted = bench.account(postgres_url, tmp_path / "count", acked, 1)
    assert counted["identity_holds"] and counted["lost"] == 0
    counted = bench.account(postgres_url, tmp_path / "count", acked | {("annotator00", 1, "no-such-task")}, 1)
    assert counted["lost"] == 1 and not counted["identity_holds"]
    counted = bench.account(postgres_url, tmp_path / "count", acked, 0)  # a cap of 0: every item is over it
    assert counted["items_over_cap"] == counted["items_submitted"] > 0
