"""KTO and RLOO losses against TRL 1.16 (the numerical oracle) and against the papers' formulas.

As in ``test_losses_vs_trl.py`` (whose tiny-model helpers are reused), each TRL comparison builds
the real trainer around a tiny random Llama (built from a config, fp32, CPU, nothing downloaded)
and runs the trainer's own code on a hand-built batch:

- KTO: ``KTOTrainer._compute_loss`` on a batch from the trainer's own collator, including the
  mismatched (rotated) KL completions; ours gets the summed log-probs from ``completion_logps``.
- RLOO advantages: ``RLOOTrainer._generate_and_score_completions`` (real sampling with
  ``generate``, rewards from a reward function returning preset values, KL against a perturbed
  reference model); ours recomputes the log-probs of the sampled completions.
- RLOO loss: ``RLOOTrainer._compute_loss`` on a hand-built batch.

TRL quirks these tests pin down (checked against trl 1.16.0's source):

- KTO's loss is ``nanmean`` over the concatenated weighted desirable and undesirable terms,
  i.e. ``sum(w_i ℓ_i) / B``: the weights are not renormalised, so e.g. ``desirable_weight=2``
  on an all-desirable batch doubles the loss.
- KTO's reference point is ``mean(KL_logps - ref_KL_logps)`` over the batch, detached, then
  clamped at 0; the mismatched pairs rotate completions by +1 within a batch
  (``(x_i, y_{i-1})``), so ``per_device_train_batch_size`` must be > 1 and sampling sequential.
- KTO logs ``rewards/margins`` only when a batch has both labels; ``rewards/chosen`` /
  ``logps/chosen`` only when it has a desirable example (likewise for rejected).
- RLOO folds the KL into the reward as the first-order log-ratio summed per sequence
  (``rewards - beta * Σ_t (old - ref)``, can be negative), unlike GRPO's per-token k3 term in the
  loss; ``normalize_advantages`` standardises over the whole batch, not per group.
- RLOO's loss clips a sequence-level ratio ``exp(Σ logps - Σ old_logps)`` and takes the mean over
  sequences: it is not ``grpo_loss`` (per-token ratio, per-sequence token mean).
- RLOO treats a completion whose reward functions all return None as unscorable: it is left out
  of its siblings' leave-one-out baselines and gets advantage 0.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

from test_losses_vs_trl import (  # noqa: E402
    ATOL,
    PAD,
    VOCAB,
    make_model,
    make_tokenizer,
    perturbed_copy,
    summed_completion_logps,
)

from rlhf_workbench.model.logprobs import completion_logps  # noqa: E402
from rlhf_workbench.train.losses import kto_loss, rloo_advantages, rloo_loss  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    """Every test in this module runs with one torch thread (see conftest.single_thread)."""


def _common_args(tmp_path, batch_size: int) -> dict:
    return dict(
        output_dir=str(tmp_path),
        report_to="none",
        bf16=False,
        use_cpu=True,
        per_device_train_batch_size=batch_size,
        disable_tqdm=True,
        save_strategy="no",
        logging_strategy="no",
    )


# --------------------------------------------------------------------------------------------
# KTO
# --------------------------------------------------------------------------------------------

# Five unpaired examples with different prompt / completion lengths (token ids 3..127).
KTO_PROMPTS = [[5, 17, 33], [8], [60, 61], [3, 4, 5, 6], [90, 91]]
KTO_COMPLETIONS = [[40, 41], [12, 13, 14], [70, 71, 72], [120, 7], [100]]


def make_kto_trainer(tmp_path, policy, ref, beta, desirable_weight, undesirable_weight):
    args = trl.KTOConfig(
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        **_common_args(tmp_path, len(KTO_PROMPTS)),
    )
    # The dataset only has to survive the trainer's preprocessing; the loss is computed on our batch.
    ds = datasets.Dataset.from_dict({"prompt": ["w3 w4", "w5"], "completion": [" w5", " w6"], "label": [True, False]})
    trainer = trl.KTOTrainer(
        model=policy, ref_model=ref, args=args, train_dataset=ds, processing_class=make_tokenizer()
    )
    trainer.model.train()  # metrics go to _metrics["train"]
    return trainer


def trl_kto_batch(trainer, labels):
    """TRL's collated layout: right-padded ``prompt + completion`` rows and the KL rows
    ``prompt_i + completion_{i-1}`` (the rotation ``_prepare_dataset`` applies per batch)."""
    kl_completions = KTO_COMPLETIONS[-1:] + KTO_COMPLETIONS[:-1]
    examples = [
        {"prompt_ids": p, "completion_ids": c, "KL_completion_ids": k, "label": lab}
        for p, c, k, lab in zip(KTO_PROMPTS, KTO_COMPLETIONS, kl_completions, labels, strict=True)
    ]
    batch = trainer.data_collator(examples)
    for i, (p, c, k) in enumerate(zip(KTO_PROMPTS, KTO_COMPLETIONS, kl_completions, strict=True)):  # layout check
        assert batch["input_ids"][i][batch["completion_mask"][i].bool()].tolist() == c
        assert batch["KL_input_ids"][i][batch["KL_completion_mask"][i].bool()].tolist() == k
        assert batch["KL_input_ids"][i][: len(p)].tolist() == p
    return batch


KTO_CASES = [
    # labels, beta, desirable_weight, undesirable_weight, reference seed
    # (seed 3: mismatched-pair KL estimate +0.14; seed 1: -0.13, so TRL clamps z0 to 0)
    ([True, False, True, True, False], 0.5, 1.0, 1.0, 3),
    ([True, False, True, True, False], 0.1, 1.33, 0.7, 3),
    ([True, False, False, True, False], 0.5, 1.0, 1.0, 1),  # z0 clamped at 0
    ([True] * 5, 0.5, 2.0, 1.0, 3),  # only desirable: no rewards/rejected, no margins; weight not renormalised
    ([False] * 5, 0.5, 1.0, 0.5, 3),  # only undesirable
]


@pytest.mark.parametrize(("labels", "beta", "desirable_weight", "undesirable_weight", "ref_seed"), KTO_CASES)
def test_kto_loss_matches_trl(tmp_path, labels, beta, desirable_weight, undesirable_weight, ref_seed):
    policy = make_model()
    ref = perturbed_copy(policy, scale=0.1, seed=ref_seed)  # copy before the trainer patches the forward
    trainer = make_kto_trainer(tmp_path, policy, ref, beta, desirable_weight, undesirable_weight)
    trl_loss = trainer._compute_loss(trainer.model, trl_kto_batch(trainer, labels), return_outputs=False).detach()

    kl_completions = KTO_COMPLETIONS[-1:] + KTO_COMPLETIONS[:-1]
    logps = summed_completion_logps(trainer.model, KTO_PROMPTS, KTO_COMPLETIONS).requires_grad_()
    ref_logps = summed_completion_logps(ref, KTO_PROMPTS, KTO_COMPLETIONS)
    kl = summed_completion_logps(trainer.model, KTO_PROMPTS, kl_completions) - summed_completion_logps(
        ref, KTO_PROMPTS, kl_completions
    )
    loss, stats = kto_loss(
        logps,
        ref_logps,
        torch.tensor(labels),
        kl,
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
    )
    assert loss.requires_grad
    torch.testing.assert_close(loss.detach(), trl_loss, atol=ATOL, rtol=0)

    metrics = trainer._metrics["train"]
    assert stats["kl"].item() == pytest.approx(metrics["kl"][-1], abs=ATOL)
    if kl.mean() > 0:
        assert stats["kl"] > 0.1  # the reference point is really exercised
    else:
        assert kl.mean() < -0.1 and stats["kl"] == 0  # clamped at 0, as TRL does
    n_desirable = sum(labels)
    for kind, n in (("chosen", n_desirable), ("rejected", len(labels) - n_desirable)):
        for name in (f"rewards/{kind}", f"logps/{kind}"):
            assert stats[name].shape == (n,)
            if n:
                assert stats[name].mean().item() == pytest.approx(metrics[name][-1], abs=ATOL), name
            else:
                assert name not in metrics  # TRL logs nothing for an absent class
    if 0 < n_desirable < len(labels):
        assert stats["rewards/margins"].item() == pytest.approx(metrics["rewards/margins"][-1], abs=ATOL)
        assert stats["rewards/chosen"].abs().max() > 1e-3  # informative example: ref != policy
    else:
        assert "rewards/margins" not in stats and "rewards/margins" not in metrics


def test_kto_hand_formula_small_example():
    """KTO eq. 8 written out by hand: r = policy - ref, z0 = max(0, mean(kl)),
    desirable λ_D (1 - σ(β (r - z0))), undesirable λ_U (1 - σ(β (z0 - r))), mean over B."""
    policy = torch.tensor([-3.0, -5.0, -2.0, -4.0], requires_grad=True)
    ref = torch.tensor([-3.5, -4.0, -2.0, -6.0])  # r = [0.5, -1, 0, 2]
    labels = torch.tensor([True, False, True, False])
    kl = torch.tensor([0.5, -0.1], requires_grad=True)  # z0 = mean = 0.2
    loss, stats = kto_loss(policy, ref, labels, kl, beta=0.5, desirable_weight=1.33, undesirable_weight=0.7)
    # 1.33 (1 - σ(0.15)) = 0.615218, 0.7 (1 - σ(0.6)) = 0.248041,
    # 1.33 (1 - σ(-0.1)) = 0.698222, 0.7 (1 - σ(-0.9)) = 0.497665
    terms = torch.tensor([0.6152184, 0.2480406, 0.6982224, 0.4976647])
    torch.testing.assert_close(loss.detach(), terms.mean(), atol=1e-6, rtol=0)
    assert loss.item() == pytest.approx(0.5147865, abs=1e-6)
    torch.testing.assert_close(stats["kl"], torch.tensor(0.2))
    torch.testing.assert_close(stats["rewards/chosen"], torch.tensor([0.25, 0.0]))
    torch.testing.assert_close(stats["rewards/rejected"], torch.tensor([-0.5, 1.0]))
    torch.testing.assert_close(stats["rewards/margins"], torch.tensor(0.125 - 0.25))
    torch.testing.assert_close(stats["logps/rejected"], torch.tensor([-5.0, -4.0]))
    loss.backward()
    assert kl.grad is None  # the reference point is detached
    # d/dr of λ (1 - σ(β(±(r - z0)))) = ∓ λ β σ(1 - σ), divided by B = 4
    s = torch.sigmoid(torch.tensor([0.15, 0.6, -0.1, -0.9]))
    expected = torch.tensor([-1.33, 0.7, -1.33, 0.7]) * 0.5 * s * (1 - s) / 4
    torch.testing.assert_close(policy.grad, expected)

    # a negative KL estimate is clamped to 0; a float works too; unit weights
    loss, stats = kto_loss(policy.detach(), ref, labels, -0.7, beta=0.5)
    # 1 - σ(0.25) = 0.437823, 1 - σ(0.5) = 0.377541, 1 - σ(0) = 0.5, 1 - σ(-1) = 0.731059
    assert loss.item() == pytest.approx((0.4378235 + 0.3775407 + 0.5 + 0.7310586) / 4, abs=1e-6)
    assert stats["kl"].item() == 0.0
    # only undesirable: the mean is over those alone, weighted by λ_U
    loss, stats = kto_loss(policy.detach(), ref, torch.zeros(4, dtype=torch.bool), 0.2, beta=0.5,
                           undesirable_weight=0.7)
    r = torch.tensor([0.5, -1.0, 0.0, 2.0])
    torch.testing.assert_close(loss, (0.7 * (1 - torch.sigmoid(0.5 * (0.2 - r)))).mean())
    assert stats["rewards/chosen"].numel() == 0 and "rewards/margins" not in stats
    with pytest.raises(ValueError):
        kto_loss(policy, ref[:3], labels, 0.0)
    with pytest.raises(ValueError):
        kto_loss(torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.bool), 0.0)


# --------------------------------------------------------------------------------------------
# RLOO
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rloo_model_dir(tmp_path_factory):
    """The tiny policy saved locally: with ``beta > 0`` RLOOTrainer loads its reference model
    from ``config._name_or_path``, which must then be a local directory (no hub access)."""
    path = tmp_path_factory.mktemp("rloo_tiny_model")
    make_model().save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def make_rloo_trainer(tmp_path, model_dir, num_generations, batch_size, rewards=None, **overrides):
    args = trl.RLOOConfig(
        num_generations=num_generations,
        max_completion_length=6,
        **_common_args(tmp_path, batch_size),
        **overrides,
    )
    policy = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    preset = list(rewards) if rewards is not None else [0.0] * batch_size

    def preset_reward(completions, **kwargs):
        assert len(completions) == len(preset)
        return preset  # None = unscorable

    ds = datasets.Dataset.from_dict({"prompt": ["w3 w4", "w5 w6"]})
    trainer = trl.RLOOTrainer(
        model=policy, reward_funcs=preset_reward, args=args, train_dataset=ds, processing_class=make_tokenizer()
    )
    trainer.model.train()  # metrics go to _metrics["train"]
    return trainer


RLOO_ADV_CASES = [
    # num_generations, rewards (None = unscorable), beta, normalize_advantages, reward_clip_range
    (4, [1.0, 0.0, 2.5, -1.0, 0.5, 0.5, 0.5, 0.5], 0.05, False, None),
    (4, [1.0, 0.0, 2.5, -1.0, 0.5, 0.5, 0.5, 0.5], 0.0, False, None),  # tied group -> zero advantages
    (2, [3.0, 1.0, 0.0, 2.0, 4.0, 4.0], 0.1, True, (0.0, 3.5)),  # group size 2, clipping, batch normalisation
    (3, [1.0, None, 2.0, 0.5, None, None], 0.05, True, None),  # unscorable completions
]


@pytest.mark.parametrize(("num_generations", "rewards", "beta", "normalize", "clip"), RLOO_ADV_CASES)
def test_rloo_advantages_match_trl(tmp_path, rloo_model_dir, num_generations, rewards, beta, normalize, clip):
    B = len(rewards)
    trainer = make_rloo_trainer(
        tmp_path,
        rloo_model_dir,
        num_generations,
        B,
        rewards,
        beta=beta,
        normalize_advantages=normalize,
        reward_clip_range=clip,
    )
    if beta:
        # TRL's reference starts as the same weights: perturb it so that the KL term is non-zero.
        # (In place: the trainer's patched forward runs this very module.)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in trainer.ref_model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    prompts = ["w3 w4 w5", "w9 w10 w11", "w20 w21 w22"][: B // num_generations]
    torch.manual_seed(0)  # generation samples
    out = trainer._generate_and_score_completions([{"prompt": p} for p in prompts for _ in range(num_generations)])

    input_ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
    attention_mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
    mask = out["completion_mask"].bool()
    T = out["completion_ids"].shape[1]
    with torch.no_grad():
        old = torch.where(mask, completion_logps(trainer.model, input_ids, attention_mask, T), 0.0)
        torch.testing.assert_close(old.sum(-1), out["old_logps"], atol=ATOL, rtol=0)  # same sequences scored
        kl = None
        if beta:
            ref = torch.where(mask, completion_logps(trainer.ref_model, input_ids, attention_mask, T), 0.0)
            kl = (old - ref).sum(-1)
    reward_tensor = torch.tensor([float("nan") if r is None else r for r in rewards])
    ours = rloo_advantages(
        reward_tensor, num_generations, kl=kl, beta=beta, normalize=normalize, reward_clip_range=clip
    )
    torch.testing.assert_close(ours, out["advantages"], atol=ATOL, rtol=0)

    metrics = trainer._metrics["train"]
    if beta:
        # TRL logs the per-token mean of the k1 log-ratio
        assert (kl.sum() / mask.sum()).item() == pytest.approx(metrics["kl"][-1], abs=ATOL)
        assert kl.abs().min() > 1e-3  # the KL penalty really enters every reward
    else:
        assert "kl" not in metrics
        assert torch.equal(ours[4:], torch.zeros(4))  # equal rewards in a group: zero advantages
    if None in rewards:
        unscorable = torch.tensor([r is None for r in rewards])
        assert torch.equal(ours[unscorable], torch.zeros(int(unscorable.sum())))
        assert torch.equal(ours[3:6], torch.zeros(3))  # a group with one scorable completion
    assert ours.abs().max() > 0.1


def test_rloo_advantages_hand_formula():
    """A_i = r_i - mean_{j≠i} r_j (Ahmadian et al. 2024, eq. 6), written out."""
    r = torch.tensor([1.0, 0.0, 2.0, 5.0])
    # baselines (0+2+5)/3, (1+2+5)/3, (1+0+5)/3, (1+0+2)/3 = 7/3, 8/3, 2, 1
    torch.testing.assert_close(rloo_advantages(r, 4), torch.tensor([-4 / 3, -8 / 3, 0.0, 4.0]))
    # group size 2: A = ±(r_1 - r_2); a tied group gets zeros
    torch.testing.assert_close(
        rloo_advantages(torch.tensor([3.0, 1.0, 0.5, 0.5]), 2), torch.tensor([2.0, -2.0, 0.0, 0.0])
    )
    # KL in the reward: r - 0.5 kl = [0, 0.5, 2, 3], mean 1.375, A = 4/3 (r' - 1.375)
    kl = torch.tensor([2.0, -1.0, 0.0, 4.0])
    torch.testing.assert_close(
        rloo_advantages(r, 4, kl=kl, beta=0.5), torch.tensor([-11 / 6, -7 / 6, 5 / 6, 13 / 6])
    )
    torch.testing.assert_close(rloo_advantages(r, 4, kl=kl, beta=0.0), rloo_advantages(r, 4))  # beta 0: no KL
    # clipping to [0, 2]: [1, 0, 2, 2], mean 1.25, A = 4/3 (r - 1.25)
    torch.testing.assert_close(
        rloo_advantages(r, 4, reward_clip_range=(0.0, 2.0)), torch.tensor([-1 / 3, -5 / 3, 1.0, 1.0])
    )
    # batch normalisation: mean 0, unbiased std sqrt(224/27) = 2.88033
    expected = torch.tensor([-4 / 3, -8 / 3, 0.0, 4.0]) / ((224 / 27) ** 0.5 + 1e-4)
    torch.testing.assert_close(rloo_advantages(r, 4, normalize=True), expected)
    # unscorable (NaN): left out of the baselines (divisor 2), advantage 0;
    # a group with a single scorable completion has no baseline: zeros
    nan = float("nan")
    torch.testing.assert_close(
        rloo_advantages(torch.tensor([1.0, nan, 2.0, 6.0, nan, 3.0, nan, nan]), 4),
        torch.tensor([1 - 4.0, 0.0, 2 - 3.5, 6 - 1.5, 0.0, 0.0, 0.0, 0.0]),
    )
    torch.testing.assert_close(rloo_advantages(r, 1), torch.zeros(4))  # no siblings
    with pytest.raises(ValueError):
        rloo_advantages(r, 3)
    with pytest.raises(ValueError):
        rloo_advantages(r, 4, beta=0.1)  # no kl


RLOO_LOSS_B = 6
RLOO_LOSS_T = 5


def rloo_loss_batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    P = 4
    prompt_lengths = torch.tensor([4, 4, 2, 2, 3, 3])  # left-padded (RoPE: safe, see test_losses_vs_trl)
    prompt_mask = (torch.arange(P) >= P - prompt_lengths.unsqueeze(1)).long()
    prompt_ids = torch.randint(3, VOCAB, (RLOO_LOSS_B, P), generator=gen).masked_fill(prompt_mask == 0, PAD)
    completion_lengths = torch.tensor([5, 2, 4, 1, 3, 5])
    completion_mask = (torch.arange(RLOO_LOSS_T) < completion_lengths.unsqueeze(1)).long()
    completion_ids = torch.randint(3, VOCAB, (RLOO_LOSS_B, RLOO_LOSS_T), generator=gen)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, PAD)
    advantages = torch.tensor([1.2, -0.7, 0.4, -1.5, 0.9, -0.3])
    noise = torch.tensor([0.5, -0.4, -0.05, 0.35, 0.1, -0.3])  # per-sequence log-ratio offsets
    return prompt_ids, prompt_mask, completion_ids, completion_mask, advantages, noise


@pytest.mark.parametrize(("epsilon", "epsilon_high"), [(0.2, None), (0.1, 0.28)])
def test_rloo_loss_matches_trl(tmp_path, rloo_model_dir, epsilon, epsilon_high):
    trainer = make_rloo_trainer(
        tmp_path, rloo_model_dir, 2, RLOO_LOSS_B, beta=0.0, epsilon=epsilon, epsilon_high=epsilon_high
    )
    policy = trainer.model
    prompt_ids, prompt_mask, completion_ids, completion_mask, advantages, noise = rloo_loss_batch()
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    with torch.no_grad():
        current = completion_logps(policy, input_ids, attention_mask, RLOO_LOSS_T)
    old_logps = torch.where(completion_mask.bool(), current, 0.0).sum(-1) - noise  # TRL stores sums
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "old_logps": old_logps,
        "advantages": advantages,
    }
    trl_loss = trainer._compute_loss(trainer.model, inputs).detach()

    logps = completion_logps(policy, input_ids, attention_mask, RLOO_LOSS_T)
    loss, stats = rloo_loss(logps, old_logps, advantages, completion_mask, epsilon=epsilon, epsilon_high=epsilon_high)
    assert loss.requires_grad
    torch.testing.assert_close(loss.detach(), trl_loss, atol=ATOL, rtol=0)
    summed = torch.where(completion_mask.bool(), logps, 0.0).sum(-1)
    loss_sums, _ = rloo_loss(summed, old_logps, advantages, epsilon=epsilon, epsilon_high=epsilon_high)
    torch.testing.assert_close(loss_sums.detach(), trl_loss, atol=ATOL, rtol=0)

    metrics = trainer._metrics["train"]
    assert stats["clip_ratio"].item() == pytest.approx(metrics["clip_ratio/region_mean"][-1], abs=ATOL)
    assert stats["clip_ratio/low_mean"].item() == pytest.approx(metrics["clip_ratio/low_mean"][-1], abs=ATOL)
    assert stats["clip_ratio/high_mean"].item() == pytest.approx(metrics["clip_ratio/high_mean"][-1], abs=ATOL)
    assert stats["clip_ratio/low_mean"] > 0 and stats["clip_ratio/high_mean"] > 0  # both clips exercised


def test_rloo_loss_hand_formula():
    """Sequence-level clipped objective by hand; on-policy it is REINFORCE with the LOO baseline:
    value -mean(A), gradient -A_i / B on each sequence's log-prob."""
    logps = torch.tensor([-3.0, -5.0, -2.0], requires_grad=True)
    old = torch.tensor([-3.5, -4.5, -2.1])  # ratios e^0.5 = 1.6487, e^-0.5 = 0.6065, e^0.1 = 1.1052
    adv = torch.tensor([2.0, -1.0, 0.5])
    loss, stats = rloo_loss(logps, old, adv, epsilon=0.2)
    # min(1.6487·2, 1.2·2) = 2.4; min(0.6065·-1, 0.8·-1) = -0.8; min(1.1052·0.5, 1.1052·0.5) = 0.5526
    expected = -(2.4 - 0.8 + 0.5 * torch.exp(torch.tensor(0.1))) / 3
    torch.testing.assert_close(loss.detach(), expected)
    torch.testing.assert_close(stats["clip_ratio/high_mean"], torch.tensor(1 / 3))
    torch.testing.assert_close(stats["clip_ratio/low_mean"], torch.tensor(1 / 3))
    torch.testing.assert_close(stats["clip_ratio"], torch.tensor(2 / 3))
    loss.backward()  # clipped sequences get no gradient; the third gets -ratio·A / B
    torch.testing.assert_close(logps.grad, torch.tensor([0.0, 0.0, -0.5 * float(torch.exp(torch.tensor(0.1))) / 3]))

    # on-policy, per-token inputs: the REINFORCE-LOO estimator of Ahmadian et al. eq. 6
    per_token = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -0.25, -0.25]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    rewards = torch.tensor([1.0, 3.0])
    adv = rloo_advantages(rewards, 2)  # [-2, 2]
    loss, stats = rloo_loss(per_token, per_token.detach(), adv, mask)
    torch.testing.assert_close(loss.detach(), -adv.mean())
    loss.backward()
    torch.testing.assert_close(per_token.grad, torch.tensor([[1.0, 1.0, 0.0], [-1.0, -1.0, -1.0]]))
    assert stats["clip_ratio"] == 0
    with pytest.raises(ValueError):
        rloo_loss(per_token, per_token.detach(), adv)  # per-token without a mask
    with pytest.raises(ValueError):
        rloo_loss(logps, old[:2], adv)
