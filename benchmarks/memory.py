"""Peak memory of one policy update per algorithm on SmolLM2-135M, and PPO's options (issue 16).

    nice -n 5 python benchmarks/memory.py                  # every case (a few minutes of CPU)
    python benchmarks/memory.py --only ppo ppo_lora        # some: memory_only_ppo_ppo_lora.json
    nice -n 5 python benchmarks/memory.py --full-round     # one whole PPO round: memory_full_round.json

Each case runs in a fresh worker process (:func:`_common.run_isolated`, so no case inherits
another's memory) and does what the loop does around an update: load the policy (and the
reference, and PPO's critic) with :func:`~rlhf_workbench.model.loading.load_policy` /
:func:`~rlhf_workbench.train.ppo.load_critic`, build AdamW, ``prepare`` them, then run one round's
update (``loop._update``) on a fixed synthetic batch: 16 sequences (PPO, GRPO, RLOO, KTO, SFT;
DPO: 8 pairs) of a 64-token prompt and a 48-token completion, one micro-batch of 16 (the demo
configs' ``micro_batch_size``: more sequences per round add micro-batches, not memory), fp32
weights without autocast (``mixed_precision: no``), one epoch. Token ids are drawn
from a seeded generator: memory depends on the shapes, not the text.

Why the update and not the whole round: the update is where the round's memory peaks — the
models, their gradients, AdamW's two moments per trained weight and one micro-batch's
activations meet there. ``--full-round`` checks that on a whole PPO round through ``loop.run``
(:data:`FULL_ROUND_SETTINGS`: 4 prompts × 4 samples, ≤ 24 new tokens, fp32, evaluation before and
after, the checkpoint) in a fresh worker: its peak RSS, the RSS just before the update and the
wall time, written by that run to its own file, ``benchmarks/results/memory_full_round.json``.
Every number in either file is measured by the run that writes it.

Reported per case (MiB): ``peak_rss_mb`` (the worker's peak resident set size, ``VmHWM``),
``loaded_rss_mb`` (resident after loading and preparing, before the update), and ``tensors``:
``policy`` / ``reference`` / ``critic`` parameters (a storage counted once: tied embeddings, a
LoRA reference that is the policy itself counts 0), ``trainable`` (their trained parameters:
gradients take as much), ``adamw`` (AdamW's ``exp_avg`` + ``exp_avg_sq`` after the step).

Cases: ``grpo`` (β = 0.04: with the reference), ``dpo``, ``kto``, ``rloo``, ``sft``, ``ppo``
(full policy, frozen reference copy, full critic: TRL PPOv2's layout), and PPO's memory options:
``ppo_gc`` (``model.gradient_checkpointing``: activations recomputed in backward),
``ppo_lora`` (``model.lora``: the reference is the policy with adapters disabled, no copy, and
AdamW covers the adapters only; the critic stays full), ``ppo_lora_gc`` (both).
Writes ``benchmarks/results/memory.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (ROOT, RESULTS, command_line, device_info, peak_rss_mb, print_table, reset_peak_rss,  # noqa: E402
                     rss_mb, run_isolated, write_result)

MIB = 2 ** 20
N_SEQ, PROMPT, COMPLETION, MICRO = 16, 64, 48, 16
LORA = {"r": 16, "alpha": 32, "target_modules": "all-linear"}
BASE = {"model": {"name": "smollm2-135m", "mixed_precision": "no"},
        "rollout": {"num_generations": 4, "max_new_tokens": COMPLETION},
        "optim": {"micro_batch_size": MICRO, "lr": 1e-5, "old_logps": "rollout"},
        "ppo": {"ppo_epochs": 1, "num_mini_batches": 1}, "grpo": {"beta": 0.04}}

# name: (algorithm, config overrides merged one level deep into BASE)
CASES: dict[str, tuple[str, dict]] = {  # PPO first: on a busy machine the others may be run later (--only)
    "ppo": ("ppo", {}),
    "ppo_lora": ("ppo", {"model": {"lora": LORA}}),
    "ppo_gc": ("ppo", {"model": {"gradient_checkpointing": True}}),
    "ppo_lora_gc": ("ppo", {"model": {"lora": LORA, "gradient_checkpointing": True}}),
    "grpo": ("grpo", {}),
    "dpo": ("dpo", {}),
    "sft": ("sft", {}),
    "kto": ("kto", {}),
    "rloo": ("rloo", {}),
}
# the whole round of --full-round: configs/ppo.yaml with these overrides
FULL_ROUND_SETTINGS = ["rounds=1", "rollout.prompts_per_round=4", "rollout.num_generations=4",
                       "rollout.max_new_tokens=24", "optim.micro_batch_size=16", "model.mixed_precision=\"no\"",
                       "tasks.max_heldout=32", "eval.kl_samples=0", "keep_checkpoints=1"]


def _config(algorithm: str, overrides: dict) -> dict:
    raw = {k: dict(v) for k, v in BASE.items()}
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value}
    return {"algorithm": "grpo" if algorithm == "sft" else algorithm, **raw}


def _mib(tensors) -> float:
    """Total size of ``tensors`` in MiB, each storage counted once."""
    seen, total = set(), 0
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total / MIB


def _batch(algorithm: str, vocab: int) -> list:
    """The synthetic global batch: ``N_SEQ`` sequences (DPO: ``N_SEQ / 2`` pairs)."""
    import torch

    from rlhf_workbench.train.samples import Sample

    g = torch.Generator().manual_seed(0)

    def sample(i: int) -> Sample:
        s = Sample(torch.randint(3, vocab, (PROMPT,), generator=g).tolist(),
                   torch.randint(3, vocab, (COMPLETION,), generator=g).tolist())
        s.old_logps = (-torch.rand(COMPLETION, generator=g) * 5).tolist()
        s.reward = float(i % 3 == 0)
        s.advantage = 1.0 if i % 2 else -1.0
        s.label = i % 2 == 0
        return s

    if algorithm == "dpo":
        return [(sample(2 * i), sample(2 * i + 1)) for i in range(N_SEQ // 2)]
    return [sample(i) for i in range(N_SEQ)]


def one_update(algorithm: str, raw: dict) -> dict:
    """Load, prepare and run one update of ``algorithm`` in this process; memory in MiB."""
    import torch

    from rlhf_workbench.config import RunConfig
    from rlhf_workbench.run.loop import _update
    from rlhf_workbench.model.loading import load_policy
    from rlhf_workbench.train.ppo import load_critic, make_optimizer
    from rlhf_workbench.model.sharding import Gatherer, make_accelerator

    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = RunConfig.model_validate(raw)
    accelerator = make_accelerator(mixed_precision="no")
    pair = load_policy(cfg.model)
    critic = load_critic(cfg) if algorithm == "ppo" else None
    if critic is not None:
        optimizer = make_optimizer(pair, critic, cfg)
    else:
        optimizer = torch.optim.AdamW([p for p in pair.policy.parameters() if p.requires_grad], lr=cfg.optim.lr)
    pair.train_module, critic, optimizer = Gatherer(accelerator, pair, critic).prepare(optimizer)
    batch = _batch(algorithm, pair.policy.config.vocab_size)
    loaded = rss_mb()
    reset_peak_rss()
    t0 = time.perf_counter()
    stats = _update(algorithm, pair, critic, optimizer, accelerator, batch, cfg)
    seconds = time.perf_counter() - t0
    modules = {"policy": pair.policy, "reference": pair.reference, "critic": critic}
    trainable = [p for m in (pair.policy, critic) if m is not None for p in m.parameters() if p.requires_grad]
    adamw = [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t) and t.dim() > 0]
    return {"peak_rss_mb": max(peak_rss_mb(), loaded), "loaded_rss_mb": loaded, "update_s": round(seconds, 1),
            "loss": stats.get("loss"), "steps": stats.get("steps"),
            "tensors": {**{k: _mib(m.parameters()) if m is not None else 0.0 for k, m in modules.items()},
                        "trainable": _mib(trainable), "adamw": _mib(adamw)}}


def full_round(overrides: list[str], model: str | None = None) -> dict:
    """One round of ``loop.run`` on ``configs/ppo.yaml`` with ``overrides`` in this process (run it
    in a fresh worker): peak RSS of the whole round, RSS just before the update, wall seconds; MiB."""
    import shutil
    import tempfile

    import torch
    from rich.console import Console

    import rlhf_workbench.run.loop as loop
    from rlhf_workbench.cli import _parse_overrides
    from rlhf_workbench.config import load_config

    torch.set_num_threads(2)
    cfg = load_config(ROOT / "configs" / "ppo.yaml", _parse_overrides(overrides + ([f"model.name={model}"] if model
                                                                                   else [])))
    seen: dict = {}
    original = loop._update

    def measured(*args, **kwargs):
        seen["rss_before_update_mb"] = rss_mb()
        return original(*args, **kwargs)

    out = Path(tempfile.mkdtemp(prefix="memory-round-"))
    loop._update = measured
    reset_peak_rss()
    t0 = time.perf_counter()
    try:
        loop.run(cfg, out, Console(quiet=True))
    finally:
        loop._update = original
        shutil.rmtree(out, ignore_errors=True)
    return {"peak_rss_mb": peak_rss_mb(), "wall_s": round(time.perf_counter() - t0, 1), **seen,
            "run_config": cfg.model_dump(mode="json")}


def run_full_round(args) -> None:
    """``--full-round``: :func:`full_round` in a fresh worker, written to ``--out`` (default
    ``memory_full_round.json``)."""
    out = Path(args.out or RESULTS / "memory_full_round.json")
    measured = run_isolated(full_round, FULL_ROUND_SETTINGS, args.model)
    result = {"benchmark": "peak RSS of one whole PPO round through loop.run (issue 16, 23)",
              "config": "configs/ppo.yaml", "overrides": FULL_ROUND_SETTINGS, "device": device_info(2),
              "ppo": measured}
    write_result(result, out, command=command_line(__file__, args.argv))
    print(f"full PPO round: peak {measured['peak_rss_mb']:.0f} MiB, before the update "
          f"{measured['rss_before_update_mb']:.0f} MiB, {measured['wall_s']:.0f} s; wrote {out}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """Run the cases (or ``--full-round``) and write the result file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", choices=list(CASES), help="cases to run (default: all)")
    parser.add_argument("--full-round", action="store_true", help="one whole PPO round instead (own result file)")
    parser.add_argument("--model", default=None, help="--full-round: another model (smoke runs)")
    parser.add_argument("--out", default=None, help="result file (default memory.json / memory_full_round.json)")
    args = parser.parse_args(argv)
    args.argv = argv
    if args.full_round:
        return run_full_round(args)
    # every case in a file is measured by the run that writes it: --only writes its own file
    out = Path(args.out or RESULTS / ("memory.json" if not args.only else f"memory_only_{'_'.join(args.only)}.json"))
    cases: dict = {}
    for name in args.only or list(CASES):
        algorithm, overrides = CASES[name]
        print(f"{name}: loading and one update ...", file=sys.stderr, flush=True)
        cases[name] = {"algorithm": algorithm, "overrides": overrides,
                       **run_isolated(one_update, algorithm, _config(algorithm, overrides))}
        print(f"{name}: peak {cases[name]['peak_rss_mb']:.0f} MiB", file=sys.stderr, flush=True)
        result = {"benchmark": "peak RSS of one policy update per algorithm (issue 16)",
                  "model": BASE["model"]["name"],
                  "batch": {"sequences": N_SEQ, "prompt_tokens": PROMPT, "completion_tokens": COMPLETION,
                            "micro_batch_size": MICRO},
                  "base_config": BASE, "device": device_info(2), "cases": cases}
        # after every case: a long run interrupted keeps what it measured
        write_result(result, out, command=command_line(__file__, argv))
    print_table("peak RSS of one update (MiB)", ["case", "peak", "loaded", "policy", "reference", "critic", "trainable",
                                                 "AdamW", "update s"],
                [[k, v["peak_rss_mb"], v["loaded_rss_mb"], *v["tensors"].values(), v["update_s"]]
                 for k, v in cases.items()])


if __name__ == "__main__":
    main()
