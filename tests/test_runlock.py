"""One owner per run: a second `rlhf run` / `rlhf worker` on a live run refuses with a clear message
and changes nothing; a dead owner's lock is taken over (runlock.py)."""

import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from sqlalchemy import select, update
from typer.testing import CliRunner

from rlhf_workbench.cli import app
from rlhf_workbench.run.lock import RunInUseError, RunLock, RunLockRow, lock_owner
from rlhf_workbench.store import Store

runner = CliRunner()


def invoke(*args):
    r = runner.invoke(app, [str(a) for a in args])
    r.text = " ".join(r.output.split())  # rich wraps long lines at the terminal width
    return r


def snapshot(run_dir, db_url=None) -> tuple:
    """Every row of every table, and every file of the run directory with its size and mtime, but
    the live owner's lock row and lock file (its heartbeat changes them)."""
    store = Store(db_url, run_dir)
    rows = {}
    with store.engine.connect() as conn:
        from rlhf_workbench.store import Base

        for table in Base.metadata.sorted_tables:
            if table.name == "run_locks":
                continue
            rows[table.name] = sorted(map(repr, conn.execute(select(table)).all()))
    files = sorted((str(p.relative_to(run_dir)), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in run_dir.rglob("*") if p.is_file() and not p.name.startswith(("workbench.db", "run.lock")))
    store.engine.dispose()
    return rows, files


def hold_lock_in_subprocess(run_dir, db_url=None) -> subprocess.Popen:
    """Another process that takes the run's lock and keeps it until killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from rlhf_workbench.run.lock import RunLock
        from rlhf_workbench.store import Store
        lock = RunLock(Store({db_url!r}, {str(run_dir)!r}), {str(run_dir)!r}, heartbeat_s=0.2).acquire()
        print("held", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_excludes_and_is_released(db_url, tmp_path):
    store = Store(db_url, tmp_path)
    with RunLock(store, tmp_path):
        owner = lock_owner(store)
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(RunInUseError, match=rf"is in use by pid {os.getpid()} on "):
            RunLock(Store(db_url, tmp_path), tmp_path).acquire()
    assert lock_owner(store) is None  # released
    RunLock(store, tmp_path).acquire().release()  # and free again


def test_database_row_excludes_another_run_directory(db_url, tmp_path):
    """Workers on two machines share one database with their own run directories: the row decides."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    with RunLock(Store(db_url, a), a):
        with pytest.raises(RunInUseError, match=r"the run's database .* is in use by pid \d+ .*run directory .*/a"):
            RunLock(Store(db_url, b), b).acquire()
        assert not (b / "run.lock").read_text()  # b's lock file was taken and given back, untouched


def test_stale_rows_are_taken_over(db_url, tmp_path):
    store = Store(db_url, tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    now = time.time()

    def plant(**kw):
        row = dict(name="run", token="x" * 32, pid=int(dead), host=socket.gethostname(), run_dir="/elsewhere",
                   started_at=now, heartbeat_at=now)
        row.update(kw)
        with store.session() as s, s.begin():
            s.query(RunLockRow).delete()
            s.add(RunLockRow(**row))

    plant()  # this host, process gone: taken over at once
    RunLock(store, tmp_path).acquire().release()
    plant(host="other-machine", pid=1)  # another machine, fresh heartbeat: refused
    with pytest.raises(RunInUseError, match=r"pid 1 on other-machine .*last heartbeat \d+ s ago"):
        RunLock(store, tmp_path, stale_s=60).acquire()
    plant(host="other-machine", pid=1, heartbeat_at=now - 61)  # silent for longer than stale_s: taken over
    lock = RunLock(store, tmp_path, stale_s=60).acquire()
    assert lock_owner(store)["pid"] == os.getpid()
    lock.release()


def test_owner_whose_lock_was_taken_over_stops(db_url, tmp_path):
    store = Store(db_url, tmp_path)
    lock = RunLock(store, tmp_path, heartbeat_s=0.05).acquire()
    with store.session() as s, s.begin():  # another machine took it over while this one stalled
        s.execute(update(RunLockRow).values(token="someone-else", host="other", pid=1))
    deadline = time.time() + 10
    while not lock.lost and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(RunInUseError, match="lost the run's lock"):
        lock.check()
    lock.release()
    assert lock_owner(store)["host"] == "other"  # the new owner's row is left alone


@pytest.mark.parametrize("command", ["run", "worker"])
def test_second_run_or_worker_on_a_live_run_refuses_and_changes_nothing(tiny_model_dir, tmp_path, command):
    """Before the lock, a second `rlhf run` on one --out sampled round 1 again (and crashed on the
    duplicate); now it exits 2 naming the owner, and no row or file of the run changes. Once the
    owner is killed (kill -9), the same command takes the run over and proceeds."""
    import yaml

    from test_loop import tiny_cfg

    out = tmp_path / "run"
    cfg = tiny_cfg(tiny_model_dir, rounds=1).model_dump(mode="json")
    cfg["feedback"]["min_rankings"] = 1
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = invoke("run", "--config", path, "--out", out, "--set", "rounds=0")  # a live run: v0, tasks, config
    assert r.exit_code == 0, r.output
    before = snapshot(out)
    owner = hold_lock_in_subprocess(out)
    try:
        r = invoke(command, "--config", path, "--out", out)
        assert r.exit_code == 2, r.output
        assert f"is in use by pid {owner.pid} on {socket.gethostname()}" in r.text
        assert "another `rlhf run` or `rlhf worker` is running this run; stop it first" in r.text
        assert snapshot(out) == before
    finally:
        owner.kill()
        owner.wait()
    # The owner died without releasing: the lock file's flock went with it, and its row names a
    # dead process on this host, so a restart takes over.
    lock = RunLock(Store(None, out), out).acquire()
    lock.release()


def test_serve_with_worker_refuses_a_live_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    path = tmp_path / "c.yaml"
    path.write_text("rounds: 1\n")
    with RunLock(Store(None, out), out):
        r = invoke("serve", "--config", path, "--out", out, "--with-worker", "--port", "1")
    assert r.exit_code == 2 and "is in use by pid" in r.text
