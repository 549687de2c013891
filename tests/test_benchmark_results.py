"""The committed benchmark results hold no path of the machine that wrote them, and the shared
writer (``benchmarks/_common.write_result``) keeps it so and records the processor."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
RESULTS = sorted((BENCH / "results").glob("*.json"))

# an absolute path: a top-level directory of a Unix file system (or a Windows drive) first, or one
# of the usual machine-specific directories anywhere in the string (e.g. in an error message)
_ROOTS = ("bin", "boot", "data", "dev", "etc", "gpfs", "home", "lib", "media", "mnt", "nix", "opt", "private",
          "proc", "root", "run", "scratch", "srv", "sys", "tmp", "usr", "var", "work", "Users", "Volumes")
ABSOLUTE = re.compile(rf"^/({'|'.join(_ROOTS)})(/|$)|/(work|home|tmp|root|Users)/|^[A-Za-z]:\\")


def absolute_paths(value, where: str = "") -> list[str]:
    """``where: string`` for every string (key or value) in a JSON tree that holds an absolute path."""
    if isinstance(value, dict):
        return [hit for k, v in value.items() for hit in absolute_paths(k, f"{where}.{k} (key)")
                + absolute_paths(v, f"{where}.{k}")]
    if isinstance(value, list):
        return [hit for i, v in enumerate(value) for hit in absolute_paths(v, f"{where}[{i}]")]
    return [f"{where}: {value}"] if isinstance(value, str) and ABSOLUTE.search(value) else []


def test_the_detector_finds_absolute_paths():
    bad = {"settings": {"data_dir": "/work/shared/data", "model": "/tmp/pytest-0/tiny"},
           "log": "see /home/me/run/serve.log", "runs": ["/root/.cache/x"]}
    assert len(absolute_paths(bad)) == 4
    fine = {"data_dir": "../shared/data", "model": "smollm2-135m", "ratios": {"bf16/steps_per_s": 1.8},
            "endpoint": "/gradio_api/call/submit", "unit": "tokens/s"}
    assert absolute_paths(fine) == []


@pytest.mark.parametrize("path", RESULTS, ids=[p.name for p in RESULTS])
def test_committed_results_hold_no_absolute_path(path):
    assert absolute_paths(json.loads(path.read_text())) == []


def test_writer_makes_paths_portable_and_records_the_processor(tmp_path):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import _common

    result = {"settings": {"data_dir": str(_common.ROOT.parent / "shared" / "data"),
                           "model": "/usr/share/tiny-llama",  # neither in nor beside the repository
                           "config": str(_common.ROOT / "configs" / "x.yaml"),
                           "sizes": [1, 2], "endpoint": "/gradio_api/call/submit"}}
    out = _common.write_result(result, tmp_path / "r.json")
    on_disk = json.loads(out.read_text())
    assert absolute_paths(on_disk) == []
    assert on_disk["settings"] == {"data_dir": "../shared/data", "model": "tiny-llama", "config": "configs/x.yaml",
                                   "sizes": [1, 2], "endpoint": "/gradio_api/call/submit"}
    cpu = on_disk["processor"]
    assert cpu == result["processor"] == _common.processor_info()
    assert isinstance(cpu["model"], str) and cpu["model"] and isinstance(cpu["amx"], bool)
    assert cpu["cores"] >= cpu["usable_cores"] >= 1
    assert cpu["amx"] == bool({"amx_bf16", "amx_tile"} & set(cpu["bf16_flags"]))
