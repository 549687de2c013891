"""Updates under FSDP2 against one process, on the fixed batches of ``distributed_update.py``.

    python tests/fsdp_worker.py OUT_DIR                                  # one process, no sharding
    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 \\
        --main_process_port PORT tests/fsdp_worker.py OUT_DIR            # FSDP2 over gloo

For each case of :data:`CASES` (a subset of ``distributed_update.CASES``: GRPO with its KL term,
DPO with an empty shard, KTO, PPO with its critic) a fresh copy of the tiny random Llama is
trained with one call of the update, with SGD (the parameter change is ``-lr ×`` the clipped
global gradient). One process runs ``distributed_update.run_case`` unchanged. Under FSDP the
policy, the critic and the frozen reference are sharded by
:meth:`rlhf_workbench.model.sharding.Gatherer.prepare`, as the loop does; afterwards the full
parameters are gathered onto the main process (:meth:`Gatherer.for_main`, the path the loop's
checkpoints take). The main process writes ``OUT_DIR/results.json`` (per case: metrics,
``sharded``: whether policy / reference / critic were FSDP modules and the fraction of the
policy's elements this process held) and ``OUT_DIR/deltas.pt`` (per case ``{"policy": Δθ,
"critic": Δφ}``, flattened in ``parameters()`` order).
"""

from __future__ import annotations

import copy
import json
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from distributed_update import CASES as ALL_CASES  # noqa: E402
from distributed_update import PAD, _flat, _ppo, base_critic, base_model, batches, run_case  # noqa: E402

from rlhf_workbench.config import RunConfig  # noqa: E402
from rlhf_workbench.model.loading import PolicyPair  # noqa: E402
from rlhf_workbench.train.ppo import Critic  # noqa: E402
from rlhf_workbench.model.sharding import Gatherer, is_fsdp, is_sharded, make_accelerator  # noqa: E402

CASES = {name: ALL_CASES[name] for name in ("grpo", "dpo", "kto", "ppo")}


def _cfg(overrides: dict) -> RunConfig:
    """The case's config, built as ``distributed_update.run_case`` builds it."""
    raw = {"model": {"name": "tiny", "mixed_precision": "no"},
           "rollout": {"num_generations": 3, "temperature": 0.7, "max_new_tokens": 12},
           "optim": {"lr": 0.1, "micro_batch_size": 2, "max_grad_norm": 1.0}}
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value}
    return RunConfig.model_validate(raw)


def run_sharded_case(accelerator, base, critic_base, batch, update, overrides: dict):
    """One case under FSDP; returns ``(metrics, sharding facts, {module: Δ} on the main process)``."""
    cfg = _cfg(overrides)
    policy, reference = copy.deepcopy(base), copy.deepcopy(base).eval().requires_grad_(False)
    pair = PolicyPair(policy=policy, reference=reference, tokenizer=types.SimpleNamespace(pad_token_id=PAD))
    critic = Critic(copy.deepcopy(critic_base)) if update is _ppo else None
    gatherer = Gatherer(accelerator, pair, critic)
    groups = [{"params": list(policy.parameters()), "lr": cfg.optim.lr}]
    if critic is not None:
        groups.append({"params": list(critic.parameters()), "lr": cfg.ppo.critic_lr})
    optimizer = torch.optim.SGD(groups, lr=cfg.optim.lr)
    pair.train_module, critic, optimizer = gatherer.prepare(optimizer)  # as the loop prepares
    local = sum(p.to_local().numel() for p in pair.train_module.parameters())
    facts = {"policy": is_sharded(pair.train_module), "reference": is_sharded(pair.reference),
             "critic": critic is None or is_sharded(critic),
             "policy_local_fraction": local / sum(p.numel() for p in base.parameters())}
    if update is _ppo:
        stats = update(pair, critic, optimizer, accelerator, copy.deepcopy(batch), cfg)
    else:
        stats = update(pair, optimizer, accelerator, copy.deepcopy(batch), cfg)
    full, full_critic = gatherer.for_main()
    if full is None:
        return stats, facts, None
    deltas = {"policy": _flat(full.policy.parameters()) - _flat(base.parameters())}
    if full_critic is not None:
        deltas["critic"] = _flat(full_critic.parameters()) - _flat(Critic(critic_base).parameters())
    return stats, facts, deltas


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    accelerator = make_accelerator(mixed_precision="no")
    base, critic_base = base_model(), base_critic()
    data = batches(base)
    results, deltas = {}, {}
    for name, (update, key, overrides) in CASES.items():
        if is_fsdp(accelerator):
            stats, facts, delta = run_sharded_case(accelerator, base, critic_base, data[key], update, overrides)
        else:
            stats, delta = run_case(accelerator, base, critic_base, data[key], update, overrides)
            facts = {}
        results[name] = {"metrics": stats, "sharded": facts}
        deltas[name] = delta
    if accelerator.is_main_process:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({
            "num_processes": accelerator.num_processes, "fsdp": is_fsdp(accelerator), "cases": results}, indent=1))
        torch.save(deltas, out / "deltas.pt")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
