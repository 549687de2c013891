"""Evaluation on held-out tasks: greedy pass@1 accuracy, mean verifier reward, format rate,
KL of the policy to the reference, and the paired significance test between two evaluations.

The second half of the module backs ``rlhf eval`` (:func:`eval_report`): sampled pass@k
and maj@k, mean reward under a reward model, win rate against the reference model's greedy
answers, response length and the exact token KL, each with a 95% confidence interval from
:mod:`rlhf_workbench.stats` (Wilson for proportions, seeded bootstrap for means). Paired
comparisons of two models (``rlhf compare``) live in :mod:`rlhf_workbench.compare`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .logprobs import scale_logits
from .models import PolicyPair
from .rollout import Completion, autocast, generate, pad_batch
from .stats import (BOOT_SEED, CONFIDENCE, N_BOOT, Estimate, maj_at_k, majority_vote, mcnemar_exact, mean_estimate,
                    pass_at_k, proportion_estimate, ratio_estimate, wilson_interval)
from .tasks import Task
from .verify import Verification, verify


@dataclass
class EvalResult:
    """Per-task outcomes of one greedy evaluation (same task order as the input)."""

    task_ids: list[str]
    correct: list[bool]  # the strict verdict (explicit, unambiguous, equal to the key)
    format_ok: list[bool]
    lengths: list[int]
    completions: list[Completion]
    lenient_correct: list[bool] = field(default_factory=list)  # the lenient reading (a separate metric)
    ambiguous: list[bool] = field(default_factory=list)
    kl: float | None = None  # mean per-token KL(π || π_ref), nats
    kl_seq: float | None = None  # mean per-completion KL (sum over tokens), nats
    open: list[bool] = field(default_factory=list)  # the task has no answer key (accuracy not applicable)
    scores: dict[str, float] = field(default_factory=dict)  # reward-model metrics (rlhf_workbench.pipeline.score_eval)
    task_scores: dict[str, list[float]] = field(default_factory=dict)  # their per-task values, same order

    @property
    def n(self) -> int:
        """Number of evaluated tasks."""
        return len(self.correct)

    @property
    def n_keyed(self) -> int:
        """Number of evaluated tasks with an answer key (the denominator of the accuracies)."""
        return self.n - sum(self.open)

    @property
    def accuracy_applicable(self) -> bool:
        """Whether any evaluated task has an answer key; with open tasks only, accuracy means nothing."""
        return self.n_keyed > 0

    @property
    def accuracy(self) -> float:
        """Greedy pass@1 as a grader sees it: an explicit, unambiguous final answer equal to the key
        (over the tasks with a key; 0.0 when there are none, see :attr:`accuracy_applicable`)."""
        return sum(self.correct) / max(1, self.n_keyed)

    @property
    def lenient_accuracy(self) -> float:
        """Fraction whose lenient reading (last number / label, no ambiguity check) is correct."""
        return sum(self.lenient_correct) / max(1, self.n_keyed)

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        """Flat metrics dict: accuracy (strict verifier) with its Wilson 95% CI, lenient accuracy,
        format rate (explicit answer marker), ambiguous rate, reward (mean verifier reward), mean
        completion length, KL. Accuracies count the tasks with a key only; ``accuracy_applicable``
        is 0.0 when every task is open (no key), ``n_open`` counts those tasks."""
        lo, hi = wilson_interval(sum(self.correct), self.n_keyed)
        m = {
            "accuracy": self.accuracy, "accuracy_ci_low": lo, "accuracy_ci_high": hi,
            "lenient_accuracy": self.lenient_accuracy, "format_rate": sum(self.format_ok) / max(1, self.n),
            "ambiguous_rate": sum(self.ambiguous) / max(1, self.n),
            "accuracy_applicable": float(self.accuracy_applicable), "n_open": sum(self.open),
            "reward": self.accuracy, "completion_length": sum(self.lengths) / max(1, self.n), "n": self.n,
        }
        if self.kl is not None:
            m["kl"] = self.kl
            m["kl_seq"] = self.kl_seq
        m.update(self.scores)
        return {prefix + k: float(v) for k, v in m.items()}


@torch.no_grad()
def token_kl_per_completion(pair: PolicyPair, completions: list[Completion], micro_batch_size: int = 8,
                            mixed_precision: str = "no") -> list[tuple[float, int]]:
    """Exact KL(π || π_ref) summed over the tokens of each completion, with its token count.

    At every completion position the full-vocabulary KL Σ_v π(v)(log π(v) − log π_ref(v)) of
    the next-token distributions is computed (no sampling estimator), conditioned on the
    completion's prompt and preceding tokens.

    Args:
        pair: policy and reference (same tokenizer: ``prompt_ids``/``token_ids`` index both).
        completions: completions sampled or decoded from the policy.
        micro_batch_size: sequences per forward pass.
        mixed_precision: ``"bf16"`` runs the forward passes under autocast.

    Returns:
        One ``(kl_sum_nats, n_tokens)`` per completion, in input order; ``(0.0, 0)`` for an
        empty completion.
    """
    pad_id = pair.tokenizer.pad_token_id
    out: list[tuple[float, int]] = [(0.0, 0)] * len(completions)
    items = [i for i, c in enumerate(completions) if c.token_ids]
    for s in range(0, len(items), micro_batch_size):
        idx = items[s : s + micro_batch_size]
        chunk = [completions[i] for i in idx]
        ids, mask, cmask = pad_batch([c.prompt_ids for c in chunk], [c.token_ids for c in chunk], pad_id)
        T = cmask.shape[1]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)

        def logits(model):
            with autocast(mixed_precision):
                out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                            logits_to_keep=T + 1).logits[:, :-1]
            return torch.log_softmax(scale_logits(out), -1)

        lp = logits(pair.policy)
        with pair.reference_context():
            lr = logits(pair.ref_model)
        kl = ((lp.exp() * (lp - lr)).sum(-1) * cmask).sum(-1)
        for j, i in enumerate(idx):
            out[i] = (float(kl[j]), int(cmask[j].sum()))
    return out


def token_kl(pair: PolicyPair, completions: list[Completion], micro_batch_size: int = 8,
             mixed_precision: str = "no") -> tuple[float, float]:
    """Exact per-position KL(π || π_ref) = Σ_v π(v)(log π(v) − log π_ref(v)), averaged over the
    tokens of the given completions, and its per-completion sum averaged over completions.

    Args:
        pair: policy and reference.
        completions: held-out completions (e.g. the greedy evaluation outputs).

    Returns:
        ``(kl_per_token, kl_per_sequence)`` in nats; ``(0, 0)`` for no tokens. Empty
        completions count in neither average.
    """
    per = [x for x in token_kl_per_completion(pair, completions, micro_batch_size, mixed_precision) if x[1]]
    tokens = sum(n for _, n in per)
    if tokens == 0:
        return 0.0, 0.0
    total = sum(k for k, _ in per)
    return total / tokens, total / len(per)


def evaluate(pair: PolicyPair, tasks: list[Task], max_new_tokens: int = 64, batch_size: int = 64,
             mixed_precision: str = "no", kl_samples: int = 0, progress=None, lenient: bool = False) -> EvalResult:
    """Greedy pass@1 on ``tasks`` (plus the KL to the reference on the first ``kl_samples``
    completions when ``kl_samples > 0``). ``correct`` is the strict verifier's verdict, or the
    lenient reading with ``lenient=True`` (:func:`rlhf_workbench.verify.verify`).

    Returns:
        An :class:`EvalResult`.
    """
    comps = generate(pair.policy, pair.tokenizer, tasks, num_generations=1, do_sample=False,
                     max_new_tokens=max_new_tokens, batch_size=batch_size, mixed_precision=mixed_precision, progress=progress)
    vers: list[Verification] = [verify(c.text, t, lenient) for c, t in zip(comps, tasks)]
    result = EvalResult(task_ids=[t.id for t in tasks], correct=[v.correct for v in vers],
                        format_ok=[v.format_ok for v in vers], lengths=[len(c.token_ids) for c in comps],
                        completions=comps, lenient_correct=[v.lenient_correct for v in vers],
                        ambiguous=[v.ambiguous for v in vers], open=[t.is_open for t in tasks])
    if kl_samples > 0:
        result.kl, result.kl_seq = token_kl(pair, comps[:kl_samples], mixed_precision=mixed_precision)
    return result


# ======================================================================================
# Models and task sets for `rlhf eval` / `rlhf compare`
# ======================================================================================


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
    from .store import Store

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
    from .store import Store

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
        (left padding, pad token set, as :func:`rlhf_workbench.models.load_tokenizer`) and the
        resolved path it was loaded from.

    Raises:
        FileNotFoundError: ``name`` looks like a local path but does not exist.
        ValueError: the model cannot be loaded (message names ``name`` and the cause).
    """
    from transformers import AutoModelForCausalLM

    from .models import BUNDLED, DTYPES, PRESETS, load_tokenizer, resolve_model_path

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


@dataclass
class TaskSelection:
    """The questions an evaluation runs on and where they came from.

    Attributes:
        tasks: the selected tasks (the instruction already applied), in evaluation order.
        source: the task file (or run directory) they were read from.
        format: task file format.
        split: ``"heldout"``, ``"train"`` or ``"all"``.
        seed: seed of the train/held-out split (:func:`rlhf_workbench.tasks.split_tasks`).
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


def select_tasks(path: str | None = None, run_dir: str | Path | None = None, format: str | None = None,
                 split: str | None = None, seed: int | None = None, read_limit: int | None = None,
                 limit: int | None = None, heldout_size: int | None = None, heldout_fraction: float | None = None,
                 instruction: str | None = None) -> TaskSelection:
    """Choose the evaluation questions from a task file, or from a run exactly as the run did.

    With ``path``: :func:`~rlhf_workbench.tasks.load_tasks` (``format``, first ``read_limit``
    records), then :func:`~rlhf_workbench.tasks.split_tasks` with ``heldout_size`` /
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
        TaskFormatError, FileNotFoundError: from :func:`~rlhf_workbench.tasks.load_tasks`.
    """
    from .store import Store
    from .tasks import load_tasks, split_tasks

    if (path is None) == (run_dir is None):
        raise ValueError("give exactly one of --tasks PATH or --run RUN_DIR")
    if split is not None and split not in SPLITS:
        raise ValueError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    split = split or "heldout"
    notes: list[str] = []
    if run_dir is not None:
        run_dir = Path(run_dir)
        fixed = {"--format": format, "--seed": seed, "--read-limit": read_limit, "--heldout-size": heldout_size,
                 "--heldout-fraction": heldout_fraction}
        given = [k for k, v in fixed.items() if v is not None]
        if given:
            raise ValueError(f"--run takes the task file, format and split from the run's config; drop {', '.join(given)}")
        cfg = run_config(run_dir)
        t = cfg.get("tasks") or {}
        seed = int(cfg.get("seed", 0))
        file, format = t.get("path", "bundled:arithmetic"), t.get("format", "auto")
        if instruction is None:
            instruction = t.get("instruction")
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
        source, run = file, str(run_dir)
    else:
        format = format or "auto"
        seed = 0 if seed is None else seed
        every = load_tasks(path, format, read_limit)
        train, held = split_tasks(every, heldout_fraction, heldout_size, seed=seed)
        source, run = str(path), None
        if split == "heldout" and not held:
            raise ValueError(f"{path}: no held-out tasks (no task has metadata.split and neither --heldout-size "
                             "nor --heldout-fraction is given): pass --split all, --split train or --heldout-size N")
    chosen = {"heldout": held, "train": train, "all": every}[split]
    if instruction:
        chosen = [replace(x, instruction=instruction) for x in chosen]
    if limit is not None:
        chosen = chosen[:limit]
    if not chosen:
        raise ValueError(f"{source}: the {split} split is empty")
    return TaskSelection(chosen, source, format, split, seed, instruction, run, notes)


# ======================================================================================
# `rlhf eval`
# ======================================================================================

TIE_TOL = 1e-5  # reward differences at most this large (absolute) count as ties


def load_scorer(path: str, batch_size: int = 8):
    """A reward model for scoring answers (:func:`rlhf_workbench.reward_model.load_reward_model`).

    Returns:
        ``(score, note)``: ``score(tasks, texts) -> list[float]`` scores ``task.transcript() +
        "\\n\\n" + text`` (the format the reward model is trained on, see
        :class:`~rlhf_workbench.reward_model.RewardModelRanker`); ``note`` warns when the
        directory is not a trained sequence-classification model (its scalar head is then
        freshly initialised, seeded with 0, and the scores mean nothing), else None.

    Raises:
        ValueError: the model cannot be loaded.
    """
    from transformers import AutoConfig

    from .models import resolve_model_path
    from .reward_model import load_reward_model, score_texts

    try:
        arch = AutoConfig.from_pretrained(resolve_model_path(path)).architectures or []
        torch.manual_seed(0)
        model, tokenizer = load_reward_model(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load reward model {path!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    note = None
    if not any(a.endswith("ForSequenceClassification") for a in arch):
        note = (f"--reward-model {path} is not a trained reward model ({', '.join(arch) or 'unknown architecture'}): "
                "its score head is random, so rewards and win rates are meaningless")

    def score(tasks: Sequence[Task], texts: Sequence[str]) -> list[float]:
        return score_texts(model, tokenizer, [t.transcript() + "\n\n" for t in tasks], list(texts), batch_size)

    return score, note


def win_value(mine: float, theirs: float, same_text: bool = False) -> float:
    """1 when ``mine > theirs``, 0 when lower, 0.5 for a tie (identical texts, or rewards within
    :data:`TIE_TOL`, which absorbs the float noise of scoring in different padded batches)."""
    if same_text or abs(mine - theirs) <= TIE_TOL:
        return 0.5
    return 1.0 if mine > theirs else 0.0


def judge_available() -> bool:
    """Whether the optional LLM-judge module :mod:`rlhf_workbench.judge` is installed."""
    import importlib.util

    return importlib.util.find_spec("rlhf_workbench.judge") is not None


def make_judge(model: str | None = None, url: str | None = None, api_model: str | None = None,
               api_key_env: str | None = None):
    """An LLM judge (:class:`rlhf_workbench.judge.PairwiseJudge`, position-swapped, Zheng et al.
    2023) on a local chat model (``model``: preset, hub id or checkpoint) or an OpenAI-compatible
    endpoint (``url``, with ``api_model`` and the API key read from the environment variable
    ``api_key_env``).

    Raises:
        ValueError: the judge module is not installed, or neither/both of ``model`` and ``url``.
        rlhf_workbench.judge.JudgeError: the endpoint cannot be reached or the key is unset.
    """
    if not judge_available():
        raise ValueError("LLM judge options need rlhf_workbench.judge, which is not installed")
    from .judge import PairwiseJudge, make_backend

    return PairwiseJudge(make_backend(url, model, api_model, api_key_env))


def judge_wins(judge, tasks: Sequence[Task], mine: Sequence[str], theirs: Sequence[str],
               progress=None) -> tuple[list[float], dict[str, Any]]:
    """Per-question points of ``mine`` against ``theirs`` from a pairwise LLM judge.

    Each pair is judged twice with the positions swapped (:meth:`PairwiseJudge.compare`, Zheng
    et al. 2023 §3.4); ``mine`` scores 1 when picked in both orders, 0 when ``theirs`` is, and
    0.5 otherwise (inconsistent or unparsable verdicts, identical texts). The judge sees the
    task's prompt and its ground-truth answer (:func:`rlhf_workbench.judge.task_reference`).

    Returns:
        ``(points, stats)``: one value in {0, 0.5, 1} per question, and ``calls``,
        ``consistent`` (pairs both orders agreed on), ``unparsed`` (replies without a verdict),
        ``identical`` (pairs not sent: same text).
    """
    from .judge import task_question, task_reference

    points: list[float] = []
    stats = {"calls": 0, "consistent": 0, "unparsed": 0, "identical": 0}
    for t, x, y in zip(tasks, mine, theirs):
        v = judge.compare(task_question(t), x, y, task_reference(t))
        points.append(v.points[0])
        stats["calls"] += v.calls
        if v.calls == 0:
            stats["identical"] += 1
        else:
            stats["consistent"] += int(v.consistent)
            stats["unparsed"] += (v.first is None) + (v.second is None)
        if progress:
            progress(1)
    return points, stats


def same_model(a: str, b: str) -> bool:
    """Whether two resolved model paths (or hub ids) name the same model."""
    if Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def _greedy(model, tokenizer, tasks: list[Task], max_new_tokens: int, batch_size: int, mixed_precision: str,
            progress=None, lenient: bool = False) -> tuple[EvalResult, list[Verification]]:
    """Greedy evaluation of one model (:func:`evaluate`) plus each completion's verification."""
    res = evaluate(PolicyPair(model, model, tokenizer), tasks, max_new_tokens=max_new_tokens, batch_size=batch_size,
                   mixed_precision=mixed_precision, kl_samples=0, progress=progress, lenient=lenient)
    return res, [verify(c.text, t, lenient) for c, t in zip(res.completions, tasks)]


NOT_APPLICABLE = Estimate(math.nan, math.nan, math.nan, "not applicable", 0)
"""An accuracy-type metric on questions without an answer key (open tasks): no value, no interval."""


def _keyed_proportion(flags: Sequence[bool], keyed: Sequence[bool], confidence: float) -> Estimate:
    """Wilson proportion of ``flags`` over the questions with an answer key (``keyed``), or
    :data:`NOT_APPLICABLE` when none has one (an open task is neither right nor wrong)."""
    n = sum(keyed)
    if not n:
        return NOT_APPLICABLE
    return proportion_estimate(sum(f for f, k in zip(flags, keyed) if k), n, confidence)


def _mcnemar_dict(before: list[bool], after: list[bool]) -> dict[str, Any]:
    """:func:`mcnemar_exact` with named counts: ``improved`` (wrong before, right after) and
    ``regressed`` (right before, wrong after)."""
    m = mcnemar_exact(before, after)
    return {"test": "exact McNemar: two-sided binomial test on the discordant pairs (reference -> model)",
            "improved": int(m["b"]), "regressed": int(m["c"]), "p_value": m["p_value"]}


def _answer_record(c: Completion, v: Verification) -> dict[str, Any]:
    return {"text": c.text, "extracted": v.extracted, "correct": v.correct, "lenient_correct": v.lenient_correct,
            "format_ok": v.format_ok, "ambiguous": v.ambiguous, "reason": v.reason,
            "tokens": len(c.token_ids), "finished": c.finished}


def eval_report(model: str, selection: TaskSelection, reference: str | None = None, reward_model: str | None = None,
                k: int = 1, n_samples: int | None = None, temperature: float = 0.7, top_p: float = 1.0,
                max_new_tokens: int = 64, batch_size: int = 32, mixed_precision: str = "no", seed: int = 0,
                confidence: float = CONFIDENCE, n_boot: int = N_BOOT, judge=None,
                progress: Callable | None = None, lenient: bool = False) -> dict:
    """Evaluate one model on the selected questions, every metric with a confidence interval.
    Correctness is the strict verifier's, or the lenient reading with ``lenient=True``.

    Metrics (``report["metrics"]``, each an :meth:`Estimate.to_dict`):

    * ``pass@1`` (greedy decoding, strict verifier), ``lenient_pass@1`` (the lenient reading),
      ``format_rate``, ``clipped_rate`` (hit ``max_new_tokens``): proportions, Wilson.
    * ``length``: greedy completion tokens (EOS included when generated), bootstrap.
    * With sampling (``k > 1`` or ``n_samples``): ``n = n_samples or k`` samples per question
      at ``temperature``/``top_p`` (torch seeded with ``seed``); ``pass@1_sampled`` (c/n),
      ``pass@k`` (unbiased, :func:`pass_at_k`, Chen et al. 2021 eq. 1) and ``maj@k``
      (:func:`maj_at_k`): means over questions, bootstrap; ``maj@k`` is a Wilson proportion
      when ``n == k`` (0/1 per question).
    * With ``reference`` (same vocabulary): ``kl_token`` (Σ KL / Σ tokens over the greedy
      completions, ratio bootstrap) and ``kl_seq`` (mean per-completion KL sum, bootstrap),
      exact full-vocabulary KL(π || π_ref) in nats (:func:`token_kl_per_completion`).
    * With ``reward_model``: ``reward`` (mean reward of the greedy answers, bootstrap); with a
      reference too, the reference's greedy answers are generated and scored: ``reward_reference``,
      ``reference_pass@1`` (Wilson) and ``win_rate`` (mean of :func:`win_value`: 1 if the model's
      answer scores higher, 0.5 for a tie, bootstrap), with the paired McNemar test of the two
      greedy accuracies in ``report["vs_reference"]``.
    * Open tasks (no answer key, e.g. the held-out prompts of a preference file): the
      accuracy-type metrics (``pass@1``, ``lenient_pass@1``, ``format_rate``, the sampled ones,
      ``reference_pass@1``, McNemar) count the questions with a key only, and without any are
      "not applicable" (method ``"not applicable"``, value and interval null; McNemar None), not 0;
      ``report["accuracy_applicable"]`` and ``report["n_open"]`` say so.
    * With ``judge`` and a reference: ``win_rate_judge``, the same win rate judged by an LLM
      (:func:`judge_wins`, position-swapped; bootstrap), counts under
      ``report["vs_reference"]["llm_judge"]``.

    Args:
        model: checkpoint directory, preset or hub id (:func:`load_eval_model`).
        selection: the questions (:func:`select_tasks`).
        reference: model to measure KL and win rate against (None: skip those metrics).
        reward_model: reward-model directory or name (None: skip reward and win rate).
        judge: a :class:`rlhf_workbench.judge.PairwiseJudge` (:func:`make_judge`) for the LLM-judged
            win rate against the reference (None: skipped).
        k, n_samples, temperature, top_p: sampling settings (``n_samples >= k``).
        max_new_tokens, batch_size, mixed_precision: generation settings.
        seed: sampling seed.
        confidence, n_boot: interval coverage and bootstrap resamples (bootstrap seed fixed at
            :data:`BOOT_SEED`).
        progress: optional ``progress(label, total) -> advance(n)`` factory for progress bars.

    Returns:
        A JSON-serialisable dict: ``schema``, ``model``, ``model_path``, ``reference``,
        ``reward_model``, ``tasks`` (:meth:`TaskSelection.to_dict`), ``settings``, ``metrics``,
        ``vs_reference``, ``notes``, ``seconds`` and ``questions`` (one record per question:
        ``id``, ``question``, ``answer``, ``greedy``, ``samples``, ``reward``, ``reference``,
        ``win``, ``win_judge``, ``kl``).

    Raises:
        ValueError: bad settings (``k < 1``, ``n_samples < k``, temperature <= 0) or a model
            that cannot be loaded.
    """
    import time

    if k < 1:
        raise ValueError(f"--k must be at least 1, got {k}")
    n = n_samples if n_samples is not None else k
    if n < k:
        raise ValueError(f"--n-samples ({n}) must be at least --k ({k}): pass@k needs n >= k samples")
    sampling = k > 1 or n_samples is not None
    if sampling and temperature <= 0:
        raise ValueError(f"--temperature must be positive for sampling, got {temperature}")
    t0 = time.time()
    tasks = selection.tasks
    notes = list(selection.notes)
    est = dict(confidence=confidence, n_boot=n_boot)

    def bar(label: str, total: int):
        return progress(label, total) if progress else None

    policy, tok, path = load_eval_model(model)
    greedy, vers = _greedy(policy, tok, tasks, max_new_tokens, batch_size, mixed_precision, bar("greedy", len(tasks)),
                           lenient)
    comps = greedy.completions
    N = len(tasks)
    keyed = [not t.is_open for t in tasks]

    def keyed_rate(flags: Sequence[bool]) -> Estimate:
        """A proportion over the questions with an answer key; not applicable without any."""
        return _keyed_proportion(flags, keyed, confidence)

    metrics: dict[str, Estimate] = {
        "pass@1": keyed_rate(greedy.correct),
        "lenient_pass@1": keyed_rate(greedy.lenient_correct),
        "format_rate": keyed_rate(greedy.format_ok),
        "clipped_rate": proportion_estimate(sum(not c.finished for c in comps), N, confidence),
        "length": mean_estimate(greedy.lengths, **est),
    }
    questions = [{"id": t.id, "question": t.question, "answer": t.answer, "greedy": _answer_record(c, v),
                  "samples": None, "reward": None, "reference": None, "win": None, "win_judge": None, "kl": None}
                 for t, c, v in zip(tasks, comps, vers)]

    if sampling:
        torch.manual_seed(seed)
        sampled = generate(policy, tok, tasks, num_generations=n, do_sample=True, temperature=temperature, top_p=top_p,
                           max_new_tokens=max_new_tokens, batch_size=batch_size, mixed_precision=mixed_precision, progress=bar(f"sampling n={n}", N * n))
        pk, p1, mk = [], [], []  # over the questions with an answer key
        for i, t in enumerate(tasks):
            group = sampled[i * n : (i + 1) * n]
            sv = [verify(c.text, t, lenient) for c in group]
            answers, correct = [v.extracted for v in sv], [v.correct for v in sv]
            c = sum(correct)
            winner, votes = majority_vote(answers)
            scores = (pass_at_k(n, c, k), c / n, maj_at_k(answers, correct, k, seed=seed))
            if keyed[i]:
                pk.append(scores[0]), p1.append(scores[1]), mk.append(scores[2])
            questions[i]["samples"] = {"n": n, "correct": c, "pass@k": scores[0], "maj@k": scores[2], "vote": winner,
                                       "votes": votes, "extracted": answers, "verdicts": correct,
                                       "texts": [x.text for x in group], "tokens": [len(x.token_ids) for x in group]}
        if not p1:
            metrics.update(dict.fromkeys(("pass@1_sampled", "pass@k", "maj@k"), NOT_APPLICABLE))
        else:
            metrics["pass@1_sampled"] = mean_estimate(p1, **est)
            metrics["pass@k"] = mean_estimate(pk, **est)
            metrics["maj@k"] = (proportion_estimate(int(sum(mk)), len(mk), confidence) if n == k
                                else mean_estimate(mk, **est))

    ref_name, vs_reference = None, None
    ref_model = ref_tok = None
    if reference is not None:
        ref_model, ref_tok, ref_path = load_eval_model(reference)
        if same_model(ref_path, path):
            notes.append(f"the reference {reference} is the model itself: KL is 0 and no win rate is computed")
            ref_model = None
        else:
            ref_name = reference
    if ref_model is not None:
        if ref_tok.get_vocab() != tok.get_vocab():
            notes.append(f"reference {reference} has another vocabulary: no token KL")
        else:
            per = token_kl_per_completion(PolicyPair(policy, ref_model, tok), comps, max(1, min(batch_size, 16)),
                                          mixed_precision)
            kept = [(s, m) for s, m in per if m]
            metrics["kl_token"] = ratio_estimate([s for s, _ in kept], [m for _, m in kept], **est)
            metrics["kl_seq"] = mean_estimate([s for s, _ in kept], **est)
            for q, (s, m) in zip(questions, per):
                q["kl"] = {"sum": s, "tokens": m}

    rewards = score = None
    if reward_model is not None:
        score, note = load_scorer(reward_model)
        if note:
            notes.append(note)
        rewards = score(tasks, [c.text for c in comps])
        metrics["reward"] = mean_estimate(rewards, **est)
        for q, r in zip(questions, rewards):
            q["reward"] = r
    if ref_model is not None and (score is not None or judge is not None):
        ref_res, ref_vers = _greedy(ref_model, ref_tok, tasks, max_new_tokens, batch_size, mixed_precision,
                                    bar("reference greedy", N), lenient)
        ref_comps = ref_res.completions
        metrics["reference_pass@1"] = keyed_rate(ref_res.correct)
        vs_reference = {"mcnemar": _mcnemar_dict([c for c, x in zip(ref_res.correct, keyed) if x],
                                                 [c for c, x in zip(greedy.correct, keyed) if x]) if any(keyed) else None}
        for q, c, v in zip(questions, ref_comps, ref_vers):
            q["reference"] = _answer_record(c, v)
        if score is not None:
            ref_rewards = score(tasks, [c.text for c in ref_comps])
            wins = [win_value(r, rr, c.text == rc.text) for r, rr, c, rc in zip(rewards, ref_rewards, comps, ref_comps)]
            metrics["reward_reference"] = mean_estimate(ref_rewards, **est)
            metrics["win_rate"] = mean_estimate(wins, **est)
            vs_reference["reward_model"] = {"wins": wins.count(1.0), "ties": wins.count(0.5),
                                            "losses": wins.count(0.0)}
            for q, rr, w in zip(questions, ref_rewards, wins):
                q["reference"]["reward"] = rr
                q["win"] = w
        if judge is not None:
            points, jstats = judge_wins(judge, tasks, [c.text for c in comps], [c.text for c in ref_comps],
                                        bar("LLM judge", N))
            metrics["win_rate_judge"] = mean_estimate(points, **est)
            vs_reference["llm_judge"] = {"wins": points.count(1.0), "ties": points.count(0.5),
                                         "losses": points.count(0.0), **jstats}
            for q, w in zip(questions, points):
                q["win_judge"] = w
    elif ref_model is not None:
        notes.append("no --reward-model or judge: no reward and no win rate against the reference")
    elif judge is not None:
        notes.append("no reference: the LLM judge has nothing to compare with")

    if not any(keyed):
        notes.append("open tasks (no answer key): pass@1, format rate and the other accuracies are not applicable; "
                     "judge the answers with --reward-model or an LLM judge (win rate vs the reference)")
    return {
        "schema": "rlhf-eval/1",
        "model": str(model), "model_path": path, "reference": ref_name, "reward_model": reward_model,
        "accuracy_applicable": any(keyed), "n_open": N - sum(keyed),
        "tasks": selection.to_dict(),
        "settings": {"k": k, "n_samples": n if sampling else 0, "temperature": temperature if sampling else None,
                     "top_p": top_p if sampling else None, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                     "mixed_precision": mixed_precision, "seed": seed, "confidence": confidence, "n_boot": n_boot,
                     "bootstrap_seed": BOOT_SEED, "tie_tolerance": TIE_TOL},
        "metrics": {name: e.to_dict() for name, e in metrics.items()},
        "vs_reference": vs_reference,
        "notes": notes,
        "seconds": round(time.time() - t0, 1),
        "questions": questions,
    }


EVAL_ROWS: tuple[tuple[str, str], ...] = (
    ("pass@1", "pass@1 (greedy)"), ("lenient_pass@1", "lenient pass@1 (last number)"), ("format_rate", "format rate"),
    ("pass@1_sampled", "pass@1 (sampled)"), ("pass@k", "pass@{k} (unbiased)"), ("maj@k", "maj@{k}"),
    ("reward", "reward (RM)"), ("reward_reference", "reward of reference (RM)"),
    ("reference_pass@1", "reference pass@1 (greedy)"), ("win_rate", "win rate vs reference (RM)"),
    ("win_rate_judge", "win rate vs reference (LLM judge)"),
    ("kl_token", "KL to reference / token"), ("kl_seq", "KL to reference / answer"),
    ("length", "length (tokens)"), ("clipped_rate", "clipped at max tokens"),
)


def _method_text(m: dict) -> str:
    return {"wilson": "Wilson", "bootstrap": "bootstrap", "bootstrap-ratio": "bootstrap (ratio)",
            "newcombe-paired": "Newcombe paired"}.get(m["method"], m["method"])


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def print_eval_report(report: dict, console) -> None:
    """Print an :func:`eval_report` as a rich table: metric, estimate, 95% interval, method."""
    from rich.markup import escape
    from rich.table import Table

    s, t = report["settings"], report["tasks"]
    conf = int(round(100 * s["confidence"]))
    table = Table(title=escape(f"{report['model']} on {t['n']} {t['split']} questions of {t['source']}"),
                  title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column(f"{conf}% CI", no_wrap=True)
    table.add_column("CI method")
    for key, label in EVAL_ROWS:
        m = report["metrics"].get(key)
        if m is None:
            continue
        digits = 1 if key == "length" else (4 if key.startswith("kl") else 3)
        ci = "n/a" if m["ci_low"] is None else f"[{m['ci_low']:.{digits}f}, {m['ci_high']:.{digits}f}]"
        table.add_row(label.format(k=s["k"]), _fmt(m["value"], digits), ci, _method_text(m))
    console.print(table)
    bits = [f"reference: {escape(str(report['reference'] or 'none'))}"]
    if s["n_samples"]:
        bits.append(f"{s['n_samples']} samples/question at T={s['temperature']}")
    vs = report.get("vs_reference")
    if vs:
        mc = vs["mcnemar"]  # None when no question has an answer key
        if "reward_model" in vs:
            w = vs["reward_model"]
            bits.append(f"reward model: {w['wins']} wins / {w['ties']} ties / {w['losses']} losses")
        if "llm_judge" in vs:
            j = vs["llm_judge"]
            bits.append(f"LLM judge: {j['wins']} wins / {j['ties']} ties / {j['losses']} losses "
                        f"({j['consistent']} consistent pairs, {j['unparsed']} unparsed replies)")
        if mc is not None:
            bits.append(f"McNemar vs reference: {mc['improved']} improved, {mc['regressed']} regressed, "
                        f"p={mc['p_value']:.3g}")
    console.print("; ".join(bits))
    for note in report["notes"]:
        console.print(f"[yellow]note[/]: {escape(note)}")


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_report(report: dict, path: str | Path) -> Path:
    """Write an :func:`eval_report` / ``compare_report`` as strict JSON (NaN and inf -> null),
    creating parent directories.

    Raises:
        OSError: the file cannot be written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(report), indent=1, ensure_ascii=False, allow_nan=False) + "\n")
    return path
