"""The house rules of ``src/rlhf_workbench`` (README "Architecture"), checked on the source.

* the import-linter layers contract in ``pyproject.toml`` (``lint-imports``) holds;
* no module over :data:`MAX_MODULE_LINES` lines, no function over :data:`MAX_FUNCTION_LINES`;
* no import of a project module inside a function, except in the CLI, whose commands import
  what they run lazily so that ``rlhf --help`` does not load torch, transformers or Gradio
  (:mod:`rlhf_workbench.cli`'s docstring);
* no underscore (private) name imported from another module;
* no import cycle between the project's modules (grimp, import-linter's graph).

Each check collects every violation and asserts the list is empty, so a failure names the
file, line and name at fault.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "rlhf_workbench"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
LAZY_IMPORTS_ALLOWED = {"cli.py"}


def _modules() -> list[Path]:
    return sorted(PKG.rglob("*.py"))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _is_project(node: ast.ImportFrom | ast.Import) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.level > 0 or (node.module or "").split(".")[0] == "rlhf_workbench"
    return any(a.name.split(".")[0] == "rlhf_workbench" for a in node.names)


def module_size_violations() -> list[str]:
    """``path: N lines`` for every module over the limit."""
    out = []
    for p in _modules():
        n = len(p.read_text(encoding="utf-8").splitlines())
        if n > MAX_MODULE_LINES:
            out.append(f"{p.relative_to(ROOT)}: {n} lines")
    return out


def function_size_violations() -> list[str]:
    """``path:line name: N lines`` for every function (or method) over the limit."""
    out = []
    for p in _modules():
        for node in ast.walk(_tree(p)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    out.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    return out


def function_import_violations() -> list[str]:
    """``path:line in f: module`` for each project import inside a function."""
    out = []
    for p in _modules():
        if p.relative_to(PKG).as_posix() in LAZY_IMPORTS_ALLOWED:
            continue
        for node in ast.walk(_tree(p)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    if isinstance(sub, (ast.Import, ast.ImportFrom)) and _is_project(sub):
                        what = sub.module if isinstance(sub, ast.ImportFrom) else sub.names[0].name
                        out.append(f"{p.relative_to(ROOT)}:{sub.lineno} in {node.name}: {what}")
    return sorted(set(out))


def private_import_violations() -> list[str]:
    """``path:line: module._name`` for each underscore name imported from a project module."""
    out = []
    for p in _modules():
        for node in ast.walk(_tree(p)):
            if isinstance(node, ast.ImportFrom) and _is_project(node):
                for a in node.names:
                    if a.name.startswith("_"):
                        out.append(f"{p.relative_to(ROOT)}:{node.lineno}: {node.module}.{a.name}")
    return out


def test_no_module_over_limit():
    assert module_size_violations() == []


def test_no_function_over_limit():
    assert function_size_violations() == []


def test_no_project_imports_inside_functions():
    assert function_import_violations() == []


def test_no_private_names_imported_across_modules():
    assert private_import_violations() == []


def test_checks_can_fail(tmp_path, monkeypatch):
    """Each check reports a planted violation (so an empty list means something)."""
    pkg = tmp_path / "src" / "rlhf_workbench"
    pkg.mkdir(parents=True)
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (pkg / "bad.py").write_text(
        "from rlhf_workbench.store import _private\n\n"
        f"def long():\n    from rlhf_workbench.store import Store\n{body}\n"
        + "\n" * MAX_MODULE_LINES
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PKG", pkg)
    assert module_size_violations() == [f"src/rlhf_workbench/bad.py: {MAX_MODULE_LINES + MAX_FUNCTION_LINES + 4} lines"]
    assert function_size_violations() == [f"src/rlhf_workbench/bad.py:3 long: {MAX_FUNCTION_LINES + 2} lines"]
    assert function_import_violations() == ["src/rlhf_workbench/bad.py:4 in long: rlhf_workbench.store"]
    assert private_import_violations() == ["src/rlhf_workbench/bad.py:1: rlhf_workbench.store._private"]


def test_import_layers_contract():
    """``lint-imports`` keeps the layers contract of ``pyproject.toml`` (it also runs in CI)."""
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    if not Path(exe).exists():
        pytest.skip("import-linter not installed")
    proc = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def import_cycles(package: str = "rlhf_workbench") -> list[list[str]]:
    """The strongly connected components of more than one module in ``package``'s import graph
    (Tarjan's algorithm over grimp's graph, every import counted, inside functions too)."""
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph(package)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return out


def test_no_import_cycles():
    assert import_cycles() == []


def test_cycle_check_can_fail(tmp_path, monkeypatch):
    """A planted two-module cycle is reported."""
    pkg = tmp_path / "cyclepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from cyclepkg import b\n")
    (pkg / "b.py").write_text("from cyclepkg import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_cycles("cyclepkg") == [["cyclepkg.a", "cyclepkg.b"]]
