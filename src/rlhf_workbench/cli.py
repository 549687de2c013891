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


user_app = typer.Typer(no_args_is_help=True, help="Annotator and admin accounts")
app.add_typer(user_app, name="user")


def _run_store(config: Path, out: Path | None, set_: list[str]):
    """The config and the database of the run ``rlhf run --config ... --out ...`` writes to."""
    from .config import load_config
    from .store import Store

    cfg = load_config(config, _parse_overrides(set_))
    return cfg, Store(cfg.db_url, out or Path("runs") / config.stem)


@user_app.command("add")
def user_add(
    username: str = typer.Argument(..., help="login name"),
    role: str = typer.Option("annotator", "--role", help="annotator or admin"),
    config: Path = typer.Option(..., "--config", "-c", help="YAML run config (locates the run's database)"),
    out: Path = typer.Option(None, "--out", "-o", help="run directory (default runs/<config name>)"),
    password: str = typer.Option(None, "--password", help="password (prompted twice, hidden, if omitted)"),
    set_: list[str] = typer.Option([], "--set", help="override a config field, e.g. --set db_url=postgresql://..."),
) -> None:
    """Create an annotator or admin account in the run's database."""
    from .annotation import ROLES, AnnotationError, create_user
    from .config import ConfigError

    try:
        if role not in ROLES:
            raise AnnotationError(f"--role must be one of {', '.join(ROLES)}, got {role!r}")
        cfg, store = _run_store(config, out, set_)
        if password is None:
            password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
        uid = create_user(store, username, password, role)
    except (ConfigError, AnnotationError, ValueError) as e:
        console.print(f"[bold red]error[/]: {e}")
        raise typer.Exit(2)
    console.print(f"created {role} {username!r} (id {uid}) in {store.url}")


@app.command()
def worker(
    config: Path = typer.Option(..., "--config", "-c", help="YAML run config"),
    out: Path = typer.Option(None, "--out", "-o", help="run directory (default runs/<config name>)"),
    set_: list[str] = typer.Option([], "--set", help="override a config field, e.g. --set feedback.min_rankings=4"),
) -> None:
    """Run the loop with expert feedback: after each rollout, wait for rankings from the web app."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .config import ConfigError, load_config
    from .loop import run as run_loop
    from .tasks import TaskFormatError

    try:
        cfg = load_config(config, {**_parse_overrides(set_), "feedback.source": "human"})
        run_loop(cfg, out or Path("runs") / config.stem, console)
    except (ConfigError, TaskFormatError, ValueError, FileNotFoundError) as e:
        console.print(f"[bold red]error[/]: {e}")
        raise typer.Exit(2)


@app.command("export")
def export_cmd(
    out_dir: Path = typer.Option(..., "--out-dir", help="where to write the preference dataset"),
    run_dir: Path = typer.Option(None, "--run", help="run directory holding workbench.db"),
    db_url: str = typer.Option(None, "--db-url", help="SQLAlchemy URL of the run's database"),
    source: str = typer.Option("all", "--source", help="human, rules or all"),
) -> None:
    """Write the collected rankings as a prompt/chosen/rejected preference dataset (JSONL, conversational JSONL, datasets)."""
    from .export import SOURCES, export_preferences
    from .store import Store

    try:
        if (run_dir is None) == (db_url is None):
            raise ValueError("give exactly one of --run RUNDIR or --db-url URL")
        if source not in SOURCES:
            raise ValueError(f"--source must be one of {', '.join(SOURCES)}, got {source!r}")
        if run_dir is not None and not (run_dir / "workbench.db").is_file():
            raise FileNotFoundError(f"{run_dir / 'workbench.db'} not found (a run with db_url set needs --db-url)")
        info = export_preferences(Store(db_url, run_dir), out_dir, source)
    except (ValueError, FileNotFoundError) as e:
        console.print(f"[bold red]error[/]: {e}")
        raise typer.Exit(2)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(info["by_source"].items())) or "none"
    console.print(f"wrote {info['pairs']} preference pairs ({counts}) to {out_dir}")


@app.command()
def serve(
    config: Path = typer.Option(..., "--config", "-c", help="YAML run config"),
    out: Path = typer.Option(None, "--out", "-o", help="run directory (default runs/<config name>)"),
    host: str = typer.Option("127.0.0.1", "--host", help="interface to listen on (0.0.0.0 for a network)"),
    port: int = typer.Option(7860, "--port", help="TCP port"),
    with_worker: bool = typer.Option(False, "--with-worker", help="also run the worker (the loop) in this process"),
    set_: list[str] = typer.Option([], "--set", help="override a config field, e.g. --set feedback.min_rankings=4"),
) -> None:
    """Serve the experts' web app (annotate, dashboard, playground); log in with `rlhf user add` accounts."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import threading

    from .config import ConfigError, load_config

    try:
        cfg = load_config(config, {**_parse_overrides(set_), "feedback.source": "human"})
    except (ConfigError, ValueError) as e:
        console.print(f"[bold red]error[/]: {e}")
        raise typer.Exit(2)
    run_dir = out or Path("runs") / config.stem
    from .app import launch

    if with_worker:
        from .loop import run as run_loop

        def work() -> None:
            try:
                run_loop(cfg, run_dir, console)
            except Exception as e:  # noqa: BLE001 - keep serving; the dashboard shows the last status
                console.print(f"[bold red]worker stopped[/]: {type(e).__name__}: {e}")

        threading.Thread(target=work, name="rlhf-worker", daemon=True).start()
    console.print(f"serving {run_dir} on http://{host}:{port} (feedback.source human"
                  + (", with the worker" if with_worker else "; start the worker with `rlhf worker`") + ")")
    launch(cfg, run_dir, host, port, block=True)


if __name__ == "__main__":
    app()
