#!/usr/bin/env python
"""Load test of the annotation web app: N concurrent annotators over loopback.

    python benchmarks/load_annotators.py --annotators 20 --seconds 30

What it does, all on 127.0.0.1 and in a temporary run directory:

1. builds a tiny random Llama (hidden size 32, 2 layers) with the real SmolLM2 tokenizer
   (from the bundled GGUF, as ``tests/conftest.py`` does);
2. seeds one rollout of ``--tasks`` additions with ``--traces`` verified traces each (plus
   one wrong trace), hand-written texts tokenized with the chat template, per-token log-probs
   from a real batched forward pass of the tiny model (``logprobs.completion_logps``), verified
   and stored with ``loop.store_rollout``;
3. creates ``--annotators`` accounts and starts the app (``app.launch``) in a subprocess on a
   free port;
4. runs one thread per annotator: log in with ``gradio_client.Client(url, auth=...)``, fetch the
   page, then loop ``/next_item`` -> ``/submit`` (a random valid ranking) until ``--seconds``
   have passed (every call has a timeout, so the loop always ends);
5. counts the submitted annotations in the database afterwards.

Reported: submissions sent, acknowledged ("ok: ..."), refused ("error: ..."), stored (rows
with status submitted), lost (acknowledged but not stored: must be 0), stored without an
acknowledgement (a timed-out call that did land), errors (exceptions) and p50/p95/max latency
per call type; also how the submissions spread over items (items covered, submissions beyond
``--annotators-per-item`` on an item: concurrent annotators that were handed the same item).
CPU seconds of the server and of the client process are recorded, since on a small machine
the 20 ``gradio_client`` instances can use more CPU than the server (``--client http`` drives
the same endpoints with plain ``httpx`` and loads the server instead). Written to
``benchmarks/results/load_annotators.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `import _common` (beside this script)
import _common  # noqa: E402  first: it records the load average at the start (stdlib only at import)

LOOPBACK = "127.0.0.1"
for _key, _val in (("GRADIO_ANALYTICS_ENABLED", "False"), ("HF_HUB_DISABLE_TELEMETRY", "1"), ("HF_HUB_OFFLINE", "1"),
                   ("TOKENIZERS_PARALLELISM", "false")):
    os.environ[_key] = _val  # no telemetry, no hub: loopback traffic only
for _key in ("NO_PROXY", "no_proxy"):
    os.environ[_key] = ",".join(dict.fromkeys([x for x in os.environ.get(_key, "").split(",") if x]
                                              + [LOOPBACK, "localhost"]))
PASSWORD = "load-test-password"
CALL_TIMEOUT_S = 30.0


# --- 1-3: the run directory ----------------------------------------------------------------------
def build_model(model_dir: Path) -> None:
    """Tiny random Llama with the real tokenizer, saved to ``model_dir``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rlhf_workbench.model.loading import bundled_gguf_path

    gguf = bundled_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)


def seed_run(run_dir: Path, n_tasks: int, n_traces: int, n_annotators: int, annotators_per_item: int,
             seed: int = 0) -> Path:
    """Write config.yaml, the model and a database with one open rollout and the accounts."""
    import torch
    import yaml

    from rlhf_workbench.config import RunConfig
    from rlhf_workbench.model.logprobs import completion_logps
    from rlhf_workbench.run.loop import store_rollout
    from rlhf_workbench.model.loading import load_tokenizer
    from rlhf_workbench.model.rollout import Completion, pad_batch, render_prompt
    from rlhf_workbench.human.accounts import create_user
    from rlhf_workbench.store import Store
    from rlhf_workbench.tasks.task import Task
    from transformers import AutoModelForCausalLM

    model_dir = run_dir / "model"
    build_model(model_dir)
    cfg = RunConfig.model_validate({
        "rounds": 1, "seed": seed,
        "model": {"name": str(model_dir), "mixed_precision": "no"},
        "rollout": {"num_generations": n_traces + 1, "prompts_per_round": n_tasks, "max_new_tokens": 32},
        "feedback": {"source": "human", "annotators_per_item": annotators_per_item, "min_rankings": n_tasks},
        "eval": {"max_new_tokens": 16},
    })
    config_path = run_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))

    rng = random.Random(seed)
    tasks = []
    for i in range(n_tasks):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        tasks.append(Task(id=f"load-{i:04d}", question=f"What is {a} + {b}?", answer=str(a + b),
                          metadata={"a": a, "b": b}))
    variants = ["{a} + {b} = {s}\nAnswer: {s}", "Answer: {s}", "Adding {a} and {b} gives {s}.\nAnswer: {s}",
                "{b} + {a} = {s}, so the sum is {s}.\nAnswer: {s}", "First {a} + {b10} = {c}, then "
                "{c} + {r} = {s}.\nAnswer: {s}"]
    tok = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    jobs = []  # (task, index, prompt_ids, token_ids)
    for t in tasks:
        a, b, s = t.metadata["a"], t.metadata["b"], int(t.answer)
        fields = {"a": a, "b": b, "s": s, "b10": b - b % 10, "c": a + b - b % 10, "r": b % 10}
        texts = [variants[k % len(variants)].format(**fields) for k in range(n_traces)]
        texts.append(f"{a} + {b} = {s + 1}\nAnswer: {s + 1}")  # one wrong trace, shown as rejected
        prompt = render_prompt(tok, t)
        for k, text in enumerate(texts):
            jobs.append((t, k, prompt, tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]))
    comps = []
    with torch.no_grad():
        for start in range(0, len(jobs), 64):
            batch = jobs[start:start + 64]
            ids, mask, cmask = pad_batch([j[2] for j in batch], [j[3] for j in batch], tok.pad_token_id)
            lp = completion_logps(model, ids, mask, cmask.shape[1], temperature=0.7)
            for row, (t, k, prompt, token_ids) in zip(lp, batch):
                comps.append(Completion(t.id, k, prompt, token_ids, row[:len(token_ids)].tolist(),
                                        tok.decode(token_ids, skip_special_tokens=True), True))
    store = Store(cfg.db_url, run_dir)
    store.set_meta("config", cfg.model_dump(mode="json"))
    store.add_tasks(tasks, "train")
    store.publish_version(0, None, "base", None, {}, round=0)
    store_rollout(store, 1, 0, {"seeded_by": "benchmarks/load_annotators.py"}, {t.id: t for t in tasks}, comps)
    rollout = store.rollout_for_round(1)
    n_ok = sum(c.verification.correct for c in rollout.completions)
    if n_ok != n_tasks * n_traces:
        raise RuntimeError(f"seeded traces: {n_ok} verified, expected {n_tasks * n_traces}")
    for i in range(n_annotators):
        create_user(store, f"annotator{i:02d}", PASSWORD)
    store.engine.dispose()
    return config_path


def serve(run_dir: Path, port: int) -> None:
    """Server process: the app on the loopback interface until terminated."""
    from rlhf_workbench.app.build import launch
    from rlhf_workbench.config import load_config

    launch(load_config(run_dir / "config.yaml"), run_dir, host=LOOPBACK, port=port, block=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"app exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url + "/", timeout=5) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"app did not answer within {timeout:.0f} s:\n{log.read_text()[-4000:]}")


# --- 4: the annotators ------------------------------------------------------------------------------
class Recorder:
    """Thread-safe counters and latencies."""

    def __init__(self):
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = {}
        self.errors: dict[str, int] = {}
        self.error_examples: list[str] = []
        self.sent = 0
        self.acked: set[tuple[str, int, str]] = set()
        self.refused: list[str] = []
        self.empty = 0

    def lat(self, op: str, seconds: float) -> None:
        with self.lock:
            self.latency.setdefault(op, []).append(seconds)

    def error(self, op: str, e: BaseException | str) -> None:
        with self.lock:
            self.errors[op] = self.errors.get(op, 0) + 1
            if len(self.error_examples) < 10:
                self.error_examples.append(f"{op}: {e!r}"[:300])


class GradioClientSession:
    """An annotator through ``gradio_client.Client(url, auth=...)`` (queue join + SSE per call)."""

    def __init__(self, url: str, user: str):
        from gradio_client import Client

        self.client = Client(url, auth=(user, PASSWORD), verbose=False, analytics_enabled=False,
                             download_files=False, httpx_kwargs={"timeout": CALL_TIMEOUT_S})
        self.cookies = self.client.cookies

    def call(self, api_name: str, *args):
        return self.client.submit(*args, api_name=f"/{api_name}").result(timeout=CALL_TIMEOUT_S)

    def close(self) -> None:
        self.client.close()


class HttpSession:
    """An annotator through Gradio's documented HTTP API with plain ``httpx``: ``POST /login``,
    then ``POST /gradio_api/call/<api>`` (an event id) and ``GET /gradio_api/call/<api>/<id>``
    (server-sent events up to ``complete``). Lighter on the client than ``gradio_client``."""

    def __init__(self, url: str, user: str):
        import httpx

        self.http = httpx.Client(base_url=url, timeout=CALL_TIMEOUT_S, trust_env=False)
        r = self.http.post("/login", data={"username": user, "password": PASSWORD})
        r.raise_for_status()
        self.cookies = dict(self.http.cookies)

    def call(self, api_name: str, *args):
        r = self.http.post(f"/gradio_api/call/{api_name}", json={"data": list(args)})
        r.raise_for_status()
        event = None
        with self.http.stream("GET", f"/gradio_api/call/{api_name}/{r.json()['event_id']}") as stream:
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event in ("complete", "error"):
                    data = json.loads(line[5:])
                    if event == "error":
                        raise RuntimeError(f"{api_name}: {data}")
                    return data[0]
        raise RuntimeError(f"{api_name}: event stream ended without a result")

    def close(self) -> None:
        self.http.close()


CLIENTS = {"gradio_client": GradioClientSession, "http": HttpSession}


def annotator(url: str, user: str, deadline: float, rec: Recorder, seed: int, kind: str = "gradio_client") -> None:
    """One annotator: log in, fetch the page (every 10th item), then next_item -> submit until
    ``deadline``; every call is bounded by ``CALL_TIMEOUT_S``."""
    import httpx

    rng = random.Random(seed)
    t = time.perf_counter()
    try:
        session = CLIENTS[kind](url, user)
    except Exception as e:  # noqa: BLE001 - counted and reported
        rec.error("connect", e)
        return
    rec.lat("connect", time.perf_counter() - t)
    page = httpx.Client(base_url=url, cookies=session.cookies, timeout=CALL_TIMEOUT_S, trust_env=False)
    try:
        n = 0
        while time.perf_counter() < deadline:
            if n % 10 == 0:  # the annotation page itself, as a browser reload would fetch it
                t = time.perf_counter()
                try:
                    r = page.get("/")
                    r.raise_for_status()
                    rec.lat("page", time.perf_counter() - t)
                except Exception as e:  # noqa: BLE001
                    rec.error("page", e)
            n += 1
            t = time.perf_counter()
            try:
                item = json.loads(session.call("next_item"))
                rec.lat("next_item", time.perf_counter() - t)
            except Exception as e:  # noqa: BLE001
                rec.error("next_item", e)
                continue
            if item is None:  # nothing left for this annotator
                with rec.lock:
                    rec.empty += 1
                time.sleep(min(1.0, max(0.0, deadline - time.perf_counter())))
                continue
            if "error" in item:
                rec.error("next_item", item["error"])
                continue
            submit_random_ranking(session, item, user, rng, rec)
    finally:
        page.close()
        session.close()


def submit_random_ranking(session, item: dict, user: str, rng: random.Random, rec) -> bool:
    """Rank a served item's traces in a random order (ties 20 % of the time) and submit it,
    recording sent / acknowledged / refused / latency in ``rec``. Returns False when the call
    itself failed (recorded as an error), True otherwise."""
    ids = list(item["completion_ids"])
    rng.shuffle(ids)
    ranks = {str(cid): (k if rng.random() > 0.2 else max(0, k - 1)) for k, cid in enumerate(ids)}
    key = (user, int(item["rollout_id"]), str(item["task_id"]))
    with rec.lock:
        rec.sent += 1
    t = time.perf_counter()
    try:
        status = session.call("submit", item["rollout_id"], item["task_id"], json.dumps(ranks),
                              f"load test {user}", "[]", item.get("revision", -1), "[]")
        rec.lat("submit", time.perf_counter() - t)
    except Exception as e:  # noqa: BLE001
        rec.error("submit", e)
        return False
    with rec.lock:
        if str(status).startswith("ok"):
            rec.acked.add(key)
        else:
            rec.refused.append(f"{user}: {status}"[:300])
    return True


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process (Linux ``/proc``), None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def percentile(xs: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default method) of ``xs``, in milliseconds."""
    if not xs:
        return None
    xs = sorted(xs)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return 1000 * (xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


def stored_submissions(run_dir: Path) -> set[tuple[str, int, str]]:
    from sqlalchemy import select

    from rlhf_workbench.store import Annotation, Store, User

    store = Store(run_dir=run_dir)
    with store.session() as s:
        rows = s.execute(select(User.username, Annotation.rollout_id, Annotation.task_id)
                         .join(User, User.id == Annotation.user_id).where(Annotation.status == "submitted")).all()
    store.engine.dispose()
    return {(u, int(r), str(t)) for u, r, t in rows}


def run_load_test(n_annotators: int, seconds: float, n_tasks: int, n_traces: int, annotators_per_item: int,
                  keep: Path | None = None, client: str = "gradio_client") -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="rlhf-load-"))
    proc = None
    try:
        t0 = time.perf_counter()
        seed_run(run_dir, n_tasks, n_traces, n_annotators, annotators_per_item)
        seed_s = time.perf_counter() - t0
        port = free_port()
        url = f"http://{LOOPBACK}:{port}"
        log = run_dir / "server.log"
        with open(log, "w") as logf:
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve", str(run_dir),
                                     "--port", str(port)], stdout=logf, stderr=subprocess.STDOUT)
        startup_s = wait_until_up(url, proc, log)
        rec = Recorder()
        deadline = time.perf_counter() + seconds
        threads = [threading.Thread(target=annotator, args=(url, f"annotator{i:02d}", deadline, rec, i, client),
                                    daemon=True)
                   for i in range(n_annotators)]
        load_before = os.getloadavg()
        server_cpu0, client_cpu0 = process_cpu_s(proc.pid), time.process_time()
        t_start = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=seconds + 2 * CALL_TIMEOUT_S + 30)
        wall = time.perf_counter() - t_start
        server_cpu1, client_cpu1 = process_cpu_s(proc.pid), time.process_time()
        load_after = os.getloadavg()
        hung = sum(th.is_alive() for th in threads)
        stored = stored_submissions(run_dir)
        lost = rec.acked - stored
        per_item: dict[tuple[int, str], int] = {}
        for _, rollout_id, task_id in stored:
            per_item[(rollout_id, task_id)] = per_item.get((rollout_id, task_id), 0) + 1
        result = {
            "annotators": n_annotators, "seconds": seconds, "tasks": n_tasks, "verified_traces_per_task": n_traces,
            "annotators_per_item": annotators_per_item, "client": client, "seed_s": round(seed_s, 2), "server_startup_s": round(startup_s, 2),
            "wall_s": round(wall, 2), "sent": rec.sent, "acknowledged": len(rec.acked), "refused": len(rec.refused),
            "stored": len(stored), "lost": len(lost), "stored_unacknowledged": len(stored - rec.acked),
            "errors": sum(rec.errors.values()), "errors_by_call": rec.errors, "error_examples": rec.error_examples,
            "refused_examples": rec.refused[:10], "next_item_empty": rec.empty, "hung_clients": hung,
            "items_covered": len(per_item), "max_annotators_on_an_item": max(per_item.values(), default=0),
            "excess_submissions": sum(max(0, n - annotators_per_item) for n in per_item.values()),
            "submissions_per_s": round(len(stored) / wall, 2) if wall else None,
            "latency_ms": {op: {"n": len(xs), "p50": round(percentile(xs, 50), 1), "p95": round(percentile(xs, 95), 1),
                                "max": round(1000 * max(xs), 1)} for op, xs in sorted(rec.latency.items())},
            "cpu_s": {"server": None if server_cpu0 is None or server_cpu1 is None else round(server_cpu1 - server_cpu0, 1),
                      "clients": round(client_cpu1 - client_cpu0, 1)},
            "host": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                     "loadavg_1min_before": round(load_before[0], 2), "loadavg_1min_after": round(load_after[0], 2)},
        }
        return result
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        if keep is not None:
            shutil.copytree(run_dir, keep, dirs_exist_ok=True)
        shutil.rmtree(run_dir, ignore_errors=True)


def print_table(r: dict) -> None:
    print(f"\n{r['annotators']} annotators ({r['client']}), {r['seconds']:.0f} s, {r['tasks']} items x {r['verified_traces_per_task']} "
          f"verified traces, {r['annotators_per_item']} annotators per item")
    print(f"{'sent':>8} {'acked':>8} {'refused':>8} {'stored':>8} {'lost':>6} {'errors':>7} {'subm/s':>8}")
    print(f"{r['sent']:>8} {r['acknowledged']:>8} {r['refused']:>8} {r['stored']:>8} {r['lost']:>6} {r['errors']:>7} "
          f"{r['submissions_per_s']:>8}")
    print(f"items covered {r['items_covered']}, most annotators on one item {r['max_annotators_on_an_item']}, "
          f"submissions beyond {r['annotators_per_item']} per item {r['excess_submissions']}")
    print(f"\n{'call':<10} {'n':>6} {'p50 ms':>9} {'p95 ms':>9} {'max ms':>9}")
    for op, d in r["latency_ms"].items():
        print(f"{op:<10} {d['n']:>6} {d['p50']:>9} {d['p95']:>9} {d['max']:>9}")
    print(f"\nCPU during the run: server {r['cpu_s']['server']} s, clients {r['cpu_s']['clients']} s over "
          f"{r['wall_s']} s wall on {r['host']['cpus']} CPUs (1-min load {r['host']['loadavg_1min_before']} -> "
          f"{r['host']['loadavg_1min_after']})")
    if r["error_examples"] or r["refused_examples"]:
        print("\nexamples:", *r["error_examples"], *r["refused_examples"], sep="\n  ")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--annotators", type=int, default=20)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--tasks", type=int, default=400, help="items in the seeded rollout")
    p.add_argument("--traces", type=int, default=3, help="verified traces per item (one wrong trace is added)")
    p.add_argument("--annotators-per-item", type=int, default=2)
    p.add_argument("--client", choices=sorted(CLIENTS), default="gradio_client",
                   help="gradio_client.Client, or plain httpx against Gradio's /gradio_api/call/ HTTP API")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "load_annotators.json")
    p.add_argument("--keep", type=Path, default=None, help="copy the run directory (db, server log) here")
    p.add_argument("--serve", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.serve is not None:
        serve(a.serve, a.port)
        return 0
    result = run_load_test(a.annotators, a.seconds, a.tasks, a.traces, a.annotators_per_item, a.keep,
                           a.client)
    print_table(result)
    _common.write_result(result, a.out)
    print(f"\nwritten to {a.out}")
    return 0 if result["lost"] == 0 and result["stored"] >= result["acknowledged"] else 1


if __name__ == "__main__":
    sys.exit(main())
