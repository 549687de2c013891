"""Rollout log-probs, stop strings, and real gradient steps on a tiny model."""

import torch
from accelerate import Accelerator

from rlhf_workbench.config import ModelConfig, RunConfig
from rlhf_workbench.model.logprobs import completion_logps
from rlhf_workbench.model.loading import load_policy, save_policy
from rlhf_workbench.model.rollout import generate
from rlhf_workbench.tasks.task import Task
from rlhf_workbench.train.dpo import dpo_update
from rlhf_workbench.train.engine import reference_logps
from rlhf_workbench.train.grpo import grpo_update
from rlhf_workbench.train.samples import Sample

TASKS = [Task(id="a", question="What is 12 + 30?", answer="42"), Task(id="b", question="What is 7 + 5?", answer="12")]


def _pair(tiny_model_dir):
    torch.manual_seed(0)
    return load_policy(ModelConfig(name=str(tiny_model_dir), mixed_precision="no"))


def test_rollout_logps_match_fresh_forward(tiny_model_dir):
    pair = _pair(tiny_model_dir)
    torch.manual_seed(1)
    comps = generate(pair.policy, pair.tokenizer, TASKS, num_generations=3, temperature=0.7, max_new_tokens=12,
                     batch_size=4)
    assert len(comps) == 6 and [c.task_id for c in comps] == ["a"] * 3 + ["b"] * 3
    for c in comps:
        assert len(c.logps) == len(c.token_ids) > 0
        ids = torch.tensor([c.prompt_ids + c.token_ids])
        fresh = completion_logps(pair.policy, ids, torch.ones_like(ids), len(c.token_ids), temperature=0.7)[0]
        assert torch.allclose(fresh, torch.tensor(c.logps), atol=1e-4), (fresh, c.logps)
        assert all(lp <= 0 for lp in c.logps)


def test_stop_string_cuts_completion(tiny_model_dir):
    pair = _pair(tiny_model_dir)
    torch.manual_seed(2)
    free = generate(pair.policy, pair.tokenizer, TASKS[:1], 4, max_new_tokens=16)
    # Stop on the second token each sample produced: every completion must end right there.
    stops = [pair.tokenizer.decode(c.token_ids[:2]) for c in free]
    torch.manual_seed(2)
    cut = generate(pair.policy, pair.tokenizer, TASKS[:1], 4, max_new_tokens=16, stop=stops[:1])
    assert cut[0].finished and cut[0].text.endswith(stops[0]) and len(cut[0].token_ids) <= 2 + 1


def _pairs(pair):
    tok = pair.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 12 + 30?"}], add_generation_prompt=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    chosen = tok.encode("12 + 30 = 42.\nAnswer: 42", add_special_tokens=False)
    rejected = tok.encode("I think it is 41.\nAnswer: 41", add_special_tokens=False)
    return [(Sample(prompt, chosen), Sample(prompt, rejected))]


def _seq_logps(model, samples):
    out = []
    for smp in samples:
        ids = torch.tensor([smp.prompt_ids + smp.token_ids])
        out.append(completion_logps(model, ids, torch.ones_like(ids), len(smp.token_ids))[0])
    return out


def _margin(pair, pairs, beta=0.1):
    """DPO implicit-reward margin β((π_c − ref_c) − (π_r − ref_r)) of the first pair."""
    samples = list(pairs[0])
    with torch.no_grad():
        pol = [x.sum() for x in _seq_logps(pair.policy, samples)]
        with pair.reference_context():
            ref = [x.sum() for x in _seq_logps(pair.ref_model, samples)]
    return beta * ((pol[0] - ref[0]) - (pol[1] - ref[1])).item()


def test_dpo_step_raises_margin(tiny_model_dir):
    pair = _pair(tiny_model_dir)
    cfg = RunConfig(algorithm="dpo", model=ModelConfig(mixed_precision="no"))
    cfg.optim.lr = 1e-3
    pairs = _pairs(pair)
    assert abs(_margin(pair, pairs)) < 1e-5  # policy == reference at the start
    opt = torch.optim.AdamW(pair.policy.parameters(), lr=cfg.optim.lr)
    stats = dpo_update(pair, opt, Accelerator(cpu=True), pairs, cfg)
    assert abs(stats["loss"] - torch.log(torch.tensor(2.0)).item()) < 1e-4  # -log σ(0) on the first step
    assert stats["rewards/margins"] == 0.0 or abs(stats["rewards/margins"]) < 1e-5
    assert _margin(pair, pairs) > 0.01


def test_grpo_step_moves_towards_positive_advantage(tiny_model_dir):
    pair = _pair(tiny_model_dir)
    cfg = RunConfig(model=ModelConfig(mixed_precision="no"))
    cfg.optim.lr = 1e-3
    (good, bad), = _pairs(pair)
    ref = reference_logps(pair, [good, bad], cfg)
    good.old_logps, bad.old_logps = ref[0].tolist(), ref[1].tolist()
    good.advantage, bad.advantage = 1.0, -1.0
    neutral = Sample(good.prompt_ids, good.token_ids[:3], ref[0][:3].tolist(), 0.0)
    opt = torch.optim.AdamW(pair.policy.parameters(), lr=cfg.optim.lr)
    stats = grpo_update(pair, opt, Accelerator(cpu=True), [good, bad, neutral], cfg)
    assert stats["clip_ratio"] == 0.0 and stats["grad_norm"] > 0
    with torch.no_grad():
        after = _seq_logps(pair.policy, [good, bad])
    assert after[0].sum() > ref[0].sum() and after[1].sum() < ref[1].sum()


def test_save_policy_loads_with_from_pretrained(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    pair = _pair(tiny_model_dir)
    save_policy(pair, tmp_path / "p")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    ids = torch.tensor([[1, 2, 3]])
    assert torch.allclose(loaded(ids).logits, pair.policy(ids).logits, atol=1e-6)


def test_lora_reference_is_adapter_disabled(tiny_model_dir, tmp_path):
    from rlhf_workbench.config import LoraConfig

    pair = load_policy(ModelConfig(name=str(tiny_model_dir), mixed_precision="no", lora=LoraConfig(r=4, alpha=8)))
    assert pair.reference is None
    cfg = RunConfig(model=ModelConfig(mixed_precision="no"))
    cfg.optim.lr = 1e-2
    pairs = _pairs(pair)
    trainable = [p for p in pair.policy.parameters() if p.requires_grad]
    assert 0 < sum(p.numel() for p in trainable) < sum(p.numel() for p in pair.policy.parameters()) / 2
    opt = torch.optim.AdamW(trainable, lr=cfg.optim.lr)
    for _ in range(3):
        dpo_update(pair, opt, Accelerator(cpu=True), pairs, cfg)
    # LoRA B starts at zero, so the first step cannot move the margin: check after a few.
    assert _margin(pair, pairs) > 0.0
    save_policy(pair, tmp_path / "merged", merge_lora=True)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = torch.tensor([[1, 2, 3]])
    assert torch.allclose(merged(ids).logits, pair.policy(ids).logits, atol=1e-5)
