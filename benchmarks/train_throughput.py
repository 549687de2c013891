"""Training throughput: this project's DPO and GRPO updates against TRL's DPOTrainer and GRPOTrainer.

Each system runs in its own worker process (its own peak memory), on the same model,
data, batch, lengths, dtype, optimizer (AdamW, constant lr, no weight decay, clip 1.0) and seed;
``--warmup`` untimed steps come first, then ``--steps`` timed steps. The loss of every step is
recorded for both systems (the first one shows that the work is the same). Both workers are
loaded side by side and take turns step by step (ours, TRL, ours, ...; ``_common.Baton``), only
one computing at a time, so that the machine's speed, which drifts by tens of per cent within
minutes on the shared 2-core machine, drifts alike for both; a step's time runs from the start
of its turn to its end (for TRL from the previous ``on_step_end``, so the Trainer's between-step
work is counted). ``--no-interleave`` runs them one after the other instead.

DPO (sigmoid loss, β = ``--beta``), one optimizer step per ``--batch`` pairs:
  * data: ``--data hh`` Anthropic HH-RLHF harmless-base (``<shared>/hh-rlhf``; prompt = the
    dialogue up to the last ``"\\n\\nAssistant:"``, completions = the two final replies) and/or
    ``--data pubmedqa`` (PubMedQA-L ``pqal_train.json``: prompt = context + question +
    instruction + ``"\\n\\nResponse:"``, ~150-650 tokens; chosen = the expert long answer +
    ``"Answer: <gold>"``, rejected = ``"Answer: <wrong>"``), so prompts dominate. Plain text in
    TRL's standard (non-conversational) format; TRL appends EOS to both completions.
  * tokens: TRL's own tokenization (``prompt_ids``, ``prompt+completion+eos`` ids after the
    common prefix). The first pairs in file order whose both sequences fit in ``--max-length``
    are used, so nothing is truncated; our ``Sample(prompt_ids, token_ids)`` get exactly the
    ids TRL's trainer holds (checked in the TRL worker, the run stops otherwise).
  * reference: TRL with ``precompute_ref_log_probs=False``, i.e. one reference forward of the
    step's pairs per step, which is what ``dpo_update`` does (reference log-probs computed once
    per call, one call per step). TRL gets a ``deepcopy`` of the policy as ``ref_model``.
  * ours: ``dpo_update`` with ``steps_per_round=1`` and ``micro_batch_size = 2·batch`` (one
    forward of all chosen + rejected sequences, as TRL's concatenated forward), through an
    ``accelerate`` Accelerator and the optimizer the loop builds (``torch.optim.AdamW``).

GRPO (β = ``--grpo-beta``, default 0 as configs/demo.yaml; ``loss_type="grpo"``; ε = 0.2;
``scale_rewards="group"``), one optimizer step per rollout of ``--batch`` prompts × ``K``:
  * prompts: bundled arithmetic train tasks in file order with the demo's instruction, chat
    template with generation prompt (the loop's ``render_prompt`` = TRL's conversational prompt).
  * sampling: temperature ``--temperature``, top-p 1, top-k off, ``--max-new-tokens``; every
    completion of a step is generated in one batch by both.
  * reward: 1 if ``rlhf_workbench.verify.verify(completion, task).correct`` else 0, for both.
  * ours: one loop round without the database: ``HFEngine.generate`` (own decode loop: the
    prompt prefilled once per group, finished rows dropped, log-probs read from the decoding
    logits) → verify → ``group_advantages`` → ``grpo_update`` (prompt shared by the group's
    completions in one packed forward, ``logprobs.packed_logps``). TRL: ``GRPOTrainer`` with ``use_vllm=False``, ``num_generations=K``,
    ``per_device_train_batch_size = generation_batch_size = batch·K``, ``steps_per_generation
    = num_iterations = 1`` (on-policy: TRL then skips the old-log-prob pass), no shuffling.
    Throughput counts every completion and includes generation.

Counting (``N`` = ``_common.matmul_params``: all parameters, tied embedding counted once as
the LM head; 134.5 M for SmolLM2-135M; attention-score FLOPs are not counted):
  * DPO tokens = prompt + completion tokens of both sequences of every pair (no padding);
    model FLOPs = 6·N per token (policy forward + backward) + 2·N per token (reference forward).
  * GRPO tokens = prompt + completion tokens of every completion; model FLOPs = 2·N per token
    (generation: prefill + decode with KV cache) + 6·N per token of every *trained* completion
    (policy forward + backward) [+ 2·N per such token for the reference when β > 0]. Our
    ``grpo_update`` skips completions whose advantage is 0 when β = 0 (a group whose rewards
    are all equal: same gradient, no work), TRL trains them; ``trained_fraction`` /
    ``trained_token_fraction`` report it, since it makes our step cheaper by design. Our
    prefix sharing and TRL's entropy are implementation differences, not counted: model FLOPs
    are those of the plain layout (every sequence's prompt counted), so MFU measures useful work.
  * DPO ``mfu_executed``: 8·N per sequence position each system's forward actually computes
    (``dpo_positions``: ours packed with the prompt once per pair, TRL's padded rows; padding
    included, the LM head counted at every position), i.e. how busy the machine was kept.
    For equal update work whatever the rewards, run with ``--grpo-beta 0.04``: both then train
    every completion and run a reference forward.
  * MFU = model FLOPs / timed seconds / measured peak matmul FLOP/s for the compute dtype
    (fp32, or bf16 for ``--dtype bf16``, which is bf16 autocast over fp32 weights for both:
    TRL ``bf16=True``, ours ``mixed_precision="bf16"``).

    python benchmarks/train_throughput.py                       # DPO (hh, pubmedqa) and GRPO
    python benchmarks/train_throughput.py --algo dpo --data hh --batch 4 --steps 5
    python benchmarks/train_throughput.py --quick               # smoke run, tiny sizes

Writes ``benchmarks/results/train_throughput.json`` (``train_throughput_<algo>[_<data>].json``
when only some are run), whose ``ratios`` are ours / TRL throughput.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile
import time
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # for `import _common` (and the workers)
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

# The demo's instruction when the committed results were measured (configs/demo.yaml has since moved
# to one that makes the 135M model write the answer line); kept so that reruns stay comparable.
DEMO_INSTRUCTION = "Reply with the result only, as 'Answer: <number>'."
WRONG = {"yes": "no", "no": "yes", "maybe": "no"}


# --------------------------------------------------------------------------------------------
# data (parent process: tokenizer only, no torch compute)
# --------------------------------------------------------------------------------------------


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_pair(tok, prompt: str, chosen: str, rejected: str) -> dict:
    """TRL 1.16 ``DPOTrainer`` tokenization of a non-conversational pair (EOS appended to the
    completions, the completion starting where prompt and prompt+completion ids diverge)."""
    eos = tok.eos_token
    chosen = chosen if chosen.endswith(eos) else chosen + eos
    rejected = rejected if rejected.endswith(eos) else rejected + eos
    p = list(tok(prompt)["input_ids"])
    pc = list(tok(prompt + chosen)["input_ids"])
    pr = list(tok(prompt + rejected)["input_ids"])
    n = min(_common_prefix(p, pc), _common_prefix(p, pr))
    return {"prompt_ids": p[:n], "chosen_ids": pc[n:], "rejected_ids": pr[n:]}


def hh_texts(data_dir: Path):
    from rlhf_workbench.train.reward_model import load_preference_file

    path = data_dir / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    offset = 0
    while True:
        chunk = load_preference_file(path, limit=256, offset=offset)
        if not chunk:
            return
        offset += len(chunk)
        for p in chunk:
            yield p.prompt, p.chosen, p.rejected


def pubmedqa_texts(data_dir: Path):
    from rlhf_workbench.tasks.loading import load_tasks

    for t in load_tasks(data_dir / "pubmedqa" / "pqal_train.json", "pubmedqa"):
        long = (t.metadata.get("long_answer") or "").strip()
        # The prompt ends on a token boundary (like HH's "Assistant:"): completions start with a space.
        yield (t.prompt() + "\n\nResponse:", f" {long}\nAnswer: {t.answer}" if long else f" Answer: {t.answer}",
               f" Answer: {WRONG[t.answer]}")


def dpo_pairs(tok, data: str, data_dir: Path, n: int, max_length: int) -> tuple[list[dict], int]:
    """The first ``n`` pairs of ``data`` whose prompt+chosen and prompt+rejected both fit in
    ``max_length`` tokens, texts and TRL token ids; and how many earlier pairs were too long."""
    source = hh_texts(data_dir) if data == "hh" else pubmedqa_texts(data_dir)
    out, dropped = [], 0
    for prompt, chosen, rejected in source:
        ids = tokenize_pair(tok, prompt, chosen, rejected)
        P = len(ids["prompt_ids"])
        if P + max(len(ids["chosen_ids"]), len(ids["rejected_ids"])) > max_length or not ids["chosen_ids"] \
                or not ids["rejected_ids"]:
            dropped += 1
            continue
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, **ids})
        if len(out) == n:
            return out, dropped
    raise SystemExit(f"only {len(out)} {data} pairs fit in {max_length} tokens; need {n}")


def dpo_positions(pairs: list[dict], batch: int) -> dict[str, list[int]]:
    """Sequence positions each system's policy forward computes per step, padding included.
    Ours (``logprobs.packed_logps``): one row per pair, the prompt once, then chosen and rejected
    back to back; width max P + max (C + R). TRL: chosen and rejected as separate right-padded
    prompt+completion rows, width max(P + T)."""
    out: dict[str, list[int]] = {"ours": [], "trl": []}
    for s in range(0, len(pairs), batch):
        lens = [(len(p["prompt_ids"]), len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs[s: s + batch]]
        out["ours"].append(len(lens) * (max(P for P, _, _ in lens) + max(C + R for _, C, R in lens)))
        out["trl"].append(2 * len(lens) * max(P + max(C, R) for P, C, R in lens))
    return out


def dpo_token_stats(pairs: list[dict], batch: int) -> dict:
    """Tokens and computed positions per pair. ``positions_per_pair`` is what each model forward
    actually computes (:func:`dpo_positions`); ``padding_efficiency`` the share of those
    positions that are real tokens."""
    n = len(pairs)
    real = sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)
    ours_real = sum(len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)
    pos = {k: sum(v) for k, v in dpo_positions(pairs, batch).items()}
    return {"tokens_per_pair": real / n,
            "prompt_tokens_mean": sum(len(p["prompt_ids"]) for p in pairs) / n,
            "completion_tokens_mean": sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs) / (2 * n),
            "positions_per_pair": {k: v / n for k, v in pos.items()},
            "padding_efficiency": {"ours": ours_real / pos["ours"], "trl": real / pos["trl"]}}


def grpo_tasks(n: int):
    from dataclasses import replace

    from rlhf_workbench.tasks.loading import load_tasks
    from rlhf_workbench.tasks.split import split_tasks

    train, _ = split_tasks(load_tasks("bundled:arithmetic"))
    if len(train) < n:
        raise SystemExit(f"bundled:arithmetic has {len(train)} train tasks; need {n}")
    return [replace(t, instruction=DEMO_INSTRUCTION) for t in train[:n]]


# --------------------------------------------------------------------------------------------
# workers (one process each, see _common.run_isolated; each loads its own model)
# --------------------------------------------------------------------------------------------


def _worker_setup(spec: dict) -> float:
    import torch
    from transformers import set_seed

    torch.set_num_threads(spec["threads"])
    set_seed(spec["seed"])
    start = _common.rss_mb()
    _common.reset_peak_rss()
    return start


def _optimizer(params, spec):
    import torch

    return torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0, fused=spec["optim"] == "adamw_torch_fused")


def _run_config(spec: dict, algorithm: str):
    from rlhf_workbench.config import (DPOConfig, GRPOConfig, ModelConfig, OptimConfig, RolloutConfig,
                                       RunConfig)

    model = ModelConfig(name=spec["model_path"], dtype="fp32",
                        mixed_precision="bf16" if spec["dtype"] == "bf16" else "no")
    optim = OptimConfig(lr=spec["lr"], weight_decay=0.0, max_grad_norm=1.0, steps_per_round=1,
                        micro_batch_size=spec["micro_batch_size"])
    kw = {}
    if algorithm == "dpo":
        kw["dpo"] = DPOConfig(beta=spec["beta"], loss_type="sigmoid")
    else:
        kw["grpo"] = GRPOConfig(beta=spec["grpo_beta"], epsilon=0.2, loss_type="grpo", scale_rewards="group")
        kw["rollout"] = RolloutConfig(num_generations=spec["K"], prompts_per_round=spec["batch"],
                                      temperature=spec["temperature"], top_p=1.0,
                                      max_new_tokens=spec["max_new_tokens"], batch_size=spec["batch"] * spec["K"])
    return RunConfig(algorithm=algorithm, model=model, optim=optim, seed=spec["seed"], **kw)


def _ours_setup(spec, algorithm):
    import torch
    from accelerate import Accelerator

    from rlhf_workbench.model.loading import load_policy

    cfg = _run_config(spec, algorithm)
    pair = load_policy(cfg.model)  # as the loop: policy + frozen reference copy
    accelerator = Accelerator(mixed_precision="no", cpu=not torch.cuda.is_available())
    optimizer = _optimizer([p for p in pair.policy.parameters() if p.requires_grad], spec)
    pair.train_module, optimizer = accelerator.prepare(pair.policy, optimizer)
    if pair.reference is not None:
        pair.reference.to(accelerator.device)
    return cfg, pair, accelerator, optimizer


def dpo_ours(spec: dict) -> dict:
    from rlhf_workbench.train.dpo import dpo_update
    from rlhf_workbench.train.samples import Sample

    rss_start = _worker_setup(spec)
    cfg, pair, accelerator, optimizer = _ours_setup(spec, "dpo")
    rss_ready = _common.rss_mb()
    stamps, losses = _common.Stamps(spec.get("baton")), []
    B = spec["batch"]
    for s in range(spec["warmup"] + spec["steps"]):
        stamps.begin()
        rows = spec["pairs"][s * B: (s + 1) * B]
        batch = [(Sample(r["prompt_ids"], r["chosen_ids"]), Sample(r["prompt_ids"], r["rejected_ids"])) for r in rows]
        metrics = dpo_update(pair, optimizer, accelerator, batch, cfg)
        losses.append(metrics["loss"])
        stamps.step_done()
    return {"losses": losses, "step_seconds": stamps.step_seconds(), "step_spans": stamps.spans(),
            "timed_seconds": stamps.timed_seconds(spec["warmup"]), "rss_start_mb": rss_start, "rss_ready_mb": rss_ready,
            "peak_rss_mb": _common.peak_rss_mb(),
            "n_params": _common.matmul_params(pair.policy), "mixed_precision": cfg.model.mixed_precision}


def _trl_common_args(spec: dict, out: str) -> dict:
    return dict(output_dir=out, learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
                weight_decay=0.0, max_grad_norm=1.0, optim=spec["optim"], bf16=spec["dtype"] == "bf16",
                use_cpu=True, report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
                seed=spec["seed"], data_seed=spec["seed"], gradient_checkpointing=False,
                gradient_accumulation_steps=1, max_steps=spec["warmup"] + spec["steps"],
                dataloader_num_workers=0)


def _recording(trainer_cls):
    """``trainer_cls`` recording the loss of every ``compute_loss`` call (full precision)."""

    class Recording(trainer_cls):
        def compute_loss(self, *args, **kwargs):
            loss = super().compute_loss(*args, **kwargs)
            self.bench_losses.append(float((loss[0] if isinstance(loss, tuple) else loss).detach().float()))
            return loss

    return Recording


def _quiet(trainer):
    """No end-of-training metrics print (logging is off; the benchmark prints its own table)."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def _stamp_callback(stamps):
    """Step stamps for a Trainer: a step runs from the end of the previous one (or the start of
    training) to ``on_step_end``, so the trainer's own between-step work counts in its steps."""
    from transformers import TrainerCallback

    class StepStamps(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            stamps.begin()

        def on_step_end(self, args, state, control, **kwargs):
            stamps.step_done()
            if state.global_step < state.max_steps:
                stamps.begin()

    return StepStamps()


def _trl_worker_setup(spec: dict):
    """A TRL worker's start: threads, seed, RSS baseline, tokenizer and the fp32 model (pad id
    set on it). Returns ``(rss_start, tokenizer, model)``."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_workbench.model.loading import load_tokenizer

    rss_start = _worker_setup(spec)
    datasets.disable_progress_bars()
    tok = load_tokenizer(spec["model_path"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return rss_start, tok, model


def dpo_trl(spec: dict) -> dict:
    import datasets
    import trl

    rss_start, tok, model = _trl_worker_setup(spec)
    ref = copy.deepcopy(model).eval().requires_grad_(False)  # copy before the trainer patches forward
    ds = datasets.Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in spec["pairs"]])
    stamps = _common.Stamps(spec.get("baton"))
    with tempfile.TemporaryDirectory() as out:
        args = trl.DPOConfig(**_trl_common_args(spec, out), per_device_train_batch_size=spec["batch"],
                             beta=spec["beta"], loss_type=["sigmoid"], max_length=spec["max_length"],
                             precompute_ref_log_probs=False, train_sampling_strategy="sequential")
        trainer = _recording(trl.DPOTrainer)(model=model, ref_model=ref, args=args, train_dataset=ds,
                                             processing_class=tok, callbacks=[_stamp_callback(stamps)])
        trainer.bench_losses = []
        _quiet(trainer)
        held = trainer.train_dataset
        if len(held) != len(spec["pairs"]):
            raise RuntimeError(f"TRL kept {len(held)} of {len(spec['pairs'])} pairs")
        for i, (row, p) in enumerate(zip(held, spec["pairs"])):
            for k in ("prompt_ids", "chosen_ids", "rejected_ids"):
                if list(row[k]) != p[k]:
                    raise RuntimeError(f"pair {i}: TRL's {k} differ from the ids given to ours")
        rss_ready = _common.rss_mb()
        trainer.train()
    return {"losses": trainer.bench_losses, "step_seconds": stamps.step_seconds(), "step_spans": stamps.spans(),
            "timed_seconds": stamps.timed_seconds(spec["warmup"]), "rss_start_mb": rss_start,
            "rss_ready_mb": rss_ready, "peak_rss_mb": _common.peak_rss_mb(),
            "mixed_precision": str(trainer.accelerator.mixed_precision), "tokens_identical": True}


def grpo_ours(spec: dict) -> dict:
    import torch

    from rlhf_workbench.train.losses import group_advantages
    from rlhf_workbench.model.rollout import HFEngine
    from rlhf_workbench.train.grpo import grpo_update
    from rlhf_workbench.train.samples import Sample
    from rlhf_workbench.verify import verify

    rss_start = _worker_setup(spec)
    cfg, pair, accelerator, optimizer = _ours_setup(spec, "grpo")
    r = cfg.rollout
    engine = HFEngine(pair.policy, pair.tokenizer, r.batch_size, cfg.model.mixed_precision)
    rss_ready = _common.rss_mb()
    tasks, B, K = spec["tasks"], spec["batch"], spec["K"]
    by_id = {t.id: t for t in tasks}
    stamps = _common.Stamps(spec.get("baton"))
    losses, prompt_tokens, completion_tokens, gen_s, active, rewards, trained = [], [], [], [], [], [], []
    for s in range(spec["warmup"] + spec["steps"]):
        stamps.begin()
        t0 = time.perf_counter()
        comps = engine.generate(tasks[s * B: (s + 1) * B], K, r.temperature, r.top_p, r.max_new_tokens, r.stop)
        gen_s.append(time.perf_counter() - t0)
        reward = torch.tensor([verify(c.text, by_id[c.task_id]).reward for c in comps], dtype=torch.float32)
        adv = group_advantages(reward, K, cfg.grpo.scale_rewards).tolist()
        samples = [Sample(c.prompt_ids, c.token_ids, c.logps, advantage=a, reward=float(x))
                   for c, a, x in zip(comps, adv, reward.tolist())]
        metrics = grpo_update(pair, optimizer, accelerator, samples, cfg)
        engine.sync_weights(pair.policy)
        stamps.step_done()
        losses.append(metrics["loss"])
        prompt_tokens.append(sum(len(c.prompt_ids) for c in comps))
        completion_tokens.append(sum(len(c.token_ids) for c in comps))
        active.append(sum(a != 0.0 for a in adv) / len(adv))
        # grpo_update skips zero-advantage completions when beta == 0 (no forward, no backward)
        trained.append(sum(len(c.prompt_ids) + len(c.token_ids) for c, a in zip(comps, adv)
                           if a != 0.0 or cfg.grpo.beta > 0))
        rewards.append(reward.mean().item())
    return {"losses": losses, "step_seconds": stamps.step_seconds(), "step_spans": stamps.spans(),
            "timed_seconds": stamps.timed_seconds(spec["warmup"]), "generation_seconds": gen_s,
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "trained_fraction": active,
            "trained_tokens": trained, "reward_mean": rewards, "rss_start_mb": rss_start, "rss_ready_mb": rss_ready,
            "peak_rss_mb": _common.peak_rss_mb(), "n_params": _common.matmul_params(pair.policy),
            "mixed_precision": cfg.model.mixed_precision}


def grpo_trl(spec: dict) -> dict:
    import datasets
    import trl

    from rlhf_workbench.model.rollout import render_prompt
    from rlhf_workbench.verify import verify

    rss_start, tok, model = _trl_worker_setup(spec)
    tasks = spec["tasks"]
    by_id = {t.id: t for t in tasks}
    ds = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": t.prompt()}], "task_id": t.id}
                                     for t in tasks])
    prompt_ids = {t.id: render_prompt(tok, t) for t in tasks}
    seen: dict[str, list] = {"completion_tokens": [], "prompt_tokens": [], "reward_mean": []}

    def correctness(completions, task_id, completion_ids=None, **kwargs):
        out = [verify(c[0]["content"] if isinstance(c, list) else c, by_id[tid]).reward
               for c, tid in zip(completions, task_id)]
        seen["completion_tokens"].append(sum(len(ids) for ids in completion_ids))
        seen["prompt_tokens"].append(sum(len(prompt_ids[tid]) for tid in task_id))
        seen["reward_mean"].append(sum(out) / len(out))
        return out

    stamps = _common.Stamps(spec.get("baton"))
    B, K = spec["batch"], spec["K"]
    with tempfile.TemporaryDirectory() as out:
        args = trl.GRPOConfig(**_trl_common_args(spec, out), per_device_train_batch_size=B * K,
                              generation_batch_size=B * K, num_generations=K, num_iterations=1,
                              max_completion_length=spec["max_new_tokens"], temperature=spec["temperature"],
                              top_p=1.0, top_k=0, beta=spec["grpo_beta"], epsilon=0.2, loss_type="grpo",
                              scale_rewards="group", use_vllm=False, shuffle_dataset=False, log_completions=False,
                              mask_truncated_completions=False)
        trainer = _recording(trl.GRPOTrainer)(model=model, reward_funcs=correctness, args=args, train_dataset=ds,
                                              processing_class=tok, callbacks=[_stamp_callback(stamps)])
        trainer.bench_losses = []
        _quiet(trainer)
        rendered = trainer.processing_class.apply_chat_template(
            [[{"role": "user", "content": tasks[0].prompt()}]], add_generation_prompt=True, tokenize=True,
            return_dict=True)["input_ids"][0]
        if list(rendered) != prompt_ids[tasks[0].id]:
            raise RuntimeError("TRL renders the prompt to other token ids than rollout.render_prompt")
        rss_ready = _common.rss_mb()
        trainer.train()
    return {"losses": trainer.bench_losses, "step_seconds": stamps.step_seconds(), "step_spans": stamps.spans(),
            "timed_seconds": stamps.timed_seconds(spec["warmup"]), **seen, "rss_start_mb": rss_start,
            "rss_ready_mb": rss_ready, "peak_rss_mb": _common.peak_rss_mb(),
            "mixed_precision": str(trainer.accelerator.mixed_precision)}


def measure_peak(spec: dict) -> float:
    import machine_peak

    sizes = (256, 512) if spec["quick"] else machine_peak.SIZES
    return machine_peak.peak_flops("bf16" if spec["dtype"] == "bf16" else "fp32", spec["threads"], sizes,
                                   0.2 if spec["quick"] else 1.0)


# --------------------------------------------------------------------------------------------
# summaries
# --------------------------------------------------------------------------------------------


def _summarise(run: dict, warmup: int, items_per_step: int, tokens_per_step: list[float],
               flops_per_step: list[float], peak: float) -> dict:
    t = run["timed_seconds"]
    steps = len(run["step_seconds"]) - warmup
    tokens = sum(tokens_per_step[warmup:])
    flops = sum(flops_per_step[warmup:])
    return {"timed_steps": steps, "timed_seconds": t, "seconds_per_step": t / steps,
            "items_per_s": items_per_step * steps / t, "tokens_per_s": tokens / t, "model_flops": flops,
            "achieved_flops_per_s": flops / t, "mfu": flops / t / peak if peak else float("nan"),
            "first_step_loss": run["losses"][0] if run["losses"] else float("nan"),
            "losses": run["losses"], "step_seconds": run["step_seconds"], "step_spans": run["step_spans"],
            "peak_rss_mb": run["peak_rss_mb"],
            "rss_start_mb": run["rss_start_mb"], "rss_ready_mb": run["rss_ready_mb"],
            **{k: run[k] for k in ("mixed_precision", "generation_seconds", "trained_fraction", "reward_mean")
               if k in run}}


def _run_systems(args, workers: dict, spec: dict, label: str) -> dict:
    """Run the systems' workers: side by side taking turns step by step (default), or one after
    the other (``--no-interleave``; always so with ``--no-isolate`` or ``--skip-trl``)."""
    if args.skip_trl:
        workers = {"ours": workers["ours"]}
    if len(workers) > 1 and not args.no_interleave and not args.no_isolate:
        runs = _common.run_interleaved(workers, spec)
    else:
        runs = {name: _common.run_isolated(fn, spec, isolate=not args.no_isolate) for name, fn in workers.items()}
    for name, run in runs.items():
        print(f"{label}: {name} done ({run['timed_seconds']:.1f} s timed)", flush=True)
    return runs


def bench_dpo(args, tok, data: str, peak: float) -> dict:
    n = (args.warmup + args.steps) * args.batch
    max_length = args.max_length or {"hh": 96 if args.quick else 256, "pubmedqa": 320 if args.quick else 768}[data]
    pairs, dropped = dpo_pairs(tok, data, Path(args.data_dir), n, max_length)
    spec = {**_spec(args), "pairs": pairs, "max_length": max_length, "micro_batch_size": 2 * args.batch}
    stats = dpo_token_stats(pairs, args.batch)
    per_step = [sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"])
                    for p in pairs[s * args.batch: (s + 1) * args.batch]) for s in range(args.warmup + args.steps)]
    runs = _run_systems(args, {"ours": dpo_ours, "trl": dpo_trl}, spec, f"dpo {data}")
    n_params = runs["ours"]["n_params"]
    flops = [(6 + 2) * n_params * t for t in per_step]
    systems = {k: _summarise(v, args.warmup, args.batch, per_step, flops, peak) for k, v in runs.items()}
    positions = dpo_positions(pairs, args.batch)
    for k, v in systems.items():
        v["pairs_per_s"] = v.pop("items_per_s")
        executed = (6 + 2) * n_params * sum(positions[k][args.warmup:])
        v["executed_flops"], v["mfu_executed"] = executed, executed / v["timed_seconds"] / peak if peak else math.nan
    return {"data": data, "pairs": n, "max_length": max_length, "pairs_skipped_over_max_length": dropped,
            "n_params": n_params, **stats, "flops_per_token": "8·N (6·N policy fwd+bwd + 2·N reference fwd)",
            "systems": systems}


def bench_grpo(args, tok, peak: float) -> dict:
    n = (args.warmup + args.steps) * args.batch
    spec = {**_spec(args), "tasks": grpo_tasks(n), "micro_batch_size": args.batch * args.num_generations}
    runs = _run_systems(args, {"ours": grpo_ours, "trl": grpo_trl}, spec, "grpo")
    n_params = runs["ours"]["n_params"]
    train_per_token = 6 + (2 if args.grpo_beta > 0 else 0)
    systems = {}
    for k, v in runs.items():
        tokens = [p + c for p, c in zip(v["prompt_tokens"], v["completion_tokens"])]
        trained = v.get("trained_tokens", tokens)  # TRL trains every completion
        flops = [2 * n_params * t + train_per_token * n_params * tt for t, tt in zip(tokens, trained)]
        s = _summarise(v, args.warmup, args.batch * args.num_generations, tokens, flops, peak)
        s["trained_token_fraction"] = sum(trained[args.warmup:]) / max(1, sum(tokens[args.warmup:]))
        s["completions_per_s"] = s.pop("items_per_s")
        s["completion_tokens_per_s"] = sum(v["completion_tokens"][args.warmup:]) / v["timed_seconds"]
        s["completion_tokens_mean"] = sum(v["completion_tokens"]) / (len(v["completion_tokens"]) * args.batch
                                                                     * args.num_generations)
        systems[k] = s
    return {"prompts_per_step": args.batch, "num_generations": args.num_generations,
            "completions_per_step": args.batch * args.num_generations, "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature, "beta": args.grpo_beta, "n_params": n_params,
            "flops_per_token": "2·N generation for every token + "
                               + ("8·N (policy fwd+bwd, reference fwd)" if args.grpo_beta > 0
                                  else "6·N policy fwd+bwd")
                               + " for every token of a trained completion (ours skips zero-advantage "
                                 "completions when beta = 0; TRL trains all)",
            "systems": systems}


def _spec(args) -> dict:
    from rlhf_workbench.model.loading import resolve_model_path

    return {"model_path": resolve_model_path(args.model), "threads": args.threads, "seed": args.seed, "lr": args.lr,
            "optim": args.optim, "dtype": args.dtype, "beta": args.beta, "grpo_beta": args.grpo_beta,
            "batch": args.batch, "warmup": args.warmup, "steps": args.steps, "K": args.num_generations,
            "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "quick": args.quick}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--algo", choices=("dpo", "grpo", "all"), default="all")
    ap.add_argument("--data", choices=("hh", "pubmedqa", "all"), default="all", help="DPO pairs")
    ap.add_argument("--data-dir", default=str(_common.SHARED_DATA))
    ap.add_argument("--model", default="smollm2-135m", help="preset, hub id or local path")
    ap.add_argument("--steps", type=int, default=4, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (>= 1)")
    ap.add_argument("--batch", type=int, default=None, help="DPO pairs / GRPO prompts per step (default 4 / 2)")
    ap.add_argument("--num-generations", type=int, default=8, help="GRPO K")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="GRPO completion cap")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-length", type=int, default=None, help="DPO sequence cap (default hh 256, pubmedqa 768)")
    ap.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    ap.add_argument("--grpo-beta", type=float, default=0.0, help="GRPO KL beta (demo: 0)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--optim", choices=("adamw_torch", "adamw_torch_fused"), default="adamw_torch",
                    help="both systems; adamw_torch = torch.optim.AdamW defaults, as the loop builds it")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 = bf16 autocast, fp32 weights")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peak-from", default=None, help="machine_peak.json to read the peak from (default: measure)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 timed steps, tiny batches and lengths")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--no-isolate", action="store_true", help="run the systems in this process (memory then shared)")
    ap.add_argument("--no-interleave", action="store_true",
                    help="run the systems one after the other instead of taking turns step by step")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = min(args.steps, 2), 1
        args.num_generations, args.max_new_tokens = 2, min(args.max_new_tokens, 8)
    if args.warmup < 1:
        ap.error("--warmup must be >= 1 (the first step compiles kernels and fills caches)")
    algos = ("dpo", "grpo") if args.algo == "all" else (args.algo,)
    datas = ("hh", "pubmedqa") if args.data == "all" else (args.data,)
    batch_arg = args.batch
    name = "train_throughput" + ("" if args.algo == "all" else f"_{args.algo}") + (
        f"_{args.data}" if args.algo != "grpo" and args.data != "all" else "")
    out = Path(args.out) if args.out else _common.RESULTS / f"{name}.json"

    from rlhf_workbench.model.loading import load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path(args.model))
    if args.peak_from:
        import json

        peak = json.loads(Path(args.peak_from).read_text())["peak_flops"]["bf16" if args.dtype == "bf16" else "fp32"]
        peak_source = args.peak_from
    else:
        peak = _common.run_isolated(measure_peak, {"dtype": args.dtype, "threads": args.threads, "quick": args.quick},
                                    isolate=not args.no_isolate)
        peak_source = "measured (machine_peak.peak_flops)"
    result = {"settings": {k: v for k, v in vars(args).items() if k != "out"},
              "device": _common.device_info(args.threads),
              "machine_busy_at_start": _common.warn_if_busy(),
              "peak_flops": {"value": peak, "dtype": "bf16" if args.dtype == "bf16" else "fp32", "source": peak_source},
              "n_params_definition": "all parameters, a tied input embedding counted once (it is the LM-head "
                                     "matmul); attention-score FLOPs not counted",
              "ratios": {}}
    rows = []
    for algo in algos:
        if algo == "dpo":
            args.batch = batch_arg or (2 if args.quick else 4)
            for data in datas:
                r = bench_dpo(args, tok, data, peak)
                result[f"dpo_{data}"] = r
                s = r["systems"]
                if "trl" in s:
                    result["ratios"][f"dpo_{data}/pairs_per_s"] = _common.finite_ratio(s["ours"]["pairs_per_s"],
                                                                                      s["trl"]["pairs_per_s"])
                    result["ratios"][f"dpo_{data}/tokens_per_s"] = _common.finite_ratio(s["ours"]["tokens_per_s"],
                                                                                       s["trl"]["tokens_per_s"])
                for k, v in s.items():
                    rows.append([f"dpo {data}", k, v["first_step_loss"], v["seconds_per_step"], v["pairs_per_s"],
                                 v["tokens_per_s"], v["mfu"] * 100, v["mfu_executed"] * 100, v["peak_rss_mb"]])
        else:
            args.batch = batch_arg or (1 if args.quick else 2)
            r = bench_grpo(args, tok, peak)
            result["grpo"] = r
            s = r["systems"]
            if "trl" in s:
                result["ratios"]["grpo/completions_per_s"] = _common.finite_ratio(s["ours"]["completions_per_s"],
                                                                                  s["trl"]["completions_per_s"])
                result["ratios"]["grpo/tokens_per_s"] = _common.finite_ratio(s["ours"]["tokens_per_s"],
                                                                             s["trl"]["tokens_per_s"])
            for k, v in s.items():
                rows.append(["grpo", k, v["first_step_loss"], v["seconds_per_step"], v["completions_per_s"],
                             v["tokens_per_s"], v["mfu"] * 100, "n/a", v["peak_rss_mb"]])
    args.batch = batch_arg
    result["settings"]["batch"] = batch_arg
    _common.print_table(f"training throughput ({args.dtype}, {args.threads} threads; peak "
                        f"{peak / 1e9:.1f} GFLOP/s)",
                        ["benchmark", "system", "loss step 1", "s/step", "pairs or compl./s", "tokens/s", "MFU %",
                         "executed MFU %", "peak RSS MiB"], rows)
    for k, v in result["ratios"].items():
        print(f"ratio ours/TRL {k}: {v:.3f}")
    if "grpo" in result:
        f = result["grpo"]["systems"]["ours"]["trained_token_fraction"]
        print(f"grpo: ours trained {100 * f:.0f}% of the timed steps' tokens (zero-advantage completions are "
              "skipped when beta = 0; TRL trains all)")
    _common.write_result(result, out)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
