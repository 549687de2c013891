"""The machine's limit: measured peak matmul FLOP/s (fp32 and bf16) with ``torch.matmul``.

Square ``n × n`` matmuls (default n = 1024, 1536, 2048; ``2·n³`` FLOPs each) with
``--threads`` torch threads (default: all cores). Each size is warmed up, then repeated until
``--seconds`` have passed; the peak is the best size's rate. bf16 is a pure bf16 matmul
(what ``torch.autocast(dtype=bfloat16)`` runs, on this CPU through AVX512-BF16/AMX where
present). The training benchmarks divide their achieved model FLOP/s by this number (MFU).

    python benchmarks/machine_peak.py            # writes benchmarks/results/machine_peak.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # for `import _common` (and the workers)
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

DTYPES = ("fp32", "bf16")
SIZES = (1024, 1536, 2048)


def _torch_dtype(dtype):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
            "bfloat16": torch.bfloat16}[dtype]


def matmul_flops_by_size(dtype="fp32", threads: int | None = None, sizes=SIZES, seconds: float = 1.0,
                         warmup: int = 2) -> dict[int, float]:
    """Measured FLOP/s of ``torch.matmul`` on square ``n × n`` operands, per ``n``.

    Args:
        dtype: ``"fp32"``/``"bf16"`` or a torch dtype.
        threads: torch intra-op threads for the measurement (restored afterwards); default all cores.
        sizes: the ``n`` to try.
        seconds: minimum timed duration per size (at least 3 matmuls).
        warmup: untimed matmuls per size first.
    """
    import torch

    from rlhf_workbench.model.loading import matmul_flops  # also what `mixed_precision: auto` measures

    dt = _torch_dtype(dtype)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    out = {}
    try:
        gen = torch.Generator().manual_seed(0)
        for n in sizes:
            out[n] = matmul_flops(dt, n, seconds, warmup, min_reps=3, generator=gen)
    finally:
        torch.set_num_threads(previous)
    return out


def peak_flops(dtype="fp32", threads: int | None = None, sizes=SIZES, seconds: float = 1.0) -> float:
    """Peak matmul FLOP/s of this machine for ``dtype`` with ``threads`` torch threads
    (the best of :func:`matmul_flops_by_size`)."""
    return max(matmul_flops_by_size(dtype, threads, sizes, seconds).values())


def measure(threads: int | None = None, sizes=SIZES, seconds: float = 1.0, dtypes=DTYPES) -> dict:
    """``{dtype: {"peak_flops": ..., "by_size": {n: flops}}}`` for each dtype."""
    out = {}
    for d in dtypes:
        by = matmul_flops_by_size(d, threads, sizes, seconds)
        out[d] = {"peak_flops": max(by.values()), "by_size": {str(k): v for k, v in by.items()}}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated square sizes")
    ap.add_argument("--seconds", type=float, default=2.0, help="timed seconds per size and dtype")
    ap.add_argument("--quick", action="store_true", help="small sizes, short timing (smoke run)")
    ap.add_argument("--out", default=str(_common.RESULTS / "machine_peak.json"))
    args = ap.parse_args(argv)
    sizes = tuple(int(s) for s in args.sizes.split(","))
    if args.quick:
        sizes, args.seconds = (256, 512), 0.2
    busy = _common.warn_if_busy()
    peaks = measure(args.threads, sizes, args.seconds)
    result = {"settings": {"threads": args.threads, "sizes": list(sizes), "seconds": args.seconds,
                           "quick": args.quick},
              "device": _common.device_info(args.threads),
              "machine_busy_at_start": busy,
              "peak_flops": {d: v["peak_flops"] for d, v in peaks.items()},
              "by_size": {d: v["by_size"] for d, v in peaks.items()},
              "ratios": {"bf16_vs_fp32": _common.finite_ratio(peaks["bf16"]["peak_flops"],
                                                               peaks["fp32"]["peak_flops"])}}
    _common.print_table(f"peak matmul GFLOP/s ({args.threads} threads)", ["n", *DTYPES],
                        [[n, *(peaks[d]["by_size"][str(n)] / 1e9 for d in DTYPES)] for n in sizes]
                        + [["peak", *(peaks[d]["peak_flops"] / 1e9 for d in DTYPES)]])
    _common.write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
