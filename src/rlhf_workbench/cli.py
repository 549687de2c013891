"""The ``rlhf`` command line (typer)."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Online RLHF Workbench")
console = Console()


@app.callback()
def main() -> None:
    """Online RLHF Workbench: sample, verify, rank and update a causal LM online."""


def _parse_overrides(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise typer.BadParameter(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


@app.command()
def run(
    config: Path = typer.Option(..., "--config", "-c", help="YAML run config"),
    out: Path = typer.Option(None, "--out", "-o", help="run directory (default runs/<config name>)"),
    set_: list[str] = typer.Option([], "--set", help="override a config field, e.g. --set tasks.path=x.jsonl"),
) -> None:
    """Run (or resume) the online loop: rollout -> verify -> feedback -> update -> evaluate."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .config import ConfigError, load_config
    from .loop import run as run_loop
    from .tasks import TaskFormatError

    try:
        cfg = load_config(config, _parse_overrides(set_))
        run_loop(cfg, out or Path("runs") / config.stem, console)
    except (ConfigError, TaskFormatError, ValueError, FileNotFoundError) as e:
        console.print(f"[bold red]error[/]: {e}")
        raise typer.Exit(2)


if __name__ == "__main__":
    app()
