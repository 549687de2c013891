"""Generation throughput by batch size: this project's ``rollout.generate`` against plain
``model.generate``.

Same model object, dtype, prompts (bundled arithmetic train tasks with the demo instruction,
chat template with generation prompt), ``--max-new-tokens`` and greedy decoding. For each
batch size ``b`` the first ``b`` prompts are generated in one batch by:

  * ``ours``: ``rollout.generate(..., do_sample=False)``: what a training rollout does, including
    the per-token log-probs it records (read from the decoding logits, no extra forward pass),
  * ``generate``: the tokenizer (left padding) on the chat-templated texts, then
    ``model.generate(input_ids, attention_mask, max_new_tokens, do_sample=False)``.

Tokens = generated tokens up to and including the first EOS (the tokens a user gets; the same
count for both when the outputs agree), over the median wall time of ``--repeats`` timed calls
(the systems taking turns) after one untimed warm-up call per system and batch size. ``identical`` says whether
ours and plain generate produced the same tokens, token for token. Peak memory: this process's
peak RSS during the timed calls (high-water mark reset before each; it includes the model), and
its rise over the RSS before the call (after the warm-up call, whose buffers the allocator may
keep, so the rise can read 0).

``--dtype``: ``fp32``; ``bf16`` (bf16 weights); ``autocast-bf16`` (fp32 weights under
``torch.autocast(bfloat16)`` for both: the project's ``mixed_precision: bf16``).

    python benchmarks/generation_throughput.py                      # batch sizes 1,4,16,64
    python benchmarks/generation_throughput.py --dtype bf16 --batch-sizes 16

Rollout-shaped run (``--sampled-prompts`` P × ``--sampled-k`` K, default 2 × 8 as the GRPO
benchmark, temperature ``--temperature``, top-p 1, top-k off): ``model.generate(...,
num_return_sequences=K, do_sample=True)`` against ``rollout.generate(..., num_generations=K)``;
tokens/s of the real (up to EOS) tokens each produced. Samples differ between the two (random),
so only throughput is compared; that the sampling distribution is right is tested in
tests/test_fast_paths.py.

Writes ``benchmarks/results/generation_throughput.json``; ``ratios`` are ours / generate
tokens per second (``ours/bs=<b>``, ``ours/sampled_k=<K>``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # for `import _common` (and the workers)
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

# The demo's instruction when the committed results were measured (configs/demo.yaml has since moved
# to one that makes the 135M model write the answer line); kept so that reruns stay comparable.
DEMO_INSTRUCTION = "Reply with the result only, as 'Answer: <number>'."


def load(model_name: str, dtype: str):
    """Model and tokenizer as ``models.load_policy`` loads the policy (no reference copy)."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_workbench.model.loading import load_tokenizer, resolve_model_path

    path = resolve_model_path(model_name)
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval(), tok


def tasks(n: int):
    from dataclasses import replace

    from rlhf_workbench.tasks.loading import load_tasks
    from rlhf_workbench.tasks.split import split_tasks

    train, _ = split_tasks(load_tasks("bundled:arithmetic"))
    return [replace(t, instruction=DEMO_INSTRUCTION) for t in train[:n]]


def _eos_ids(model, tok) -> set[int]:
    ids = set(tok.convert_tokens_to_ids([tok.eos_token]))
    gen = model.generation_config.eos_token_id
    ids |= set(gen if isinstance(gen, list) else [gen] if gen is not None else [])
    return ids


def _cut(row: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in eos:
            return row[: i + 1]
    return row


def _encode(tok, batch):
    """Chat-templated prompts (generation prompt appended) as one left-padded tokenizer batch."""
    texts = [tok.apply_chat_template([{"role": "user", "content": t.prompt()}], add_generation_prompt=True,
                                     tokenize=False) for t in batch]
    return tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)


def plain_generate(model, tok, batch, max_new_tokens: int, autocast_bf16: bool) -> list[list[int]]:
    """Plain Hugging Face: tokenizer batch (left padding) + ``model.generate``, greedy."""
    import torch

    enc = _encode(tok, batch)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast_bf16 else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=tok.pad_token_id)
    eos = _eos_ids(model, tok)
    return [_cut(row, eos) for row in out[:, enc["input_ids"].shape[1]:].tolist()]


def ours_generate(model, tok, batch, max_new_tokens: int, autocast_bf16: bool) -> list[list[int]]:
    from rlhf_workbench.model.rollout import generate

    comps = generate(model, tok, batch, num_generations=1, do_sample=False, max_new_tokens=max_new_tokens,
                     batch_size=len(batch), mixed_precision="bf16" if autocast_bf16 else "no")
    return [c.token_ids for c in comps]


def plain_sample(model, tok, batch, k: int, temperature: float, max_new_tokens: int, autocast_bf16: bool):
    """Plain Hugging Face sampling of ``k`` completions per prompt (``num_return_sequences``)."""
    import torch

    enc = _encode(tok, batch)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast_bf16 else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_p=1.0,
                             top_k=0, num_return_sequences=k, pad_token_id=tok.pad_token_id)
    eos = _eos_ids(model, tok)
    return [_cut(row, eos) for row in out[:, enc["input_ids"].shape[1]:].tolist()]


def ours_sample(model, tok, batch, k: int, temperature: float, max_new_tokens: int, autocast_bf16: bool):
    from rlhf_workbench.model.rollout import generate

    comps = generate(model, tok, batch, num_generations=k, do_sample=True, temperature=temperature, top_p=1.0,
                     max_new_tokens=max_new_tokens, batch_size=len(batch) * k,
                     mixed_precision="bf16" if autocast_bf16 else "no")
    return [c.token_ids for c in comps]


def _timed(fns: dict, repeats: int) -> dict:
    """Per system: (outputs, median seconds, peak RSS MiB, peak RSS rise MiB) over ``repeats``
    calls, the systems taking turns (generate, ours, generate, ours, ...) so that a slow spell of
    the machine hits both alike."""
    times = {name: [] for name in fns}
    peak = dict.fromkeys(fns, 0.0)
    rise = dict.fromkeys(fns, 0.0)
    outs = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            before = _common.rss_mb()
            _common.reset_peak_rss()
            t0 = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t0)
            p = _common.peak_rss_mb()
            peak[name], rise[name] = max(peak[name], p), max(rise[name], p - before)
    return {name: (outs[name], statistics.median(times[name]), peak[name], rise[name]) for name in fns}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="preset, hub id or local path")
    ap.add_argument("--batch-sizes", default="1,4,16,64")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dtype", choices=("fp32", "bf16", "autocast-bf16"), default="fp32")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per system and batch size (median)")
    ap.add_argument("--sampled-prompts", type=int, default=2, help="rollout-shaped run: prompts ...")
    ap.add_argument("--sampled-k", type=int, default=8, help="... times K samples each (0: skip)")
    ap.add_argument("--temperature", type=float, default=0.7, help="for the sampled run")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--quick", action="store_true", help="smoke run: batch sizes 1,2, 8 new tokens, 1 repeat")
    ap.add_argument("--out", default=str(_common.RESULTS / "generation_throughput.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.max_new_tokens, args.repeats = "1,2", min(args.max_new_tokens, 8), 1
        args.sampled_prompts, args.sampled_k = 1, 2
    sizes = [int(b) for b in args.batch_sizes.split(",")]

    busy = _common.warn_if_busy()
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = load(args.model, args.dtype)
    ac = args.dtype == "autocast-bf16"
    all_tasks = tasks(max(sizes))
    systems = {
        "generate": lambda b: plain_generate(model, tok, b, args.max_new_tokens, ac),
        "ours": lambda b: ours_generate(model, tok, b, args.max_new_tokens, ac),
    }
    by_bs, ratios, rows = {}, {}, []
    for bs in sizes:
        batch = all_tasks[:bs]
        res = {}
        for fn in systems.values():
            fn(batch)  # warm-up (untimed)
        timed = _timed({name: (lambda fn=fn: fn(batch)) for name, fn in systems.items()}, args.repeats)
        for name, (outs, secs, peak, rise) in timed.items():
            tokens = sum(len(o) for o in outs)
            res[name] = {"seconds": secs, "tokens": tokens, "tokens_per_s": tokens / secs,
                         "sequences_per_s": bs / secs, "peak_rss_mb": peak, "peak_rss_rise_mb": rise,
                         "outputs": outs}
        identical = res["ours"]["outputs"] == res["generate"]["outputs"]
        for r in res.values():
            r.pop("outputs")
        by_bs[str(bs)] = {"systems": res, "identical": identical}
        ratios[f"ours/bs={bs}"] = _common.finite_ratio(res["ours"]["tokens_per_s"], res["generate"]["tokens_per_s"])
        for name, r in res.items():
            rows.append([bs, name, r["tokens"], r["seconds"], r["tokens_per_s"], ratios.get(f"{name}/bs={bs}", 1.0),
                         r["peak_rss_mb"], r["peak_rss_rise_mb"], "yes" if identical else "NO"])
        print(f"bs={bs}: done", flush=True)
    sampled = None
    if args.sampled_k:
        batch, k = all_tasks[: args.sampled_prompts], args.sampled_k
        fns = {"generate": lambda: plain_sample(model, tok, batch, k, args.temperature, args.max_new_tokens, ac),
               "ours": lambda: ours_sample(model, tok, batch, k, args.temperature, args.max_new_tokens, ac)}
        for fn in fns.values():
            fn()
        sampled = {"prompts": len(batch), "k": k, "temperature": args.temperature, "systems": {}}
        for name, (outs, secs, peak, rise) in _timed(fns, args.repeats).items():
            tokens = sum(len(o) for o in outs)
            sampled["systems"][name] = {"seconds": secs, "tokens": tokens, "tokens_per_s": tokens / secs,
                                        "sequences_per_s": len(outs) / secs, "peak_rss_mb": peak,
                                        "peak_rss_rise_mb": rise}
        sy = sampled["systems"]
        ratios[f"ours/sampled_k={k}"] = _common.finite_ratio(sy["ours"]["tokens_per_s"], sy["generate"]["tokens_per_s"])
        for name, r in sy.items():
            rows.append([f"{len(batch)}×{k} sampled", name, r["tokens"], r["seconds"], r["tokens_per_s"],
                         ratios[f"ours/sampled_k={k}"] if name == "ours" else 1.0, r["peak_rss_mb"],
                         r["peak_rss_rise_mb"], "n/a"])
        print("sampled: done", flush=True)
    result = {"settings": {k: v for k, v in vars(args).items() if k != "out"},
              "device": _common.device_info(args.threads),
              "machine_busy_at_start": busy,
              "identical": all(v["identical"] for v in by_bs.values()),
              "by_batch_size": by_bs, "sampled": sampled, "ratios": ratios}
    _common.print_table(f"greedy generation, <= {args.max_new_tokens} new tokens ({args.dtype}, {args.threads} threads)",
                        ["batch", "system", "tokens", "seconds", "tokens/s", "vs generate", "peak RSS MiB",
                         "rise MiB", "identical"], rows)
    _common.write_result(result, args.out)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
