"""One owner per run: an advisory lock held by ``rlhf run`` / ``rlhf worker`` while the loop runs.

Two loops on one run would sample the same round twice and interleave their updates, so the loop
takes two locks before it writes anything, and a second loop refuses to start with a message
naming the owner:

- a lock file ``<run dir>/run.lock`` held with ``fcntl.flock``: the kernel drops it when the
  owner exits or is killed, so on one machine a dead owner never blocks a restart;
- a row in the run's database (table ``run_locks``: owner token, pid, host, run directory, start
  time and a heartbeat refreshed every ``heartbeat_s`` seconds by a daemon thread), which also
  covers workers on other machines that share a PostgreSQL database with their own run
  directories.

A row left by a dead owner is taken over (compare-and-swap on the owner token): at once when the
owner ran on this host and its process is gone, or its run directory is ours and we hold the lock
file (a live owner would hold it); otherwise once its heartbeat is older than ``stale_s`` seconds
(the owner's clock, so machines should keep time). An owner whose row was taken over (it stalled
longer than ``stale_s``) notices on its next heartbeat; :meth:`RunLock.check` then raises.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from sqlalchemy import Float, Integer, String, Text, delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from rlhf_workbench.store import Base, Store

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: the database row alone
    fcntl = None

LOCK_FILE = "run.lock"


class RunInUseError(RuntimeError):
    """Another live process owns the run (its directory or its database); the message names it."""


class RunLockRow(Base):
    """The owner of the run stored in this database (one row, ``name = "run"``)."""

    __tablename__ = "run_locks"
    name: Mapped[str] = mapped_column(String(50), primary_key=True)
    token: Mapped[str] = mapped_column(String(64))
    pid: Mapped[int] = mapped_column(Integer)
    host: Mapped[str] = mapped_column(String(255))
    run_dir: Mapped[str] = mapped_column(Text)
    started_at: Mapped[float] = mapped_column(Float)
    heartbeat_at: Mapped[float] = mapped_column(Float)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _describe(owner: dict, now: float) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started_at", now)))
    text = f"pid {owner.get('pid')} on {owner.get('host')} (run directory {owner.get('run_dir')}, started {started}"
    if "heartbeat_at" in owner:
        text += f", last heartbeat {max(0.0, now - owner['heartbeat_at']):.0f} s ago"
    return text + ")"


class RunLock:
    """The run's lock: lock file plus database row (see the module docstring).

    Args:
        store: the run's database.
        run_dir: the run directory (holds the lock file).
        heartbeat_s: seconds between heartbeats of the database row.
        stale_s: a row whose heartbeat is older than this is taken over.

    Use as a context manager, or :meth:`acquire` / :meth:`release`.
    """

    def __init__(self, store: Store, run_dir: str | Path, heartbeat_s: float = 15.0, stale_s: float = 120.0):
        self.store, self.run_dir = store, Path(run_dir).resolve()
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.token = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.lost = False
        self._file = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- acquire / release ---------------------------------------------------------------------
    def acquire(self) -> "RunLock":
        """Take both locks, or raise :class:`RunInUseError` having changed nothing.

        Raises:
            RunInUseError: a live process owns the run directory or the database.
        """
        RunLockRow.__table__.create(self.store.engine, checkfirst=True)
        self._lock_file()
        try:
            self._lock_row()
        except BaseException:
            self._unlock_file()
            raise
        if self._file is not None:  # the owner, for the message a refused process prints
            self._file.seek(0)
            self._file.truncate()
            self._file.write(json.dumps(self._owner()))
            self._file.flush()
        self._thread = threading.Thread(target=self._beat, name="rlhf-run-lock", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Give up both locks (the row only if it is still ours). Safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if not self.lost:
            try:
                with self.store.session() as s, s.begin():
                    s.execute(delete(RunLockRow).where(RunLockRow.name == "run", RunLockRow.token == self.token))
            except Exception:  # noqa: BLE001 - the database may be gone; the row then goes stale
                pass
        self._unlock_file()

    def check(self) -> None:
        """Raise :class:`RunInUseError` if another process took the run over (our heartbeat stalled)."""
        if self.lost:
            raise RunInUseError(f"{self.run_dir}: this process lost the run's lock (no heartbeat for over "
                                f"{self.stale_s:.0f} s, and another process took the run over); stopping")

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # --- the lock file --------------------------------------------------------------------------
    def _lock_file(self) -> None:
        if fcntl is None:
            return
        path = self.run_dir / LOCK_FILE
        f = open(path, "a+", encoding="utf-8")  # never truncates: a refused process changes nothing
        # (at most it creates the empty file)
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                owner = json.loads(f.read() or "{}")
            except ValueError:
                owner = {}
            f.close()
            who = _describe(owner, time.time()) if owner else "another process"
            raise RunInUseError(f"{self.run_dir} is in use by {who}: another `rlhf run` or `rlhf worker` is "
                                "running this run; stop it first (or use another --out)") from None
        self._file = f

    def _unlock_file(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    # --- the database row -----------------------------------------------------------------------
    def _owner(self) -> dict:
        now = time.time()
        return {"pid": os.getpid(), "host": self.host, "run_dir": str(self.run_dir), "started_at": now}

    def _lock_row(self) -> None:
        now = time.time()
        mine = dict(name="run", token=self.token, pid=os.getpid(), host=self.host, run_dir=str(self.run_dir),
                    started_at=now, heartbeat_at=now)
        try:
            with self.store.session() as s, s.begin():
                s.add(RunLockRow(**mine))
            return
        except IntegrityError:
            pass
        with self.store.session() as s:
            row = s.get(RunLockRow, "run")
            owner = None if row is None else {k: getattr(row, k) for k in
                                              ("token", "pid", "host", "run_dir", "started_at", "heartbeat_at")}
        if owner is None or self._stale(owner, now):
            with self.store.session() as s, s.begin():
                if owner is None:
                    s.add(RunLockRow(**mine))
                    taken = True
                else:  # compare-and-swap: only if nobody took it over since we read it
                    taken = s.execute(update(RunLockRow).where(RunLockRow.name == "run",
                                                               RunLockRow.token == owner["token"])
                                      .values(**{k: v for k, v in mine.items() if k != "name"})).rowcount == 1
            if taken:
                return
            with self.store.session() as s:
                row = s.get(RunLockRow, "run")
                owner = {} if row is None else {"pid": row.pid, "host": row.host, "run_dir": row.run_dir,
                                                "started_at": row.started_at, "heartbeat_at": row.heartbeat_at}
        raise RunInUseError(f"the run's database {self.store.engine.url.render_as_string(hide_password=True)} is in "
                            f"use by {_describe(owner, now)}: another `rlhf run` or `rlhf worker` is running this "
                            f"run; stop it first (a dead owner on another machine is taken over "
                            f"{self.stale_s:.0f} s after its last heartbeat)")

    def _stale(self, owner: dict, now: float) -> bool:
        """Whether the row's owner is certainly or presumably dead."""
        if owner["host"] == self.host:
            if not _pid_alive(owner["pid"]):
                return True
            if owner["run_dir"] == str(self.run_dir) and self._file is not None:
                return True  # a live owner of this directory would hold the lock file we hold
        return now - owner["heartbeat_at"] > self.stale_s

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                with self.store.session() as s, s.begin():
                    n = s.execute(update(RunLockRow).where(RunLockRow.name == "run", RunLockRow.token == self.token)
                                  .values(heartbeat_at=time.time())).rowcount
            except Exception:  # noqa: BLE001 - a database hiccup: try again at the next beat
                continue
            if n == 0:
                self.lost = True
                return


def lock_owner(store: Store) -> dict | None:
    """The run's current lock row as a dict (``pid``, ``host``, ``run_dir``, ``started_at``,
    ``heartbeat_at``), or None when nobody holds it (for status displays)."""
    RunLockRow.__table__.create(store.engine, checkfirst=True)
    with store.session() as s:
        row = s.scalar(select(RunLockRow).where(RunLockRow.name == "run"))
        return None if row is None else {"pid": row.pid, "host": row.host, "run_dir": row.run_dir,
                                         "started_at": row.started_at, "heartbeat_at": row.heartbeat_at}
