"""Every benchmark figure in the README comes from a committed result file.

A figure is marked where it stands with an HTML comment right after its digits (invisible on
the rendered page)::

    ours **0.861<!-- result: train_throughput.json#dpo_hh.systems.ours.pairs_per_s .3f --> pairs/s**

naming the file in ``benchmarks/results/``, the key path in it (dots; list indices as numbers)
(it may hold spaces: the last word is the format) and how the README rounds it: a Python format spec, prefixed ``%`` for a fraction shown as a
percentage (x 100), ``G`` for MiB shown as GiB (/ 1024) or ``B`` for a count shown in billions
(FLOP/s as GFLOP/s) or ``M`` for seconds shown as minutes (/ 60); exponents are written without
leading zeros (``5e-21``). The test reads each value, formats it and fails on any mismatch; it
also checks that every file a figure comes from records the processor (model, AMX or not), the
load average at the start and the end, and the command that made it (written by the script:
``benchmarks/_common.write_result``), and that the text around a figure names the processor
vendor and does not call a busy machine quiet.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = (ROOT / "README.md").read_text(encoding="utf-8")

MARKER = re.compile(r"(-?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?)<!-- result: ([\w.\-]+\.json)#([^<>]+?) (\S+) -->")
ANY_MARKER = re.compile(r"<!-- result: ")

# Files written before write_result recorded the load at start and end and the command: each
# needs a re-run by its script (the list must shrink as they are re-run; it may never grow).
NEEDS_RERUN = {"active_learning.json", "bf16_ratio.json", "bf16_vs_fp32.json", "constitution_effect_critic_only.json",
               "demo.json", "e2e_app_rounds.json", "generation_throughput.json", "hh.json", "load_annotators.json",
               "load_annotators_http.json", "load_two_apps_postgres.json", "machine_peak.json", "memory.json",
               "reward_model_hh.json", "train_throughput.json",
               "train_throughput_grpo_beta0.04.json"}

# The figures marked today (a lower bound: removing markers fails the test).
MIN_FIGURES = 359


def format_figure(value, spec: str) -> str:
    """``value`` as the README writes it under ``spec`` (see the module docstring)."""
    if spec[0] == "%":
        value, spec = 100 * value, spec[1:]
    elif spec[0] == "G":
        value, spec = value / 1024, spec[1:]
    elif spec[0] == "B":
        value, spec = value / 1e9, spec[1:]
    elif spec[0] == "M":
        value, spec = value / 60, spec[1:]
    out = format(value, spec)
    return re.sub(r"e([-+])0*(\d)", lambda m: "e" + ("-" if m.group(1) == "-" else "") + m.group(2), out)


def lookup(data, path: str):
    """The value at ``path`` (dot-separated keys; a number indexes a list) in a JSON tree."""
    for part in path.split("."):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def figures(text: str = README) -> list[tuple[str, str, str, str, int]]:
    """``(shown, file, key, spec, offset)`` of every marked figure in ``text``."""
    return [(m.group(1), m.group(2), m.group(3), m.group(4), m.start()) for m in MARKER.finditer(text)]


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _block(offset: int) -> str:
    """The text a figure at ``offset`` stands in: its paragraph or list item; in a table, its row
    and the paragraph before the table (which speaks for every row)."""
    line_start = README.rfind("\n", 0, offset) + 1
    line = README[line_start: README.find("\n", offset)]
    if line.startswith("|"):
        table_start = README.rfind("\n\n", 0, offset)
        return README[README.rfind("\n\n", 0, table_start) + 2: table_start] + "\n" + line
    start = max(README.rfind("\n\n", 0, offset), README.rfind("\n- ", 0, offset))
    ends = [i for i in (README.find("\n\n", offset), README.find("\n- ", offset)) if i >= 0]
    return README[start: min(ends) if ends else len(README)]


def _nearest_vendor(offset: int) -> str | None:
    """The processor vendor named last before ``offset`` within its README section."""
    section = max(README.rfind("\n## ", 0, offset), README.rfind("\n### ", 0, offset))
    text = README[section:offset]
    found = {vendor: text.rfind(vendor) for vendor in ("Intel", "AMD")}
    best = max(found, key=found.get)
    return best if found[best] >= 0 else None


def _busy(data: dict) -> bool:
    if data.get("machine_busy_at_start") or data.get("machine_was_busy") or data.get("busy_at_start"):
        return True
    load = (data.get("load") or {}).get("at_start")
    cores = data["processor"].get("cores") if isinstance(data.get("processor"), dict) else 2
    return bool(load) and load[0] > 0.5 * cores


def _processor_name(data: dict) -> str | None:
    cpu, device = data.get("processor"), data.get("device")
    if isinstance(cpu, dict):
        return cpu.get("model")
    if isinstance(cpu, str):  # an early file wrote the name alone
        return cpu
    return device.get("cpu") if isinstance(device, dict) else None


def _vendor(data: dict) -> str | None:
    name = _processor_name(data) or ""
    return next((vendor for vendor in ("Intel", "AMD") if vendor in name), None)


def test_format_and_lookup():
    assert format_figure(0.6796875, "%.1f") == "68.0" and format_figure(7946.44, "G.2f") == "7.76"
    assert format_figure(5.36e-21, ".0e") == "5e-21" and format_figure(1992, ",d") == "1,992"
    assert format_figure(3.7e11, "B.0f") == "370" and format_figure(1.7263e-4, ".3e") == "1.726e-4"
    assert lookup({"a": [{"b": 3}]}, "a.0.b") == 3
    shown = figures("x **3.89<!-- result: t.json#ratios.x .2f -->** and 8<!-- result: t.json#y d --> s")
    assert [(s, f, k, spec) for s, f, k, spec, _ in shown] == [("3.89", "t.json", "ratios.x", ".2f"),
                                                               ("8", "t.json", "y", "d")]


def test_every_marker_is_well_formed():
    """A marker the pattern does not read (a typo, no digits before it) would be skipped silently."""
    assert len(ANY_MARKER.findall(README)) == len(figures())


def test_readme_figures_match_their_result_files():
    marked = figures()
    assert len(marked) >= MIN_FIGURES, f"{len(marked)} figures marked, expected at least {MIN_FIGURES}"
    wrong = []
    for shown, name, key, spec, offset in marked:
        try:
            value = lookup(_load(name), key)
        except (KeyError, IndexError, TypeError, FileNotFoundError) as e:
            wrong.append(f"{name}#{key}: missing ({type(e).__name__}: {e})")
            continue
        if isinstance(value, float) and not math.isfinite(value):
            wrong.append(f"{name}#{key}: {value}")
        elif format_figure(value, spec) != shown:
            wrong.append(f"{name}#{key}: README {shown}, file {format_figure(value, spec)} ({value!r}) "
                         f"at README line {README.count(chr(10), 0, offset) + 1}")
    assert wrong == []


def test_result_files_record_processor_load_and_command():
    """Every file a README figure comes from records the processor (model, AMX), the load at
    start and end, and the command; files written before the writer recorded them are listed in
    :data:`NEEDS_RERUN` (and must leave it once re-run)."""
    names = sorted({name for _, name, *_ in figures()})
    missing = set()
    for name in names:
        data = _load(name)
        cpu = data.get("processor") if isinstance(data.get("processor"), dict) else {}
        load = data.get("load") or {}
        complete = (isinstance(cpu.get("model"), str) and isinstance(cpu.get("amx"), bool)
                    and len(load.get("at_start") or []) == 3 and len(load.get("at_end") or []) == 3
                    and isinstance(data.get("command"), str) and data["command"].startswith("python benchmarks/"))
        if not complete:
            missing.add(name)
    assert missing <= NEEDS_RERUN, f"incomplete and not listed as needing a re-run: {sorted(missing - NEEDS_RERUN)}"
    assert not (NEEDS_RERUN - missing) & set(names), \
        f"re-run and complete now: remove from NEEDS_RERUN: {sorted((NEEDS_RERUN - missing) & set(names))}"


def test_figures_name_their_processor_and_never_call_a_busy_machine_quiet():
    """Results from an Intel and an AMD machine must not sit side by side unlabelled: the processor
    named last before a figure (in its section) is the one its file records; and a machine its
    file records as busy is not "quiet" in the text around the figure."""
    wrong = []
    for _, name, key, _, offset in figures():
        data = _load(name)
        vendor = _vendor(data)
        block = _block(offset)
        if vendor is None:
            if "processor not recorded" not in block:
                wrong.append(f"{name}: no processor recorded, and the text does not say so: {block[:80]!r}")
        elif _nearest_vendor(offset) != vendor:
            wrong.append(f"{name}#{key}: measured on {vendor}, but the nearest processor named before it in its "
                         f"section is {_nearest_vendor(offset)}: {block[:80]!r}")
        if _busy(data) and re.search(r"\bquiet\b", block):
            wrong.append(f"{name}#{key}: 'quiet' but the file records a busy machine: {block[:80]!r}")
    assert wrong == []


def test_the_check_fails_on_a_wrong_figure():
    """The comparison itself can fail: a marked figure off by one in its last digit is reported."""
    shown, name, key, spec, _ = figures()[0]
    value = lookup(_load(name), key)
    assert format_figure(value, spec) == shown
    assert format_figure(value * 1.5 + 1, spec) != shown


@pytest.mark.parametrize("sentence", ["within ±8 points", "5/64 = 7.8 %", "680 s", "1.84× in the other run",
                                      "2.99×)", "2.74×)", "on a quiet 2-core CPU"])
def test_figures_without_a_result_file_are_gone(sentence):
    assert sentence not in README
