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
    """``--set key=value`` options as ``{dotted key: YAML-parsed value}``.

    Raises:
        typer.BadParameter: an item without ``=``, an empty or malformed dotted key, or a value
            that is not valid YAML.
    """
    import re

    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise typer.BadParameter(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip()
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", k):
            raise typer.BadParameter(f"--set {item!r}: the key must be a dotted field path such as tasks.path")
        try:
            out[k] = yaml.safe_load(v)
        except yaml.YAMLError as e:
            raise typer.BadParameter(f"--set {item!r}: the value is not valid YAML ({e})") from None
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
    from .runlock import RunInUseError
    from .tasks import TaskFormatError

    try:
        cfg = load_config(config, _parse_overrides(set_))
        run_loop(cfg, out or Path("runs") / config.stem, console)
    except (ConfigError, TaskFormatError, ValueError, FileNotFoundError, RunInUseError) as e:
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
    role: str = typer.Option("annotator", "--role", help="annotator, playground or admin (see rlhf_workbench.auth)"),
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
    from .runlock import RunInUseError
    from .tasks import TaskFormatError

    try:
        cfg = load_config(config, {**_parse_overrides(set_), "feedback.source": "human"})
        run_loop(cfg, out or Path("runs") / config.stem, console)
    except (ConfigError, TaskFormatError, ValueError, FileNotFoundError, RunInUseError) as e:
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


def _progress(bar):
    """``progress(label, total) -> advance(n)`` factory on a rich Progress (for eval/compare)."""

    def make(label: str, total: int):
        job = bar.add_task(label, total=total)
        return lambda n: bar.advance(job, n)

    return make


def _eval_selection(tasks: str | None, run_dir: Path | None, models: list[str], **kw):
    """Questions for ``eval``/``compare``: ``--tasks``, ``--run``, or else the run one of the models
    belongs to. Returns ``(selection, run_config_or_None)``."""
    from .evaluate import find_run_dir, run_config, select_tasks

    if tasks is not None and run_dir is not None:
        raise ValueError("give --tasks PATH or --run RUN_DIR, not both (--run takes the run's task file)")
    if tasks is None and run_dir is None:
        run_dir = next((r for r in map(find_run_dir, models) if r is not None), None)
        if run_dir is None:
            raise ValueError("give --tasks PATH or --run RUN_DIR (no model is a checkpoint of a run)")
    if run_dir is not None and tasks is None:
        kw["seed"] = None  # the run's split seed; --seed then only seeds sampling
    sel = select_tasks(tasks, run_dir if tasks is None else None, **kw)
    return sel, (run_config(run_dir) if tasks is None else None)


def _gen_defaults(cfg: dict | None, max_new_tokens, batch_size, mixed_precision):
    """Generation settings: the option if given, else the run's eval settings, else 64 / 32 / no."""
    ev, model = (cfg or {}).get("eval") or {}, (cfg or {}).get("model") or {}
    mnt = max_new_tokens or ev.get("max_new_tokens") or 64
    bs = batch_size or ev.get("batch_size") or 32
    mp = mixed_precision or model.get("mixed_precision") or "no"
    if mp not in ("no", "bf16", "auto"):
        raise ValueError(f"--mixed-precision must be no, bf16 or auto, got {mp!r}")
    if mp == "auto":
        from .models import resolve_mixed_precision

        mp = resolve_mixed_precision(mp)
    for flag, value in (("--max-new-tokens", mnt), ("--batch-size", bs)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    return mnt, bs, mp


def _judge_errors() -> tuple[type[Exception], ...]:
    """``(JudgeError,)`` when the LLM-judge module is installed, else ``()``."""
    try:
        from .judge import JudgeError
    except ImportError:
        return ()
    return (JudgeError,)


def _judge(model: str | None, url: str | None, api_model: str | None, api_key_env: str | None):
    """The LLM judge the ``--judge-*`` options describe, or None when neither --judge-model nor --judge-url is given."""
    if model is None and url is None:
        if api_model or api_key_env:
            raise ValueError("--judge-api-model / --judge-api-key-env need --judge-url")
        return None
    from .evaluate import make_judge

    return make_judge(model, url, api_model, api_key_env)


_TASKS_HELP = "task file (jsonl, gsm8k, pubmedqa json, mcq, csv/parquet) or bundled:<name>"
_RUN_HELP = "run directory: its config's task file, instruction, held-out split and eval settings"
_SPLIT_HELP = "heldout (default), train or all, split as `rlhf run` does"
_SEED_HELP = "seed of the train/held-out split with --tasks (default 0; --run uses the run's) and of sampling"


def _lenient(verifier: str | None, cfg: dict | None) -> bool:
    """Whether ``--verifier`` (else the run's ``tasks.verifier``, else strict) asks for the lenient reading."""
    choice = verifier or ((cfg or {}).get("tasks") or {}).get("verifier") or "strict"
    if choice not in ("strict", "lenient"):
        raise ValueError(f"--verifier must be strict or lenient, got {choice!r}")
    return choice == "lenient"


@app.command("eval")
def eval_cmd(
    model: str = typer.Option(None, "--model", "--checkpoint", "-m",
                              help="checkpoint or run dir, preset (smollm2-135m) or hub id; default with --run: its newest policy; "
                              "an `rlhf train` out dir is evaluated on its held-out prompts against its base model"),
    reference: str = typer.Option(None, "--reference", help="model for KL and win rate; default: the run's base model; 'none' skips"),
    tasks: str = typer.Option(None, "--tasks", help=_TASKS_HELP),
    run_dir: Path = typer.Option(None, "--run", help=_RUN_HELP),
    format_: str = typer.Option(None, "--format", help="auto, jsonl, gsm8k, pubmedqa, mcq or hf (with --tasks)"),
    split: str = typer.Option(None, "--split", help=_SPLIT_HELP),
    seed: int = typer.Option(None, "--seed", help=_SEED_HELP),
    limit: int = typer.Option(None, "--limit", help="evaluate only the first N selected questions"),
    read_limit: int = typer.Option(None, "--read-limit", help="read only the first N records of --tasks (before splitting)"),
    heldout_size: int = typer.Option(None, "--heldout-size", help="held-out questions when the file has no split"),
    heldout_fraction: float = typer.Option(None, "--heldout-fraction", help="held-out fraction when the file has no split"),
    instruction: str = typer.Option(None, "--instruction", help="final-answer instruction (default: the run's, or per answer type)"),
    k: int = typer.Option(1, "--k", help="k of pass@k and maj@k; k > 1 samples k answers per question"),
    n_samples: int = typer.Option(None, "--n-samples", help="samples per question n >= k for the unbiased pass@k (default k)"),
    temperature: float = typer.Option(0.7, "--temperature", help="sampling temperature for pass@k / maj@k"),
    top_p: float = typer.Option(1.0, "--top-p", help="nucleus sampling for pass@k / maj@k"),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="answer length cap (default: the run's eval setting, else 64)"),
    batch_size: int = typer.Option(None, "--batch-size", help="sequences per generation batch (default: the run's, else 32)"),
    mixed_precision: str = typer.Option(None, "--mixed-precision", help="no, bf16 or auto (default: the run's, else no)"),
    reward_model: str = typer.Option(None, "--reward-model", help="reward model dir: mean reward and win rate vs the reference"),
    judge_model: str = typer.Option(None, "--judge-model", help="LLM judge run locally (preset, hub id, checkpoint): win rate"),
    judge_url: str = typer.Option(None, "--judge-url", help="LLM judge at an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8001/v1"),
    judge_api_model: str = typer.Option(None, "--judge-api-model", help="model name sent to --judge-url (default: its first /models entry)"),
    judge_api_key_env: str = typer.Option(None, "--judge-api-key-env", help="environment variable holding the --judge-url API key"),
    bootstrap: int = typer.Option(10_000, "--bootstrap", help="bootstrap resamples for the intervals of means"),
    verifier: str = typer.Option(None, "--verifier", help="strict (default; the run's setting with --run) or lenient"),
    out: Path = typer.Option(None, "--out", "-o", help="write the results (with per-question outcomes) to this JSON file"),
) -> None:
    """Evaluate a checkpoint: greedy pass@1, pass@k and maj@k, reward, win rate, KL and length, with 95% intervals."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rich.markup import escape
    from rich.progress import Progress

    from .evaluate import default_reference, eval_report, print_eval_report, run_checkpoint, write_report
    from .offline import offline_run_info
    from .tasks import TaskFormatError

    try:
        if model is None:
            if run_dir is None:
                raise ValueError("give --model PATH_OR_PRESET (or --run RUN_DIR to evaluate its newest policy)")
            if tasks is None:
                model = str(run_checkpoint(run_dir))
        offline = offline_run_info(model) if model else None  # `rlhf train` output: held-out prompts, base model
        if offline is not None and tasks is None and run_dir is None:
            if not offline.get("heldout_file"):
                raise ValueError(f"{model} was trained with --heldout-fraction 0 (no held-out prompts): pass --tasks")
            tasks = str(Path(model) / offline["heldout_file"])
        sel, cfg = _eval_selection(tasks, run_dir, [model], format=format_, split=split, seed=seed,
                                   read_limit=read_limit, limit=limit, heldout_size=heldout_size,
                                   heldout_fraction=heldout_fraction, instruction=instruction)
        mnt, bs, mp = _gen_defaults(cfg, max_new_tokens, batch_size, mixed_precision)
        if bootstrap < 1:
            raise ValueError(f"--bootstrap must be at least 1, got {bootstrap}")
        why = "given"
        if reference is None and offline is not None:
            reference, why = offline["settings"]["model"], f"base model of the `rlhf train` run {model}"
        elif reference is None:
            reference, why = default_reference(model)
        elif reference.lower() == "none":
            reference, why = None, "--reference none"
        console.print(f"model {escape(model)}; reference {escape(str(reference))} ({escape(why)}); "
                      f"{len(sel.tasks)} {sel.split} questions of {escape(sel.source)}")
        judge = _judge(judge_model, judge_url, judge_api_model, judge_api_key_env)
        with Progress(console=console, transient=True) as bar:
            report = eval_report(model, sel, reference, reward_model, k, n_samples, temperature, top_p, mnt, bs, mp,
                                 seed=seed if seed is not None else sel.seed, n_boot=bootstrap, judge=judge,
                                 progress=_progress(bar), lenient=_lenient(verifier, cfg))
    except (ValueError, FileNotFoundError, TaskFormatError, *_judge_errors()) as e:
        console.print(f"[bold red]error[/]: {escape(str(e))}")
        raise typer.Exit(2)
    print_eval_report(report, console)
    if out is not None:
        console.print(f"wrote {escape(str(write_report(report, out)))}")


@app.command("compare")
def compare_cmd(
    model_a: str = typer.Argument(..., help="baseline A: checkpoint or run dir, preset or hub id"),
    model_b: str = typer.Argument(..., help="challenger B: checkpoint or run dir, preset or hub id"),
    tasks: str = typer.Option(None, "--tasks", help=_TASKS_HELP),
    run_dir: Path = typer.Option(None, "--run", help=_RUN_HELP + " (default: the run A or B belongs to)"),
    format_: str = typer.Option(None, "--format", help="auto, jsonl, gsm8k, pubmedqa, mcq or hf (with --tasks)"),
    split: str = typer.Option(None, "--split", help=_SPLIT_HELP),
    seed: int = typer.Option(None, "--seed", help="seed of the train/held-out split with --tasks (default 0)"),
    limit: int = typer.Option(None, "--limit", help="compare on the first N selected questions only"),
    read_limit: int = typer.Option(None, "--read-limit", help="read only the first N records of --tasks (before splitting)"),
    heldout_size: int = typer.Option(None, "--heldout-size", help="held-out questions when the file has no split"),
    heldout_fraction: float = typer.Option(None, "--heldout-fraction", help="held-out fraction when the file has no split"),
    instruction: str = typer.Option(None, "--instruction", help="final-answer instruction (default: the run's, or per answer type)"),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="answer length cap (default: the run's eval setting, else 64)"),
    batch_size: int = typer.Option(None, "--batch-size", help="sequences per generation batch (default: the run's, else 32)"),
    mixed_precision: str = typer.Option(None, "--mixed-precision", help="no, bf16 or auto (default: the run's, else no)"),
    reward_model: str = typer.Option(None, "--reward-model", help="reward model dir: win rate of B over A"),
    judge_model: str = typer.Option(None, "--judge-model", help="LLM judge run locally (preset, hub id, checkpoint): win rate"),
    judge_url: str = typer.Option(None, "--judge-url", help="LLM judge at an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8001/v1"),
    judge_api_model: str = typer.Option(None, "--judge-api-model", help="model name sent to --judge-url (default: its first /models entry)"),
    judge_api_key_env: str = typer.Option(None, "--judge-api-key-env", help="environment variable holding the --judge-url API key"),
    examples: int = typer.Option(3, "--examples", help="questions where A and B differ to print"),
    bootstrap: int = typer.Option(10_000, "--bootstrap", help="bootstrap resamples"),
    verifier: str = typer.Option(None, "--verifier", help="strict (default; the run's setting with --run) or lenient"),
    out: Path = typer.Option(None, "--out", "-o", help="write the comparison (with per-question outcomes) to this JSON file"),
) -> None:
    """Compare two models on the same questions: accuracies, paired difference, exact McNemar test, examples."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rich.markup import escape
    from rich.progress import Progress

    from .compare import compare_report, print_compare_report
    from .evaluate import write_report
    from .tasks import TaskFormatError

    try:
        sel, cfg = _eval_selection(tasks, run_dir, [model_a, model_b], format=format_, split=split, seed=seed,
                                   read_limit=read_limit, limit=limit, heldout_size=heldout_size,
                                   heldout_fraction=heldout_fraction, instruction=instruction)
        mnt, bs, mp = _gen_defaults(cfg, max_new_tokens, batch_size, mixed_precision)
        if bootstrap < 1:
            raise ValueError(f"--bootstrap must be at least 1, got {bootstrap}")
        console.print(f"{len(sel.tasks)} {sel.split} questions of {escape(sel.source)}"
                      + (f" (run {escape(sel.run_dir)})" if sel.run_dir else "")
                      + f"; greedy, max {mnt} new tokens, mixed precision {mp}")
        judge = _judge(judge_model, judge_url, judge_api_model, judge_api_key_env)
        with Progress(console=console, transient=True) as bar:
            report = compare_report(model_a, model_b, sel, reward_model, mnt, bs, mp, n_boot=bootstrap,
                                    examples=examples, judge=judge, progress=_progress(bar),
                                    lenient=_lenient(verifier, cfg))
    except (ValueError, FileNotFoundError, TaskFormatError, *_judge_errors()) as e:
        console.print(f"[bold red]error[/]: {escape(str(e))}")
        raise typer.Exit(2)
    print_compare_report(report, console)
    if out is not None:
        console.print(f"wrote {escape(str(write_report(report, out)))}")


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
    from .guidelines import load_guidelines

    try:
        cfg = load_config(config, {**_parse_overrides(set_), "feedback.source": "human"})
        load_guidelines(cfg.feedback.guidelines)  # a missing or empty guidelines file: refused before serving
    except (ConfigError, ValueError, FileNotFoundError) as e:
        console.print(f"[bold red]error[/]: {e}")
        raise typer.Exit(2)
    run_dir = out or Path("runs") / config.stem
    from .app import launch

    if with_worker:  # refuse at once, not from the worker thread, when a worker already owns the run
        from .runlock import RunInUseError, RunLock
        from .store import Store

        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            RunLock(Store(cfg.db_url, run_dir), run_dir).acquire().release()
        except RunInUseError as e:
            console.print(f"[bold red]error[/]: {e}")
            raise typer.Exit(2)
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


@app.command("serve-model")
def serve_model_cmd(
    model: str = typer.Option(None, "--model", "-m",
                              help="preset name, HF hub id, local model dir, run checkpoint or run dir (default: "
                              "with --run the run's latest version, else smollm2-135m)"),
    run_dir: Path = typer.Option(None, "--run", help="store every served completion and take thumbs on them "
                                 "(POST /v1/feedback) in this run's database, tagged with the served policy version; "
                                 "an algorithm: kto run trains on them in its next round"),
    db: str = typer.Option(None, "--db", help="SQLAlchemy URL of the database for --run (default: the run's "
                           "workbench.db), or alone: a database without a run (versions untagged)"),
    host: str = typer.Option("127.0.0.1", "--host", help="interface to listen on (0.0.0.0 for a network)"),
    port: int = typer.Option(8001, "--port", help="TCP port"),
    name: str = typer.Option(None, "--name", help="model id reported by the API (default: --model as given)"),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 or bf16"),
    api_key_env: str = typer.Option(None, "--api-key-env", help="environment variable holding the API key that "
                                    "requests must send as 'Authorization: Bearer <key>' (needed beyond loopback)"),
    max_queue: int = typer.Option(8, "--max-queue", help="requests in the server at once (generating or waiting); "
                                  "more get 503"),
    max_n: int = typer.Option(4, "--max-n", help="largest n (choices) per request"),
    max_tokens: int = typer.Option(512, "--max-tokens", help="largest max_tokens per request"),
    max_prompt_tokens: int = typer.Option(2048, "--max-prompt-tokens", help="longest prompt, in tokens"),
) -> None:
    """Serve a model behind an OpenAI-compatible API (POST /v1/chat/completions, GET /v1/models;
    with --run or --db also POST /v1/feedback for thumbs up / down on served answers).

    Without --api-key-env the server has no authentication and listens on loopback only.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .serve_model import LOOPBACK_HOSTS, ServeLimits, load_served_model, serve

    try:
        if dtype not in ("fp32", "bf16"):
            raise ValueError(f"--dtype must be fp32 or bf16, got {dtype!r}")
        key = None
        if api_key_env is not None:
            key = os.environ.get(api_key_env)
            if not key:
                raise ValueError(f"--api-key-env: environment variable {api_key_env} is not set or empty")
        elif host not in LOOPBACK_HOSTS:
            raise ValueError(f"--host {host}: serving beyond loopback needs an API key: set one in an environment "
                             "variable and pass its name with --api-key-env")
        limits = ServeLimits(api_key=key, max_queue=max_queue, max_n=max_n, max_tokens=max_tokens,
                             max_prompt_tokens=max_prompt_tokens)
        feedback, model = _serve_feedback(run_dir, db, model)
        loaded, tokenizer = load_served_model(model, dtype)
    except (ValueError, OSError) as e:  # OSError covers FileNotFoundError and unknown hub ids
        console.print(f"[bold red]error[/]: {e}")
        raise typer.Exit(2)
    if key is None:
        console.print(f"[yellow]warning[/]: no authentication (--api-key-env not given): any process on this "
                      f"machine can use the model; serving on loopback ({host}) only")
    console.print(f"serving {name or model} on http://{host}:{port}/v1 (chat/completions, models"
                  + (f", feedback; policy version {feedback.policy_version}" if feedback else "")
                  + f"; n <= {max_n}, max_tokens <= {max_tokens}, prompt <= {max_prompt_tokens} tokens, "
                  f"{max_queue} requests at once)")
    serve(loaded, tokenizer, name or model, host, port, limits, **({"feedback": feedback} if feedback else {}))


def _serve_feedback(run_dir: Path | None, db: str | None, model: str | None):
    """``(FeedbackStore or None, model to serve)`` for ``serve-model``'s --run / --db / --model
    (see :mod:`rlhf_workbench.thumbs`: the policy version is the run's latest when serving its
    default, else read from the served path).

    Raises:
        ValueError: --run names no run (no workbench.db and no --db) or a run with no version.
        FileNotFoundError: --model is a run directory without a model.
    """
    from .serve_model import served_path
    from .store import Store
    from .thumbs import FeedbackStore, run_model, served_version

    if run_dir is None and db is None:
        return None, model or "smollm2-135m"
    if run_dir is not None and db is None and not (run_dir / "workbench.db").is_file():
        raise ValueError(f"--run {run_dir}: no run database here (workbench.db); give --db URL for a run stored "
                         "elsewhere")
    store = Store(db, run_dir)
    if model is None and run_dir is not None:
        model, version = run_model(store, run_dir)
    else:
        model = model or "smollm2-135m"
        version = served_version(store, run_dir, served_path(model))
    return FeedbackStore(store, version), model


@app.command("train")
def train_cmd(
    algorithm: str = typer.Option(..., "--algorithm", help="dpo, kto, sft or rm (reward model)"),
    data: Path = typer.Option(..., "--data", help="TRL-format file: prompt/chosen/rejected (or HH-RLHF), "
                              "prompt/completion/label, prompt/completion or messages; jsonl(.gz), json, csv, parquet"),
    out_dir: Path = typer.Option(..., "--out-dir", help="final model, checkpoints/, metrics.json, heldout.jsonl"),
    model: str = typer.Option("smollm2-135m", "--model", help="base model: preset, hub id or local path"),
    epochs: int = typer.Option(1, "--epochs", help="passes over the training examples (more on a rerun: resume)"),
    lr: float = typer.Option(None, "--lr", help="learning rate (default TRL's: dpo/kto 1e-6, sft 2e-5, rm 1e-5)"),
    batch_size: int = typer.Option(8, "--batch-size", help="examples (dpo/rm: pairs) per optimizer step"),
    micro_batch_size: int = typer.Option(None, "--micro-batch-size", help="sequences per forward pass (default 16)"),
    beta: float = typer.Option(None, "--beta", help="DPO / KTO beta (default 0.1)"),
    max_length: int = typer.Option(512, "--max-length", help="tokens per prompt + completion"),
    limit: int = typer.Option(None, "--limit", help="read only the first N records"),
    heldout_fraction: float = typer.Option(0.1, "--heldout-fraction", help="fraction of the prompts held out"),
    seed: int = typer.Option(0, "--seed", help="seed of the split, the shuffling and the initialisation"),
    lora: bool = typer.Option(False, "--lora/--no-lora", help="train LoRA adapters (merged into the final model)"),
    set_: list[str] = typer.Option([], "--set", help="run-config field, e.g. --set dpo.loss_type=ipo (applied last)"),
) -> None:
    """Train offline on a preference / KTO / SFT file with the loop's own updates (see rlhf_workbench.offline).

    Rerunning the same command resumes after the newest epoch checkpoint; `rlhf eval --model
    OUT_DIR --reward-model RM` then evaluates the held-out prompts against the base model.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rich.markup import escape

    from .config import ConfigError
    from .offline import OfflineArgs, train_offline

    try:
        args = OfflineArgs(algorithm, str(data), str(out_dir), model, epochs, lr, batch_size, micro_batch_size, beta,
                           max_length, limit, heldout_fraction, seed, lora, _parse_overrides(set_))
        metrics = train_offline(args, log=lambda line: console.print(escape(line)))
    except (ConfigError, ValueError, FileNotFoundError) as e:  # TaskFormatError is a ValueError
        console.print(f"[bold red]error[/]: {escape(str(e))}")
        raise typer.Exit(2)
    console.print(f"trained {algorithm} on {metrics['train_examples']} examples ({len(metrics['steps'])} steps), "
                  f"{metrics['heldout_examples']} held out; saved to {escape(str(out_dir))}")


@app.command("train-rm")
def train_rm_cmd(
    out_dir: Path = typer.Option(..., "--out-dir", help="where to save the reward model (a feedback source `path`)"),
    run_dir: Path = typer.Option(None, "--run", help="learn from this run's stored rankings (workbench.db)"),
    preferences: Path = typer.Option(None, "--preferences", help="or a jsonl(.gz) of prompt/chosen/rejected or HH-RLHF dialogues"),
    source: str = typer.Option(None, "--source", help="with --run: only rankings from this source (human, rules)"),
    model: str = typer.Option("smollm2-135m", "--model", help="backbone: preset, hub id or local path"),
    heldout_fraction: float = typer.Option(0.1, "--heldout-fraction", help="pairs kept out of training for accuracy"),
    limit: int = typer.Option(None, "--limit", help="use at most this many pairs"),
    lr: float = typer.Option(1e-5, "--lr"),
    epochs: int = typer.Option(1, "--epochs"),
    batch_size: int = typer.Option(8, "--batch-size"),
    max_length: int = typer.Option(512, "--max-length"),
    margin: bool = typer.Option(False, "--margin/--no-margin", help="with --run: rank distance as the required reward margin"),
    seed: int = typer.Option(0, "--seed"),
    freeze_backbone: bool = typer.Option(True, "--freeze-backbone/--full", help="frozen backbone + head on cached "
                                         "pooled features (default), or full fine-tuning (--lr, --epochs)"),
    pooling: str = typer.Option("mean_last", "--pooling", help="frozen: last, mean or mean_last"),
    layer: int = typer.Option(-1, "--layer", help="frozen: hidden-state layer (0 embeddings, -1 final)"),
    max_tokens: int = typer.Option(128, "--max-tokens", help="frozen: each text's final tokens kept"),
    head_epochs: int = typer.Option(30, "--head-epochs", help="frozen: epochs over the cached features"),
    head_lr: float = typer.Option(3e-3, "--head-lr", help="frozen: head learning rate (cosine to 0)"),
    head_weight_decay: float = typer.Option(0.1, "--head-weight-decay", help="frozen: AdamW weight decay"),
    mixed_precision: str = typer.Option("auto", "--mixed-precision", help="frozen: no, bf16 or auto"),
) -> None:
    """Train a Bradley-Terry reward model on a run's rankings (distilling the experts) or a preference file.

    Pairs are shuffled with ``--seed`` and split into train and held-out; the held-out pairwise
    accuracy and the per-step (full) or per-epoch (frozen) metrics are written to
    ``OUT_DIR/metrics.json``. The default frozen backbone runs one forward pass per text and
    fits a linear head on cached pooled features (rlhf_workbench.rm_features); ``--full``
    fine-tunes every weight (slow on a CPU).
    """
    import json
    import random

    import torch

    from .reward_model import load_preference_file, load_reward_model, pairs_from_rankings, pairwise_accuracy, \
        train_reward_model
    from .store import Store

    try:
        if (run_dir is None) == (preferences is None):
            raise ValueError("give exactly one of --run RUNDIR or --preferences FILE")
        if not 0 <= heldout_fraction < 1:
            raise ValueError(f"--heldout-fraction must be in [0, 1), got {heldout_fraction}")
        if run_dir is not None:
            if not (run_dir / "workbench.db").is_file():
                raise FileNotFoundError(f"{run_dir / 'workbench.db'} not found")
            pairs = pairs_from_rankings(Store(run_dir=run_dir), source, with_margin=margin)
        else:
            pairs = load_preference_file(preferences)
        random.Random(seed).shuffle(pairs)
        pairs = pairs[:limit] if limit else pairs
        n_held = int(len(pairs) * heldout_fraction)
        train, held = pairs[n_held:], pairs[:n_held]
        if not train:
            raise ValueError(f"no training pairs ({len(pairs)} pairs in all)")
    except (ValueError, FileNotFoundError) as e:
        console.print(f"[bold red]error[/]: {e}")
        raise typer.Exit(2)
    torch.manual_seed(seed)
    try:
        rm, tokenizer = load_reward_model(model, pooling=pooling if freeze_backbone else None, layer=layer,
                                          max_tokens=max_tokens, mixed_precision=mixed_precision)
    except ValueError as e:
        console.print(f"[bold red]error[/]: {e}")
        raise typer.Exit(2)
    steps = train_reward_model(rm, tokenizer, train, lr=lr, epochs=epochs, batch_size=batch_size,
                               max_length=max_length, seed=seed, head_epochs=head_epochs, head_lr=head_lr,
                               head_weight_decay=head_weight_decay)
    acc = pairwise_accuracy(rm, tokenizer, held, batch_size, max_length) if held else None
    out_dir.mkdir(parents=True, exist_ok=True)
    rm.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    info = {"train_pairs": len(train), "heldout_pairs": len(held), "heldout_accuracy": acc, "steps": steps,
            "settings": {"model": model, "lr": lr, "epochs": epochs, "batch_size": batch_size,
                         "max_length": max_length, "seed": seed, "source": source, "margin": margin,
                         "freeze_backbone": freeze_backbone, "pooling": pooling, "layer": layer,
                         "max_tokens": max_tokens, "head_epochs": head_epochs, "head_lr": head_lr,
                         "head_weight_decay": head_weight_decay,
                         "mixed_precision": getattr(rm, "mixed_precision", None)}}
    (out_dir / "metrics.json").write_text(json.dumps(info, indent=1))
    console.print(f"trained on {len(train)} pairs ({len(steps)} {'epochs' if freeze_backbone else 'steps'}), "
                  "held-out pairwise accuracy "
                  + (f"{acc:.3f} on {len(held)} pairs" if acc is not None else "n/a") + f"; saved to {out_dir}")


if __name__ == "__main__":
    app()
