"""Frozen-backbone reward model: cached pooled features of a frozen causal LM + a trained scalar head.

Full fine-tuning of a 135M reward model on a CPU sees a few hundred pairs in a quarter of an
hour and stays near chance on HH-RLHF (benchmarks/results/reward_model_hh.json, earlier runs).
Here the backbone is frozen, so every text needs exactly one no-grad forward pass: texts are
``prompt + completion + eos`` (:func:`rlhf_workbench.train.rm_inputs.encode_texts`) *left*-truncated
to their final ``max_tokens`` tokens (the budget goes to the final turns, where chosen and
rejected differ), the hidden states of one layer are pooled into a feature vector (cached), and
a linear head ``r(x) = w · (f(x) - μ) / σ + b`` is fitted on the cached features for many epochs
with the Bradley–Terry loss (:func:`rlhf_workbench.train.rm_loss.bradley_terry_loss`; Christiano et al.
2017, Ouyang et al. 2022 eq. 1), AdamW with decoupled weight decay and a cosine learning-rate
schedule. ``μ, σ`` standardise each feature over the training texts (mid-layer hidden states
have a few huge dimensions that would otherwise dominate the step sizes).

Pooling (``pooling``): ``"last"`` (hidden state at the last token, the eos; what
``AutoModelForSequenceClassification`` reads), ``"mean"`` (mean over the window's tokens) or
``"mean_last"`` (both concatenated, ``2 × hidden`` features). ``layer`` indexes
``hidden_states`` (0 = embeddings, -1 = the final layer after the final norm). Decision
(default ``mean_last``, ``layer=-1``, ``max_tokens=128``): a feasibility run on a machine like
this one (SmolLM2-135M, bf16, 1,849 HH harmless-base train pairs, 463 held out) gave 62.2 %
held-out with mean+last of the final layer. The benchmark's selection study (partial run on a
busy CPU, benchmarks/results/reward_model_hh.json ``selection``: 308 training pairs, 76
validation pairs from the train split) gave, at weight decay 0.1: layer 10 last 68.4 %, mean
59.2 %, mean_last 63.2 %; layer 20 last 73.7 %, mean 65.8 %, mean_last 73.7 %; final layer last
71.1 %, mean 64.5 %, mean_last 69.7 % (weight decay 0.01-1 changed little). Mean pooling alone is
worst everywhere; last and mean_last are within noise (±10 points at 76 pairs), as are layer 20
and the final layer, so the default stays mean_last of the final layer (which reached 64.8 %
[Wilson 56.2, 72.6] on 128 held-out pairs after 384 training pairs there).

Saved format (:meth:`PooledRewardModel.save_pretrained`): a directory with ``config.json`` (the
backbone's config, ``architectures`` ``...ForSequenceClassification``, ``num_labels`` 1, so
``AutoConfig`` and :func:`rlhf_workbench.evaluation.scoring.load_scorer` see a reward model),
``reward_head.safetensors`` (``weight [1, F]``, ``bias [1]``, ``feature_mean [F]``,
``feature_std [F]``) and ``reward_head.json`` (``format``, ``backbone``, ``pooling``, ``layer``,
``max_tokens``, ``mixed_precision``, ``feature_dim``); the tokenizer is saved beside them. The
backbone weights are *referenced* (``backbone``: a preset name or an absolute directory), not
copied, unless ``save_pretrained(..., save_backbone=True)``.
:func:`rlhf_workbench.train.reward_model.load_reward_model` loads such a directory transparently.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel
from transformers.modeling_outputs import SequenceClassifierOutput

from rlhf_workbench.model.loading import resolve_mixed_precision, resolve_model_path
from rlhf_workbench.train.rm_inputs import encode_texts, right_pad
from rlhf_workbench.train.rm_loss import bradley_terry_loss

HEAD_CONFIG = "reward_head.json"
HEAD_WEIGHTS = "reward_head.safetensors"
HEAD_FORMAT = "rlhf_workbench.pooled_reward_head.v1"
BACKBONE_DIR = "backbone"
POOLINGS = ("last", "mean", "mean_last")


def left_truncate(ids: torch.Tensor, mask: torch.Tensor, max_tokens: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each right-padded row's final ``max_tokens`` real tokens (still right-padded).

    Args:
        ids, mask: ``[B, T]`` token ids and attention mask (1 = real token), right padding.
        max_tokens: window length (None: unchanged).

    Returns:
        ``[B, min(T, max_tokens)]`` ids and mask; padding positions keep the pad id of ``ids``.
    """
    if max_tokens is None or ids.shape[1] <= max_tokens:
        return ids, mask
    lengths = mask.sum(1)
    start = (lengths - max_tokens).clamp(min=0)
    pos = start[:, None] + torch.arange(max_tokens, device=ids.device)[None, :]
    keep = torch.arange(max_tokens, device=ids.device)[None, :] < lengths.clamp(max=max_tokens)[:, None]
    pos = pos.clamp(max=ids.shape[1] - 1)
    new_ids = torch.gather(ids, 1, pos)
    pad = ids[mask == 0][:1]
    new_ids = torch.where(keep, new_ids, pad if pad.numel() else new_ids)
    return new_ids, keep.to(mask.dtype)


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pooled features ``[B, F]`` (fp32) of hidden states ``[B, T, H]`` under mask ``[B, T]``
    (right padding): ``last`` (F = H), ``mean`` (F = H) or ``mean_last`` (F = 2H, mean first).

    Raises:
        ValueError: unknown ``pooling``.
    """
    hidden = hidden.float()
    m = mask.to(hidden.dtype)[:, :, None]
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), mask.sum(1).long() - 1]
    mean = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    if pooling == "last":
        return last
    if pooling == "mean":
        return mean
    if pooling == "mean_last":
        return torch.cat([mean, last], dim=-1)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


class RewardHead(nn.Module):
    """Linear scalar head on standardised features: ``r = w · (f - μ) / σ + b``.

    Shapes: ``f [..., F]`` -> ``r [...]``; buffers ``feature_mean``, ``feature_std`` ``[F]``.
    The weight starts at zero (every reward 0, loss ln 2).
    """

    def __init__(self, feature_dim: int):
        super().__init__()
        self.linear = nn.Linear(feature_dim, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))

    def standardize_from(self, feats: torch.Tensor) -> None:
        """Set ``μ, σ`` to the per-feature mean and std of ``feats [N, F]`` (σ floored at 1e-6)."""
        self.feature_mean.copy_(feats.mean(0))
        self.feature_std.copy_(feats.std(0).clamp(min=1e-6) if feats.shape[0] > 1 else torch.ones_like(feats[0]))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """Rewards ``[...]`` of features ``[..., F]``."""
        return self.linear((feats.float() - self.feature_mean) / self.feature_std).squeeze(-1)


class PooledRewardModel(nn.Module):
    """A frozen backbone (``AutoModel``) + :class:`RewardHead` on pooled hidden states.

    Behaves like a ``num_labels=1`` sequence-classification model for the reward-model code:
    ``model(input_ids, attention_mask).logits`` is ``[B, 1]``, ``model.config.pad_token_id`` is
    set, ``save_pretrained(dir)`` writes a directory that
    :func:`rlhf_workbench.train.reward_model.load_reward_model` reads back. Inputs are right-padded
    rows of any length; each row is left-truncated to its last ``max_tokens`` tokens inside
    :meth:`features`, so callers' own ``max_length`` does not change the reward as long as it is
    at least ``max_tokens``.

    Attributes:
        backbone: the frozen transformer (``requires_grad`` off, eval mode).
        head: the trainable :class:`RewardHead`.
        pooling, layer, max_tokens: see the module docstring.
        mixed_precision: ``"bf16"`` (autocast for the backbone's forward) or ``"no"``.
        backbone_ref: preset name or absolute directory the backbone was loaded from (saved).
    """

    def __init__(self, backbone: nn.Module, pooling: str = "mean_last", layer: int = -1,
                 max_tokens: int | None = 128, mixed_precision: str = "no", backbone_ref: str = "",
                 head: RewardHead | None = None):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if mixed_precision not in ("no", "bf16"):
            raise ValueError(f"mixed_precision must be 'no' or 'bf16', got {mixed_precision!r}")
        self.backbone = backbone.eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        hidden = backbone.config.hidden_size
        self.head = head or RewardHead(2 * hidden if pooling == "mean_last" else hidden)
        self.pooling, self.layer, self.max_tokens = pooling, layer, max_tokens
        self.mixed_precision, self.backbone_ref = mixed_precision, backbone_ref
        self.config = backbone.config
        self.config.num_labels = 1
        self.n_forward = 0  # backbone forward passes so far (one per batch)

    def train(self, mode: bool = True):
        """Only the head changes mode; the frozen backbone stays in eval mode (no dropout)."""
        super().train(mode)
        self.backbone.eval()
        return self

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 layers: Sequence[int] | None = None, poolings: Sequence[str] | None = None):
        """Pooled features of right-padded rows, no gradient, one backbone forward pass.

        Args:
            input_ids, attention_mask: ``[B, T]``.
            layers, poolings: for a study of several at once: returns
                ``{(layer, pooling): [B, F]}``; None: ``[B, F]`` of ``self.layer``/``self.pooling``.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ids, mask = left_truncate(input_ids, attention_mask, self.max_tokens)
        device = ids.device
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                             enabled=self.mixed_precision == "bf16"):
            out = self.backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        self.n_forward += 1
        if layers is None and poolings is None:
            return pool(out.hidden_states[self.layer], mask, self.pooling)
        return {(la, po): pool(out.hidden_states[la], mask, po)
                for la in (layers or [self.layer]) for po in (poolings or [self.pooling])}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_):
        """``SequenceClassifierOutput`` whose ``logits`` are the rewards ``[B, 1]`` (fp32)."""
        return SequenceClassifierOutput(logits=self.head(self.features(input_ids, attention_mask))[:, None])

    def save_pretrained(self, out_dir: str | Path, save_backbone: bool = False, **_) -> None:
        """Write ``config.json``, ``reward_head.safetensors`` and ``reward_head.json`` to
        ``out_dir`` (and the backbone's weights under ``out_dir/backbone`` with
        ``save_backbone``); the tokenizer is saved by the caller, as for a Hugging Face model."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        cfg = self.config.__class__.from_dict(self.config.to_dict())
        archs = [a.replace("ForCausalLM", "ForSequenceClassification").replace("Model", "ForSequenceClassification")
                 if not a.endswith("ForSequenceClassification") else a for a in (cfg.architectures or [])]
        cfg.architectures = archs or [type(self.backbone).__name__.replace("Model", "ForSequenceClassification")]
        cfg.num_labels = 1
        cfg.save_pretrained(out)
        ref = self.backbone_ref
        if save_backbone:
            self.backbone.save_pretrained(out / BACKBONE_DIR)
            ref = BACKBONE_DIR
        h = self.head
        save_file({"weight": h.linear.weight.detach().float().contiguous(),
                   "bias": h.linear.bias.detach().float().contiguous(),
                   "feature_mean": h.feature_mean.float().contiguous(),
                   "feature_std": h.feature_std.float().contiguous()}, str(out / HEAD_WEIGHTS))
        (out / HEAD_CONFIG).write_text(json.dumps({
            "format": HEAD_FORMAT, "backbone": ref, "pooling": self.pooling, "layer": self.layer,
            "max_tokens": self.max_tokens, "mixed_precision": self.mixed_precision,
            "feature_dim": h.linear.in_features}, indent=1))


def is_pooled_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory saved by :meth:`PooledRewardModel.save_pretrained`."""
    return (Path(path) / HEAD_CONFIG).is_file()


def _backbone_ref(name_or_path: str) -> str:
    """A preset/hub name as given; a local directory as an absolute path (so the reference
    still resolves from another working directory)."""
    p = Path(name_or_path)
    return str(p.resolve()) if p.exists() else name_or_path


def load_backbone(name_or_path: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The base transformer (``AutoModel``, no LM head) of a causal LM checkpoint.

    Raises:
        OSError: the checkpoint cannot be found or read.
    """
    return AutoModel.from_pretrained(resolve_model_path(name_or_path), dtype=dtype)


def new_pooled_reward_model(backbone: str, pooling: str = "mean_last", layer: int = -1, max_tokens: int | None = 128,
                            mixed_precision: str = "auto") -> PooledRewardModel:
    """A frozen ``backbone`` (preset, hub id or directory) with a fresh zero head.

    ``mixed_precision`` ``"auto"`` is decided by :func:`rlhf_workbench.model.loading.resolve_mixed_precision`
    (bf16 when this CPU's measured bf16 matmul is >= 1.5× fp32, or a bf16-capable GPU).
    """
    return PooledRewardModel(load_backbone(backbone), pooling, layer, max_tokens,
                             resolve_mixed_precision(mixed_precision), _backbone_ref(backbone))


def load_pooled_reward_model(path: str | Path) -> PooledRewardModel:
    """Load a directory written by :meth:`PooledRewardModel.save_pretrained`.

    Raises:
        ValueError: ``reward_head.json`` has another format or its feature size does not match
            the weights.
        OSError: the referenced backbone cannot be loaded.
    """
    path = Path(path)
    meta = json.loads((path / HEAD_CONFIG).read_text())
    if meta.get("format") != HEAD_FORMAT:
        raise ValueError(f"{path / HEAD_CONFIG}: field 'format' is {meta.get('format')!r}, expected {HEAD_FORMAT!r}")
    ref = meta["backbone"]
    local = path / ref
    backbone = load_backbone(str(local) if ref == BACKBONE_DIR and local.is_dir() else ref)
    w = load_file(str(path / HEAD_WEIGHTS))
    head = RewardHead(int(meta["feature_dim"]))
    if w["weight"].shape != head.linear.weight.shape:
        raise ValueError(f"{path / HEAD_WEIGHTS}: weight shape {tuple(w['weight'].shape)} does not match "
                         f"'feature_dim' {meta['feature_dim']} in {path / HEAD_CONFIG}")
    with torch.no_grad():
        head.linear.weight.copy_(w["weight"])
        head.linear.bias.copy_(w["bias"])
        head.feature_mean.copy_(w["feature_mean"])
        head.feature_std.copy_(w["feature_std"])
    return PooledRewardModel(backbone, meta["pooling"], int(meta["layer"]), meta["max_tokens"],
                             meta["mixed_precision"], ref, head)


# --------------------------------------------------------------------------------------------
# cached features and head training
# --------------------------------------------------------------------------------------------


def extract_features(model: PooledRewardModel, rows: Sequence[Sequence[int]], pad_id: int, batch_size: int = 16,
                     layers: Sequence[int] | None = None, poolings: Sequence[str] | None = None):
    """Features of token rows, one no-grad backbone pass per batch; rows are batched by length
    (less padding) and returned in the input order.

    Returns:
        ``[N, F]`` fp32 on the CPU, or ``{(layer, pooling): [N, F]}`` with ``layers``/``poolings``
        (see :meth:`PooledRewardModel.features`).
    """
    device = next(model.parameters()).device
    rows = [list(r)[-model.max_tokens:] if model.max_tokens else list(r) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    parts, study = [], layers is not None or poolings is not None
    for i in range(0, len(order), batch_size):
        ids, mask = right_pad([rows[j] for j in order[i: i + batch_size]], pad_id, device)
        parts.append(model.features(ids, mask, layers, poolings))
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    if not study:
        return torch.cat([p.cpu() for p in parts])[inverse]
    return {k: torch.cat([p[k].cpu() for p in parts])[inverse] for k in parts[0]}


def pair_features(model: PooledRewardModel, tokenizer, pairs, batch_size: int = 16,
                  layers: Sequence[int] | None = None, poolings: Sequence[str] | None = None):
    """``(chosen, rejected)`` features of pairs (``[N, F]`` each, or dicts as in
    :func:`extract_features`), each distinct text forwarded once (a prompt's shared completions
    and repeated pairs are not recomputed)."""
    prompts = [p.prompt for p in pairs]
    rows = (encode_texts(tokenizer, prompts, [p.chosen for p in pairs])
            + encode_texts(tokenizer, prompts, [p.rejected for p in pairs]))
    if model.max_tokens:
        rows = [r[-model.max_tokens:] for r in rows]
    index: dict[tuple, int] = {}
    ids = [index.setdefault(tuple(r), len(index)) for r in rows]
    feats = extract_features(model, [list(k) for k in index], tokenizer.pad_token_id, batch_size, layers, poolings)
    n = len(pairs)
    take = torch.tensor(ids, dtype=torch.long)
    if isinstance(feats, dict):
        return ({k: v[take[:n]] for k, v in feats.items()}, {k: v[take[n:]] for k, v in feats.items()})
    return feats[take[:n]], feats[take[n:]]


def fit_head(head: RewardHead, chosen: torch.Tensor, rejected: torch.Tensor, epochs: int = 30, lr: float = 3e-3,
             weight_decay: float = 0.1, batch_size: int = 64, seed: int = 0, margins: torch.Tensor | None = None,
             eval_features: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[dict[str, float]]:
    """Fit ``head`` on cached pair features with the Bradley–Terry loss.

    ``-log σ(r(f_c) - r(f_r) - m)`` (:func:`~rlhf_workbench.train.rm_loss.bradley_terry_loss`, Ouyang et
    al. 2022 eq. 1; margin m from Llama 2 when ``margins`` is given), AdamW (decoupled
    ``weight_decay``) with a cosine schedule from ``lr`` to 0 over all steps; pairs shuffled
    every epoch with ``seed``. ``μ, σ`` are first set from the chosen and rejected features.

    Args:
        head: the head to train (in place).
        chosen, rejected: ``[N, F]`` features.
        epochs, lr, weight_decay, batch_size, seed: optimisation settings.
        margins: ``[N]`` required reward gaps, or None.
        eval_features: held-out ``(chosen, rejected)`` features; adds ``eval_accuracy`` per epoch.

    Returns:
        One dict per epoch: ``epoch`` (1-based), ``pairs_seen``, ``loss`` (nats, mean over the
        epoch's steps), ``accuracy`` (training pairs, after the epoch), ``margin`` (mean
        ``r_c - r_r``), ``learning_rate`` (at the epoch's last step) and ``eval_accuracy``.

    Raises:
        ValueError: no pairs, or shapes that do not match.
    """
    if chosen.shape != rejected.shape or chosen.ndim != 2 or chosen.shape[0] == 0:
        raise ValueError(f"fit_head: chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} "
                         "must be the same non-empty [N, F]")
    head.standardize_from(torch.cat([chosen, rejected]))
    n = chosen.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, epochs * steps_per_epoch) / (epochs * steps_per_epoch))))
    rng = random.Random(seed)
    head.train()
    out = []
    for epoch in range(1, epochs + 1):
        order = list(range(n))
        rng.shuffle(order)
        losses = []
        for i in range(0, n, batch_size):
            idx = torch.tensor(order[i: i + batch_size], device=chosen.device)
            loss, _ = bradley_terry_loss(head(chosen[idx]), head(rejected[idx]),
                                         None if margins is None else margins[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lr_now = sched.get_last_lr()[0]
            sched.step()
            losses.append(loss.item())
        with torch.no_grad():
            d = head(chosen) - head(rejected)
            rec = {"epoch": epoch, "pairs_seen": epoch * n, "loss": sum(losses) / len(losses),
                   "accuracy": (d > 0).float().mean().item(), "margin": d.mean().item(), "learning_rate": lr_now}
            if eval_features is not None:
                rec["eval_accuracy"] = head_accuracy(head, *eval_features)
        out.append(rec)
    head.eval()
    return out


def head_accuracy(head: RewardHead, chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Fraction of pairs (features ``[N, F]``) with ``r(chosen) > r(rejected)`` (ties wrong)."""
    with torch.no_grad():
        return (head(chosen) > head(rejected)).float().mean().item()


def train_reward_head(model: PooledRewardModel, tokenizer, pairs, epochs: int = 30, lr: float = 3e-3,
                      weight_decay: float = 0.1, batch_size: int = 64, seed: int = 0,
                      feature_batch_size: int = 16, eval_pairs=None) -> list[dict[str, float]]:
    """Cache the pairs' features (one backbone pass per distinct text), then :func:`fit_head`.

    Args:
        model: a :class:`PooledRewardModel` (its head is trained in place).
        tokenizer: its tokenizer (pad token set).
        pairs: :class:`~rlhf_workbench.train.reward_model.RewardPair` list; margins are used when every
            pair has one.
        eval_pairs: held-out pairs for the per-epoch ``eval_accuracy`` (their features are cached
            too).
        epochs, lr, weight_decay, batch_size, seed: head training (:func:`fit_head`).
        feature_batch_size: texts per backbone forward.

    Returns:
        :func:`fit_head`'s per-epoch records; the first also has ``feature_seconds`` (wall time
        of the feature pass) and ``texts_forwarded``.

    Raises:
        ValueError: no pairs.
    """
    if not pairs:
        raise ValueError("train_reward_head: no pairs")
    t0 = time.time()
    n0 = model.n_forward
    fc, fr = pair_features(model, tokenizer, pairs, feature_batch_size)
    ev = pair_features(model, tokenizer, eval_pairs, feature_batch_size) if eval_pairs else None
    feature_s, passes = time.time() - t0, model.n_forward - n0
    dev = model.head.feature_mean.device
    fc, fr = fc.to(dev), fr.to(dev)
    ev = None if ev is None else (ev[0].to(dev), ev[1].to(dev))
    ms = [p.margin for p in pairs]
    margins = None if any(m is None for m in ms) else torch.tensor(ms, dtype=torch.float32, device=dev)
    metrics = fit_head(model.head, fc, fr, epochs, lr, weight_decay, batch_size, seed, margins, ev)
    metrics[0].update(feature_seconds=feature_s, forward_passes=passes)
    return metrics
