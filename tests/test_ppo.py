"""PPO: the pure losses against the papers' formulas computed by hand, and one real update.

TRL 1.16 no longer ships ``PPOTrainer``, so there is no numerical oracle to import: each loss is
checked against an independent plain-Python implementation of its formula (GAE as the explicit
sum of Schulman et al. 2016, eq. 16, not the backward recursion the code uses; the clipped
surrogate of Schulman et al. 2017, eq. 7, token by token). The integration tests run
:func:`rlhf_workbench.train.ppo.ppo_update` on the tiny random Llama with real forward passes.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from accelerate import Accelerator

from rlhf_workbench.config import ModelConfig, PPOConfig, RunConfig
from rlhf_workbench.model.logprobs import completion_logps
from rlhf_workbench.train.ppo_losses import (
    explained_variance,
    gae_advantages,
    kl_penalty_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_loss,
)
from rlhf_workbench.model.loading import load_policy
from rlhf_workbench.train.ppo import (
    Critic,
    load_critic,
    make_optimizer,
    ppo_update,
    save_critic,
    token_values,
    truncated,
)
from rlhf_workbench.train.samples import Sample


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    """Every test in this module runs with one torch thread (see conftest.single_thread)."""


def _ragged(lengths, T, seed=0):
    """Random ``[B, T]`` rewards and values (garbage at padding too) and a right-padded mask."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return rewards, values, mask


# --------------------------------------------------------------------------------------------
# pure functions vs hand formulas
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_explicit_sum(gamma, lam):
    """Â_t = Σ_{l≥0} (γλ)^l δ_{t+l}, δ_t = r_t + γ V_{t+1} - V_t, episode ending at the last token."""
    lengths = [5, 1, 3, 7]
    rewards, values, mask = _ragged(lengths, T=7, seed=1)
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
    for i, n in enumerate(lengths):
        r, v = rewards[i, :n].tolist(), values[i, :n].tolist() + [0.0]  # V after the last token = 0
        deltas = [r[t] + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(7):
            if t < n:
                expected = sum((gamma * lam) ** l * deltas[t + l] for l in range(n - t))
                assert adv[i, t].item() == pytest.approx(expected, abs=1e-6)
                assert ret[i, t].item() == pytest.approx(expected + v[t], abs=1e-6)
            else:
                assert adv[i, t].item() == 0.0 and ret[i, t].item() == 0.0


def test_gae_monte_carlo_limit_and_errors():
    # γ = λ = 1: the advantage is the reward-to-go minus the value (a Monte Carlo estimate).
    rewards = torch.tensor([[0.0, 0.0, 1.0, 9.0]])
    values = torch.tensor([[0.5, 0.25, 0.125, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae_advantages(rewards, values, mask, 1.0, 1.0)
    assert adv.tolist() == [[0.5, 0.75, 0.875, 0.0]]
    assert ret.tolist() == [[1.0, 1.0, 1.0, 0.0]]
    with pytest.raises(ValueError, match="right-padded"):
        gae_advantages(rewards, values, torch.tensor([[1, 0, 1, 0]]), 1.0, 1.0)
    with pytest.raises(ValueError, match="same"):
        gae_advantages(rewards, values[:, :3], mask, 1.0, 1.0)


def test_masked_statistics_and_whitening_match_hand_formula():
    x = torch.tensor([[1.0, 2.0, 4.0, 100.0], [-3.0, 0.5, -50.0, 7.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    kept = [1.0, 2.0, 4.0, -3.0, 0.5]
    mu, var, pvar = statistics.fmean(kept), statistics.variance(kept), statistics.pvariance(kept)
    assert masked_mean(x, mask).item() == pytest.approx(mu, abs=1e-12)
    assert masked_var(x, mask).item() == pytest.approx(var, abs=1e-12)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(pvar, abs=1e-12)
    white = masked_whiten(x, mask)
    scaled = masked_whiten(x, mask, shift_mean=False)
    for i in range(2):
        for j in range(4):
            expected = (x[i, j].item() - mu) / math.sqrt(var + 1e-8)
            assert white[i, j].item() == pytest.approx(expected, abs=1e-9)
            assert scaled[i, j].item() == pytest.approx(expected + mu, abs=1e-9)
    kept_white = white[mask.bool()]
    assert kept_white.mean().item() == pytest.approx(0.0, abs=1e-9)
    assert kept_white.std().item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least two"):
        masked_var(x, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="empty"):
        masked_var(x, torch.zeros_like(mask))


def test_kl_penalty_rewards_puts_score_on_last_real_token():
    logps = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-0.5, -0.25, 9.0, 9.0], [-1.0, 9.0, 9.0, 9.0]])
    ref = torch.tensor([[-1.5, -1.0, -3.0, -2.0], [-0.5, -0.75, 0.0, 0.0], [-2.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    scores = torch.tensor([10.0, -3.0, 2.0])
    rewards, kl = kl_penalty_rewards(scores, logps, ref, mask, kl_coef=0.1)
    expected_kl = [[0.5, -1.0, 0.0, -2.0], [0.0, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
    expected_rewards = [[-0.05, 0.1, 0.0, 0.2 + 10.0], [0.0, -0.05 - 3.0, 0.0, 0.0], [-0.1 + 2.0, 0.0, 0.0, 0.0]]
    assert torch.allclose(kl, torch.tensor(expected_kl), atol=1e-6)
    assert torch.allclose(rewards, torch.tensor(expected_rewards), atol=1e-6)
    # Ouyang eq. 2 per sequence: Σ_t r_t = score - β Σ_t kl_t
    assert torch.allclose(rewards.sum(1), scores - 0.1 * kl.sum(1), atol=1e-6)
    with pytest.raises(ValueError, match="no completion tokens"):
        kl_penalty_rewards(scores, logps, ref, torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]]), 0.1)
    with pytest.raises(ValueError, match="scores"):
        kl_penalty_rewards(scores[:2], logps, ref, mask, 0.1)


def test_ppo_loss_matches_hand_formula_with_both_clip_branches():
    eps, c, vf_coef, ent_coef = 0.2, 0.2, 0.1, 0.01
    # tokens: (ratio, advantage) chosen to hit every branch of max(-Aρ, -A clip(ρ))
    ratios = [1.5, 1.5, 0.5, 0.5, 1.1, 1.0]  # >1+ε, >1+ε, <1-ε, <1-ε, inside, padding
    adv = [1.0, -1.0, -2.0, 2.0, 0.5, 3.0]
    # values: (V, V_old, R) with V outside V_old ± c on both sides, and inside
    vals = [(1.0, 0.5, 2.0), (1.0, 0.5, 0.0), (-0.5, 0.0, -1.0), (0.3, 0.2, 0.25), (0.0, 0.1, 1.0), (5.0, 0.0, 0.0)]
    ent = [1.0, 2.0, 3.0, 4.0, 5.0, 100.0]
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.7, -1.2, -3.0]], dtype=torch.float64)
    logps = (old + torch.log(torch.tensor(ratios, dtype=torch.float64)).view(2, 3)).requires_grad_(True)

    def t(xs):
        return torch.tensor(xs, dtype=torch.float64).view(2, 3)

    values = t([v for v, _, _ in vals]).requires_grad_(True)
    loss, stats = ppo_loss(logps, old, values, t([o for _, o, _ in vals]), t(adv), t([r for _, _, r in vals]),
                           mask, eps, c, vf_coef, t(ent), ent_coef)
    n = 5
    pg, vf, clipped_pg, clipped_vf = [], [], [], []
    for k in range(n):
        rho, a = ratios[k], adv[k]
        u, w = -a * rho, -a * min(max(rho, 1 - eps), 1 + eps)
        pg.append(max(u, w))
        clipped_pg.append(w > u)
        v, o, r = vals[k]
        u, w = (v - r) ** 2, (min(max(v, o - c), o + c) - r) ** 2
        vf.append(0.5 * max(u, w))
        clipped_vf.append(w > u)
    assert clipped_pg == [True, False, True, False, False]  # both clip branches, and unclipped ones
    assert clipped_vf == [True, False, True, False, False]
    pg_loss, vf_loss = sum(pg) / n, sum(vf) / n
    assert loss.item() == pytest.approx(pg_loss + vf_coef * vf_loss - ent_coef * sum(ent[:n]) / n, abs=1e-12)
    assert stats["loss/policy_avg"].item() == pytest.approx(pg_loss, abs=1e-12)
    assert stats["loss/value_avg"].item() == pytest.approx(vf_loss, abs=1e-12)
    assert stats["policy/clipfrac_avg"].item() == pytest.approx(2 / 5)
    assert stats["val/clipfrac_avg"].item() == pytest.approx(2 / 5)
    assert stats["val/ratio"].item() == pytest.approx(sum(ratios[:n]) / n, abs=1e-12)
    assert stats["policy/approxkl_avg"].item() == pytest.approx(0.5 * sum(math.log(r) ** 2 for r in ratios[:n]) / n)
    assert stats["policy/entropy_avg"].item() == pytest.approx(3.0)
    loss.backward()
    # d loss / d logp_k = -A_k ρ_k / n where the unclipped term is taken, 0 where clipped; 0 at padding
    g = logps.grad.view(-1).tolist()
    for k in range(n):
        assert g[k] == pytest.approx(0.0 if clipped_pg[k] else -adv[k] * ratios[k] / n, abs=1e-12)
    assert g[5] == 0.0
    # d loss / d V_k = vf_coef (V - R) / n where unclipped, 0 where the clipped value loss is taken
    gv = values.grad.view(-1).tolist()
    for k in range(n):
        v, _, r = vals[k]
        assert gv[k] == pytest.approx(0.0 if clipped_vf[k] else vf_coef * (v - r) / n, abs=1e-12)
    with pytest.raises(ValueError, match="entropy"):
        ppo_loss(logps, old, values, values, t(adv), t(adv), mask, entropy_coef=0.1)


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 50.0], [4.0, 6.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    values = torch.tensor([[1.5, 1.0, 3.0, 0.0], [4.0, 5.0, 0.0, 0.0]])
    r, v = [1.0, 2.0, 3.0, 4.0, 6.0], [1.5, 1.0, 3.0, 4.0, 5.0]
    expected = 1 - statistics.pvariance([a - b for a, b in zip(r, v)]) / statistics.pvariance(r)
    assert explained_variance(values, returns, mask).item() == pytest.approx(expected, abs=1e-6)
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 3.2), returns, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(explained_variance(values, torch.ones_like(returns), mask).item())


def test_ppo_config_defaults_and_validation():
    cfg = RunConfig()
    assert cfg.ppo == PPOConfig()
    assert (cfg.ppo.kl_coef, cfg.ppo.cliprange, cfg.ppo.vf_coef, cfg.ppo.gamma, cfg.ppo.lam) == (0.05, 0.2, 0.1, 1.0, 0.95)
    assert cfg.ppo.ppo_epochs == 4 and cfg.ppo.missing_eos_penalty is None
    with pytest.raises(ValueError):
        PPOConfig(ppo_epochs=0)
    with pytest.raises(ValueError):
        PPOConfig(clip_range=0.1)  # unknown keys are errors


# --------------------------------------------------------------------------------------------
# critic and update on the tiny model
# --------------------------------------------------------------------------------------------

TEMPERATURE = 0.7


@pytest.fixture()
def setup(tiny_model_dir):
    torch.manual_seed(0)
    cfg = RunConfig(model=ModelConfig(name=str(tiny_model_dir), mixed_precision="no"))
    cfg.rollout.temperature = TEMPERATURE
    pair = load_policy(cfg.model)
    critic = load_critic(cfg)
    return cfg, pair, critic


def _encode(pair, text, eos=True):
    ids = pair.tokenizer.encode(text, add_special_tokens=False)
    return ids + [pair.tokenizer.eos_token_id] if eos else ids


def _samples(pair, eos_bad=True):
    """A good and a bad completion (same length) of one prompt, and a second prompt of another length."""
    p1 = _encode(pair, "Question: what is two plus two? Answer:", eos=False)
    p2 = _encode(pair, "2+2=", eos=False)
    good = _encode(pair, " four, since 2+2=4")
    bad = _encode(pair, " five, since 2+2=5", eos=eos_bad)
    other = _encode(pair, " 4")
    assert len(p1) != len(p2) and len(good) == len(bad) + (0 if eos_bad else 1)
    samples = [Sample(p1, good, reward=1.0), Sample(p1, bad, reward=-1.0), Sample(p2, other, reward=0.0)]
    for s in samples:
        s.old_logps = _seq_logps(pair.policy, s, TEMPERATURE).tolist()
    return samples


def _seq_logps(model, s: Sample, temperature=TEMPERATURE) -> torch.Tensor:
    ids = torch.tensor([s.prompt_ids + s.token_ids])
    with torch.no_grad():
        return completion_logps(model, ids, torch.ones_like(ids), len(s.token_ids), temperature)[0]


def test_token_values_align_with_state_before_each_token(setup):
    cfg, pair, critic = setup
    samples = _samples(pair)
    with torch.no_grad():
        values = token_values(critic, samples, pair.tokenizer.pad_token_id, "no", batch_size=2)
        for i, s in enumerate(samples):
            ids = torch.tensor([s.prompt_ids + s.token_ids])
            full = critic(ids, torch.ones_like(ids))[0]  # unpadded: position j is V(ids[: j + 1])
            P, n = len(s.prompt_ids), len(s.token_ids)
            assert torch.allclose(values[i, :n], full[P - 1 : P + n - 1], atol=1e-5)
            assert (values[i, n:] == 0).all()
            # the value of token 0 is the value of the prompt alone
            prompt_only = critic(torch.tensor([s.prompt_ids]), torch.ones(1, P, dtype=torch.long))[0, -1]
            assert values[i, 0].item() == pytest.approx(prompt_only.item(), abs=1e-5)
    assert values.shape == (3, max(len(s.token_ids) for s in samples))


def test_critic_save_load_round_trip(setup, tmp_path):
    cfg, pair, critic = setup
    samples = _samples(pair)
    with torch.no_grad():
        critic.model.score.weight.add_(0.5)  # not the fresh initialisation
        before = token_values(critic, samples, pair.tokenizer.pad_token_id)
    out = save_critic(critic, tmp_path / "critic")
    assert out.is_dir() and not (tmp_path / "critic.tmp").exists()
    save_critic(critic, tmp_path / "critic")  # replacing an existing directory works
    loaded = load_critic(cfg, checkpoint=str(out))
    assert isinstance(loaded, Critic)
    with torch.no_grad():
        after = token_values(loaded, samples, pair.tokenizer.pad_token_id)
    assert torch.equal(before, after)
    fresh = load_critic(cfg)
    assert not torch.equal(fresh.model.score.weight, loaded.model.score.weight)


def test_truncated_detects_missing_eos(setup):
    cfg, pair, _ = setup
    samples = _samples(pair, eos_bad=False)
    assert truncated(samples, pair) == [False, True, False]
    assert truncated(samples, pair, stop=["=5"]) == [False, False, False]


def _params(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _changed(before, module):
    return {k for k, v in module.named_parameters() if not torch.equal(before[k], v.detach())}


def test_ppo_update_first_step_matches_hand_computation(setup):
    """One epoch, one minibatch: at the first (only) step π = π_old and V = V_old, so the ratio is
    1, nothing is clipped, the policy loss is -mean(whitened A) = 0 and the value loss is
    ½ mean((V_old - R)²) with R from a hand-computed GAE on the real rollout values."""
    cfg, pair, critic = setup
    cfg.ppo.ppo_epochs, cfg.ppo.num_mini_batches, cfg.optim.micro_batch_size = 1, 1, 2
    cfg.ppo.kl_coef = 0.2
    samples = _samples(pair)
    pad = pair.tokenizer.pad_token_id
    # make the policy differ from the reference so the KL term is not zero
    with torch.no_grad():
        for p in pair.policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    for s in samples:
        s.old_logps = _seq_logps(pair.policy, s).tolist()
    with torch.no_grad():
        old_values = token_values(critic, samples, pad)
    gamma, lam, beta = cfg.ppo.gamma, cfg.ppo.lam, cfg.ppo.kl_coef
    sq_err, n_tok, kls = 0.0, 0, []
    for i, s in enumerate(samples):
        ref = _seq_logps(pair.reference, s).tolist()
        n = len(s.token_ids)
        kl = [a - b for a, b in zip(s.old_logps, ref)]
        kls.append(sum(kl))
        r = [-beta * k for k in kl]
        r[-1] += s.reward
        v = old_values[i, :n].tolist() + [0.0]
        deltas = [r[t] + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            ret = sum((gamma * lam) ** l * deltas[t + l] for l in range(n - t)) + v[t]
            sq_err += (v[t] - ret) ** 2
            n_tok += 1
    opt = make_optimizer(pair, critic, cfg)
    stats = ppo_update(pair, critic, opt, Accelerator(cpu=True), samples, cfg)
    assert stats["steps"] == 1.0
    assert stats["val/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert stats["policy/clipfrac_avg"] == 0.0 and stats["val/clipfrac_avg"] == 0.0
    assert stats["policy/approxkl_avg"] == pytest.approx(0.0, abs=1e-9)
    assert stats["loss/policy_avg"] == pytest.approx(0.0, abs=1e-5)
    assert stats["loss/value_avg"] == pytest.approx(0.5 * sq_err / n_tok, rel=1e-4)
    assert stats["loss"] == pytest.approx(stats["loss/policy_avg"] + 0.1 * stats["loss/value_avg"], abs=1e-6)
    assert stats["objective/kl"] == pytest.approx(sum(kls) / 3, abs=1e-4)
    assert abs(stats["objective/kl"]) > 1e-3
    assert stats["objective/scores"] == pytest.approx(0.0)
    assert stats["objective/non_score_reward"] == pytest.approx(-beta * sum(kls) / 3, abs=1e-4)
    assert stats["objective/rlhf_reward"] == pytest.approx(stats["objective/non_score_reward"], abs=1e-6)
    assert stats["grad_norm"] > 0 and math.isfinite(stats["val/explained_variance"])


def test_ppo_update_moves_policy_and_critic(setup):
    cfg, pair, critic = setup
    cfg.ppo.ppo_epochs, cfg.ppo.num_mini_batches, cfg.optim.micro_batch_size = 2, 2, 1
    cfg.optim.lr, cfg.ppo.critic_lr = 1e-3, 1e-3
    cfg.ppo.missing_eos_penalty = 0.5
    samples = _samples(pair, eos_bad=False)  # the bad completion is cut: its score gets the penalty
    good, bad = samples[0], samples[1]
    before_good, before_bad = _seq_logps(pair.policy, good).sum(), _seq_logps(pair.policy, bad).sum()
    policy_before, critic_before, ref_before = _params(pair.policy), _params(critic), _params(pair.reference)
    opt = make_optimizer(pair, critic, cfg)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-3]
    stats = ppo_update(pair, critic, opt, Accelerator(cpu=True), samples, cfg)
    assert stats["steps"] == 4.0  # 2 epochs x 2 minibatches
    assert stats["objective/scores"] == pytest.approx((1.0 - 1.0 - 0.5 + 0.0) / 3)
    assert "policy/entropy_avg" not in stats
    changed = _changed(policy_before, pair.policy)
    assert len(changed) == len(policy_before)  # every policy tensor moved
    critic_changed = _changed(critic_before, critic)
    assert "model.score.weight" in critic_changed and len(critic_changed) == len(critic_before)
    assert not _changed(ref_before, pair.reference)
    after_good, after_bad = _seq_logps(pair.policy, good).sum(), _seq_logps(pair.policy, bad).sum()
    # The two completions share most tokens (" since 2+2="), so a minibatch holding one of them
    # moves the other too and how far each moves alone depends on the shuffle (seeded by cfg.seed
    # and the batch: minibatches {good, bad}, {other}, then {good, other}, {bad} here; good +1.74,
    # bad -0.38 nats). The test is on the difference, as PPO promises: the positive-advantage
    # sequence gains log-probability relative to the negative-advantage one (2.12 nats here).
    assert (after_good - before_good) - (after_bad - before_bad) > 0.5, (before_good, after_good, before_bad, after_bad)
    assert after_bad - before_bad < -0.1, (before_bad, after_bad)
    for k in ("policy/approxkl_avg", "loss/value_avg", "val/ratio", "grad_norm", "loss"):
        assert math.isfinite(stats[k])
    assert stats["policy/approxkl_avg"] > 0  # later epochs are off-policy


def test_ppo_update_entropy_bonus_and_errors(setup):
    cfg, pair, critic = setup
    cfg.ppo.ppo_epochs, cfg.ppo.entropy_coef = 1, 0.01
    samples = _samples(pair)
    opt = make_optimizer(pair, critic, cfg)
    stats = ppo_update(pair, critic, opt, Accelerator(cpu=True), samples, cfg)
    vocab = pair.policy.config.vocab_size
    # entropy of a nearly uniform random tiny model at temperature 0.7: positive, below log |V|
    assert 0 < stats["policy/entropy_avg"] <= math.log(vocab) + 1e-4
    assert stats["loss"] == pytest.approx(
        stats["loss/policy_avg"] + 0.1 * stats["loss/value_avg"] - 0.01 * stats["policy/entropy_avg"], abs=1e-5
    )
    assert ppo_update(pair, critic, opt, Accelerator(cpu=True), [Sample(samples[0].prompt_ids, [])], cfg)["steps"] == 0.0
    with pytest.raises(ValueError, match="old_logps"):
        ppo_update(pair, critic, opt, Accelerator(cpu=True), [Sample(samples[0].prompt_ids, [5, 6], [0.0])], cfg)
