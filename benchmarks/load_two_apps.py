#!/usr/bin/env python
"""Load test of the whole feedback path: N annotators over several app processes on one database
(PostgreSQL), with the worker training on their rankings and killed once with SIGKILL mid-round.

    python benchmarks/load_two_apps.py --annotators 20 --seconds 30 --apps 2 --postgres \\
        --with-worker --kill-worker-after 12

Everything runs on 127.0.0.1 in a temporary folder:

1. the database: ``--postgres`` starts a throw-away PostgreSQL (``initdb`` + ``pg_ctl`` on
   loopback at a free port, its own socket folder; as root the server runs as ``nobody``; the
   approach of ``tests/conftest.py``'s ``postgres_server``), ``--db-url URL`` uses a given empty
   database, neither: SQLite in the run directory;
2. a tiny random Llama with the real tokenizer (``load_annotators.build_model``), a task file,
   the config (``db_url`` set) and ``--annotators`` accounts;
3. with ``--with-worker``: the real ``rlhf worker`` (``tests/fault_worker.py none``: the loop,
   whose sampling returns two verified traces and a wrong one per task, so each round has items
   worth ranking at once); the annotators start when round 1's rollout is stored;
4. ``--apps`` ``rlhf serve`` processes on free ports; annotator ``i`` uses app ``i % apps``;
   each is a plain HTTP client (``load_annotators.HttpSession``) looping ``next_item`` ->
   ``submit`` (a random valid ranking) until ``--seconds`` have passed; every call has a timeout;
5. ``--kill-worker-after S``: SIGKILL of the worker once, S seconds into the load, then an
   immediate restart (it takes over the dead worker's run lock and resumes);
6. afterwards the annotators stop, the worker is stopped, and the database is counted.

Reported (``benchmarks/results/load_two_apps_postgres.json`` by default): acknowledged (the
client saw ``ok``), stored (submitted rows), trained (``consumed_round`` set, in a round that
recorded its rankings), pending (not consumed, in a round that has not trained), lost
(acknowledged, not stored: must be 0), the identities acknowledged = stored = trained + pending,
the most submissions on one item against ``--annotators-per-item`` (the cap), submissions/s,
p50/p95/max latency per route (login, next_item, submit), the rounds trained and the worker kill
(when, in which round, how long until the restarted worker published its next version).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `import _common` (beside this script)
import _common  # noqa: E402  first: it records the load average at the start (stdlib only at import)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load_annotators as la  # noqa: E402  (beside this script: model, HTTP client, recorder, percentiles)

ROOT = Path(__file__).resolve().parents[1]
FAULT_WORKER = ROOT / "tests" / "fault_worker.py"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
       "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


# --- 1: PostgreSQL ---------------------------------------------------------------------------------
def postgres_bin() -> Path | None:
    """Directory of PostgreSQL's server binaries (``initdb``, ``pg_ctl``), or None."""
    import glob

    found = shutil.which("initdb") or shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


@contextlib.contextmanager
def temporary_postgres():
    """A throw-away PostgreSQL on 127.0.0.1 (trust auth, loopback only); yields the base URL
    ``postgresql+psycopg2://postgres@127.0.0.1:PORT``. Raises RuntimeError when it cannot start."""
    bindir = postgres_bin()
    if bindir is None:
        raise RuntimeError("PostgreSQL server binaries not found (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="rlhf-pg-"))
    user = "nobody" if os.geteuid() == 0 else None  # PostgreSQL refuses to run as root
    data, sock, log = root / "data", root / "sock", root / "server.log"
    sock.mkdir()
    if user:
        shutil.chown(root, user=user)
        shutil.chown(sock, user=user)

    def pg(*args, timeout=120):
        return subprocess.run([str(bindir / args[0]), *args[1:]], user=user, cwd=root, capture_output=True,
                              text=True, timeout=timeout)

    started = False
    try:
        port = la.free_port()
        r = pg("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8")
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed: {r.stderr.strip()[-500:]}")
        opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {sock} -c fsync=off -c synchronous_commit=off " \
               "-c full_page_writes=off -c max_connections=200"
        r = pg("pg_ctl", "-D", str(data), "-o", opts, "-l", str(log), "-w", "-t", "60", "start")
        if r.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not start: {r.stderr.strip()[-300:]} "
                               f"{log.read_text()[-500:] if log.exists() else ''}")
        started = True
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}"
    finally:
        if started:
            pg("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop", timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def create_database(base_url: str, name: str) -> str:
    from sqlalchemy import create_engine, text

    engine = create_engine(f"{base_url}/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return f"{base_url}/{name}"


# --- 2: the run ----------------------------------------------------------------------------------------
def seed_run(run_dir: Path, db_url: str | None, n_annotators: int, prompts_per_round: int,
             annotators_per_item: int, min_rankings: int, rounds: int) -> Path:
    """Model, task file, config and accounts; returns the config path."""
    import yaml

    from rlhf_workbench.human.accounts import create_user
    from rlhf_workbench.store import Store
    from rlhf_workbench.tasks.loading import save_tasks
    from rlhf_workbench.tasks.task import Task

    la.build_model(run_dir / "model")
    rng = random.Random(0)
    n_train, n_heldout = max(3 * prompts_per_round, 30), 4
    tasks = []
    for i in range(n_train + n_heldout):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        tasks.append(Task(id=f"load-{i:04d}", question=f"What is {a} + {b}?", answer=str(a + b),
                          metadata={"split": "heldout" if i >= n_train else "train"}))
    save_tasks(tasks, run_dir / "tasks.jsonl")
    cfg = {"rounds": rounds, "seed": 1, "model": {"name": str(run_dir / "model"), "mixed_precision": "no"},
           "tasks": {"path": str(run_dir / "tasks.jsonl")},
           "rollout": {"num_generations": 3, "prompts_per_round": prompts_per_round, "max_new_tokens": 4,
                       "batch_size": 8},
           "feedback": {"source": "human", "min_rankings": min_rankings, "annotators_per_item": annotators_per_item,
                        "poll_seconds": 0.5},
           "optim": {"micro_batch_size": 8}, "eval": {"max_new_tokens": 4, "kl_samples": 2},
           "keep_checkpoints": 1, "tracking": {"backend": "none"}}
    if db_url:
        cfg["db_url"] = db_url
    config = run_dir / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    store = Store(db_url, run_dir)
    for i in range(n_annotators):
        create_user(store, f"annotator{i:02d}", la.PASSWORD)
    store.engine.dispose()
    return config


# --- 3-5: processes and annotators -------------------------------------------------------------------
class Worker:
    """``rlhf worker`` (canned traces, tests/fault_worker.py) that can be killed -9 and restarted."""

    def __init__(self, config: Path, run_dir: Path):
        self.config, self.run_dir, self.proc, self.starts = config, run_dir, None, 0
        self.log = run_dir / "worker.log"

    def start(self) -> None:
        self.starts += 1
        with self.log.open("a") as f:
            self.proc = subprocess.Popen([sys.executable, str(FAULT_WORKER), "none", str(self.run_dir / "generate.log"),
                                          "worker", "--config", str(self.config), "--out", str(self.run_dir)],
                                         stdout=f, stderr=subprocess.STDOUT, env=ENV)

    def kill9(self) -> int:
        self.proc.kill()
        return self.proc.wait(30)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        return self.proc.returncode


def start_app(config: Path, run_dir: Path, k: int) -> tuple[subprocess.Popen, str, Path]:
    port = la.free_port()
    log = run_dir / f"app{k}.log"
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "rlhf_workbench.cli", "serve", "--config", str(config),
                                 "--out", str(run_dir), "--port", str(port)], stdout=f, stderr=subprocess.STDOUT, env=ENV)
    return proc, f"http://{la.LOOPBACK}:{port}", log


def annotate(url: str, user: str, deadline: float, rec: "la.Recorder", seed: int) -> None:
    """One annotator on one app: log in, then next_item -> submit until ``deadline``; a failed
    call is recorded and the session is opened again."""
    rng = random.Random(seed)
    session = None
    while time.perf_counter() < deadline:
        try:
            if session is None:
                t = time.perf_counter()
                session = la.HttpSession(url, user)
                rec.lat("login", time.perf_counter() - t)
            t = time.perf_counter()
            item = json.loads(session.call("next_item"))
            rec.lat("next_item", time.perf_counter() - t)
        except Exception as e:  # noqa: BLE001 - counted and reported
            rec.error("login" if session is None else "next_item", e)
            session = None
            time.sleep(0.3)
            continue
        if item is None or "error" in item:  # nothing to rank now (round full, or worker training)
            with rec.lock:
                rec.empty += 1
            time.sleep(min(0.5, max(0.0, deadline - time.perf_counter())))
            continue
        if not la.submit_random_ranking(session, item, user, rng, rec):
            session = None  # log in again
    if session is not None:
        session.close()


def db_state(db_url: str | None, run_dir: Path) -> dict:
    """Rounds with a rollout, published versions, rollouts that recorded rankings, submitted and
    pending (not yet consumed) annotations."""
    from sqlalchemy import func, select

    from rlhf_workbench.store import Annotation, RankingRow, Rollout, Store

    store = Store(db_url, run_dir)
    try:
        with store.session() as s:
            rounds = sorted(s.scalars(select(Rollout.round)).all())
            trained = sorted(set(s.scalars(select(RankingRow.rollout_id)).all()))
            submitted = select(func.count()).select_from(Annotation).where(Annotation.status == "submitted")
            n_submitted = s.scalar(submitted)
            n_pending = s.scalar(submitted.where(Annotation.consumed_round.is_(None)))
        return {"rollout_rounds": rounds, "versions": [v.id for v in store.versions()],
                "rollouts_trained": trained, "submitted": n_submitted,
                "pending": n_pending}
    finally:
        store.engine.dispose()


def account(db_url: str | None, run_dir: Path, acked: set, annotators_per_item: int) -> dict:
    """Count from the database: stored, trained, pending, lost, cap."""
    from sqlalchemy import select

    from rlhf_workbench.store import Annotation, RankingRow, Rollout, Store, User

    store = Store(db_url, run_dir)
    try:
        with store.session() as s:
            rows = s.execute(select(User.username, Annotation.rollout_id, Annotation.task_id, Annotation.consumed_round)
                             .join(User, User.id == Annotation.user_id)
                             .where(Annotation.status == "submitted")).all()
            trained_rollouts = set(s.scalars(select(RankingRow.rollout_id)).all())
            rollout_rounds = sorted(s.scalars(select(Rollout.round)).all())
        versions = [(v.id, v.parent_id) for v in store.versions()]
    finally:
        store.engine.dispose()
    stored = {(u, int(r), str(t)): c for u, r, t, c in rows}
    per_item: dict[tuple[int, str], int] = {}
    for _, r, t in stored:
        per_item[(r, t)] = per_item.get((r, t), 0) + 1
    trained = {k for k, c in stored.items() if c is not None}
    pending = set(stored) - trained
    by_round: dict[str, int] = {}
    for c in stored.values():
        if c is not None:
            by_round[str(c)] = by_round.get(str(c), 0) + 1
    return {
        "acknowledged": len(acked), "stored": len(stored), "trained": len(trained), "pending": len(pending),
        "trained_by_round": dict(sorted(by_round.items(), key=lambda kv: int(kv[0]))),
        "lost": len(acked - set(stored)), "stored_unacknowledged": len(set(stored) - acked),
        "consumed_without_rankings": sum(k[1] not in trained_rollouts for k in trained),
        "pending_in_trained_round": sum(k[1] in trained_rollouts for k in pending),
        "identity_holds": len(acked) == len(stored) == len(trained) + len(pending) and not (acked ^ set(stored)),
        "items_submitted": len(per_item), "max_submissions_on_an_item": max(per_item.values(), default=0),
        "annotators_per_item": annotators_per_item,
        "items_over_cap": sum(n > annotators_per_item for n in per_item.values()),
        "rollout_rounds": rollout_rounds, "rounds_sampled_twice": len(rollout_rounds) - len(set(rollout_rounds)),
        "versions_chain_ok": versions == [(0, None)] + [(v, v - 1) for v in range(1, len(versions))],
        "versions_published": len(versions) - 1,
    }


def wait_for(pred, timeout: float, what: str, poll: float = 0.5, alive=None):
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        v = pred()
        if v:
            return v
        if alive is not None and not alive():
            raise RuntimeError(f"{what}: process exited")
        time.sleep(poll)
    raise RuntimeError(f"{what}: not within {timeout:.0f} s")


def run(a: argparse.Namespace, db_url: str | None) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="rlhf-load2-"))
    apps: list[subprocess.Popen] = []
    worker = None
    try:
        t0 = time.perf_counter()
        config = seed_run(run_dir, db_url, a.annotators, a.prompts_per_round, a.annotators_per_item,
                          a.min_rankings, a.rounds)
        seed_s = time.perf_counter() - t0
        state = lambda: db_state(db_url, run_dir)  # noqa: E731
        worker_first_rollout_s = None
        if a.with_worker:
            worker = Worker(config, run_dir)
            worker.start()
        started = [start_app(config, run_dir, k) for k in range(a.apps)]
        apps = [p for p, _, _ in started]
        t1 = time.perf_counter()
        for proc, url, log in started:
            la.wait_until_up(url, proc, log)
        startup_s = time.perf_counter() - t1
        if worker is not None:
            wait_for(lambda: state()["rollout_rounds"], 300, "the worker's first rollout",
                     alive=lambda: worker.proc.poll() is None)
            worker_first_rollout_s = time.perf_counter() - t0
        rec = la.Recorder()
        rec.latency.setdefault("login", [])
        deadline = time.perf_counter() + a.seconds
        threads = [threading.Thread(target=annotate, args=(started[i % a.apps][1], f"annotator{i:02d}", deadline,
                                                          rec, i), daemon=True) for i in range(a.annotators)]
        t_start = time.perf_counter()
        for th in threads:
            th.start()
        kill: dict | None = None
        killer = None
        if worker is not None and a.kill_worker_after is not None:
            kill = {}

            def kill_and_restart() -> None:
                time.sleep(max(0.0, t_start + a.kill_worker_after - time.perf_counter()))
                before = state()
                t_kill = time.perf_counter()
                rc = worker.kill9()
                worker.start()
                kill.update({"at_s": round(t_kill - t_start, 2), "exit_code": rc, "state_at_kill": before,
                             "acknowledged_at_kill": len(rec.acked)})
                try:  # how long until the restarted worker publishes its next version
                    n_before = len(before["versions"])
                    wait_for(lambda: len(state()["versions"]) > n_before,
                             max(5.0, deadline + 60 - time.perf_counter()), "next version after the restart",
                             alive=lambda: worker.proc.poll() is None)
                    kill["next_version_after_restart_s"] = round(time.perf_counter() - t_kill, 2)
                except Exception as e:  # noqa: BLE001 - reported
                    kill["next_version_after_restart_s"] = None
                    kill["note"] = str(e)

            killer = threading.Thread(target=kill_and_restart, daemon=True)
            killer.start()
        for th in threads:
            th.join(timeout=max(1.0, deadline - time.perf_counter()) + 2 * la.CALL_TIMEOUT_S + 30)
        wall = time.perf_counter() - t_start
        hung = sum(th.is_alive() for th in threads)
        if killer is not None:
            killer.join(timeout=max(5.0, deadline + 90 - time.perf_counter()))
        worker_alive_at_end = worker is not None and worker.proc.poll() is None
        worker_rc = worker.stop() if worker is not None else None
        for p in apps:
            p.terminate()
        for p in apps:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        counts = account(db_url, run_dir, set(rec.acked), a.annotators_per_item)
        return {
            "annotators": a.annotators, "apps": a.apps, "seconds": a.seconds,
            "database": "none" if db_url is None else db_url.split(":", 1)[0].split("+")[0],
            "with_worker": a.with_worker, "prompts_per_round": a.prompts_per_round, "min_rankings": a.min_rankings,
            **counts,
            "sent": rec.sent, "refused": len(rec.refused), "refused_examples": rec.refused[:5],
            "errors": sum(rec.errors.values()), "errors_by_call": rec.errors, "error_examples": rec.error_examples,
            "next_item_empty": rec.empty, "hung_clients": hung,
            "wall_s": round(wall, 2), "seed_s": round(seed_s, 2), "apps_startup_s": round(startup_s, 2),
            "worker_first_rollout_s": None if worker_first_rollout_s is None else round(worker_first_rollout_s, 2),
            "worker_kill": kill, "worker_starts": worker.starts if worker else 0,
            "worker_alive_at_end": worker_alive_at_end, "worker_exit_code_at_stop": worker_rc,
            "submissions_per_s": round(len(rec.acked) / wall, 2) if wall else None,
            "latency_ms": {op: {"n": len(xs), "p50": round(la.percentile(xs, 50), 1),
                                "p95": round(la.percentile(xs, 95), 1), "max": round(1000 * max(xs), 1)}
                           for op, xs in sorted(rec.latency.items()) if xs},
            "host": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "loadavg_1min": round(os.getloadavg()[0], 2)},
        }
    finally:
        if worker is not None and worker.proc is not None and worker.proc.poll() is None:
            worker.proc.kill()
        for p in apps:
            if p.poll() is None:
                p.kill()
        if a.keep is not None:
            shutil.copytree(run_dir, a.keep, dirs_exist_ok=True)
        shutil.rmtree(run_dir, ignore_errors=True)


def ok(r: dict) -> bool:
    """The accounting identities and the cap."""
    return (r["lost"] == 0 and r["identity_holds"] and r["stored_unacknowledged"] == 0
            and r["consumed_without_rankings"] == 0 and r["pending_in_trained_round"] == 0
            and r["items_over_cap"] == 0 and r["rounds_sampled_twice"] == 0 and r["versions_chain_ok"]
            and r["hung_clients"] == 0)


def print_summary(r: dict) -> None:
    print(f"\n{r['annotators']} annotators over {r['apps']} app processes on {r['database']}, {r['seconds']:.0f} s, "
          f"worker {'on' if r['with_worker'] else 'off'}")
    print(f"acknowledged {r['acknowledged']} = stored {r['stored']} = trained {r['trained']} + pending {r['pending']}; "
          f"lost {r['lost']}; identity {'holds' if r['identity_holds'] else 'BROKEN'}")
    print(f"trained by round {r['trained_by_round']}")
    print(f"most submissions on one item {r['max_submissions_on_an_item']} (cap {r['annotators_per_item']}), "
          f"items over the cap {r['items_over_cap']}; rounds {r['rollout_rounds']}, versions {r['versions_published']}")
    print(f"refused {r['refused']}, errors {r['errors']}, {r['submissions_per_s']} submissions/s over {r['wall_s']} s")
    for op, d in r["latency_ms"].items():
        print(f"  {op:<10} n={d['n']:>5} p50 {d['p50']:>8} ms  p95 {d['p95']:>8} ms  max {d['max']:>8} ms")
    if r["worker_kill"]:
        print("worker kill:", json.dumps(r["worker_kill"]))
    if r["error_examples"] or r["refused_examples"]:
        print("examples:", *r["error_examples"], *r["refused_examples"], sep="\n  ")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--annotators", type=int, default=20)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--apps", type=int, default=2, help="app processes (annotator i uses app i %% apps)")
    db = p.add_mutually_exclusive_group()
    db.add_argument("--postgres", action="store_true", help="start a throw-away PostgreSQL on loopback")
    db.add_argument("--db-url", default=None, help="an empty database (default: SQLite in the run directory)")
    p.add_argument("--with-worker", action="store_true", help="run the worker (canned traces, tiny model)")
    p.add_argument("--kill-worker-after", type=float, default=None, help="SIGKILL the worker once, S s into the load")
    p.add_argument("--prompts-per-round", type=int, default=10)
    p.add_argument("--min-rankings", type=int, default=10)
    p.add_argument("--annotators-per-item", type=int, default=2)
    p.add_argument("--rounds", type=int, default=200, help="the worker's rounds (more than the load can finish)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "load_two_apps_postgres.json")
    p.add_argument("--keep", type=Path, default=None, help="copy the run directory (logs, SQLite) here")
    a = p.parse_args(argv)
    if a.kill_worker_after is not None and not a.with_worker:
        p.error("--kill-worker-after needs --with-worker")
    if a.postgres:
        with temporary_postgres() as base:
            r = run(a, create_database(base, "load"))
    else:
        r = run(a, a.db_url)
    r["command"] = "python benchmarks/load_two_apps.py " + " ".join(argv if argv is not None else sys.argv[1:])
    r["ok"] = ok(r)
    print_summary(r)
    _common.write_result(r, a.out)
    print(f"\nwritten to {a.out}")
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
