"""Old log-probs recomputed in the training layout (``optim.old_logps: recompute``, and ``auto``,
the default, under bf16 autocast; issue 12).

Under bf16 autocast the log-probs the rollout records while decoding differ from a training
forward's (SmolLM2-135M: 0.03 nats/token mean, max 0.4; ``benchmarks/results/bf16_ratio.json``),
so an importance ratio against them is not 1 before any update. The tiny model's own mismatch is
small (~1e-5 nats at logit scale 30, ``tests/test_logprobs_bf16.py``), so here the stored rollout
log-probs are pushed ±0.05 nats per token (seeded random signs) to simulate SmolLM2's: the tokens
and the policy are unchanged, only the recorded numbers are off, as after a bf16 decode.

For PPO (one epoch, one minibatch), RLOO (one step, and two steps) and GRPO (two steps) on a
fresh bf16 rollout of the logit-scaled tiny model, the ratios every loss call of the *first*
optimizer step sees (captured by wrapping the loss function) must be 1 within 1e-3 (mean and max
``|ratio - 1|``), with a clip fraction of 0. With ``rollout`` (the old behaviour) the same check
fails under the same perturbation: that is asserted too, so the test can fail. The updates also
report the perturbation as ``rollout_logp_diff`` (~0.05 nats/token) in both modes. PPO also runs
with the default ``auto``, which recomputes under bf16.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from accelerate import Accelerator

import rlhf_workbench.train.ppo as ppo_module
import rlhf_workbench.train.rloo as rloo_module
import rlhf_workbench.train.grpo as update_module
from rlhf_workbench.config import ModelConfig, RunConfig
from rlhf_workbench.model.loading import load_policy
from rlhf_workbench.model.rollout import HFEngine
from rlhf_workbench.tasks.loading import load_tasks
from rlhf_workbench.tasks.split import split_tasks
from rlhf_workbench.train.engine import recompute_old_logps
from rlhf_workbench.train.samples import Sample

T, K, PROMPTS, MICRO = 0.7, 4, 4, 4
PERTURB = 0.05  # nats per token added to (or taken from) every recorded log-prob
INSTRUCTION = "Reply with the result only, as 'Answer: <number>'."


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    """One torch thread for the module (see conftest.single_thread)."""


@pytest.fixture(scope="module")
def rollout(tiny_model_dir):
    """A bf16 rollout of the tiny Llama with its logits ×30 (as ``tests/test_logprobs_bf16.py``):
    ``(completions, recorded log-probs + ±PERTURB)``; the policy is rebuilt for each test."""
    pair = _pair(tiny_model_dir)
    train, _ = split_tasks(load_tasks("bundled:arithmetic"))
    tasks = [replace(t, instruction=INSTRUCTION) for t in train[:PROMPTS]]
    torch.manual_seed(0)
    engine = HFEngine(pair.policy, pair.tokenizer, batch_size=PROMPTS * K, mixed_precision="bf16")
    comps = engine.generate(tasks, K, T, 1.0, 32, [])
    assert len(comps) == PROMPTS * K and all(c.token_ids for c in comps)
    g = torch.Generator().manual_seed(7)
    perturbed = [(torch.tensor(c.logps) + PERTURB * (2 * torch.randint(0, 2, (len(c.logps),), generator=g) - 1))
                 .tolist() for c in comps]
    return comps, perturbed


def _pair(tiny_model_dir):
    torch.manual_seed(0)
    pair = load_policy(ModelConfig(name=str(tiny_model_dir), mixed_precision="bf16"))
    with torch.no_grad():
        for m in (pair.policy, pair.reference):
            m.get_input_embeddings().weight.mul_(30.0)  # tied: realistic logits (log-probs down to ~-10)
    return pair


def _setup(tiny_model_dir, rollout, old_logps: str, **sections):
    raw = {"model": {"name": str(tiny_model_dir), "mixed_precision": "bf16"},
           "rollout": {"num_generations": K, "temperature": T, "max_new_tokens": 32},
           "optim": {"lr": 1e-3, "micro_batch_size": MICRO, "old_logps": old_logps}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    cfg = RunConfig.model_validate(raw)
    pair = _pair(tiny_model_dir)
    comps, perturbed = rollout
    g = torch.Generator().manual_seed(1)
    rewards = torch.rand(len(comps), generator=g).tolist()
    samples = [Sample(c.prompt_ids, c.token_ids, old_logps=lp, reward=r)
               for c, lp, r in zip(comps, perturbed, rewards)]
    for i in range(0, len(samples), K):  # GRPO's group-relative advantages
        mean = sum(s.reward for s in samples[i : i + K]) / K
        for s in samples[i : i + K]:
            s.advantage = s.reward - mean
    return cfg, pair, samples


class _Capture:
    """Wraps a loss function: keeps the log-ratios ``logps - old_logps`` (detached, over the
    completion mask, per token; RLOO per sequence) and the clip fraction of every call."""

    def __init__(self, monkeypatch, module, name: str, clip_key: str, per_sequence: bool = False):
        self.calls: list[tuple[torch.Tensor, float]] = []
        loss_fn = getattr(module, name)

        def wrapped(logps, old, *args, **kwargs):
            loss, stats = loss_fn(logps, old, *args, **kwargs)
            log_ratio = (logps - old).detach().double()
            cmask = self.mask_of(args, logps)
            log_ratio = (log_ratio * cmask).sum(-1) if per_sequence else log_ratio[cmask.bool()]
            self.calls.append((log_ratio, float(stats[clip_key])))
            return loss, stats

        monkeypatch.setattr(module, name, wrapped)

    @staticmethod
    def mask_of(args, logps) -> torch.Tensor:
        """The completion mask among a loss's positional arguments: the ``[B, T]`` 0/1 integer tensor."""
        return next(a for a in args if isinstance(a, torch.Tensor) and a.shape == logps.shape
                    and not a.is_floating_point())

    def first(self, calls: int) -> dict[str, float]:
        """Ratio statistics over the first ``calls`` loss calls (the first optimizer step's micro-batches)."""
        ratio = torch.cat([r for r, _ in self.calls[:calls]]).exp()
        return {"mean": float(ratio.mean()), "max_dev": float((ratio - 1).abs().max()),
                "clip": max(c for _, c in self.calls[:calls])}


def _first_step_is_unchanged(stats: dict[str, float]) -> bool:
    """The issue's criterion: the first step sees the ratio of a policy that has not moved."""
    return abs(stats["mean"] - 1) <= 1e-3 and stats["max_dev"] <= 1e-3 and stats["clip"] == 0.0


def _check(mode: str, stats: dict[str, float], out: dict[str, float], who: str) -> None:
    print(f"\n{who} [{mode}] first step: ratio mean - 1 = {stats['mean'] - 1:.2e}, max |ratio - 1| "
          f"{stats['max_dev']:.2e}, clip {stats['clip']:.3f}; rollout_logp_diff {out['rollout_logp_diff']:.4f}")
    assert _first_step_is_unchanged(stats) == (mode != "rollout"), stats  # auto: bf16, so recompute
    # the recorded log-probs are ±PERTURB off the policy's (plus the tiny model's ~1e-5 mismatch)
    assert out["rollout_logp_diff"] == pytest.approx(PERTURB, abs=2e-3)


@pytest.mark.parametrize("mode", ["recompute", "rollout", "auto"])
def test_ppo_first_step_ratio(tiny_model_dir, rollout, monkeypatch, mode):
    cfg, pair, samples = _setup(tiny_model_dir, rollout, mode, ppo={"ppo_epochs": 2, "num_mini_batches": 1,
                                                                     "kl_coef": 0.05})
    capture = _Capture(monkeypatch, ppo_module, "ppo_loss", "policy/clipfrac_avg")
    critic = ppo_module.load_critic(cfg)
    out = ppo_module.ppo_update(pair, critic, ppo_module.make_optimizer(pair, critic, cfg), Accelerator(cpu=True),
                                samples, cfg)
    assert out["steps"] == 2.0 and len(capture.calls) == 2 * len(samples) // MICRO
    stats = capture.first(len(samples) // MICRO)
    _check(mode, stats, out, "PPO")
    if mode != "rollout":
        # policy == reference and the old log-probs are the policy's: the KL penalty is ~0, not ±PERTURB
        assert abs(out["objective/kl"]) < 1e-3
        assert capture.first(2 * len(samples) // MICRO)["max_dev"] > 1e-3  # the second epoch sees the step


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("mode", ["recompute", "rollout"])
def test_rloo_first_step_ratio(tiny_model_dir, rollout, monkeypatch, mode, steps):
    cfg, pair, samples = _setup(tiny_model_dir, rollout, mode, rloo={"beta": 0.05},
                                optim={"steps_per_round": steps})
    capture = _Capture(monkeypatch, rloo_module, "rloo_loss", "clip_ratio", per_sequence=True)
    out = rloo_module.rloo_update(pair, torch.optim.AdamW(pair.policy.parameters(), lr=cfg.optim.lr),
                                  Accelerator(cpu=True), samples, cfg)
    assert out["steps"] == float(steps)
    _check(mode, capture.first(len(samples) // steps // MICRO), out, f"RLOO ({steps} step(s))")
    if mode == "recompute":
        assert abs(out["kl"]) <= 1e-6  # the policy's log-probs against the reference's, same micro-batches


@pytest.mark.parametrize("mode", ["recompute", "rollout"])
def test_grpo_two_steps_first_step_ratio(tiny_model_dir, rollout, monkeypatch, mode):
    cfg, pair, samples = _setup(tiny_model_dir, rollout, mode, optim={"steps_per_round": 2},
                                grpo={"beta": 0.0, "epsilon": 0.2})
    capture = _Capture(monkeypatch, update_module, "grpo_loss", "clip_ratio")
    out = update_module.grpo_update(pair, torch.optim.AdamW(pair.policy.parameters(), lr=cfg.optim.lr),
                                    Accelerator(cpu=True), samples, cfg)
    assert out["steps"] == 2.0
    _check(mode, capture.first(len(samples) // 2 // MICRO), out, "GRPO (2 steps)")


def test_recompute_needs_no_recorded_logps_and_one_step_grpo_is_on_policy(tiny_model_dir, rollout, monkeypatch):
    """With ``recompute`` the recorded log-probs are optional (they only feed the drift metric);
    GRPO with one step keeps using its detached training log-probs (no extra pass) in both modes,
    and still reports the drift."""
    cfg, pair, samples = _setup(tiny_model_dir, rollout, "recompute", rloo={"beta": 0.05})
    bare = [replace(s, old_logps=None) for s in samples]
    out = rloo_module.rloo_update(pair, torch.optim.AdamW(pair.policy.parameters(), lr=cfg.optim.lr),
                                  Accelerator(cpu=True), bare, cfg)
    assert out["steps"] == 1.0 and "rollout_logp_diff" not in out
    critic = ppo_module.load_critic(cfg)
    out = ppo_module.ppo_update(pair, critic, ppo_module.make_optimizer(pair, critic, cfg), Accelerator(cpu=True),
                                bare, cfg)
    assert out["steps"] >= 1.0 and "rollout_logp_diff" not in out
    with pytest.raises(ValueError, match="old_logps"):  # a recorded row of the wrong length is still an error
        rloo_module.rloo_update(pair, torch.optim.AdamW(pair.policy.parameters()), Accelerator(cpu=True),
                                [replace(s, old_logps=s.old_logps[:-1]) for s in samples], cfg)

    passes = []
    real_pass = update_module.old_logps_pass
    monkeypatch.setattr(update_module, "old_logps_pass", lambda *a, **k: passes.append(1) or real_pass(*a, **k))
    for mode in ("recompute", "rollout"):
        cfg, pair, samples = _setup(tiny_model_dir, rollout, mode, grpo={"beta": 0.0})
        capture = _Capture(monkeypatch, update_module, "grpo_loss", "clip_ratio")
        out = update_module.grpo_update(pair, torch.optim.AdamW(pair.policy.parameters(), lr=cfg.optim.lr),
                                        Accelerator(cpu=True), samples, cfg)
        stats = capture.first(len(capture.calls))
        assert stats["max_dev"] == 0.0 and stats["clip"] == 0.0  # detached: exactly 1
        assert out["rollout_logp_diff"] == pytest.approx(PERTURB, abs=2e-3)
    assert not passes


def test_auto_recomputes_under_bf16_only():
    """``auto`` (the default) recomputes where decoding and training round differently (bf16
    autocast) and keeps the recorded log-probs in fp32, where they match to float noise."""
    def decide(**optim_and_model):
        model = {"mixed_precision": optim_and_model.pop("mp")}
        return recompute_old_logps(RunConfig.model_validate({"model": model, "optim": optim_and_model}))

    assert RunConfig().optim.old_logps == "auto"
    assert decide(mp="bf16") and not decide(mp="no")
    assert decide(mp="no", old_logps="recompute") and decide(mp="bf16", old_logps="recompute")
    assert not decide(mp="bf16", old_logps="rollout")
    with pytest.raises(ValueError, match="old_logps"):
        RunConfig.model_validate({"optim": {"old_logps": "sometimes"}})
