"""RLOO, KTO and rejection-sampling SFT updates on the tiny model, with real forward passes.

Each returned loss is checked against the loss function of :mod:`rlhf_workbench.train.losses` applied
by hand to a fresh, unpadded forward pass of the same batch (one sequence at a time, so the
update's batching and padding are checked too); then that a step changes the weights and moves
the policy the right way.
"""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator

from rlhf_workbench.config import LoraConfig, ModelConfig, RunConfig
from rlhf_workbench.model.logprobs import completion_logps
from rlhf_workbench.train.losses import kto_loss, rloo_advantages, rloo_loss
from rlhf_workbench.model.loading import load_policy
from rlhf_workbench.train.kto import kto_kl_partners, kto_update
from rlhf_workbench.train.rloo import rloo_update
from rlhf_workbench.train.samples import Sample
from rlhf_workbench.train.sft import sft_update

TOL = 1e-5
TEMPERATURE = 0.7


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    """Every test in this module runs with one torch thread (see conftest.single_thread)."""


def _setup(tiny_model_dir, lora=False, perturb=0.0, **sections):
    """Policy pair, config, accelerator and AdamW, prepared as the loop does. ``perturb`` adds
    seeded noise to the policy so that it differs from the reference."""
    torch.manual_seed(0)
    pair = load_policy(ModelConfig(name=str(tiny_model_dir), mixed_precision="no",
                                   lora=LoraConfig(r=4, alpha=8) if lora else None))
    if perturb:
        with torch.no_grad():
            for p in pair.policy.parameters():
                p.add_(perturb * torch.randn_like(p))
    raw = {"model": {"name": str(tiny_model_dir), "mixed_precision": "no"},
           "rollout": {"num_generations": 3, "temperature": TEMPERATURE},
           "optim": {"lr": 1e-3, "micro_batch_size": 2}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    cfg = RunConfig.model_validate(raw)
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW([p for p in pair.policy.parameters() if p.requires_grad], lr=cfg.optim.lr)
    pair.train_module, optimizer = accelerator.prepare(pair.policy, optimizer)
    return pair, cfg, accelerator, optimizer


def _prompt(tok, question: str) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _completion(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]


QUESTIONS = ["What is 12 + 30?", "What is 7 + 5?"]
TEXTS = [
    ["12 + 30 = 42.\nAnswer: 42", "I think it is 41.\nAnswer: 41", "Answer: 42"],
    ["7 + 5 = 12, so\nAnswer: 12", "Answer: 13", "Seven plus five is twelve.\nAnswer: 12"],
]


def _samples(tok, texts=TEXTS) -> list[Sample]:
    return [Sample(_prompt(tok, q), _completion(tok, t)) for q, group in zip(QUESTIONS, texts) for t in group]


@torch.no_grad()
def _logps(model, samples, temperature=1.0) -> list[torch.Tensor]:
    """Per-token log-probs of each completion from its own unpadded forward pass."""
    out = []
    for s in samples:
        ids = torch.tensor([s.prompt_ids + s.token_ids])
        out.append(completion_logps(model, ids, torch.ones_like(ids), len(s.token_ids), temperature)[0])
    return out


def _params(pair) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in pair.policy.parameters() if p.requires_grad])


# --------------------------------------------------------------------------------------------
# RLOO
# --------------------------------------------------------------------------------------------


def _rloo_batch(pair, rewards, texts=TEXTS):
    samples = _samples(pair.tokenizer, texts)
    for s, lp, r in zip(samples, _logps(pair.policy, samples, TEMPERATURE), rewards):
        # The sampling policy's log-probs, slightly off the current policy so that ratios differ from 1.
        s.old_logps = (lp + 0.03 * torch.sin(torch.arange(lp.numel(), dtype=torch.float32))).tolist()
        s.reward = r
    return samples


@pytest.mark.parametrize("old_logps", ["rollout", "recompute"])
def test_rloo_loss_matches_hand_computation_and_steps(tiny_model_dir, old_logps):
    """``rollout``: KL and ratio against the recorded (here perturbed) log-probs; ``recompute``:
    against the policy's own, so the ratio is 1 and the perturbation shows only in
    ``rollout_logp_diff``."""
    pair, cfg, accelerator, optimizer = _setup(tiny_model_dir, perturb=0.02, rloo={"beta": 0.05},
                                               optim={"old_logps": old_logps})
    samples = _rloo_batch(pair, [1.0, 0.0, 0.5, 0.2, 1.0, 0.0])
    pol = _logps(pair.policy, samples, TEMPERATURE)
    with pair.reference_context():
        ref = _logps(pair.ref_model, samples, TEMPERATURE)
    recorded = [torch.tensor(s.old_logps) for s in samples]
    old = recorded if old_logps == "rollout" else pol
    kl = torch.stack([(o - r).sum() for o, r in zip(old, ref)])
    adv = rloo_advantages(torch.tensor([s.reward for s in samples]), 3, kl, beta=0.05)
    expected, stats = rloo_loss(torch.stack([p.sum() for p in pol]), torch.stack([o.sum() for o in old]), adv)
    before = _params(pair)
    out = rloo_update(pair, optimizer, accelerator, samples, cfg)
    assert out["loss"] == pytest.approx(expected.item(), abs=TOL)
    assert out["kl"] == pytest.approx(kl.sum().item() / sum(len(s.token_ids) for s in samples), abs=TOL)
    assert out["clip_ratio"] == pytest.approx(stats["clip_ratio"].item(), abs=TOL)
    if old_logps == "recompute":
        assert out["clip_ratio"] == 0.0
    drift = torch.cat([(p - r).abs() for p, r in zip(pol, recorded)]).mean().item()  # ~0.03 · |sin|
    assert out["rollout_logp_diff"] == pytest.approx(drift, abs=1e-5) and drift > 0.01
    assert out["steps"] == 1.0 and out["grad_norm"] > 0
    assert not torch.equal(before, _params(pair))


def test_rloo_equal_rewards_have_no_effect(tiny_model_dir):
    """β = 0: a group whose rewards are all equal has zero advantages, so it changes nothing."""
    pair, cfg, accelerator, optimizer = _setup(tiny_model_dir, rloo={"beta": 0.0})
    before = _params(pair)
    out = rloo_update(pair, optimizer, accelerator, _rloo_batch(pair, [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]), cfg)
    assert out["steps"] == 0.0 and out["loss"] == 0.0
    assert torch.equal(before, _params(pair))

    # One informative group plus an all-equal one: replacing the all-equal group's completions by
    # other texts gives exactly the same update (its samples carry no gradient; the normaliser
    # still counts them, so the loss is the mean over all six).
    after = []
    for other in (TEXTS[1], ["Answer: 99", "no idea", "12"]):
        pair, cfg, accelerator, optimizer = _setup(tiny_model_dir, rloo={"beta": 0.0})
        samples = _rloo_batch(pair, [1.0, 0.0, 0.5, 1.0, 1.0, 1.0], [TEXTS[0], other])
        out = rloo_update(pair, optimizer, accelerator, samples, cfg)
        assert out["steps"] == 1.0
        after.append(_params(pair))
    assert torch.allclose(after[0], after[1], atol=1e-7, rtol=0)
    assert not torch.equal(before, after[0])


def test_rloo_lora_reference_is_policy_without_adapters(tiny_model_dir):
    pair, cfg, accelerator, optimizer = _setup(tiny_model_dir, lora=True, rloo={"beta": 0.05})
    samples = _rloo_batch(pair, [1.0, 0.0, 0.5, 0.2, 1.0, 0.0])
    for s in samples:  # on-policy old log-probs: with fresh adapters (B = 0) the KL is 0
        s.old_logps = _logps(pair.policy, [s], TEMPERATURE)[0].tolist()
    out = rloo_update(pair, optimizer, accelerator, samples, cfg)
    assert abs(out["kl"]) < TOL and out["steps"] == 1.0


def test_rloo_rejects_partial_groups(tiny_model_dir):
    pair, cfg, accelerator, optimizer = _setup(tiny_model_dir)
    with pytest.raises(ValueError, match="multiple of num_generations"):
        rloo_update(pair, optimizer, accelerator, _rloo_batch(pair, [1.0] * 6)[:4], cfg)


# --------------------------------------------------------------------------------------------
# KTO
# --------------------------------------------------------------------------------------------


def _kto_batch(tok):
    samples = _samples(tok)
    for s, label in zip(samples, [True, False, True, True, False, False]):
        s.label = label
    return samples


def test_kto_loss_matches_hand_computation(tiny_model_dir):
    pair, cfg, accelerator, optimizer = _setup(tiny_model_dir, perturb=0.02, kto={"beta": 0.1, "desirable_weight": 1.3})
    samples = _kto_batch(pair.tokenizer)
    partners = kto_kl_partners(samples)
    assert all(samples[j].prompt_ids != s.prompt_ids for s, j in zip(samples, partners))  # mismatched pairs
    kl_pairs = [Sample(s.prompt_ids, samples[j].token_ids) for s, j in zip(samples, partners)]
    pol = torch.stack([x.sum() for x in _logps(pair.policy, samples)])
    pol_kl = torch.stack([x.sum() for x in _logps(pair.policy, kl_pairs)])
    with pair.reference_context():
        ref = torch.stack([x.sum() for x in _logps(pair.ref_model, samples)])
        ref_kl = torch.stack([x.sum() for x in _logps(pair.ref_model, kl_pairs)])
    labels = torch.tensor([s.label for s in samples])
    expected, stats = kto_loss(pol, ref, labels, pol_kl - ref_kl, beta=0.1, desirable_weight=1.3)
    before = _params(pair)
    out = kto_update(pair, optimizer, accelerator, samples, cfg)
    assert out["loss"] == pytest.approx(expected.item(), abs=TOL)
    assert out["kl"] == pytest.approx(stats["kl"].item(), abs=TOL)
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert out[key] == pytest.approx(stats[key].mean().item(), abs=1e-4), key
    assert out["rewards/margins"] == pytest.approx(stats["rewards/margins"].item(), abs=TOL)
    assert out["steps"] == 1.0 and out["grad_norm"] > 0
    assert not torch.equal(before, _params(pair))


def test_kto_raises_desirable_over_undesirable(tiny_model_dir):
    pair, cfg, accelerator, optimizer = _setup(tiny_model_dir, optim={"lr": 3e-3})
    samples = _kto_batch(pair.tokenizer)
    labels = torch.tensor([s.label for s in samples])

    def gap() -> float:
        seq = torch.stack([x.sum() for x in _logps(pair.policy, samples)])
        return (seq[labels].mean() - seq[~labels].mean()).item()

    start = gap()
    for _ in range(3):
        kto_update(pair, optimizer, accelerator, samples, cfg)
    assert gap() > start + 0.1


def test_kto_needs_labels(tiny_model_dir):
    pair, cfg, accelerator, optimizer = _setup(tiny_model_dir)
    with pytest.raises(ValueError, match="no label"):
        kto_update(pair, optimizer, accelerator, _samples(pair.tokenizer), cfg)


# --------------------------------------------------------------------------------------------
# Rejection-sampling SFT
# --------------------------------------------------------------------------------------------


def _nll(pair, samples) -> float:
    lps = _logps(pair.policy, samples)
    return -(torch.cat(lps).sum() / sum(x.numel() for x in lps)).item()


def test_sft_loss_and_accuracy_match_hand_computation(tiny_model_dir):
    pair, cfg, accelerator, optimizer = _setup(tiny_model_dir, sft={"lr": 3e-2})
    samples = [s for s, ok in zip(_samples(pair.tokenizer), [1, 0, 1, 1, 0, 1]) if ok]  # the verified traces
    n_tokens = sum(len(s.token_ids) for s in samples)
    for _ in range(4):  # train a little first, so that some tokens are the argmax (accuracy > 0)
        sft_update(pair, optimizer, accelerator, samples, cfg)
    correct = 0
    with torch.no_grad():
        for s in samples:
            logits = pair.policy(torch.tensor([s.prompt_ids + s.token_ids])).logits[0]
            pred = logits[len(s.prompt_ids) - 1 : -1].argmax(-1)
            correct += (pred == torch.tensor(s.token_ids)).sum().item()
    expected = _nll(pair, samples)
    before = _params(pair)
    out = sft_update(pair, optimizer, accelerator, samples, cfg)
    assert out["loss"] == pytest.approx(expected, abs=TOL)
    assert out["mean_token_accuracy"] == pytest.approx(correct / n_tokens, abs=TOL) and correct > 0
    assert out["num_tokens"] == n_tokens and out["steps"] == 1.0 and out["grad_norm"] > 0
    assert not torch.equal(before, _params(pair))


def test_sft_lowers_nll_of_trained_traces(tiny_model_dir):
    pair, cfg, accelerator, optimizer = _setup(tiny_model_dir, sft={"lr": 1e-2, "epochs": 2})
    samples = _samples(pair.tokenizer)[::2]
    start = _nll(pair, samples)
    for _ in range(3):
        out = sft_update(pair, optimizer, accelerator, samples, cfg)
        assert out["steps"] == 2.0
    assert optimizer.param_groups[0]["lr"] == cfg.optim.lr  # the SFT lr applies to the phase only
    assert _nll(pair, samples) < start - 0.5
    assert math.isfinite(out["loss"]) and out["loss"] < start
