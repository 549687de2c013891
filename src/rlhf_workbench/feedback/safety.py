"""Safety filter: flag traces that must never be preferred, whatever their correctness.

The loop treats a flagged trace like a wrong one: it is unranked, gets reward 0 and is never
the chosen side of a preference pair (it can be the rejected side). Two kinds of check,
configured by :class:`rlhf_workbench.config.SafetyConfig`:

- **patterns**: regular expressions (Python ``re`` syntax, case-insensitive, searched anywhere
  in the trace) from the config and/or a file with one regex per line (blank lines and lines
  starting with ``#`` are skipped). ``patterns_file: bundled:<name>`` reads a list shipped in
  ``rlhf_workbench/data/safety_<name>.txt`` (``bundled:medical``: an illustrative list of
  dangerous clinical advice, not a vetted policy).
- **classifier**: a ``transformers`` text-classification model (local directory or hub id),
  run with ``transformers.pipeline``; a trace is flagged when the probability of
  ``classifier_label`` is at least ``threshold``.

Patterns run first; the classifier only sees traces that no pattern flagged.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

from rlhf_workbench.config import SafetyConfig

SafetyFn = Callable[[Sequence[str]], list[str | None]]


@dataclass(frozen=True)
class SafetyPattern:
    """A compiled pattern and where it came from (``patterns[2]`` or ``file.txt:7``)."""

    regex: re.Pattern
    origin: str

    def reason(self) -> str:
        """``"pattern '<regex>'"``, plus the file and line for a file pattern."""
        where = f" ({self.origin})" if not self.origin.startswith("patterns[") else ""
        return f"pattern {self.regex.pattern!r}{where}"


def resolve_patterns_file(path: str | Path) -> Path:
    """A patterns file's path; ``bundled:<name>`` is ``rlhf_workbench/data/safety_<name>.txt``.

    Raises:
        FileNotFoundError: no such file (or no such bundled list, with the available names).
    """
    path = str(path)
    if path.startswith("bundled:"):
        name = path.split(":", 1)[1]
        data = resources.files("rlhf_workbench") / "data"
        found = Path(str(data / f"safety_{name}.txt"))
        if not found.is_file():
            names = sorted(p.name[len("safety_"):-4] for p in Path(str(data)).glob("safety_*.txt"))
            raise FileNotFoundError(f"safety.patterns_file: no bundled list {name!r} (available: {', '.join(names)})")
        return found
    if not Path(path).is_file():
        raise FileNotFoundError(f"safety.patterns_file: {path}: file not found")
    return Path(path)


def load_patterns_file(path: str | Path) -> list[SafetyPattern]:
    """Compile the regexes of a patterns file (one per line; blank and ``#`` lines skipped;
    surrounding whitespace stripped).

    Raises:
        FileNotFoundError: see :func:`resolve_patterns_file`.
        ValueError: a line is not a valid regex; the message is ``<file>:<line>: invalid regex ...``.
    """
    file = resolve_patterns_file(path)
    out = []
    for line_no, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            out.append(SafetyPattern(re.compile(text, re.IGNORECASE), f"{file}:{line_no}"))
        except re.error as e:
            raise ValueError(f"{file}:{line_no}: invalid regex {text!r}: {e}") from e
    return out


class SafetyFilter:
    """Flags texts; ``filter(texts)`` returns, per text, None or the reason it was flagged.

    Args:
        patterns: compiled patterns (the first match is the reason).
        classifier: a ``transformers`` text-classification pipeline, or None.
        label: the classifier label that means unsafe.
        threshold: flag when that label's probability is ``>= threshold``.
        batch_size: texts per classifier batch.
    """

    def __init__(self, patterns: Sequence[SafetyPattern] = (), classifier=None, label: str = "unsafe",
                 threshold: float = 0.5, batch_size: int = 16):
        self.patterns, self.classifier, self.label = list(patterns), classifier, label
        self.threshold, self.batch_size = threshold, batch_size

    def __call__(self, texts: Sequence[str]) -> list[str | None]:
        """One entry per text: None (not flagged), ``"pattern '<regex>'"`` (with ``(file:line)``
        for a file pattern) or ``"classifier <label> <probability>"`` (two decimals)."""
        reasons: list[str | None] = []
        for t in texts:
            hit = next((p for p in self.patterns if p.regex.search(t)), None)
            reasons.append(hit.reason() if hit else None)
        if self.classifier is not None:
            todo = [i for i, r in enumerate(reasons) if r is None]
            for i, p in zip(todo, self.label_probabilities([texts[i] for i in todo])):
                if p >= self.threshold:
                    reasons[i] = f"classifier {self.label} {p:.2f}"
        return reasons

    def label_probabilities(self, texts: Sequence[str]) -> list[float]:
        """The classifier's probability of :attr:`label` for each text (0.0 without a classifier)."""
        if self.classifier is None or not texts:
            return [0.0] * len(texts)
        outs = self.classifier(list(texts), top_k=None, truncation=True, batch_size=self.batch_size)
        return [next((d["score"] for d in out if d["label"] == self.label), 0.0) for out in outs]


@functools.lru_cache(maxsize=2)
def load_classifier(name_or_path: str, label: str):
    """A text-classification pipeline for ``name_or_path`` (GPU when available), loaded once
    per process (the loop rebuilds its filter every round).

    The tokenizer gets a pad token (its EOS) when it has none, so batches work for decoder
    models (e.g. ``LlamaForSequenceClassification``).

    Raises:
        OSError: the model cannot be loaded.
        ValueError: ``label`` is not one of the model's labels (``config.id2label``), naming
            the field ``safety.classifier_label`` and the labels available.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    labels = list(model.config.id2label.values())
    if label not in labels:
        raise ValueError(f"safety.classifier_label: {label!r} is not a label of {name_or_path} (labels: {labels})")
    device = 0 if torch.cuda.is_available() else -1
    return pipeline("text-classification", model=model.eval(), tokenizer=tokenizer, device=device)


def make_safety_filter(cfg: SafetyConfig | None) -> SafetyFn:
    """The filter a config describes: ``filter(texts) -> [None | reason, ...]``.

    ``cfg`` None gives a filter that flags nothing. Patterns from ``cfg.patterns`` and
    ``cfg.patterns_file`` are compiled here, and the classifier is loaded here, so config
    errors surface before the first round.

    Raises:
        FileNotFoundError: ``patterns_file`` does not exist.
        ValueError: a bad regex (``patterns[i]`` or ``<file>:<line>``), or a classifier label
            the model does not have.
    """
    if cfg is None:
        return lambda texts: [None] * len(texts)
    patterns = []
    for i, p in enumerate(cfg.patterns):
        try:
            patterns.append(SafetyPattern(re.compile(p, re.IGNORECASE), f"patterns[{i}]"))
        except re.error as e:
            raise ValueError(f"safety.patterns[{i}]: invalid regex {p!r}: {e}") from e
    if cfg.patterns_file:
        patterns += load_patterns_file(cfg.patterns_file)
    classifier = load_classifier(cfg.classifier, cfg.classifier_label) if cfg.classifier else None
    return SafetyFilter(patterns, classifier, cfg.classifier_label, cfg.threshold)
