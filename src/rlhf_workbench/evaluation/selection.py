"""What ``rlhf eval`` and ``rlhf compare`` run on: the models (a checkpoint, run, preset or hub id,
and the run it belongs to), the questions (a task file, or a run's own split) and the generation
and verifier settings (the options given, else the run's)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rlhf_workbench.model.loading import BUNDLED, DTYPES, PRESETS, load_tokenizer, resolve_mixed_precision, resolve_model_path
from rlhf_workbench.store import Store
from rlhf_workbench.tasks.loading import load_tasks
from rlhf_workbench.tasks.split import split_tasks
from rlhf_workbench.tasks.task import Task


def find_run_dir(model: str | Path) -> Path | None:
    """The run directory a local checkpoint belongs to, or None.

    Recognises ``<run>`` itself, ``<run>/policy`` and ``<run>/checkpoints/vN`` where ``<run>``
    holds the run's SQLite database ``workbench.db`` (runs with an external ``db_url`` are not
    recognised: pass ``--run``/``--reference`` explicitly).
    """
    p = Path(model)
    if not p.is_dir():
        return None
    for cand, ok in ((p, True), (p.parent, p.name == "policy"), (p.parent.parent, p.parent.name == "checkpoints")):
        if ok and (cand / "workbench.db").is_file():
            return cand
    return None


def run_config(run_dir: str | Path) -> dict:
    """The config a run was started with, as stored in ``<run_dir>/workbench.db`` (a plain dict,
    so runs written by older or newer versions of the config schema still read).

    Raises:
        FileNotFoundError: no ``workbench.db`` in ``run_dir``.
        ValueError: the database holds no config.
    """
    db = Path(run_dir) / "workbench.db"
    if not db.is_file():
        raise FileNotFoundError(f"{db} not found: --run expects a run directory written by `rlhf run`")
    cfg = Store(None, run_dir).get_meta("config")
    if not isinstance(cfg, dict):
        raise ValueError(f"{db}: no run config stored (run_meta key 'config')")
    return cfg


def run_checkpoint(run_dir: str | Path) -> Path:
    """The newest policy of a run: ``<run>/policy`` when the run finished, else the checkpoint of
    its newest published version.

    Raises:
        FileNotFoundError: neither exists yet.
    """
    run_dir = Path(run_dir)
    final = run_dir / "policy"
    if (final / "config.json").is_file() or (final / "adapter_config.json").is_file():
        return final
    if (run_dir / "workbench.db").is_file():
        store = Store(None, run_dir)
        for v in reversed(store.versions()):
            ckpt = store.checkpoint_dir(v)  # stored relative to the run directory (older runs: absolute)
            if ckpt and Path(ckpt).is_dir():
                return Path(ckpt)
    raise FileNotFoundError(f"{run_dir}: no policy/ and no published checkpoint to evaluate")


def load_eval_model(name: str | Path, dtype: str = "fp32"):
    """Load a model for evaluation: a preset short name, hub id, HF model directory, LoRA
    adapter directory (merged into its base), or run directory (its newest policy).

    Args:
        name: what to load (``smollm2-135m``, ``runs/demo/checkpoints/v10``, ``runs/demo``...).
        dtype: ``"fp32"`` or ``"bf16"`` weights.

    Returns:
        ``(model, tokenizer, path)``: the model in eval mode without gradients, its tokenizer
        (left padding, pad token set, as :func:`rlhf_workbench.model.loading.load_tokenizer`) and the
        resolved path it was loaded from.

    Raises:
        FileNotFoundError: ``name`` looks like a local path but does not exist.
        ValueError: the model cannot be loaded (message names ``name`` and the cause).
    """
    from transformers import AutoModelForCausalLM  # slow import: only when a model is loaded

    name = str(name)
    p = Path(name)
    if p.is_dir() and (p / "workbench.db").is_file():
        p = run_checkpoint(p)
    if not p.exists() and name not in PRESETS and name != BUNDLED and (
            name.startswith((".", "/", "~")) or name.count("/") > 1 or name.startswith("runs/")):
        raise FileNotFoundError(f"model {name!r}: no such directory")
    try:
        if p.is_dir() and (p / "adapter_config.json").is_file():
            from peft import AutoPeftModelForCausalLM

            path = str(p)
            tokenizer = load_tokenizer(path)
            model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).merge_and_unload()
        else:
            path = str(p) if p.exists() else resolve_model_path(name)
            tokenizer = load_tokenizer(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load model {name!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval().requires_grad_(False)
    return model, tokenizer, path


def default_reference(model: str) -> tuple[str | None, str]:
    """The reference to compare ``model`` with when ``--reference`` is not given.

    Returns:
        ``(reference, why)``: the base model (``model.name`` of the run config) when ``model``
        is a checkpoint of a run; ``None`` otherwise (a preset or hub id is its own base, and
        a directory outside a run has no known base), with the reason in words.
    """
    run = find_run_dir(model)
    if run is not None:
        try:
            base = (run_config(run).get("model") or {}).get("name")
        except (FileNotFoundError, ValueError):
            base = None
        if base:
            return base, f"base model of the run {run}"
    if Path(model).exists():
        return None, "no run found for this checkpoint: pass --reference"
    return None, "the model is itself a base model"


def eval_reference(reference: str | None, model: str, offline: dict | None = None) -> tuple[str | None, str]:
    """The reference ``rlhf eval`` compares ``model`` with, and why.

    Args:
        reference: ``--reference`` as given: a model, ``"none"`` (no reference) or None (the default).
        model: the evaluated model.
        offline: the ``offline.json`` of an ``rlhf train`` output directory
            (:func:`rlhf_workbench.train.offline.offline_run_info`), or None.

    Returns:
        ``(reference or None, reason in words)``: the given one; none; the base model of the
        ``rlhf train`` run; else :func:`default_reference`.
    """
    if reference is None and offline is not None:
        return offline["settings"]["model"], f"base model of the `rlhf train` run {model}"
    if reference is None:
        return default_reference(model)
    if reference.lower() == "none":
        return None, "--reference none"
    return reference, "given"


@dataclass
class TaskSelection:
    """The questions an evaluation runs on and where they came from.

    Attributes:
        tasks: the selected tasks (the instruction already applied), in evaluation order.
        source: the task file (or run directory) they were read from.
        format: task file format.
        split: ``"heldout"``, ``"train"`` or ``"all"``.
        seed: seed of the train/held-out split (:func:`rlhf_workbench.tasks.split.split_tasks`).
        instruction: the final-answer instruction override (None: per-type default).
        run_dir: the run whose config and split were used, if any.
        notes: things the user should know (fallbacks taken).
    """

    tasks: list[Task]
    source: str
    format: str
    split: str
    seed: int
    instruction: str | None = None
    run_dir: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON description (without the tasks themselves)."""
        return {"source": self.source, "format": self.format, "split": self.split, "seed": self.seed,
                "instruction": self.instruction, "run": self.run_dir, "n": len(self.tasks), "notes": self.notes}


SPLITS = ("heldout", "train", "all")


def _find_task_file(path: str, run_dir: Path) -> str | None:
    """A run config's task path as given (relative to the working directory), else relative
    to the directory holding ``runs/`` or to the run directory; None if none exists."""
    if path.startswith("bundled:"):
        return path
    for cand in (Path(path), run_dir.resolve().parent.parent / path, run_dir / path):
        if cand.is_file():
            return str(cand)
    return None


def same_model(a: str, b: str) -> bool:
    """Whether two resolved model paths (or hub ids) name the same model."""
    if Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def select_tasks(path: str | None = None, run_dir: str | Path | None = None, format: str | None = None,
                 split: str | None = None, seed: int | None = None, read_limit: int | None = None,
                 limit: int | None = None, heldout_size: int | None = None, heldout_fraction: float | None = None,
                 instruction: str | None = None) -> TaskSelection:
    """Choose the evaluation questions from a task file, or from a run exactly as the run did.

    With ``path``: :func:`~rlhf_workbench.tasks.loading.load_tasks` (``format``, first ``read_limit``
    records), then :func:`~rlhf_workbench.tasks.split.split_tasks` with ``heldout_size`` /
    ``heldout_fraction`` and ``seed`` (default 0) — the logic of ``rlhf run`` — and the
    ``split`` (default ``"heldout"``) is kept. With ``run_dir``: the task file, format, read
    limit, split sizes, ``max_heldout``, seed and instruction come from the run's stored config,
    so ``--split heldout`` gives the run's held-out questions in the order the run evaluated
    them; if the task file is not found (or the recomputed held-out set differs from the one
    stored in the run database) the tasks stored in ``workbench.db`` are used instead (ordered
    by id) and a note says so. ``limit`` then keeps the first ``limit`` selected questions.

    Raises:
        ValueError: both or neither of ``path``/``run_dir``; options that a run fixes given with
            ``run_dir``; unknown ``split``; nothing selected (the message says what to pass).
        TaskFormatError, FileNotFoundError: from :func:`~rlhf_workbench.tasks.loading.load_tasks`.
    """
    if (path is None) == (run_dir is None):
        raise ValueError("give exactly one of --tasks PATH or --run RUN_DIR")
    if split is not None and split not in SPLITS:
        raise ValueError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    split = split or "heldout"
    if run_dir is not None:
        fixed = {"--format": format, "--seed": seed, "--read-limit": read_limit, "--heldout-size": heldout_size,
                 "--heldout-fraction": heldout_fraction}
        given = [k for k, v in fixed.items() if v is not None]
        if given:
            raise ValueError(f"--run takes the task file, format and split from the run's config; drop {', '.join(given)}")
        sel = _run_split(Path(run_dir), instruction)
    else:
        sel = _file_split(path, format or "auto", 0 if seed is None else seed, read_limit, heldout_fraction,
                          heldout_size, instruction)
        if split == "heldout" and not sel.held:
            raise ValueError(f"{path}: no held-out tasks (no task has metadata.split and neither --heldout-size "
                             "nor --heldout-fraction is given): pass --split all, --split train or --heldout-size N")
    chosen = {"heldout": sel.held, "train": sel.train, "all": sel.every}[split]
    if sel.instruction:
        chosen = [replace(x, instruction=sel.instruction) for x in chosen]
    if limit is not None:
        chosen = chosen[:limit]
    if not chosen:
        raise ValueError(f"{sel.source}: the {split} split is empty")
    return TaskSelection(chosen, sel.source, sel.format, split, sel.seed, sel.instruction, sel.run_dir, sel.notes)


@dataclass
class _Split:
    """A task file (or run) read and split: every task, the train and held-out lists, and how."""

    every: list[Task]
    train: list[Task]
    held: list[Task]
    source: str
    format: str
    seed: int
    instruction: str | None
    run_dir: str | None = None
    notes: list[str] = field(default_factory=list)


def _file_split(path: str, format: str, seed: int, read_limit: int | None, heldout_fraction: float | None,
                heldout_size: int | None, instruction: str | None) -> _Split:
    """The tasks of ``path`` split as ``rlhf run`` splits them."""
    every = load_tasks(path, format, read_limit)
    train, held = split_tasks(every, heldout_fraction, heldout_size, seed=seed)
    return _Split(every, train, held, str(path), format, seed, instruction)


def _run_split(run_dir: Path, instruction: str | None) -> _Split:
    """The tasks of a run split as the run split them (its stored config), falling back to the
    tasks stored in its database (with a note) when the file is gone or gives another held-out set."""
    cfg = run_config(run_dir)
    t = cfg.get("tasks") or {}
    seed = int(cfg.get("seed", 0))
    file, format = t.get("path", "bundled:arithmetic"), t.get("format", "auto")
    if instruction is None:
        instruction = t.get("instruction")
    notes: list[str] = []
    found = _find_task_file(file, run_dir)
    stored = Store(None, run_dir)
    stored_held = stored.tasks("heldout")
    if found is None:
        notes.append(f"task file {file} not found; using the tasks stored in {run_dir / 'workbench.db'} (ordered by id)")
        train, held = stored.tasks("train"), stored_held
        every = train + held
    else:
        every = load_tasks(found, format, t.get("limit"))
        train, held = split_tasks(every, t.get("heldout_fraction"), t.get("heldout_size"), seed=seed)
        if t.get("max_heldout"):
            held = held[: t["max_heldout"]]
        if stored_held and {x.id for x in stored_held} != {x.id for x in held}:
            notes.append(f"the held-out split recomputed from {file} differs from the one stored in "
                         f"{run_dir / 'workbench.db'}; using the stored one (ordered by id)")
            held = stored_held
    return _Split(every, train, held, file, format, seed, instruction, str(run_dir), notes)


def select_questions(tasks: str | None, run_dir: str | Path | None, models: list[str],
                     **kw: Any) -> tuple[TaskSelection, dict | None]:
    """The questions of ``rlhf eval`` / ``rlhf compare``: from the task file ``tasks``, from
    ``run_dir``, or else from the run one of ``models`` belongs to (:func:`find_run_dir`).

    Args:
        tasks, run_dir: ``--tasks`` and ``--run`` (at most one).
        models: the models evaluated (their run is the default).
        kw: the other arguments of :func:`select_tasks`; with a run, ``seed`` is the run's
            (the given seed then only seeds sampling).

    Returns:
        ``(selection, the run's config or None)``.

    Raises:
        ValueError: both ``tasks`` and ``run_dir``, or neither and no model belongs to a run; and
            as :func:`select_tasks`.
    """
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


def generation_settings(cfg: dict | None, max_new_tokens: int | None, batch_size: int | None,
                        mixed_precision: str | None) -> tuple[int, int, str]:
    """``(max_new_tokens, batch_size, mixed_precision)``: each option if given, else the run config's
    eval settings (``cfg``, as :func:`run_config` returns it), else 64 / 32 / ``"no"``; ``"auto"``
    precision is decided for this machine (:func:`~rlhf_workbench.model.loading.resolve_mixed_precision`).

    Raises:
        ValueError: a precision other than no, bf16 or auto, or a length or batch size below 1.
    """
    ev, model = (cfg or {}).get("eval") or {}, (cfg or {}).get("model") or {}
    mnt = max_new_tokens or ev.get("max_new_tokens") or 64
    bs = batch_size or ev.get("batch_size") or 32
    mp = mixed_precision or model.get("mixed_precision") or "no"
    if mp not in ("no", "bf16", "auto"):
        raise ValueError(f"--mixed-precision must be no, bf16 or auto, got {mp!r}")
    if mp == "auto":
        mp = resolve_mixed_precision(mp)
    for flag, value in (("--max-new-tokens", mnt), ("--batch-size", bs)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    return mnt, bs, mp


def lenient_verifier(verifier: str | None, cfg: dict | None) -> bool:
    """Whether ``verifier`` (``--verifier``; else the run config's ``tasks.verifier``, else
    ``"strict"``) asks for the lenient reading of answers.

    Raises:
        ValueError: a verifier other than strict or lenient.
    """
    choice = verifier or ((cfg or {}).get("tasks") or {}).get("verifier") or "strict"
    if choice not in ("strict", "lenient"):
        raise ValueError(f"--verifier must be strict or lenient, got {choice!r}")
    return choice == "lenient"
