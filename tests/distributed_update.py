"""One update of every algorithm on a fixed global batch, for comparing process counts.

    python tests/distributed_update.py OUT_DIR                       # one process
    accelerate launch --num_processes 2 --cpu --num_machines 1 --mixed_precision no \\
        --dynamo_backend no --main_process_port PORT tests/distributed_update.py OUT_DIR

Builds a tiny random Llama from a config with a fixed seed (nothing read from disk, no
tokenizer: token ids are drawn from a seeded generator), and for each case in ``CASES`` trains
a fresh copy of it with one call of the update on the same global batch, on every process.
PPO cases also train a fresh copy of a tiny random critic (a Llama sequence classifier with one
label, wrapped in :class:`rlhf_workbench.train.ppo.Critic`), prepared like the policy (DDP).
The optimizer is plain SGD, so the parameter change is ``-lr ×`` the clipped global gradient
(summed over the phase's steps) and comparing it compares gradients. The main process writes
``OUT_DIR/results.json`` (per case: the returned metrics, ``delta_abs_sum`` = Σ|Δθ| per
trained module, the metrics every process returned, and a parameter checksum per process,
which DDP keeps equal) and ``OUT_DIR/deltas.pt`` (per case, ``{"policy": Δθ, "critic": Δφ}``,
flattened parameter changes; ``critic`` for PPO only).

A one-process run also measures each case's float noise (``noise``): the same update again with
another micro-batch size (:func:`other_micro_batch_size`), mathematically the same but with
matmuls of other shapes, so float sums added in another order; per metric ``|m - m'|``, per
module ``max |Δ - Δ'|`` (``delta_max``) and ``|Σ|Δ| - Σ|Δ'||`` (``delta_abs_sum``). Process
counts change the shapes the same way, so this is the scale of the differences to expect
between them on this machine (on a 2-core AMD EPYC the one-step RLOO loss against the rollout
log-probs moved by 1.7e-5 relative: it is the mean of terms of both signs, ~15 times larger than it).
"""

from __future__ import annotations

import copy
import json
import sys
import types
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from rlhf_workbench.config import RunConfig
from rlhf_workbench.model.logprobs import completion_logps
from rlhf_workbench.model.loading import PolicyPair
from rlhf_workbench.train.ppo import Critic, ppo_update
from rlhf_workbench.train.dpo import dpo_update
from rlhf_workbench.train.grpo import grpo_update
from rlhf_workbench.train.kto import kto_update
from rlhf_workbench.train.rloo import rloo_update
from rlhf_workbench.train.samples import Sample
from rlhf_workbench.train.sft import sft_update

VOCAB, PAD, TEMPERATURE = 96, 0, 0.7


def _config(**kwargs) -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       tie_word_embeddings=True, pad_token_id=PAD, bos_token_id=1, eos_token_id=2, **kwargs)


def base_model() -> LlamaForCausalLM:
    """The tiny Llama every case starts from (seed 0, fp32)."""
    torch.manual_seed(0)
    return LlamaForCausalLM(_config())


def base_critic() -> LlamaForSequenceClassification:
    """The tiny value model every PPO case starts from (seed 2, fp32, one label)."""
    torch.manual_seed(2)
    return LlamaForSequenceClassification(_config(num_labels=1))


def _ids(g: torch.Generator, n: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


def _with_old_logps(model, samples: list[Sample], g: torch.Generator) -> list[Sample]:
    """Rollout-like old log-probs: the model's own at the sampling temperature, perturbed a little
    so that ratios differ from 1 (and some clip) where they are the old log-probs; in the cases
    with ``optim.old_logps: recompute`` they only feed ``rollout_logp_diff``."""
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s.prompt_ids + s.token_ids])
            lp = completion_logps(model, ids, torch.ones_like(ids), len(s.token_ids), TEMPERATURE)[0]
            s.old_logps = (lp + 0.15 * torch.randn(lp.shape, generator=g)).tolist()
    return samples


def batches(model) -> dict:
    """The fixed global batches (different prompt and completion lengths)."""
    g = torch.Generator().manual_seed(1234)
    prompts = [_ids(g, n) for n in (5, 3, 7)]
    lengths = [4, 9, 2, 6, 11, 3, 7, 5, 8]

    def grouped(k_per_prompt: int, n_prompts: int) -> list[Sample]:
        return [Sample(prompts[p], _ids(g, lengths[(p * k_per_prompt + k) % len(lengths)]))
                for p in range(n_prompts) for k in range(k_per_prompt)]

    grpo = _with_old_logps(model, grouped(3, 2) + [Sample(prompts[2], _ids(g, 6))], g)  # 7 samples
    for s, a in zip(grpo, [1.2, -0.4, -0.8, 0.0, 0.9, -0.9, 0.5]):
        s.advantage = a
    rloo = _with_old_logps(model, grouped(3, 2), g)  # 2 groups of K = 3
    for s, r in zip(rloo, [1.0, 0.0, 0.2, 0.0, 0.0, 1.0]):
        s.reward = r
    dpo = [(Sample(prompts[i % 3], _ids(g, lengths[i])), Sample(prompts[i % 3], _ids(g, lengths[i + 3])))
           for i in range(5)]
    kto = grouped(2, 3)[:5]
    for s, label in zip(kto, [True, False, False, True, True]):
        s.label = label
    sft = grouped(2, 3)[:5]
    ppo = _with_old_logps(model, grouped(2, 3)[:5], g)  # 5 samples: uneven over 2 processes
    for s, r in zip(ppo, [1.0, -0.5, 0.3, 0.0, -1.0]):
        s.reward = r
    finished = [True, False, True, True, False]  # two cut by the length cap (missing_eos_penalty)
    return {"grpo": grpo, "rloo": rloo, "dpo": dpo, "kto": kto, "sft": sft, "ppo": (ppo, finished)}


def _ppo(pair, critic, optimizer, accelerator, batch, cfg):
    samples, finished = batch
    return ppo_update(pair, critic, optimizer, accelerator, samples, cfg, finished=finished)


# name: (update, batch key, config overrides)
CASES = {
    "grpo": (grpo_update, "grpo", {"grpo": {"beta": 0.04, "loss_type": "grpo"},
                                   "optim": {"steps_per_round": 2, "old_logps": "recompute"}}),
    "grpo_dapo": (grpo_update, "grpo", {"grpo": {"beta": 0.0, "loss_type": "dapo", "epsilon_high": 0.28}}),
    # old log-probs (optim.old_logps; "auto" means rollout in fp32): recomputed in "grpo", "rloo", "ppo",
    # "ppo_lora"; recorded at rollout here, in "rloo_norm" and "ppo_entropy" (ratios off 1 from the first step)
    "grpo_dr": (grpo_update, "grpo", {"grpo": {"beta": 0.0, "loss_type": "dr_grpo"},
                                      "optim": {"steps_per_round": 3, "old_logps": "rollout"}}),
    "dpo": (dpo_update, "dpo", {"optim": {"steps_per_round": 3}}),  # steps of 2, 2, 1 pairs: an empty shard
    "dpo_accum": (dpo_update, "dpo", {"optim": {"micro_batch_size": 4}, "dpo": {"loss_type": "ipo"}}),
    # two steps: with one, the recomputed ratio is 1 and the loss -mean(A) is 0 up to float noise
    "rloo": (rloo_update, "rloo", {"optim": {"steps_per_round": 2, "old_logps": "recompute"}}),
    "rloo_norm": (rloo_update, "rloo", {"rloo": {"beta": 0.0, "normalize_advantages": True},
                                        "optim": {"steps_per_round": 2, "old_logps": "rollout"}}),
    "kto": (kto_update, "kto", {"optim": {"steps_per_round": 2}}),
    "sft": (sft_update, "sft", {"sft": {"epochs": 2}}),
    # LoRA: the reference is the wrapped policy with adapters disabled (padding forwards keep DDP in step).
    "kto_lora": (kto_update, "kto", {"optim": {"steps_per_round": 2, "lr": 1.0}, "lora": True}),
    # PPO: 2 epochs x 2 minibatches (3 + 2 of the 5 samples, shuffled), one sequence per
    # micro-batch: accumulation under no_sync, and the process with the shorter shard of the
    # 3-sample minibatch runs a padding micro-batch of policy and critic.
    "ppo": (_ppo, "ppo", {"ppo": {"ppo_epochs": 2, "num_mini_batches": 2, "kl_coef": 0.1, "critic_lr": 0.05},
                          "optim": {"micro_batch_size": 1, "old_logps": "recompute"}}),
    # 3 minibatches of 2, 2, 1 samples (the last: an empty shard), entropy bonus, whitened
    # rewards, missing-EOS penalty, a tight value clip that binds (val/clipfrac_avg ≈ 0.36).
    "ppo_entropy": (_ppo, "ppo", {"ppo": {"ppo_epochs": 1, "num_mini_batches": 3, "entropy_coef": 0.01,
                                          "whiten_rewards": True, "missing_eos_penalty": 0.5,
                                          "cliprange_value": 0.05, "critic_lr": 1.0},
                                  "optim": {"old_logps": "rollout"}}),
    # LoRA policy (reference = the wrapped policy with adapters disabled) and a full-weight
    # critic; shards of 3 + 2 samples in micro-batches of 2: padding forwards in the reference,
    # rollout-value and training passes. (vf_coef 0.5: the default's loss nearly cancels to 0.)
    "ppo_lora": (_ppo, "ppo", {"ppo": {"ppo_epochs": 2, "num_mini_batches": 1, "critic_lr": 0.05,
                                       "vf_coef": 0.5},
                               "optim": {"lr": 1.0, "old_logps": "recompute"}, "lora": True}),
}


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in params])


def run_case(accelerator: Accelerator, base, critic_base, batch, update,
             overrides: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    raw = {"model": {"name": "tiny", "mixed_precision": "no"},
           "rollout": {"num_generations": 3, "temperature": TEMPERATURE, "max_new_tokens": 12},
           "optim": {"lr": 0.1, "micro_batch_size": 2, "max_grad_norm": 1.0}}
    overrides = dict(overrides)
    lora = overrides.pop("lora", False)
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value}
    cfg = RunConfig.model_validate(raw)
    policy = copy.deepcopy(base)
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)
        policy = get_peft_model(policy, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
        pair = PolicyPair(policy=policy, reference=None, tokenizer=types.SimpleNamespace(pad_token_id=PAD))
    else:
        reference = copy.deepcopy(base).eval().requires_grad_(False)
        pair = PolicyPair(policy=policy, reference=reference, tokenizer=types.SimpleNamespace(pad_token_id=PAD))
    params = {"policy": [p for p in policy.parameters() if p.requires_grad]}
    if update is _ppo:
        critic = Critic(copy.deepcopy(critic_base))
        params["critic"] = [p for p in critic.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD([{"params": params["policy"], "lr": cfg.optim.lr},
                                     {"params": params["critic"], "lr": cfg.ppo.critic_lr}], lr=cfg.optim.lr)
    else:
        optimizer = torch.optim.SGD(params["policy"], lr=cfg.optim.lr)
    before = {k: _flat(v) for k, v in params.items()}
    if update is _ppo:
        pair.train_module, critic, optimizer = accelerator.prepare(policy, critic, optimizer)
        stats = update(pair, critic, optimizer, accelerator, copy.deepcopy(batch), cfg)
    else:
        pair.train_module, optimizer = accelerator.prepare(policy, optimizer)
        stats = update(pair, optimizer, accelerator, copy.deepcopy(batch), cfg)
    return stats, {k: _flat(v) - before[k] for k, v in params.items()}


def other_micro_batch_size(overrides: dict) -> int:
    """The micro-batch size of a case's noise run: 1 (every sequence alone, no padding), or 3 for
    a case that already runs with 1."""
    return 3 if overrides.get("optim", {}).get("micro_batch_size", 2) == 1 else 1


def float_noise(accelerator, base, critic_base, batch, update, overrides: dict, stats: dict,
                delta_by_module: dict[str, torch.Tensor]) -> dict:
    """The case again with :func:`other_micro_batch_size`: how far its results move when only the
    shapes of the matmuls (so the order of float additions) change."""
    optim = {**overrides.get("optim", {}), "micro_batch_size": other_micro_batch_size(overrides)}
    stats2, delta2 = run_case(accelerator, base, critic_base, batch, update, {**overrides, "optim": optim})
    return {"metrics": {k: abs(stats2[k] - v) for k, v in stats.items()},
            "delta_max": {k: (d - delta2[k]).abs().max().item() for k, d in delta_by_module.items()},
            "delta_abs_sum": {k: abs(d.abs().sum().item() - delta2[k].abs().sum().item())
                              for k, d in delta_by_module.items()}}


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    base, critic_base = base_model(), base_critic()
    data = batches(base)
    results, deltas = {}, {}
    for name, (update, key, overrides) in CASES.items():
        stats, delta_by_module = run_case(accelerator, base, critic_base, data[key], update, overrides)
        delta = torch.cat(list(delta_by_module.values()))
        results[name] = {
            "metrics": stats,
            "delta_abs_sum": {k: d.abs().sum().item() for k, d in delta_by_module.items()},
            "metrics_by_process": gather_object([stats]) if accelerator.num_processes > 1 else [stats],
            "checksum_by_process": gather_object([(delta.double() * torch.arange(delta.numel())).sum().item()])
            if accelerator.num_processes > 1 else [None],
        }
        if accelerator.num_processes == 1:
            results[name]["noise"] = float_noise(accelerator, base, critic_base, data[key], update, overrides,
                                                 stats, delta_by_module)
        deltas[name] = delta_by_module
    if accelerator.is_main_process:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"num_processes": accelerator.num_processes, "cases": results},
                                                     indent=1))
        torch.save(deltas, out / "deltas.pt")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
