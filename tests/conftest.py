"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Directory of the shared read-only data sets (GSM8K, PubMedQA, ...).

    ``$RLHF_SHARED_DATA`` if set, else ``<repo>/../shared/data``; the test is skipped when the
    directory does not exist.
    """
    env = os.environ.get("RLHF_SHARED_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path} (set RLHF_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The default model's real tokenizer (from the bundled GGUF), saved alone to a directory."""
    from transformers import AutoTokenizer

    from rlhf_workbench.model.loading import bundled_gguf_path

    gguf = bundled_gguf_path()
    out = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer_dir, tmp_path_factory) -> Path:
    """A tiny randomly initialised Llama (hidden size 32, 2 layers) with the real SmolLM2
    tokenizer, saved so that ``load_policy(ModelConfig(name=str(path)))`` loads it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def seed_rollout(store, pair, texts: dict, round: int = 1, version: int = 0, tasks: dict | None = None) -> int:
    """Store a rollout of hand-written traces, as if policy ``version`` had sampled them.

    ``texts`` maps task id -> list of completion texts. Token ids come from the real tokenizer and
    the per-token log-probs from a real forward pass of ``pair.policy``; each trace is verified by
    the real verifier. Returns the rollout id.
    """
    import torch

    from rlhf_workbench.model.logprobs import completion_logps
    from rlhf_workbench.run.loop import store_rollout
    from rlhf_workbench.model.rollout import Completion, render_prompt

    tasks = tasks or {t.id: t for split in ("train", "heldout") for t in store.tasks(split)}
    comps = []
    for task_id, group in texts.items():
        prompt = render_prompt(pair.tokenizer, tasks[task_id])
        for k, text in enumerate(group):
            ids = pair.tokenizer.encode(text, add_special_tokens=False) + [pair.tokenizer.eos_token_id]
            full = torch.tensor([prompt + ids])
            with torch.no_grad():
                logps = completion_logps(pair.policy, full, torch.ones_like(full), len(ids))[0].tolist()
            comps.append(Completion(task_id, k, prompt, ids, logps, text, True))
    return store_rollout(store, round, version, {"seeded": True}, tasks, comps)


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread and no ``datasets`` progress bars for a module (light CPU, deterministic
    sums in the TRL comparisons); restores the thread count afterwards."""
    import datasets
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    yield
    torch.set_num_threads(previous)


# --- PostgreSQL --------------------------------------------------------------------------------

def _postgres_bin() -> Path | None:
    """Directory of PostgreSQL's server binaries (``initdb``, ``pg_ctl``), or None."""
    import glob
    import shutil

    found = shutil.which("initdb") or shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """A throw-away PostgreSQL server for the session: ``initdb`` into a temporary folder, then
    ``pg_ctl`` on 127.0.0.1 at a free port with its own socket folder (never the system's).

    Yields the server's base URL ``postgresql+psycopg2://postgres@127.0.0.1:PORT`` (trust
    authentication on loopback only). As root the server runs as ``nobody`` (PostgreSQL refuses
    root). Skips when the binaries (Debian's ``postgresql`` package) or the driver
    (``psycopg2-binary``, in the ``test`` extra) are missing, or the server does not start.
    """
    import shutil
    import socket
    import subprocess
    import tempfile

    pytest.importorskip("psycopg2", reason="psycopg2-binary not installed (pip install -e '.[test]')")
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="rlhf-pg-"))
    user = None
    if os.geteuid() == 0:
        user = "nobody"
        shutil.chown(root, user=user)
    data, sock, log = root / "data", root / "sock", root / "server.log"
    sock.mkdir()
    if user:
        shutil.chown(sock, user=user)

    def pg(*args, timeout=120):
        return subprocess.run([str(bindir / args[0]), *args[1:]], user=user, cwd=root, capture_output=True,
                              text=True, timeout=timeout)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = pg("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8")
    if r.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"initdb failed: {r.stderr.strip()[-500:]}")
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {sock} -c fsync=off -c synchronous_commit=off " \
           "-c full_page_writes=off -c max_connections=100"
    r = pg("pg_ctl", "-D", str(data), "-o", opts, "-l", str(log), "-w", "-t", "60", "start")
    if r.returncode != 0:
        text = log.read_text() if log.exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"PostgreSQL did not start: {r.stderr.strip()[-300:]} {text[-500:]}")
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}"
    finally:
        pg("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop", timeout=60)
        shutil.rmtree(root, ignore_errors=True)


_pg_databases = iter(range(1, 1_000_000))


@pytest.fixture()
def postgres_url(postgres_server) -> str:
    """A fresh, empty database on the session's PostgreSQL server (its SQLAlchemy URL)."""
    from sqlalchemy import create_engine, text

    name = f"test_{os.getpid()}_{next(_pg_databases)}"
    engine = create_engine(f"{postgres_server}/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return f"{postgres_server}/{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """The URL of an empty database, once SQLite (a file in ``tmp_path``) and once PostgreSQL
    (:func:`postgres_url`; skipped where no server can be started)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'workbench.db'}"
    return request.getfixturevalue("postgres_url")


def gradio_api_call(http, api_name: str, data: list) -> tuple[str, object]:
    """One call of a named endpoint through Gradio's HTTP API (``POST /gradio_api/call/<name>``,
    then its event stream) with an ``httpx`` client: ``(event, data)``, event ``complete`` or
    ``error``; AssertionError if the stream ends without either."""
    import json

    r = http.post(f"/gradio_api/call/{api_name}", json={"data": data})
    r.raise_for_status()
    event = None
    with http.stream("GET", f"/gradio_api/call/{api_name}/{r.json()['event_id']}") as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                return event, json.loads(line[5:])
    raise AssertionError(f"{api_name}: no result")


def loop_beside_app(cfg, out, expert, timeout: float = 300.0) -> tuple[dict, list[str]]:
    """Run the loop (:func:`rlhf_workbench.run.loop.run`) in a thread beside the web app on a free
    loopback port, with ``expert(url, stop)`` (a scripted annotator: a callable taking the app's
    URL and a ``threading.Event`` set when the loop ends) in another thread, as ``rlhf serve
    --with-worker`` and an annotator would run. Stops at the loop's end, at the first error of
    either thread or after ``timeout`` seconds.

    Returns:
        ``(summary, errors)``: the loop's summary, and the tracebacks of either thread (plus
        ``"timeout"`` when the loop was still running).
    """
    import socket
    import threading
    import time
    import traceback

    from rich.console import Console

    from rlhf_workbench.app.build import launch
    from rlhf_workbench.run.loop import run

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = launch(cfg, out, "127.0.0.1", port, block=False)
    stop, errors, summary = threading.Event(), [], {}

    def guard(fn, *args):
        try:
            fn(*args)
        except BaseException:  # noqa: BLE001 - returned to the test
            errors.append(traceback.format_exc())

    worker = threading.Thread(target=guard, args=(lambda: summary.update(run(cfg, out, Console(quiet=True))),),
                              daemon=True)
    ranker = threading.Thread(target=guard, args=(expert, f"http://127.0.0.1:{port}", stop), daemon=True)
    deadline = time.time() + timeout
    try:
        worker.start()
        ranker.start()
        while worker.is_alive() and not errors and time.time() < deadline:
            worker.join(0.5)
    finally:
        stop.set()
        ranker.join(60)
        demo.close()
    if worker.is_alive():
        errors.append("timeout")
    return summary, errors
