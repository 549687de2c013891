"""Helpers shared by the throughput benchmarks: isolated workers, peak memory, FLOP counts,
result files and tables.

Peak memory is the peak resident set size (``VmHWM``) of the process that runs one system.
On Linux the high-water mark is reset (``/proc/self/clear_refs`` ← ``5``) right before the
measured work, so the number covers that work (plus whatever the process already held:
``rss_start_mb`` says how much). Training systems run in forked child processes (one per
system, forked from a fork server that has only imported the libraries), so one system's
freed-but-cached memory never counts for the next.
"""

from __future__ import annotations

import copy
import json
import math
import multiprocessing as mp
import multiprocessing.connection
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]  # the repository
RESULTS = Path(__file__).resolve().parent / "results"
SHARED_DATA = Path(os.environ.get("RLHF_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers are used on both sides of a fork


def _loadavg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


# The load average when the benchmark script started (this module is imported first thing);
# :func:`write_result` records it beside the load at the end.
LOAD_AT_START = _loadavg()


# --------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------


def _status_kb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float:
    """Current resident set size of this process, MiB (NaN where unavailable)."""
    kb = _status_kb("VmRSS")
    return float("nan") if kb is None else kb / 1024


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS high-water mark (Linux ≥ 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident set size of this process since start or the last :func:`reset_peak_rss`, MiB."""
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        if sys.platform == "darwin":
            kb /= 1024
    return kb / 1024


# --------------------------------------------------------------------------------------------
# isolated workers
# --------------------------------------------------------------------------------------------


def _child(conn, fn, args, kwargs):
    try:
        conn.send(("ok", fn(*args, **kwargs)))
    except BaseException as e:  # noqa: BLE001 - report everything to the parent
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        conn.close()


# Imported once by the fork server, so that each worker forked from it starts with them loaded.
PRELOAD = ["torch", "transformers", "accelerate", "datasets", "trl.trainer.dpo_trainer", "trl.trainer.grpo_trainer",
           "rlhf_workbench.train.grpo", "rlhf_workbench.train.dpo", "rlhf_workbench.model.rollout", "rlhf_workbench.model.loading", "rlhf_workbench.verify"]


def _context():
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _start(ctx, fn, args, kwargs):
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, args, kwargs))
    proc.start()
    child.close()
    return proc, parent


def _result(name: str, status: str, value: Any) -> Any:
    if status != "ok":
        raise RuntimeError(f"{name} failed in its worker:\n{value}")
    return value


def run_isolated(fn: Callable, *args, isolate: bool = True, **kwargs) -> Any:
    """``fn(*args, **kwargs)`` in a fresh worker process (its own peak memory), or in this
    process when ``isolate`` is False. ``fn`` must be a module-level function of an importable
    module (or of the script being run); arguments and result must be picklable.

    Workers are forked from a ``multiprocessing`` fork server that has only imported
    :data:`PRELOAD` (fast start, and no OpenMP thread pool inherited from a process that already
    ran torch compute: a plain ``fork`` of such a process hangs at its first parallel op).
    Falls back to ``spawn`` where there is no fork server.

    Raises:
        RuntimeError: the worker raised (its traceback is in the message) or died.
    """
    if not isolate:
        return fn(*args, **kwargs)
    proc, conn = _start(_context(), fn, args, kwargs)
    try:
        status, value = conn.recv()
    except EOFError:
        proc.join()
        raise RuntimeError(f"{getattr(fn, '__name__', fn)}: worker died (exit code {proc.exitcode})") from None
    proc.join()
    return _result(getattr(fn, "__name__", str(fn)), status, value)


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere), so
    that a worker waiting for its turn holds only its live memory (model, optimizer state) and
    not the buffers of its last step."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Baton:
    """Turn-taking between worker processes that run side by side: a worker calls :meth:`take`
    before each step and :meth:`pass_on` after it, so that the steps of the systems alternate
    (worker 0, 1, ..., 0, 1, ...) and a slow or fast spell of the machine falls on all of them
    alike. The first :meth:`take` also waits until every worker has finished its set-up (loading
    the model, tokenizing), so that no set-up work runs beside a timed step.

    Made by :func:`run_interleaved`, which hands worker ``i`` its copy as ``spec["baton"]``.
    """

    def __init__(self, ctx, n: int, timeout_s: float = 1800.0):
        self.turns = [ctx.Semaphore(0) for _ in range(n)]
        self.ready = ctx.Barrier(n)
        self.index, self.timeout_s, self._started = 0, timeout_s, False

    def take(self) -> None:
        """Block until it is this worker's turn.

        Raises:
            TimeoutError: no turn within ``timeout_s`` (another worker stalled).
        """
        if not self._started:
            self._started = True
            self.ready.wait(self.timeout_s)
            if self.index == 0:
                self.turns[0].release()
        if not self.turns[self.index].acquire(timeout=self.timeout_s):
            raise TimeoutError(f"worker {self.index}: no turn within {self.timeout_s:.0f} s")

    def pass_on(self) -> None:
        """Give the turn to the next worker."""
        self.turns[(self.index + 1) % len(self.turns)].release()


def run_interleaved(fns: dict[str, Callable], spec: dict) -> dict[str, Any]:
    """Each ``fns[name](spec)`` in its own worker process (as :func:`run_isolated`: own peak
    memory), all alive together and taking turns step by step through ``spec["baton"]``, a
    :class:`Baton` (order: that of ``fns``). Every worker must run the same number of steps.

    Returns:
        ``{name: result}``.

    Raises:
        RuntimeError: a worker raised or died (the others are then terminated).
    """
    ctx = _context()
    baton = Baton(ctx, len(fns))
    running = {}
    for i, (name, fn) in enumerate(fns.items()):
        mine = copy.copy(baton)  # same semaphores, own index
        mine.index = i
        running[name] = _start(ctx, fn, ({**spec, "baton": mine},), {})
    results: dict[str, Any] = {}
    try:
        while len(results) < len(running):
            pending = {conn: name for name, (proc, conn) in running.items() if name not in results}
            for conn in mp.connection.wait(list(pending)):
                name = pending[conn]
                try:
                    status, value = conn.recv()
                except EOFError:
                    raise RuntimeError(f"{name}: worker died (exit code {running[name][0].exitcode})") from None
                results[name] = _result(name, status, value)
    finally:
        for proc, _ in running.values():
            if proc.is_alive() and len(results) < len(running):
                proc.terminate()
            proc.join()
    return results


# --------------------------------------------------------------------------------------------
# model FLOPs
# --------------------------------------------------------------------------------------------


def matmul_params(model) -> int:
    """``N`` of the 6·N·D rule: every parameter that takes part in a matmul per token.

    All parameters, counted once (``model.parameters()`` de-duplicates tied weights), minus
    the input embedding when it is *not* tied to the LM head (a lookup, no FLOPs). With tied
    embeddings (SmolLM2) the shared matrix stays in: it is the LM-head matmul. Norm weights
    are included (negligible). Attention-score FLOPs (∝ sequence length) are not counted.
    """
    n = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if emb is not None and (head is None or head.weight is not emb.weight):
        n -= emb.weight.numel()
    return n


# --------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------


def _cpuinfo_field(name: str) -> str | None:
    """The first ``name : value`` of ``/proc/cpuinfo`` (None where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == name:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def processor_info() -> dict:
    """The processor a benchmark ran on, written into every result file (:func:`write_result`):
    ``model`` (lscpu's "Model name", else ``/proc/cpuinfo``'s "model name"), ``amx`` (the
    ``amx_bf16``/``amx_tile`` flags: Intel AMX, where bf16 matmuls run ~6× fp32; AVX512-BF16
    alone gives ~2×), ``bf16_flags`` (the bf16 matmul flags present), ``cores`` (logical CPUs)
    and ``usable_cores`` (those this process may run on)."""
    import subprocess

    name = None
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10,
                             env={**os.environ, "LC_ALL": "C"}).stdout
        name = next((line.split(":", 1)[1].strip() for line in out.splitlines()
                     if line.split(":", 1)[0].strip() == "Model name"), None)
    except (OSError, subprocess.SubprocessError):
        pass
    name = name or _cpuinfo_field("model name") or platform.processor() or platform.machine()
    flags = set((_cpuinfo_field("flags") or "").split())
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {"model": name, "amx": bool(flags & {"amx_bf16", "amx_tile"}),
            "bf16_flags": sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"}),
            "cores": os.cpu_count(), "usable_cores": usable}


def device_info(threads: int) -> dict:
    """The software and processor a benchmark ran with (``cpu``, ``cores``, ``torch_threads``,
    library versions, ``bf16_matmul_units``, ``cuda``) and the load average when it was called."""
    import torch

    cpu = processor_info()
    out = {"cpu": cpu["model"], "cores": cpu["cores"], "torch_threads": threads, "torch": torch.__version__,
           "python": platform.python_version(), "bf16_matmul_units": cpu["bf16_flags"],
           "cuda": torch.cuda.is_available()}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        import trl

        out["trl"] = trl.__version__
    except ImportError:
        pass
    try:
        out["load_average_at_start"] = list(os.getloadavg())
    except OSError:
        pass
    return out


def warn_if_busy() -> bool:
    """Print a warning and return True when the 1-minute load average is above half the cores
    (other work running: timings are contaminated)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return False
    cores = os.cpu_count() or 1
    if load > 0.5 * cores:
        print(f"WARNING: load average {load:.2f} on {cores} cores: other processes are running, "
              "timings will be contaminated", file=sys.stderr, flush=True)
        return True
    return False


def finite_ratio(ours: float, peer: float) -> float:
    """``ours / peer`` (NaN when either is missing or the peer is 0)."""
    if not ours or not peer or not math.isfinite(ours) or not math.isfinite(peer):
        return float("nan")
    return ours / peer


def portable_path(path: str) -> str:
    """An absolute path as a committed result file should hold it: relative to the repository
    root when inside it or beside it (``../shared/data``), else only its last part (a temporary
    directory, a home directory: nothing another machine can use)."""
    rel = os.path.relpath(path, ROOT)
    return rel if not rel.startswith(os.pardir + os.sep + os.pardir) else Path(path).name


def _is_local_path(value: str) -> bool:
    """An absolute filesystem path of this machine (``/work/...``, ``/tmp/...``): starts with
    ``/`` and its first part exists here (so ``/gradio_api/call`` or ``/s`` is left alone)."""
    if not value.startswith("/") or len(value) < 2 or "\n" in value:
        return False
    first = value[1:].split("/", 1)[0]
    return bool(first) and os.path.exists("/" + first)


def portable_paths(value: Any) -> Any:
    """``value`` (a JSON-like tree) with every string that is an absolute path of this machine
    replaced by :func:`portable_path`."""
    if isinstance(value, dict):
        return {k: portable_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable_paths(v) for v in value]
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str) and _is_local_path(value):
        return portable_path(value)
    return value


def command_line(script: str | Path | None = None, argv: list[str] | None = None) -> str:
    """The command that ran the benchmark, as a result file records it: ``python
    benchmarks/<script>.py`` and its arguments (``argv``, else ``sys.argv[1:]``; quoted as a shell
    would need, absolute paths made portable). ``script`` defaults to ``sys.argv[0]``."""
    import shlex

    script = Path(script or sys.argv[0]).resolve()
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["python", portable_path(str(script)), *(portable_paths(a) for a in args)])


def write_result(result: dict, out: str | Path, command: str | None = None) -> Path:
    """Write ``result`` as JSON to ``out``, with the processor it ran on (``processor``,
    :func:`processor_info`), the load average at the start of the script and now (``load``:
    ``at_start``, ``at_end``, 1/5/15-minute averages, and ``cores``), the command that made it
    (``command``: ``command`` when given, else the one already in ``result``, else
    :func:`command_line` of this process) -- all added to ``result`` too -- and paths made
    portable (:func:`portable_paths`), so that a committed file holds no path of the machine
    that wrote it. Never edit these fields by hand: rerun the script."""
    out = Path(out)
    result.setdefault("processor", processor_info())
    if command is not None:
        result["command"] = command
    result.setdefault("command", command_line())
    result["load"] = {"at_start": LOAD_AT_START, "at_end": _loadavg(), "cores": os.cpu_count()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(portable_paths(result), indent=2, default=str) + "\n")
    return out


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """A rich table (plain text when rich is missing)."""
    def fmt(v):
        if isinstance(v, float):
            if not math.isfinite(v):
                return "—"
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
        return str(v)

    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        print(" | ".join(columns))
        for r in rows:
            print(" | ".join(fmt(v) for v in r))
        return
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="left" if c == columns[0] else "right")
    for r in rows:
        table.add_row(*(fmt(v) for v in r))
    Console(width=max(100, 20 * len(columns))).print(table)


class Stamps:
    """Per-step wall-clock seconds: from :meth:`begin` (the worker's turn, when a :class:`Baton`
    is given) to :meth:`step_done` (which passes the turn on)."""

    def __init__(self, baton: Baton | None = None):
        self.baton = baton
        self.starts: list[float] = []
        self.ends: list[float] = []

    def begin(self) -> None:
        if self.baton is not None:
            self.baton.take()
        self.starts.append(time.perf_counter())

    def step_done(self) -> None:
        self.ends.append(time.perf_counter())
        if self.baton is not None:
            release_free_memory()  # the next worker's step gets the room this one no longer uses
            self.baton.pass_on()

    def step_seconds(self) -> list[float]:
        return [e - s for s, e in zip(self.starts, self.ends)]

    def spans(self) -> list[tuple[float, float]]:
        """``(start, end)`` of each step in ``time.perf_counter`` seconds (CLOCK_MONOTONIC on
        Linux: comparable between processes, so the turn-taking can be checked)."""
        return list(zip(self.starts, self.ends))

    def timed_seconds(self, warmup: int) -> float:
        """Seconds of the steps after the first ``warmup``."""
        return sum(self.step_seconds()[warmup:])
