"""Fault matrix: the worker killed with SIGKILL at every stage of a round while annotators submit
through the web app's HTTP API, then restarted; at the end every acknowledged submission is
stored and either trained on or still pending, no round was sampled twice, versions form one
chain, and the last checkpoint loads.

The worker is the real ``rlhf worker`` (tests/fault_worker.py, which only replaces sampling with
canned traces so a tiny random model yields items worth ranking, and kills itself at the chosen
stage); the app is the real ``rlhf serve`` in another process; the annotators are plain HTTP
clients of Gradio's API (benchmarks/load_annotators.py ``HttpSession``: log in, ``next_item``,
``submit``). Each restart also takes over the dead worker's run lock at once.
"""

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select

from rlhf_workbench.store import Annotation, Store

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 2


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("load_annotators", ROOT / "benchmarks" / "load_annotators.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _App:
    """``rlhf serve`` in a subprocess that the test can kill -9 and restart on the same port."""

    def __init__(self, bench, config: Path, run: Path, env: dict, log: Path):
        self.bench, self.config, self.run, self.env, self.log = bench, config, run, env, log
        self.port = bench.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.epoch = 0  # bumped at every restart: sessions of an older epoch are gone with the process
        self.down = threading.Event()
        self.proc = None

    def start(self) -> None:
        with self.log.open("a") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "rlhf_workbench.cli", "serve", "--config",
                                          str(self.config), "--out", str(self.run), "--port", str(self.port)],
                                         stdout=f, stderr=subprocess.STDOUT, env=self.env)
        self.bench.wait_until_up(self.url, self.proc, self.log)
        self.down.clear()

    def kill9_and_restart(self) -> None:
        self.down.set()
        self.epoch += 1
        self.proc.kill()  # SIGKILL
        self.proc.wait()
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _annotate(app: _App, user: str, stop: threading.Event, out: dict, seed: int) -> None:
    """One annotator: next_item -> submit a random valid ranking, until ``stop``; logs in again
    after the app was killed (errors of a session the dead app held, or while it is down, are
    expected; any other error is recorded as one)."""
    rng = random.Random(seed)
    session, epoch = None, -1
    while not stop.is_set():
        try:
            if session is None or epoch != app.epoch:
                epoch = app.epoch
                session = app.bench.HttpSession(app.url, user)
            item = json.loads(session.call("next_item"))
            if item is None or "error" in item:
                time.sleep(0.3)
                continue
            ids = list(item["completion_ids"])
            rng.shuffle(ids)
            status = session.call("submit", item["rollout_id"], item["task_id"],
                                  json.dumps({str(c): k for k, c in enumerate(ids)}), f"by {user}", "[]",
                                  item.get("revision", -1), "[]")
        except Exception as e:  # noqa: BLE001
            with out["lock"]:
                out["expected_errors" if app.down.is_set() or epoch != app.epoch else "errors"].append(f"{user}: {e!r}")
            session = None
            time.sleep(0.3)
            continue
        key = (user, int(item["rollout_id"]), str(item["task_id"]))
        with out["lock"]:
            (out["acked"].add(key) if str(status).startswith("ok") else out["refused"].append(str(status)))


def _check_acknowledged(store: Store, users: list[str], acked: set) -> tuple[int, int]:
    """Every acknowledged submission is stored, and trained on (consumed by a round that recorded
    its rankings) or pending (its round has not trained). Returns ``(trained, pending)``."""
    from rlhf_workbench.store import RankingRow, User

    with store.session() as s:
        ids = {u.username: u.id for u in s.scalars(select(User))}
        rows = {(a.user_id, a.rollout_id, a.task_id): a for a in s.scalars(select(Annotation))}
        trained = {r.rollout_id for r in s.scalars(select(RankingRow))}
    n_trained = 0
    for user, rollout_id, task_id in acked:
        a = rows.get((ids[user], rollout_id, task_id))
        assert a is not None and a.status == "submitted", ("acknowledged but not stored", user, rollout_id, task_id)
        if a.consumed_round is not None:
            assert rollout_id in trained, ("consumed by a round without rankings", user, rollout_id, task_id)
            n_trained += 1
        else:
            assert rollout_id not in trained, ("acknowledged, not consumed, round trained", user, rollout_id, task_id)
    return n_trained, len(acked) - n_trained


@pytest.mark.slow
def test_worker_killed_at_every_stage(tiny_model_dir, tmp_path):
    from rlhf_workbench.human.accounts import create_user
    from rlhf_workbench.run.loop import prompts_for_round
    from rlhf_workbench.tasks.loading import save_tasks
    from rlhf_workbench.tasks.task import Task

    bench = _load_benchmark()
    run = tmp_path / "run"
    tasks = [Task(id=f"t{i:02d}", question=f"What is {10 + i} + {20 + i}?", answer=str(30 + 2 * i),
                  metadata={"split": "heldout" if i >= 9 else "train"}) for i in range(12)]
    save_tasks(tasks, tmp_path / "tasks.jsonl")
    cfg = {"rounds": ROUNDS, "seed": 1, "model": {"name": str(tiny_model_dir), "mixed_precision": "no"},
           "tasks": {"path": str(tmp_path / "tasks.jsonl")},
           "rollout": {"num_generations": 3, "prompts_per_round": 3, "max_new_tokens": 4, "batch_size": 8},
           "feedback": {"source": "human", "min_rankings": 2, "annotators_per_item": 1, "poll_seconds": 0.2},
           "optim": {"micro_batch_size": 8}, "eval": {"max_new_tokens": 4, "kl_samples": 2},
           "keep_checkpoints": 1, "tracking": {"backend": "none"}}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    store = Store(None, run)
    users = [f"ann{i}" for i in range(3)]
    for u in users:
        create_user(store, u, bench.PASSWORD)

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    app = _App(bench, config, run, env, tmp_path / "app.log")
    out = {"lock": threading.Lock(), "acked": set(), "refused": [], "errors": [], "expected_errors": []}
    stop, threads, outcomes = threading.Event(), [], []
    gen_log = tmp_path / "generate.log"

    def acked() -> set:
        with out["lock"]:
            return set(out["acked"])

    try:
        app.start()
        threads = [threading.Thread(target=_annotate, args=(app, u, stop, out, i)) for i, u in enumerate(users)]
        for t in threads:
            t.start()
        for stage in ("rollout", "consume", "update", "app", "checkpoint", "publish", "prune", "none"):
            if stage == "app":  # kill -9 of the app process while annotators use it; restart it
                app.kill9_and_restart()
                outcomes.append(("app", -9))
            else:
                proc = subprocess.run([sys.executable, str(ROOT / "tests" / "fault_worker.py"), stage, str(gen_log),
                                       "worker", "--config", str(config), "--out", str(run)],
                                      env=env, capture_output=True, text=True, timeout=300)
                outcomes.append((stage, proc.returncode))
                want = 0 if stage == "none" else -signal.SIGKILL
                assert proc.returncode == want, (stage, proc.stdout[-3000:], proc.stderr[-3000:])
            outcomes[-1] += _check_acknowledged(store, users, acked())  # after every kill, not only at the end
        time.sleep(1.0)  # annotators notice the run is over
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        app.stop()
    assert not out["errors"], out["errors"][:5]
    refused = out["refused"]
    assert all("already used for training" in r or "not open" in r or "served" in r for r in refused), refused[:5]

    # Versions 0..ROUNDS, one chain; exactly one rollout per round.
    versions = store.versions()
    assert [(v.id, v.parent_id) for v in versions] == [(0, None)] + [(r, r - 1) for r in range(1, ROUNDS + 1)]
    assert [store.rollout_for_round(r) is not None for r in range(1, ROUNDS + 2)] == [True] * ROUNDS + [False]
    # No round sampled twice: round 1 was sampled again only because the first sampling was killed
    # before it was stored; every later round once.
    train = store.tasks("train")
    expected = [prompts_for_round(train, r, 3, 1) for r in [1, 1] + list(range(2, ROUNDS + 1))]
    calls = [json.loads(line)["generate"] for line in gen_log.read_text().splitlines()]
    assert calls == [[t.id for t in batch] for batch in expected]
    # Every acknowledged submission is stored, and trained on or pending.
    assert acked(), "no submission was acknowledged"
    n_trained, n_pending = _check_acknowledged(store, users, acked())
    # The last checkpoint loads; no half-written checkpoint is left behind.
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "checkpoints" / f"v{ROUNDS}")
    AutoModelForCausalLM.from_pretrained(run / "policy")
    assert not list((run / "checkpoints").glob("*.tmp"))
    print(f"fault matrix (stage, exit code, trained, pending): {outcomes}; acknowledged {len(acked())}, trained {n_trained}, pending {n_pending}, "
          f"refused {len(refused)}, errors while the app was down {len(out['expected_errors'])}")
