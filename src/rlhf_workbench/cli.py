"""The ``rlhf`` command line (typer): each command parses its options, calls one function of the
package and turns the errors a user can fix into a message and exit code 2.

Lazy imports, on purpose: every command imports the project modules it runs (and torch,
transformers, Gradio, rich's progress bars) inside its own body, not at the top of this module,
so that ``rlhf --help``, a command's ``--help`` and a mistyped option answer at once instead of
loading torch, transformers and Gradio first. This module is the one exception to the house
rule "no project imports inside functions" (``tests/test_architecture.py`` exempts ``cli.py``
only); everywhere else imports sit at the top of the module.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

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
    _run_loop(config, out, _parse_overrides(set_))


def _run_loop(config: Path, out: Path | None, overrides: dict) -> None:
    """``rlhf run`` / ``rlhf worker``: load the config (with ``overrides``) and run the loop in the
    run directory (default ``runs/<config name>``); bad input exits with code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rlhf_workbench.config import ConfigError, load_config
    from rlhf_workbench.run.lock import RunInUseError
    from rlhf_workbench.run.loop import run as run_loop
    from rlhf_workbench.tasks.task import TaskFormatError

    try:
        cfg = load_config(config, overrides)
        run_loop(cfg, out or Path("runs") / config.stem, console)
    except (ConfigError, TaskFormatError, ValueError, FileNotFoundError, RunInUseError) as e:
        console.print(f"[bold red]error[/]: {e}")
        raise typer.Exit(2)


user_app = typer.Typer(no_args_is_help=True, help="Annotator and admin accounts")
app.add_typer(user_app, name="user")


@user_app.command("add")
def user_add(
    username: str = typer.Argument(..., help="login name"),
    role: str = typer.Option("annotator", "--role", help="annotator, playground or admin (see rlhf_workbench.app.auth)"),
    config: Path = typer.Option(..., "--config", "-c", help="YAML run config (locates the run's database)"),
    out: Path = typer.Option(None, "--out", "-o", help="run directory (default runs/<config name>)"),
    password: str = typer.Option(None, "--password", help="password (prompted twice, hidden, if omitted)"),
    set_: list[str] = typer.Option([], "--set", help="override a config field, e.g. --set db_url=postgresql://..."),
) -> None:
    """Create an annotator or admin account in the run's database."""
    from rlhf_workbench.human.accounts import ROLES, check_new_account, create_user
    from rlhf_workbench.human.errors import AnnotationError
    from rlhf_workbench.config import ConfigError, load_config
    from rlhf_workbench.store import Store

    try:
        if role not in ROLES:
            raise AnnotationError(f"--role must be one of {', '.join(ROLES)}, got {role!r}")
        cfg = load_config(config, _parse_overrides(set_))
        if password is None:
            password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
        check_new_account(username, password, role)  # before the run directory or database exists
        store = Store(cfg.db_url, out or Path("runs") / config.stem)
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
    _run_loop(config, out, {**_parse_overrides(set_), "feedback.source": "human"})


@app.command("export")
def export_cmd(
    out_dir: Path = typer.Option(..., "--out-dir", help="where to write the preference dataset"),
    run_dir: Path = typer.Option(None, "--run", help="run directory holding workbench.db"),
    db_url: str = typer.Option(None, "--db-url", help="SQLAlchemy URL of the run's database"),
    source: str = typer.Option("all", "--source", help="human, rules or all"),
) -> None:
    """Write the collected rankings as a prompt/chosen/rejected preference dataset (JSONL, conversational JSONL, datasets)."""
    from rlhf_workbench.human.export import SOURCES, export_preferences
    from rlhf_workbench.store import Store

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


# ---- the options `rlhf eval` and `rlhf compare` share: one definition each -----------------

def _shared(type_: type, *flags: str, help: str, optional: bool = True):
    """An option of both ``rlhf eval`` and ``rlhf compare``: its type (None when not given) and flags."""
    return Annotated[Optional[type_] if optional else type_, typer.Option(*flags, help=help)]


TasksOpt = _shared(str, "--tasks", help="task file (jsonl, gsm8k, pubmedqa json, mcq, csv/parquet) or bundled:<name>")
RunOpt = _shared(Path, "--run", help="run directory: its config's task file, instruction, held-out split and eval settings "
                 "(default: the run a model belongs to)")
FormatOpt = _shared(str, "--format", help="auto, jsonl, gsm8k, pubmedqa, mcq or hf (with --tasks)")
SplitOpt = _shared(str, "--split", help="heldout (default), train or all, split as `rlhf run` does")
SeedOpt = _shared(int, "--seed", help="seed of the train/held-out split with --tasks (default 0; --run uses the run's) and, in "
                  "eval, of sampling")
LimitOpt = _shared(int, "--limit", help="use only the first N selected questions")
ReadLimitOpt = _shared(int, "--read-limit", help="read only the first N records of --tasks (before splitting)")
HeldoutSizeOpt = _shared(int, "--heldout-size", help="held-out questions when the file has no split")
HeldoutFractionOpt = _shared(float, "--heldout-fraction", help="held-out fraction when the file has no split")
InstructionOpt = _shared(str, "--instruction", help="final-answer instruction (default: the run's, or per answer type)")
MaxNewTokensOpt = _shared(int, "--max-new-tokens", help="answer length cap (default: the run's eval setting, else 64)")
BatchSizeOpt = _shared(int, "--batch-size", help="sequences per generation batch (default: the run's, else 32)")
MixedPrecisionOpt = _shared(str, "--mixed-precision", help="no, bf16 or auto (default: the run's, else no)")
RewardModelOpt = _shared(str, "--reward-model", help="reward model dir: rewards and the win rate (eval: vs the reference; "
                         "compare: B over A)")
JudgeModelOpt = _shared(str, "--judge-model", help="LLM judge run locally (preset, hub id, checkpoint): win rate")
JudgeUrlOpt = _shared(str, "--judge-url", help="LLM judge at an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8001/v1")
JudgeApiModelOpt = _shared(str, "--judge-api-model", help="model name sent to --judge-url (default: its first /models entry)")
JudgeApiKeyEnvOpt = _shared(str, "--judge-api-key-env", help="environment variable holding the --judge-url API key")
BootstrapOpt = _shared(int, "--bootstrap", help="bootstrap resamples for the intervals of means", optional=False)
VerifierOpt = _shared(str, "--verifier", help="strict (default; the run's setting with --run) or lenient")
OutOpt = _shared(Path, "--out", "-o", help="write the report (with per-question outcomes) to this JSON file")


def _eval_settings(p: dict, tasks: str | None, models: list[str]):
    """``(selection, run config or None, (max_new_tokens, batch_size, mixed_precision))`` from the shared
    options' values ``p`` (a command's ``ctx.params``) and ``tasks`` (``--tasks`` or a default)."""
    from rlhf_workbench.evaluation.selection import generation_settings, select_questions

    sel, cfg = select_questions(tasks, p["run_dir"], models, format=p["format_"], split=p["split"], seed=p["seed"],
                                read_limit=p["read_limit"], limit=p["limit"], heldout_size=p["heldout_size"],
                                heldout_fraction=p["heldout_fraction"], instruction=p["instruction"])
    gen = generation_settings(cfg, p["max_new_tokens"], p["batch_size"], p["mixed_precision"])
    if p["bootstrap"] < 1:
        raise ValueError(f"--bootstrap must be at least 1, got {p['bootstrap']}")
    return sel, cfg, gen


def _judge(p: dict):
    """The LLM judge the ``--judge-*`` options (in ``ctx.params`` ``p``) describe; None without --judge-model/--judge-url."""
    if p["judge_model"] is None and p["judge_url"] is None:
        if p["judge_api_model"] or p["judge_api_key_env"]:
            raise ValueError("--judge-api-model / --judge-api-key-env need --judge-url")
        return None
    from rlhf_workbench.evaluation.scoring import make_judge

    return make_judge(p["judge_model"], p["judge_url"], p["judge_api_model"], p["judge_api_key_env"])


@contextmanager
def _eval_errors():
    """Bad options, task files and judge endpoints of ``eval``/``compare``: the message and exit code 2."""
    from rlhf_workbench.feedback.judge import JudgeError
    from rlhf_workbench.tasks.task import TaskFormatError

    try:
        yield
    except (ValueError, FileNotFoundError, TaskFormatError, JudgeError) as e:
        console.print(f"[bold red]error[/]: {escape(str(e))}")
        raise typer.Exit(2)


@app.command("eval")
def eval_cmd(
    ctx: typer.Context,
    model: str = typer.Option(None, "--model", "--checkpoint", "-m",
                              help="checkpoint or run dir, preset (smollm2-135m) or hub id; default with --run: its newest policy; "
                              "an `rlhf train` out dir is evaluated on its held-out prompts against its base model"),
    reference: str = typer.Option(None, "--reference", help="model for KL and win rate; default: the run's base model; 'none' skips"),
    tasks: TasksOpt = None, run_dir: RunOpt = None, format_: FormatOpt = None, split: SplitOpt = None,
    seed: SeedOpt = None, limit: LimitOpt = None, read_limit: ReadLimitOpt = None, heldout_size: HeldoutSizeOpt = None,
    heldout_fraction: HeldoutFractionOpt = None, instruction: InstructionOpt = None,
    k: int = typer.Option(1, "--k", help="k of pass@k and maj@k; k > 1 samples k answers per question"),
    n_samples: int = typer.Option(None, "--n-samples", help="samples per question n >= k for the unbiased pass@k (default k)"),
    temperature: float = typer.Option(0.7, "--temperature", help="sampling temperature for pass@k / maj@k"),
    top_p: float = typer.Option(1.0, "--top-p", help="nucleus sampling for pass@k / maj@k"),
    max_new_tokens: MaxNewTokensOpt = None, batch_size: BatchSizeOpt = None, mixed_precision: MixedPrecisionOpt = None,
    reward_model: RewardModelOpt = None, judge_model: JudgeModelOpt = None, judge_url: JudgeUrlOpt = None,
    judge_api_model: JudgeApiModelOpt = None, judge_api_key_env: JudgeApiKeyEnvOpt = None,
    bootstrap: BootstrapOpt = 10_000, verifier: VerifierOpt = None, out: OutOpt = None,
) -> None:
    """Evaluate a checkpoint: greedy pass@1, pass@k and maj@k, reward, win rate, KL and length, with 95% intervals."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rich.progress import Progress

    from rlhf_workbench.evaluation.report import eval_report, print_eval_report, write_report
    from rlhf_workbench.evaluation.selection import eval_reference, lenient_verifier, run_checkpoint
    from rlhf_workbench.train.offline import offline_run_info

    with _eval_errors():
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
        sel, cfg, (mnt, bs, mp) = _eval_settings(ctx.params, tasks, [model])
        reference, why = eval_reference(reference, model, offline)
        console.print(f"model {escape(model)}; reference {escape(str(reference))} ({escape(why)}); "
                      f"{len(sel.tasks)} {sel.split} questions of {escape(sel.source)}")
        judge = _judge(ctx.params)
        with Progress(console=console, transient=True) as bar:
            report = eval_report(model, sel, reference, reward_model, k, n_samples, temperature, top_p, mnt, bs, mp,
                                 seed=seed if seed is not None else sel.seed, n_boot=bootstrap, judge=judge,
                                 progress=_progress(bar), lenient=lenient_verifier(verifier, cfg))
    print_eval_report(report, console)
    if out is not None:
        console.print(f"wrote {escape(str(write_report(report, out)))}")


@app.command("compare")
def compare_cmd(
    ctx: typer.Context,
    model_a: str = typer.Argument(..., help="baseline A: checkpoint or run dir, preset or hub id"),
    model_b: str = typer.Argument(..., help="challenger B: checkpoint or run dir, preset or hub id"),
    tasks: TasksOpt = None, run_dir: RunOpt = None, format_: FormatOpt = None, split: SplitOpt = None,
    seed: SeedOpt = None, limit: LimitOpt = None, read_limit: ReadLimitOpt = None, heldout_size: HeldoutSizeOpt = None,
    heldout_fraction: HeldoutFractionOpt = None, instruction: InstructionOpt = None,
    max_new_tokens: MaxNewTokensOpt = None, batch_size: BatchSizeOpt = None, mixed_precision: MixedPrecisionOpt = None,
    reward_model: RewardModelOpt = None, judge_model: JudgeModelOpt = None, judge_url: JudgeUrlOpt = None,
    judge_api_model: JudgeApiModelOpt = None, judge_api_key_env: JudgeApiKeyEnvOpt = None,
    examples: int = typer.Option(3, "--examples", help="questions where A and B differ to print"),
    bootstrap: BootstrapOpt = 10_000, verifier: VerifierOpt = None, out: OutOpt = None,
) -> None:
    """Compare two models on the same questions: accuracies, paired difference, exact McNemar test, examples."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rich.progress import Progress

    from rlhf_workbench.evaluation.compare import compare_report, print_compare_report
    from rlhf_workbench.evaluation.report import write_report
    from rlhf_workbench.evaluation.selection import lenient_verifier

    with _eval_errors():
        sel, cfg, (mnt, bs, mp) = _eval_settings(ctx.params, tasks, [model_a, model_b])
        console.print(f"{len(sel.tasks)} {sel.split} questions of {escape(sel.source)}"
                      + (f" (run {escape(sel.run_dir)})" if sel.run_dir else "")
                      + f"; greedy, max {mnt} new tokens, mixed precision {mp}")
        judge = _judge(ctx.params)
        with Progress(console=console, transient=True) as bar:
            report = compare_report(model_a, model_b, sel, reward_model, mnt, bs, mp, n_boot=bootstrap,
                                    examples=examples, judge=judge, progress=_progress(bar),
                                    lenient=lenient_verifier(verifier, cfg))
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

    from rlhf_workbench.config import ConfigError, load_config
    from rlhf_workbench.human.guidelines import load_guidelines

    try:
        cfg = load_config(config, {**_parse_overrides(set_), "feedback.source": "human"})
        load_guidelines(cfg.feedback.guidelines)  # a missing or empty guidelines file: refused before serving
    except (ConfigError, ValueError, FileNotFoundError) as e:
        console.print(f"[bold red]error[/]: {e}")
        raise typer.Exit(2)
    run_dir = out or Path("runs") / config.stem
    from rlhf_workbench.app.build import launch

    if with_worker:  # refuse at once, not from the worker thread, when a worker already owns the run
        from rlhf_workbench.run.lock import RunInUseError, RunLock
        from rlhf_workbench.store import Store

        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            RunLock(Store(cfg.db_url, run_dir), run_dir).acquire().release()
        except RunInUseError as e:
            console.print(f"[bold red]error[/]: {e}")
            raise typer.Exit(2)
        from rlhf_workbench.run.loop import run as run_loop

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
    from rlhf_workbench.app.serve_model import LOOPBACK_HOSTS, ServeLimits, serve
    from rlhf_workbench.model.chat import load_served_model

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
    (see :mod:`rlhf_workbench.feedback.thumbs`: the policy version is the run's latest when serving its
    default, else read from the served path).

    Raises:
        ValueError: --run names no run (no workbench.db and no --db) or a run with no version.
        FileNotFoundError: --model is a run directory without a model.
    """
    from rlhf_workbench.model.chat import served_path
    from rlhf_workbench.store import Store
    from rlhf_workbench.feedback.thumbs import FeedbackStore, run_model, served_version

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
    """Train offline on a preference / KTO / SFT file with the loop's own updates (see rlhf_workbench.train.offline).

    Rerunning the same command resumes after the newest epoch checkpoint; `rlhf eval --model
    OUT_DIR --reward-model RM` then evaluates the held-out prompts against the base model.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rlhf_workbench.config import ConfigError
    from rlhf_workbench.train.offline import OfflineArgs, train_offline

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
    fits a linear head on cached pooled features (rlhf_workbench.train.rm_features); ``--full``
    fine-tunes every weight (slow on a CPU).
    """
    import json

    import torch

    from rlhf_workbench.train.reward_model import load_reward_model, pairwise_accuracy, train_reward_model

    try:
        train, held = _reward_pairs(run_dir, preferences, source, margin, seed, limit, heldout_fraction)
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
            "settings": {"model": model, "lr": lr, "epochs": epochs, "batch_size": batch_size, "max_length": max_length,
                         "seed": seed, "source": source, "margin": margin, "freeze_backbone": freeze_backbone,
                         "pooling": pooling, "layer": layer, "max_tokens": max_tokens, "head_epochs": head_epochs,
                         "head_lr": head_lr, "head_weight_decay": head_weight_decay,
                         "mixed_precision": getattr(rm, "mixed_precision", None)}}
    (out_dir / "metrics.json").write_text(json.dumps(info, indent=1))
    console.print(f"trained on {len(train)} pairs ({len(steps)} {'epochs' if freeze_backbone else 'steps'}), "
                  "held-out pairwise accuracy "
                  + (f"{acc:.3f} on {len(held)} pairs" if acc is not None else "n/a") + f"; saved to {out_dir}")


def _reward_pairs(run_dir: Path | None, preferences: Path | None, source: str | None, margin: bool, seed: int,
                  limit: int | None, heldout_fraction: float):
    """``(train, held)`` pairs for ``train-rm``: a run's rankings or a preference file, shuffled with
    ``seed``, cut to ``limit``, the first ``heldout_fraction`` held out. Bad options: ValueError,
    FileNotFoundError."""
    import random

    from rlhf_workbench.store import Store
    from rlhf_workbench.train.reward_model import load_preference_file, pairs_from_rankings

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
    return train, held


if __name__ == "__main__":
    app()
