"""PPO with a learned critic for language models (Ouyang et al. 2022; Schulman et al. 2017).

One call of :func:`ppo_update` trains on one rollout batch. For each completion ``y`` of
prompt ``x`` (tokens ``y_0 … y_{n-1}``, state ``s_t = x y_{<t}``), in order:

1. rollout quantities, no gradient (π_old = the policy that sampled, all log-probs at the
   rollout temperature τ, i.e. of ``softmax(logits / τ)``)::

       logp_old_t = log π_old(y_t | s_t)          recomputed, or recorded at rollout (below)
       logp_ref_t = log π_ref(y_t | s_t)          frozen reference
       V_old_t    = V_φ(s_t)                      critic, value of the state *before* y_t
       score      = r(x, y)  [- missing_eos_penalty if y was cut by max_new_tokens]

2. per-token reward with a KL penalty (k1; Ouyang et al. eq. 2; score on the last token)::

       kl_t = logp_old_t - logp_ref_t
       r_t  = -β kl_t + [t = n-1] · score

3. GAE (Schulman et al. 2016, eq. 16), episode ends after y_{n-1} (V_n = 0)::

       δ_t = r_t + γ V_old_{t+1} - V_old_t
       A_t = δ_t + γλ A_{t+1}
       R_t = A_t + V_old_t                         value targets

4. whiten: ``A ← (A - mean(A)) / sqrt(var(A) + 1e-8)`` over all completion tokens of the
   (global) batch

5. ``ppo_epochs`` × ``num_mini_batches`` optimizer steps: each epoch shuffles the batch and
   cuts it into ``min(num_mini_batches, B)`` near-equal minibatches, each step runs over
   micro-batches with gradient accumulation (token-weighted, so the step's loss is the
   minibatch's token mean whatever the micro-batch size or number of processes)::

       ρ_t    = exp(logp_t - logp_old_t)
       L^π    = mean_t max(-A_t ρ_t, -A_t clip(ρ_t, 1-ε, 1+ε))                  (PPO eq. 7)
       L^V    = ½ mean_t max((V_t - R_t)², (clip(V_t, V_old_t ± c) - R_t)²)
       loss   = L^π + vf_coef L^V - entropy_coef mean_t H_t

   then one clipped-gradient AdamW step on the policy and the critic together.

Old log-probs (``optim.old_logps``): with ``recompute``, or ``auto`` (the default) under bf16
autocast (:func:`rlhf_workbench.train.engine.recompute_old_logps`), ``logp_old`` is the
policy's own, computed without gradient before step 1's other passes in exactly the forward,
autocast and micro-batches of the first epoch's minibatches (the epoch permutations are drawn
first), so the first optimizer step's ratio is exactly 1, also under bf16 autocast where the
log-probs recorded while decoding differ from a training forward's by ~0.03 nats/token on
SmolLM2-135M (:func:`rlhf_workbench.train.engine.old_logps_pass` gives the reasons and the cost: one
no-grad policy forward per round). They also enter the KL penalty and ``objective/entropy``, as in
TRL, which recomputes them too. Otherwise the recorded log-probs are used as they are.

The maths is in :mod:`rlhf_workbench.train.ppo_losses` (:func:`~rlhf_workbench.train.ppo_losses.kl_penalty_rewards`,
:func:`~rlhf_workbench.train.ppo_losses.gae_advantages`, :func:`~rlhf_workbench.train.ppo_losses.masked_whiten`,
:func:`~rlhf_workbench.train.ppo_losses.ppo_loss`); TRL's PPOTrainer/PPOv2Trainer is the reference
design and metrics carry its names.

The critic is ``AutoModelForSequenceClassification`` (``num_labels=1``) loaded by
:func:`rlhf_workbench.train.reward_model.load_reward_model`, used per token as TRL PPOv2's
``get_reward`` does: the backbone (``model.<base_model_prefix>``) then the ``score`` head on
every position. Huang et al. (2024) initialise the value model from the reward model; a run
with rule rewards has none, so by default it starts from the policy's base model with a
fresh head (``ppo.critic_init`` can name a reward model or any other checkpoint instead).

Data-parallel (``W = accelerator.num_processes``): the design of :mod:`rlhf_workbench.train.engine`
(read its module docstring): its planning and sharding, and its micro-step loop
(:meth:`~rlhf_workbench.train.engine.Phase.micro_steps`) over the policy and the critic together.
``samples`` is the global batch, the same list on every process. Step 1's reference and critic
passes are sharded (process ``r`` takes the ``r``-th of ``W`` contiguous shards of the batch;
padding forwards keep the count of forwards of the wrapped modules equal) and one all-reduce of
the zero-filled ``[2, B, T]`` tensor of reference log-probs and rollout values gives every
process all rows. Steps 2-4 are then computed redundantly on every process over the whole
``[B, T]`` batch (elementwise work and one backward scan over ``T``, negligible next to a
forward pass), so the whitening statistics are those of the global batch's tokens and every
process holds identical advantages and returns without further communication. Step 5's
shuffles come from a generator seeded with ``cfg.seed`` and a digest of the batch's token ids:
the same permutations on every process without communication, a different one for each
batch. Each minibatch is one optimizer step cut into ``W`` contiguous shards; each process
backpropagates ``W · Σ_{its tokens} ℓ_t / N_minibatch`` (``N_minibatch`` the completion tokens
of the global minibatch), through the prepared (DDP-wrapped) policy and critic, gradients of
both synchronised once per step, so the averaged gradient, the clipped norm and the step equal
one process's on the same batch. Metrics are sums over each process's tokens reduced with one
collective at the end: every process returns the one-process numbers up to float rounding
(``tests/test_distributed.py``).
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedModel

from rlhf_workbench.config import RunConfig
from rlhf_workbench.model.loading import PolicyPair, resolve_model_path
from rlhf_workbench.model.logprobs import completion_logps, scale_logits, token_logps
from rlhf_workbench.model.rollout import autocast, pad_batch
from rlhf_workbench.train.engine import (
    Phase,
    Tally,
    all_sum,
    micro_batches,
    plan,
    recompute_old_logps,
    require_old_logps,
    sharded_reference,
    split,
    tally_drift,
)
from rlhf_workbench.train.ppo_losses import explained_variance, gae_advantages, kl_penalty_rewards, masked_whiten, ppo_loss
from rlhf_workbench.train.reward_model import load_reward_model
from rlhf_workbench.train.samples import Sample

CRITIC_DIR = "critic"  # suggested sub-directory of a round checkpoint for save_critic


class Critic(torch.nn.Module):
    """Per-token value model: a sequence-classification model's backbone and scalar ``score`` head.

    ``forward`` returns the head applied to every position's last hidden state, so the value at
    position ``i`` is ``V(tokens[: i + 1])``. Calling the wrapper (rather than the backbone
    directly) keeps it usable under ``accelerator.prepare`` (DDP hooks run in ``forward``).

    Attributes:
        model: the ``AutoModelForSequenceClassification`` (``num_labels=1``) it wraps; this is
            what :func:`save_critic` saves.
    """

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        if not hasattr(model, "score") or not hasattr(model, model.base_model_prefix):
            raise ValueError(
                f"Critic: {type(model).__name__} has no `score` head or `{model.base_model_prefix}` backbone"
            )
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` float32 values for ``[B, L]`` token ids (position ids follow the mask, as
        :func:`rlhf_workbench.model.logprobs.completion_logps`); values at padding are meaningless."""
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        backbone = getattr(self.model, self.model.base_model_prefix)
        hidden = backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return self.model.score(hidden).squeeze(-1).float()


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP / accelerate wrapper (``.module``), or the module itself."""
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module
    return module


def load_critic(cfg: RunConfig, checkpoint: str | None = None, base_path: str | None = None) -> Critic:
    """Load the critic: from a saved critic directory, else a fresh scalar head on a backbone.

    Args:
        cfg: the run config (``model.name`` / ``model.cache_dir`` / ``model.dtype``,
            ``model.gradient_checkpointing``, ``ppo.critic_init``).
        checkpoint: a directory written by :func:`save_critic` (resume); loaded as is.
        base_path: already-resolved path of the policy's base model (skips
            :func:`rlhf_workbench.model.loading.resolve_model_path`).

    Returns:
        A :class:`Critic` in train mode, dtype ``cfg.model.dtype``. Without ``checkpoint`` its
        backbone is ``ppo.critic_init`` if set, else the policy's base model (not a resumed
        policy checkpoint), and its ``score`` head is freshly initialised by transformers (seed
        torch first for reproducibility). Always full-parameter, also when the policy uses LoRA.
    """
    base = base_path or resolve_model_path(cfg.model.name, cfg.model.cache_dir)
    source = checkpoint or (resolve_model_path(cfg.ppo.critic_init, cfg.model.cache_dir) if cfg.ppo.critic_init else base)
    tokenizer = AutoTokenizer.from_pretrained(base)  # only for the pad id load_reward_model sets
    model, _ = load_reward_model(source, cfg.model.dtype, tokenizer=tokenizer)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return Critic(model).train()


def save_critic(critic: torch.nn.Module, out_dir: str | Path) -> Path:
    """Save the critic so that :func:`load_critic` (``checkpoint=out_dir``) restores it exactly.

    Accepts the :class:`Critic` or its accelerate/DDP wrapper. Written to a temporary sibling and
    renamed (as :func:`rlhf_workbench.model.loading.save_policy`), so a crash never leaves a partial
    directory; an existing ``out_dir`` is replaced.

    Returns:
        ``out_dir`` as a Path.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    _unwrap(critic).model.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def make_optimizer(pair: PolicyPair, critic: torch.nn.Module, cfg: RunConfig) -> torch.optim.AdamW:
    """One AdamW over policy and critic: group 0 the policy's trainable parameters at
    ``cfg.optim.lr``, group 1 the critic's at ``cfg.ppo.critic_lr``; weight decay
    ``cfg.optim.weight_decay`` for both. Build it before ``accelerator.prepare``; its
    ``state_dict`` covers both modules (save it with the checkpoint to resume)."""
    return torch.optim.AdamW(
        [
            {"params": [p for p in pair.policy.parameters() if p.requires_grad], "lr": cfg.optim.lr},
            {"params": [p for p in _unwrap(critic).parameters() if p.requires_grad], "lr": cfg.ppo.critic_lr},
        ],
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
    )


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def token_values(critic: torch.nn.Module, samples: list[Sample], pad_id: int, mixed_precision: str = "no",
                 batch_size: int | None = None) -> torch.Tensor:
    """Critic values aligned with the completion tokens: ``values[i, t] = V(prompt_i + y_i[:t])``.

    The value of completion token ``t`` is the value of the state *before* it is emitted, i.e.
    the head's output at the position of the preceding token (the last prompt token for
    ``t = 0``), the same position whose logits give ``log π(y_t | ·)``. With
    :func:`rlhf_workbench.model.rollout.pad_batch`'s layout (left-padded prompts, right-padded
    completions of length ``T``) these are columns ``-T-1 … -2`` of the row (TRL PPOv2:
    ``full_value[:, context_length - 1 : -1]``).

    Args:
        critic: a :class:`Critic` (or its accelerate wrapper).
        samples: prompts and completions (``prompt_ids``, ``token_ids``).
        pad_id: the tokenizer's pad id.
        mixed_precision: ``"bf16"`` runs the forward under autocast.
        batch_size: sequences per forward (None: all at once). Gradients flow unless the caller
            disables them.

    Returns:
        ``[B, T]`` float32 values on the critic's device, ``T`` the longest completion, zero at padding.
    """
    device = _device(critic)
    out = []
    size = batch_size or len(samples)
    T = max(1, max(len(s.token_ids) for s in samples))
    for i in range(0, len(samples), size):
        chunk = samples[i : i + size]
        ids, mask, cmask = pad_batch([s.prompt_ids for s in chunk], [s.token_ids for s in chunk], pad_id)
        ids, mask, cmask = ids.to(device), mask.to(device), cmask.to(device)
        t = cmask.shape[1]
        with autocast(mixed_precision):
            v = critic(ids, mask)[:, -t - 1 : -1]
        v = torch.where(cmask.bool(), v, torch.zeros_like(v))
        out.append(torch.nn.functional.pad(v, (0, T - t)))
    return torch.cat(out)


def _policy_forward(model, samples: list[Sample], pad_id: int, temperature: float, mixed_precision: str,
                    with_entropy: bool, device: torch.device):
    """``(logps [B, T], entropy [B, T] or None, completion_mask [B, T])`` of the sampled tokens
    under ``softmax(logits.float() / temperature)`` (:func:`~rlhf_workbench.model.logprobs.token_logps`, as
    the rollout recorded them); entropy (nats) of that distribution per position."""
    ids, mask, cmask = pad_batch([s.prompt_ids for s in samples], [s.token_ids for s in samples], pad_id)
    ids, mask, cmask = ids.to(device), mask.to(device), cmask.to(device)
    T = cmask.shape[1]
    if not with_entropy:
        with autocast(mixed_precision):
            return completion_logps(model, ids, mask, T, temperature), None, cmask
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with autocast(mixed_precision):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                       logits_to_keep=T + 1).logits
    scaled = scale_logits(logits[:, :-1, :], temperature)  # float32, shared by log-probs and entropy
    logps = token_logps(scaled, ids[:, -T:])
    entropy = torch.logsumexp(scaled, dim=-1) - (torch.softmax(scaled, dim=-1) * scaled).sum(-1)
    return logps, entropy, cmask


def _eos_ids(pair: PolicyPair) -> set[int]:
    tok = pair.tokenizer
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    gen = getattr(getattr(pair.policy, "generation_config", None), "eos_token_id", None)
    ids |= set(gen if isinstance(gen, list) else [gen] if gen is not None else [])
    return ids


def truncated(samples: list[Sample], pair: PolicyPair, stop: list[str] | None = None) -> list[bool]:
    """Whether each completion was cut by the length cap: it ends neither with an EOS id (the
    tokenizer's or the generation config's) nor with the token ids of a stop string, which is
    :func:`rlhf_workbench.model.rollout.generate`'s ``finished`` flag negated. Prefer passing the stored
    ``finished`` flags to :func:`ppo_update` when you have them."""
    eos = _eos_ids(pair)
    stop_ids = [pair.tokenizer.encode(s, add_special_tokens=False) for s in stop or []]
    out = []
    for s in samples:
        ids = s.token_ids
        done = bool(ids) and (ids[-1] in eos or any(x and ids[-len(x):] == x for x in stop_ids))
        out.append(not done)
    return out


@torch.no_grad()
def _sharded_values(critic: torch.nn.Module, accelerator, samples: list[Sample], per_rank: list[list[int]],
                    pad_id: int, mixed_precision: str, batch_size: int) -> dict[int, torch.Tensor]:
    """Rollout values (:func:`token_values`, critic in eval mode) of this process's samples
    ``per_rank[rank]``, through the (possibly wrapped) critic; a process with fewer micro-batches
    runs padding forwards, since a forward of a wrapped module can be a collective.

    Returns:
        ``{index: [T_i] float32 tensor on accelerator.device}`` for this process's indices.
    """
    was_training = critic.training
    critic.eval()
    out: dict[int, torch.Tensor] = {}
    try:
        for chunk in micro_batches(per_rank, accelerator.process_index, batch_size):
            if chunk is None:  # a padding forward
                token_values(critic, samples[:1], pad_id, mixed_precision)
                continue
            values = token_values(critic, [samples[i] for i in chunk], pad_id, mixed_precision)
            for j, i in enumerate(chunk):
                out[i] = values[j, : len(samples[i].token_ids)].to(accelerator.device)
    finally:
        critic.train(was_training)
    return out


@torch.no_grad()
def _old_logps(policy, accelerator, samples: list[Sample], steps, pad_id: int, temperature: float,
               mixed_precision: str, with_entropy: bool, batch_size: int) -> dict[int, torch.Tensor]:
    """The policy's per-token log-probs (``optim.old_logps: recompute``) of this process's items of
    the first epoch's minibatches ``steps``, without gradient, by the very call and micro-batches
    (:func:`_policy_forward`, :func:`~rlhf_workbench.train.engine.micro_batches`, padding forwards
    included) of the training loop, so its first step recomputes them bit for bit (ratio 1).

    Returns:
        ``{index: [T_i] float32 tensor (nats) on accelerator.device}`` for this process's items.
    """
    out: dict[int, torch.Tensor] = {}
    for step in steps:
        for micro in micro_batches(step.shards, accelerator.process_index, batch_size):
            idx = step.items[:1] if micro is None else micro
            logps, _, _ = _policy_forward(policy, [samples[i] for i in idx], pad_id, temperature, mixed_precision,
                                          with_entropy, accelerator.device)
            for j, i in enumerate(micro or []):
                out[i] = logps[j, : len(samples[i].token_ids)].float()
    return out


def _shuffle_generator(samples: list[Sample], seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed`` and a digest of the batch's token ids: every process
    draws the same minibatch permutations without communicating, and each batch its own."""
    digest = hashlib.blake2b(str(seed).encode(), digest_size=8)
    for s in samples:
        digest.update(repr((s.prompt_ids, s.token_ids)).encode())
    return torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") & (2**63 - 1))


@dataclass
class _Batch:
    """The kept samples of one PPO batch and the tensors steps 1-4 compute over it (all ``[B, T]``
    on ``accelerator.device``, identical on every process)."""

    samples: list[Sample]
    mask: torch.Tensor
    old_logps: torch.Tensor
    ref: torch.Tensor | None = None
    old_values: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None


def _rollout_quantities(pair: PolicyPair, critic, accelerator, b: _Batch, cfg: RunConfig, recompute: bool,
                        first_epoch: list[int], drift: Tally) -> None:
    """Step 1 (no gradient): each process its shard of the reference log-probs and rollout values
    (and, when ``recompute``, the old log-probs of its items of the first epoch's minibatches
    ``first_epoch``), then one all-reduce of ``[3, B, T]``; sets ``b.ref``, ``b.old_values`` and,
    when recomputed, ``b.old_logps``."""
    p, rank, world = cfg.ppo, accelerator.process_index, accelerator.num_processes
    pad_id, temperature, mp = pair.tokenizer.pad_token_id, cfg.rollout.temperature, cfg.model.mixed_precision
    samples, (B, T) = b.samples, b.mask.shape
    shards = split(list(range(B)), world)
    ref_rows = sharded_reference(pair, accelerator, samples, shards, cfg, temperature)
    value_rows = _sharded_values(critic, accelerator, samples, shards, pad_id, mp, cfg.optim.micro_batch_size)
    local = torch.zeros(3, B, T, device=accelerator.device)
    for i in shards[rank]:
        n = len(samples[i].token_ids)
        local[0, i, :n] = ref_rows[i]
        local[1, i, :n] = value_rows[i]
    if recompute:
        fresh = _old_logps(pair.train_module, accelerator, samples, plan(first_epoch, p.num_mini_batches, world),
                           pad_id, temperature, mp, p.entropy_coef > 0, cfg.optim.micro_batch_size)
        tally_drift(drift, samples, fresh)
        for i, row in fresh.items():
            local[2, i, : row.numel()] = row
    b.ref, b.old_values, recomputed = all_sum(accelerator, local)
    if recompute:
        b.old_logps = recomputed


def _advantages(b: _Batch, scores: torch.Tensor, cfg: RunConfig) -> dict[str, float]:
    """Steps 2-4 over the whole batch, on every process: rewards with the KL penalty, GAE,
    whitening; sets ``b.advantages`` and ``b.returns`` and returns the ``objective/*`` and
    ``val/explained_variance`` metrics."""
    p, mask = cfg.ppo, b.mask
    with torch.no_grad():
        rewards, kl = kl_penalty_rewards(scores, b.old_logps, b.ref, mask, p.kl_coef)
        if p.whiten_rewards and mask.sum() > 1:
            rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
        advantages, returns = gae_advantages(rewards, b.old_values, mask, p.gamma, p.lam)
        if p.whiten_advantages and mask.sum() > 1:
            advantages = masked_whiten(advantages, mask) * mask
    b.advantages, b.returns = advantages, returns
    non_score = (-p.kl_coef * kl).sum(1).mean().item()
    return {
        "objective/kl": kl.sum(1).mean().item(),
        "objective/entropy": (-b.old_logps * mask).sum(1).mean().item(),
        "objective/non_score_reward": non_score,
        "objective/scores": scores.mean().item(),
        "objective/rlhf_reward": scores.mean().item() + non_score,
        "val/explained_variance": explained_variance(b.old_values, returns, mask).item(),
    }


def _train(pair: PolicyPair, critic, optimizer, accelerator, b: _Batch, perms: list[list[int]], cfg: RunConfig,
           recompute: bool, drift: Tally) -> dict[str, float]:
    """Step 5: epochs x minibatches (one optimizer step each, W shards) x micro-batches of
    :func:`~rlhf_workbench.train.ppo_losses.ppo_loss`, token-weighted; returns the step means of
    its metrics, ``grad_norm`` and ``steps``."""
    p, policy, device = cfg.ppo, pair.train_module, accelerator.device
    pad_id, temperature, mp = pair.tokenizer.pad_token_id, cfg.rollout.temperature, cfg.model.mixed_precision
    with_entropy = p.entropy_coef > 0
    names = ("policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg",
             "val/ratio") + (("policy/entropy_avg",) if with_entropy else ())
    # listed at each step: FSDP2 registers other parameter objects while a module is unsharded
    phase = Phase(accelerator, optimizer, [policy, critic],
                  lambda: [q for m in (policy, critic) for q in m.parameters() if q.requires_grad],
                  cfg.optim.max_grad_norm, "loss", *names)  # sums over steps of each step's minibatch token mean

    def forward(batch: list[Sample]):
        logps, entropy, cmask = _policy_forward(policy, batch, pad_id, temperature, mp, with_entropy, device)
        return logps, entropy, cmask, token_values(critic, batch, pad_id, mp)

    def pad_forward(idx: list[int]) -> torch.Tensor:
        logps, _, _, values = forward([b.samples[i] for i in idx])
        return logps.sum() + values.sum()

    steps = [st for perm in perms for st in plan(perm, p.num_mini_batches, accelerator.num_processes)]
    for mb in phase.micro_steps(steps, cfg.optim.micro_batch_size, pad_forward):
        idx = mb.items
        batch = [b.samples[i] for i in idx]
        logps, entropy, cmask, values = forward(batch)
        t = cmask.shape[1]
        if not recompute and mb.first_step:  # the policy has not moved yet: drift for free
            tally_drift(drift, batch, logps)
        loss, stats = ppo_loss(
            logps, b.old_logps[idx, :t], values, b.old_values[idx, :t], b.advantages[idx, :t], b.returns[idx, :t],
            cmask, p.cliprange, p.cliprange_value, p.vf_coef, entropy, p.entropy_coef,
        )
        weight = float(cmask.sum()) / float(b.mask[mb.step.items].sum())  # token share of the global minibatch
        phase.backward(loss * weight)
        phase.tally.add("loss", loss.item() * weight)
        for k in names:
            phase.tally.add(k, stats[k].item() * weight)
    sums = phase.reduce()
    return {**{k: v / len(phase.grad_norms) for k, v in sums.items()}, "grad_norm": phase.grad_norm,
            "steps": float(len(phase.grad_norms))}


def _scores(samples: list[Sample], finished: list[bool] | None, cfg: RunConfig, device) -> torch.Tensor:
    """``[B]`` sequence scores: ``Sample.reward`` minus ``ppo.missing_eos_penalty`` where unfinished."""
    scores = torch.tensor([float(s.reward) for s in samples], device=device)
    if cfg.ppo.missing_eos_penalty is not None:
        scores = scores - cfg.ppo.missing_eos_penalty * torch.tensor([not f for f in finished], dtype=torch.float32,
                                                                     device=device)
    return scores


def _batch_tensors(samples: list[Sample], recompute: bool, device) -> _Batch:
    """The completion mask and (unless ``recompute``) the recorded old log-probs as ``[B, T]``."""
    B, T = len(samples), max(len(s.token_ids) for s in samples)
    mask = torch.zeros(B, T, dtype=torch.long, device=device)
    old_logps = torch.zeros(B, T, device=device)
    for i, s in enumerate(samples):
        mask[i, : len(s.token_ids)] = 1
        if not recompute:
            old_logps[i, : len(s.token_ids)] = torch.tensor(s.old_logps, dtype=torch.float32)
    return _Batch(samples, mask, old_logps)


def ppo_update(pair: PolicyPair, critic: torch.nn.Module, optimizer, accelerator, samples: list[Sample],
               cfg: RunConfig, finished: list[bool] | None = None) -> dict[str, float]:
    """PPO on one rollout batch (see the module docstring for the equations, in order, and for
    the data-parallel design).

    Args:
        pair: policy / reference / tokenizer; the policy forward goes through ``pair.train_module``.
        critic: a :class:`Critic`, or under ``accelerate launch`` its prepared (DDP) wrapper,
            which every critic forward goes through.
        optimizer: from :func:`make_optimizer` (both modules' parameters; prepared or not).
        accelerator: the ``accelerate.Accelerator`` (``backward``, ``clip_grad_norm_``, ``no_sync``,
            ``reduce``; built with ``gradient_accumulation_steps=1``).
        samples: the global batch, identical on every process: one per completion, with
            ``prompt_ids``, ``token_ids``, ``old_logps`` (per token, recorded at rollout at
            ``cfg.rollout.temperature``; optional when they are recomputed, where they
            only feed ``rollout_logp_diff``) and ``reward`` (the sequence score). Completions without
            tokens are skipped. Whitening (advantages, and rewards when ``whiten_rewards``) is
            over all completion tokens of this batch, whatever the number of processes, and is
            skipped when the batch has fewer than two completion tokens.
        cfg: ``cfg.ppo`` hyperparameters, ``cfg.optim`` (``micro_batch_size``, ``max_grad_norm``),
            ``cfg.rollout.temperature``, ``cfg.model.mixed_precision``, ``cfg.seed`` (shuffling).
        finished: per sample, whether it ended with EOS / a stop string (the rollout's
            ``Completion.finished``); needed only for ``ppo.missing_eos_penalty``, inferred from
            the tokens with :func:`truncated` when None.

    Returns:
        Metrics named as TRL's PPO trainers log them, the same on every process:
        ``objective/kl`` (mean over sequences of the summed k1 KL, nats), ``objective/entropy``
        (mean summed ``-logp_old``), ``objective/non_score_reward`` (mean summed ``-β kl``),
        ``objective/scores`` (mean score after the missing-EOS penalty), ``objective/rlhf_reward``
        (their sum), ``val/explained_variance`` (of the returns by the rollout values), and
        averaged over optimizer steps (each a token mean over the step's minibatch):
        ``policy/approxkl_avg``, ``policy/clipfrac_avg``, ``loss/policy_avg``, ``loss/value_avg``,
        ``val/clipfrac_avg``, ``val/ratio``, ``policy/entropy_avg`` (only when
        ``entropy_coef > 0``), ``loss`` (total), ``grad_norm`` (global, before clipping); and
        ``steps`` (optimizer steps, ``ppo_epochs × min(num_mini_batches, B)``; 0 when there is
        nothing to train on); when the completions carry rollout log-probs, ``rollout_logp_diff``
        (mean ``|current - recorded|`` before any step, nats per token: over all completions with
        recomputed ones, else over the first minibatch's from its own forward).

    Raises:
        ValueError: a sample with ``old_logps`` not of the completion's length (or without any,
            when they are not recomputed), or ``finished`` of the wrong length.
    """
    p = cfg.ppo
    if finished is not None and len(finished) != len(samples):
        raise ValueError(f"ppo_update: {len(finished)} finished flags for {len(samples)} samples")
    keep = [i for i, s in enumerate(samples) if s.token_ids]
    recompute = recompute_old_logps(cfg)
    require_old_logps(samples, keep, "ppo_update", optional=recompute)
    if finished is None and p.missing_eos_penalty is not None:
        finished = [not t for t in truncated(samples, pair, cfg.rollout.stop)]
    samples = [samples[i] for i in keep]
    finished = [finished[i] for i in keep] if finished is not None else None
    if not samples:
        return {"loss": 0.0, "grad_norm": 0.0, "steps": 0.0}
    b = _batch_tensors(samples, recompute, accelerator.device)
    pair.train_module.train()
    critic.train()
    shuffle = _shuffle_generator(samples, cfg.seed)
    perms = [torch.randperm(len(samples), generator=shuffle).tolist() for _ in range(p.ppo_epochs)]
    drift = Tally("drift", "drift_tokens")
    _rollout_quantities(pair, critic, accelerator, b, cfg, recompute, perms[0], drift)
    metrics = _advantages(b, _scores(samples, finished, cfg, accelerator.device), cfg)
    metrics.update(_train(pair, critic, optimizer, accelerator, b, perms, cfg, recompute, drift))
    drift_sums = drift.reduce(accelerator)
    if drift_sums["drift_tokens"]:
        metrics["rollout_logp_diff"] = drift_sums["drift"] / drift_sums["drift_tokens"]
    return metrics
