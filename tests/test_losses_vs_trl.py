"""Our DPO/GRPO losses and log-prob helpers against TRL 1.16 (the numerical oracle).

TRL's losses live inside the trainers' ``_compute_loss``, so each comparison builds a real
``DPOTrainer`` / ``GRPOTrainer`` around a tiny random Llama (built from a config, fp32, CPU,
nothing downloaded) and calls that ``_compute_loss`` on a hand-built batch in TRL's own
layout; ours gets the same sequences in the rollout layout (left-padded prompts,
right-padded completions) through ``completion_logps`` and the pure loss functions.

TRL quirks these tests pin down (checked against trl 1.16.0's source):

- ``DPOTrainer`` patches the model's ``forward`` with a fused LM head (``fused_lm_head=True``
  returns per-token ``log_probs`` instead of logits); a call without that kwarg is the
  original forward, so ``completion_logps`` runs on the very same model object.
- DPO ``loss_type="sigmoid"`` ignores ``label_smoothing`` (only ``robust``, ``exo_pair``
  and ``aot*`` read it), so TRL has no cDPO; ours is checked against the cDPO formula.
- DPO ``ipo`` divides the summed log-ratios by the completion token count (as ours does).
- GRPO's ``use_bias_correction_kl`` defaults to True in 1.16: the k3 KL term (and the
  logged ``kl``) is multiplied by the importance ratio ``exp(logps - old_logps)``. Ours
  implements the classic k3 penalty, so the off-policy comparisons set it to False; the
  two agree when on-policy (ratio 1), which is tested separately.
- GRPO's training forward passes no ``position_ids``, so TRL scores a left-padded prompt
  with positions shifted by the padding (unlike ``generate``). For RoPE models (Llama) a
  common shift cancels in attention, so the GRPO comparison here uses left-padded prompts
  safely; with absolute position embeddings (GPT-2) TRL's training log-probs would differ
  from the rollout's. Our padding behaviour is checked against the unpadded sequence on a
  GPT-2 in ``test_completion_logps_left_padding``.
- ``DPOTrainer``/``GRPOTrainer`` patch ``model.forward`` with a closure over the original
  bound forward, so a ``copy.deepcopy`` of a patched model still runs the original weights:
  copy reference models before building the trainer.
- ``_compute_loss`` divides grpo/bnpo/dr_grpo by ``current_gradient_accumulation_steps``,
  which only ``Trainer.train`` sets; the tests set it to 1. ``dapo`` divides by
  ``num_items_in_batch * grad_accum / steps_per_generation / num_processes``.
- GRPO's advantages are computed inline in ``_generate_and_score_completions`` (not a
  function), so ``group_advantages`` is checked against a copy of those lines that uses
  TRL's own ``nanstd``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from rlhf_workbench.model.logprobs import completion_logps, selective_log_softmax  # noqa: E402
from rlhf_workbench.train.losses import dpo_loss, group_advantages, grpo_loss  # noqa: E402

VOCAB = 128
PAD = 0
ATOL = 1e-5


# --------------------------------------------------------------------------------------------
# tiny model / tokenizer
# --------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    """Every test in this module runs with one torch thread (see conftest.single_thread)."""


def make_tokenizer():
    """In-memory word-level tokenizer: ``<pad>``=0, ``<eos>``=1, ``<unk>``=2, ``w3``..``w127``."""
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def make_model(seed: int = 0):
    """Tiny random Llama, fp32. A larger init range than the default (0.02) makes the next-token
    distributions far from uniform, so the log-probs (and the losses) actually vary."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.2,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=1,
    )
    return transformers.LlamaForCausalLM(cfg).float().eval()


def perturbed_copy(model, scale: float = 0.05, seed: int = 1):
    """A reference model that differs from ``model`` (deepcopy + Gaussian noise on every weight)."""
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return ref.eval()


def rollout_layout(prompts: list[list[int]], completions: list[list[int]]):
    """Left-padded prompts + right-padded completions, as ``completion_logps`` expects.

    Returns ``(input_ids [B, P+T], attention_mask [B, P+T], completion_mask [B, T])``.
    """
    P = max(len(p) for p in prompts)
    T = max(len(c) for c in completions)
    ids, attn, cmask = [], [], []
    for p, c in zip(prompts, completions, strict=True):
        ids.append([PAD] * (P - len(p)) + p + c + [PAD] * (T - len(c)))
        attn.append([0] * (P - len(p)) + [1] * (len(p) + len(c)) + [0] * (T - len(c)))
        cmask.append([1] * len(c) + [0] * (T - len(c)))
    return torch.tensor(ids), torch.tensor(attn), torch.tensor(cmask)


def summed_completion_logps(model, prompts, completions, temperature: float = 1.0) -> torch.Tensor:
    """``[B]`` sum of the completion tokens' log-probs, via our ``completion_logps``."""
    input_ids, attention_mask, cmask = rollout_layout(prompts, completions)
    with torch.no_grad():
        logps = completion_logps(model, input_ids, attention_mask, cmask.shape[1], temperature=temperature)
    return torch.where(cmask.bool(), logps, 0.0).sum(-1)


# --------------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------------

# Four preference pairs with different prompt / chosen / rejected lengths (token ids 3..127).
DPO_EXAMPLES = [
    {"prompt_ids": [5, 17, 33], "chosen_ids": [40, 41], "rejected_ids": [90]},
    {"prompt_ids": [8], "chosen_ids": [12], "rejected_ids": [100, 101, 102]},
    {"prompt_ids": [60, 61], "chosen_ids": [70, 71, 72], "rejected_ids": [73, 74]},
    {"prompt_ids": [3, 4, 5, 6], "chosen_ids": [120, 7], "rejected_ids": [9, 10, 11, 126]},
]


def make_dpo_trainer(tmp_path, policy, ref, loss_type: str, beta: float, label_smoothing: float):
    args = trl.DPOConfig(
        output_dir=str(tmp_path),
        beta=beta,
        loss_type=[loss_type],
        label_smoothing=label_smoothing,
        report_to="none",
        bf16=False,
        use_cpu=True,
        per_device_train_batch_size=len(DPO_EXAMPLES),
        disable_tqdm=True,
        save_strategy="no",
        logging_strategy="no",
    )
    # The dataset only has to survive the trainer's preprocessing; the loss is computed on our batch.
    ds = datasets.Dataset.from_dict({"prompt": ["w3 w4"], "chosen": [" w5"], "rejected": [" w6"]})
    trainer = trl.DPOTrainer(
        model=policy, ref_model=ref, args=args, train_dataset=ds, processing_class=make_tokenizer()
    )
    trainer.model.train()  # metrics go to _metrics["train"]
    return trainer


def trl_dpo_batch(trainer):
    """The batch in TRL's collated layout: right-padded ``prompt + completion`` rows, all chosen
    rows first, then all rejected rows, with a ``completion_mask`` over the completion tokens."""
    batch = trainer.data_collator(DPO_EXAMPLES)
    n = len(DPO_EXAMPLES)
    assert batch["input_ids"].shape[0] == 2 * n
    for i, ex in enumerate(DPO_EXAMPLES):  # layout check: chosen rows first, then rejected rows
        for row, key in ((i, "chosen_ids"), (n + i, "rejected_ids")):
            m = batch["completion_mask"][row].bool()
            assert batch["input_ids"][row][m].tolist() == ex[key]
            assert batch["input_ids"][row][: len(ex["prompt_ids"])].tolist() == ex["prompt_ids"]
    return batch


def ours_dpo(policy, ref, beta, loss_type, label_smoothing):
    prompts = [ex["prompt_ids"] for ex in DPO_EXAMPLES]
    chosen = [ex["chosen_ids"] for ex in DPO_EXAMPLES]
    rejected = [ex["rejected_ids"] for ex in DPO_EXAMPLES]
    logps = summed_completion_logps(policy, prompts * 2, chosen + rejected)
    ref_logps = summed_completion_logps(ref, prompts * 2, chosen + rejected)
    n = len(DPO_EXAMPLES)
    return dpo_loss(
        logps[:n],
        logps[n:],
        ref_logps[:n],
        ref_logps[n:],
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        chosen_lengths=torch.tensor([len(c) for c in chosen], dtype=torch.float32),
        rejected_lengths=torch.tensor([len(r) for r in rejected], dtype=torch.float32),
    )


@pytest.mark.parametrize(
    ("loss_type", "beta", "label_smoothing"),
    [("sigmoid", 0.5, 0.0), ("hinge", 0.5, 0.0), ("ipo", 0.5, 0.0), ("robust", 0.5, 0.1), ("sigmoid", 0.1, 0.0)],
)
def test_dpo_loss_matches_trl(tmp_path, loss_type, beta, label_smoothing):
    policy = make_model()
    ref = perturbed_copy(policy)
    trainer = make_dpo_trainer(tmp_path, policy, ref, loss_type, beta, label_smoothing)
    trl_loss = trainer._compute_loss(trainer.model, trl_dpo_batch(trainer), return_outputs=False)

    loss, stats = ours_dpo(policy, ref, beta, loss_type, label_smoothing)
    torch.testing.assert_close(loss, trl_loss.detach(), atol=ATOL, rtol=0)

    metrics = trainer._metrics["train"]
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert stats[name].shape == (len(DPO_EXAMPLES),)
        assert stats[name].mean().item() == pytest.approx(metrics[name][-1], abs=ATOL), name
    # The example must be informative: ref != policy, and the pairs do not all agree.
    assert stats["rewards/chosen"].abs().max() > 1e-3
    assert 0.0 < stats["rewards/accuracies"].mean() < 1.0


def test_dpo_sigmoid_label_smoothing(tmp_path):
    """TRL 1.16's ``sigmoid`` ignores ``label_smoothing`` (no cDPO); ours implements cDPO."""
    beta, eps = 0.5, 0.1
    policy = make_model()
    ref = perturbed_copy(policy)
    trainer = make_dpo_trainer(tmp_path, policy, ref, "sigmoid", beta, eps)
    trl_loss = trainer._compute_loss(trainer.model, trl_dpo_batch(trainer), return_outputs=False).detach()

    plain, stats = ours_dpo(policy, ref, beta, "sigmoid", 0.0)
    torch.testing.assert_close(plain, trl_loss, atol=ATOL, rtol=0)  # TRL == plain DPO despite eps

    cdpo, _ = ours_dpo(policy, ref, beta, "sigmoid", eps)
    h = (stats["rewards/chosen"] - stats["rewards/rejected"]) / beta  # the log-ratio difference
    expected = (-(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)).mean()
    torch.testing.assert_close(cdpo, expected, atol=1e-6, rtol=0)
    assert (cdpo - plain).abs() > 1e-4  # smoothing does change our loss


def test_dpo_hand_formulas_small_example():
    """Each loss type against its paper formula on hand-picked numbers (no model)."""
    c, r = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    rc, rr = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -3.0])
    beta = 0.5
    h = (c - rc) - (r - rr)  # [0.5 - (-1), -1 - 1] = [1.5, -2.0]
    torch.testing.assert_close(h, torch.tensor([1.5, -2.0]))
    loss, stats = dpo_loss(c, r, rc, rr, beta=beta, loss_type="sigmoid")
    torch.testing.assert_close(loss, -F.logsigmoid(beta * h).mean())
    loss, _ = dpo_loss(c, r, rc, rr, beta=beta, loss_type="hinge")
    torch.testing.assert_close(loss, torch.relu(1 - beta * h).mean())
    lc, lr = torch.tensor([2.0, 1.0]), torch.tensor([4.0, 2.0])
    loss, _ = dpo_loss(c, r, rc, rr, beta=beta, loss_type="ipo", chosen_lengths=lc, rejected_lengths=lr)
    hn = (c - rc) / lc - (r - rr) / lr
    torch.testing.assert_close(loss, ((hn - 1 / (2 * beta)) ** 2).mean())
    eps = 0.2
    loss, _ = dpo_loss(c, r, rc, rr, beta=beta, loss_type="robust", label_smoothing=eps)
    expected = ((-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(stats["rewards/chosen"], beta * (c - rc))
    torch.testing.assert_close(stats["rewards/margins"], beta * h)
    torch.testing.assert_close(stats["rewards/accuracies"], torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError):
        dpo_loss(c, r, rc, rr, loss_type="ipo")
    with pytest.raises(ValueError):
        dpo_loss(c, r, rc, rr, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError):
        dpo_loss(c, r, rc, rr, loss_type="nope")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# GRPO
# --------------------------------------------------------------------------------------------

GRPO_NUM_GENERATIONS = 4
GRPO_B = 8  # two groups of four
GRPO_PROMPT_LENGTHS = [3, 5]  # per group; the shorter prompt is left-padded (RoPE: safe, see docstring)
GRPO_T = 6  # completion columns; below max_completion_length so dr_grpo's constant is really tested
GRPO_MAX_COMPLETION_LENGTH = 8
GRPO_COMPLETION_LENGTHS = [6, 2, 5, 3, 1, 6, 4, 5]


@pytest.fixture(scope="module")
def grpo_model_dir(tmp_path_factory):
    """The tiny policy saved locally: with ``beta > 0`` GRPOTrainer builds its reference model
    from ``config._name_or_path``, which must then be a local directory (no hub access)."""
    path = tmp_path_factory.mktemp("grpo_tiny_model")
    make_model().save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def grpo_batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    P = max(GRPO_PROMPT_LENGTHS)
    prompt_ids = torch.randint(3, VOCAB, (len(GRPO_PROMPT_LENGTHS), P), generator=gen)
    prompt_mask = (torch.arange(P) >= P - torch.tensor(GRPO_PROMPT_LENGTHS).unsqueeze(1)).long()
    prompt_ids = prompt_ids.masked_fill(prompt_mask == 0, PAD)
    # a group shares its prompt
    prompt_ids = prompt_ids.repeat_interleave(GRPO_NUM_GENERATIONS, dim=0)
    prompt_mask = prompt_mask.repeat_interleave(GRPO_NUM_GENERATIONS, dim=0)
    completion_ids = torch.randint(3, VOCAB, (GRPO_B, GRPO_T), generator=gen)
    completion_mask = (torch.arange(GRPO_T) < torch.tensor(GRPO_COMPLETION_LENGTHS).unsqueeze(1)).long()
    completion_ids = completion_ids.masked_fill(completion_mask == 0, PAD)
    rewards = torch.randn(GRPO_B, generator=gen)
    noise = 0.15 * torch.randn(GRPO_B, GRPO_T, generator=gen)
    return prompt_ids, prompt_mask, completion_ids, completion_mask, rewards, noise


def make_grpo_trainer(tmp_path, model_dir, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path),
        num_generations=GRPO_NUM_GENERATIONS,
        per_device_train_batch_size=GRPO_B,
        max_completion_length=GRPO_MAX_COMPLETION_LENGTH,
        report_to="none",
        bf16=False,
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        logging_strategy="no",
    )
    kwargs.update(overrides)
    args = trl.GRPOConfig(**kwargs)
    policy = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ds = datasets.Dataset.from_dict({"prompt": ["w3 w4", "w5 w6"]})
    trainer = trl.GRPOTrainer(
        model=policy,
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=ds,
        processing_class=make_tokenizer(),
    )
    trainer.model.train()  # metrics go to _metrics["train"]
    trainer.current_gradient_accumulation_steps = 1  # normally set by Trainer.train
    return trainer


GRPO_CASES = [
    # loss_type, beta, epsilon, epsilon_high, temperature
    ("grpo", 0.04, 0.2, None, 1.0),
    ("grpo", 0.04, 0.2, 0.28, 0.7),
    ("dr_grpo", 0.04, 0.2, None, 0.7),
    ("bnpo", 0.0, 0.2, None, 1.0),
    ("bnpo", 0.04, 0.1, 0.3, 1.0),
    ("dapo", 0.04, 0.2, 0.28, 1.0),
]


@pytest.mark.parametrize(("loss_type", "beta", "epsilon", "epsilon_high", "temperature"), GRPO_CASES)
def test_grpo_loss_matches_trl(tmp_path, grpo_model_dir, loss_type, beta, epsilon, epsilon_high, temperature):
    trainer = make_grpo_trainer(
        tmp_path,
        grpo_model_dir,
        loss_type=loss_type,
        beta=beta,
        epsilon=epsilon,
        epsilon_high=epsilon_high,
        temperature=temperature,
        use_bias_correction_kl=False,  # ours is the classic k3 penalty (see module docstring)
    )
    policy = trainer.model
    # Our own reference, from an unpatched copy of the same weights (TRL's ref model is not used by
    # _compute_loss). Not a deepcopy of `policy`: its patched forward closes over the original
    # model's bound forward, so a deepcopy would silently keep running the original weights.
    ref = perturbed_copy(make_model())
    prompt_ids, prompt_mask, completion_ids, completion_mask, rewards, noise = grpo_batch()
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    mask = completion_mask.bool()

    with torch.no_grad():
        ref_logps = completion_logps(ref, input_ids, attention_mask, GRPO_T, temperature=temperature)
        current = completion_logps(policy, input_ids, attention_mask, GRPO_T, temperature=temperature)
    # Rollout-time log-probs: the current ones plus noise, so the ratio leaves [1-eps, 1+eps_high]
    # on some tokens. Padding positions are 0, as TRL's fused head returns there.
    old_logps = torch.where(mask, current + noise, 0.0)
    ref_logps = torch.where(mask, ref_logps, 0.0)
    advantages = group_advantages(rewards, GRPO_NUM_GENERATIONS)
    num_items = completion_mask.sum() + 7  # the whole generation batch's token count (dapo)

    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "old_per_token_logps": old_logps,
        "ref_per_token_logps": ref_logps,
        "num_items_in_batch": num_items.float(),
    }
    trl_loss = trainer._compute_loss(trainer.model, inputs).detach()

    logps = completion_logps(policy, input_ids, attention_mask, GRPO_T, temperature=temperature)
    loss, stats = grpo_loss(
        logps,
        old_logps,
        ref_logps if beta else None,
        advantages,
        completion_mask,
        beta=beta,
        epsilon=epsilon,
        epsilon_high=epsilon_high,
        loss_type=loss_type,
        max_completion_length=GRPO_MAX_COMPLETION_LENGTH,
        num_items=num_items.item(),
    )
    assert loss.requires_grad
    torch.testing.assert_close(loss.detach(), trl_loss, atol=ATOL, rtol=0)

    metrics = trainer._metrics["train"]
    # Same definitions: masked token means over the batch.
    assert stats["clip_ratio"].item() == pytest.approx(metrics["clip_ratio/region_mean"][-1], abs=ATOL)
    assert stats["clip_ratio/low_mean"].item() == pytest.approx(metrics["clip_ratio/low_mean"][-1], abs=ATOL)
    assert stats["clip_ratio/high_mean"].item() == pytest.approx(metrics["clip_ratio/high_mean"][-1], abs=ATOL)
    assert stats["clip_ratio"] > 0  # the example exercises clipping
    if beta:
        assert stats["kl"].item() == pytest.approx(metrics["kl"][-1], abs=ATOL)
        assert stats["kl"] > 0
    else:
        assert "kl" not in metrics  # TRL logs no KL without a penalty


def test_grpo_bias_corrected_kl_on_policy(tmp_path, grpo_model_dir):
    """TRL 1.16's default ``use_bias_correction_kl=True`` multiplies the k3 term by the ratio;
    on-policy (old == current, ratio 1) its loss value equals ours."""
    beta = 0.04
    trainer = make_grpo_trainer(tmp_path, grpo_model_dir, loss_type="grpo", beta=beta)
    assert trainer.args.use_bias_correction_kl
    policy = trainer.model
    ref = perturbed_copy(make_model())  # unpatched copy, see test_grpo_loss_matches_trl
    prompt_ids, prompt_mask, completion_ids, completion_mask, rewards, _ = grpo_batch(seed=1)
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    mask = completion_mask.bool()
    with torch.no_grad():
        ref_logps = torch.where(mask, completion_logps(ref, input_ids, attention_mask, GRPO_T), 0.0)
    advantages = group_advantages(rewards, GRPO_NUM_GENERATIONS)
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "old_per_token_logps": None,  # TRL then uses per_token_logps.detach(): on-policy
        "ref_per_token_logps": ref_logps,
        "num_items_in_batch": completion_mask.sum().float(),
    }
    trl_loss = trainer._compute_loss(trainer.model, inputs).detach()
    logps = completion_logps(policy, input_ids, attention_mask, GRPO_T)
    loss, stats = grpo_loss(
        logps, logps.detach(), ref_logps, advantages, completion_mask, beta=beta, loss_type="grpo"
    )
    torch.testing.assert_close(loss.detach(), trl_loss, atol=ATOL, rtol=0)
    assert stats["kl"].item() == pytest.approx(trainer._metrics["train"]["kl"][-1], abs=ATOL)
    assert stats["clip_ratio"] == 0


def test_grpo_hand_formula_small_example():
    """``grpo_loss`` against the clipped objective written out by hand (one sequence, three tokens)."""
    logps = torch.tensor([[-1.0, -2.0, -0.5]])
    old = torch.tensor([[-1.5, -2.0, -0.3]])
    ref = torch.tensor([[-1.2, -1.8, -9.0]])  # the last token is padding
    mask = torch.tensor([[1, 1, 0]])
    adv = torch.tensor([2.0])
    beta, eps = 0.1, 0.2
    ratio = torch.exp(logps - old)  # [e^0.5 = 1.6487, 1, e^-0.2 = 0.8187]
    obj = torch.minimum(ratio * 2.0, ratio.clamp(0.8, 1.2) * 2.0)  # [2.4, 2.0, ...]
    kl = torch.exp(ref - logps) - (ref - logps) - 1
    per_tok = -obj + beta * kl
    loss, stats = grpo_loss(logps, old, ref, adv, mask, beta=beta, epsilon=eps, loss_type="grpo")
    torch.testing.assert_close(loss, per_tok[0, :2].mean())
    torch.testing.assert_close(obj[0, :2], torch.tensor([2.4, 2.0]))
    torch.testing.assert_close(stats["kl"], kl[0, :2].mean())
    torch.testing.assert_close(stats["clip_ratio/high_mean"], torch.tensor(0.5))
    torch.testing.assert_close(stats["clip_ratio/low_mean"], torch.tensor(0.0))
    loss, _ = grpo_loss(logps, old, ref, adv, mask, beta=beta, epsilon=eps, loss_type="dr_grpo",
                        max_completion_length=4)
    torch.testing.assert_close(loss, per_tok[0, :2].sum() / 4)
    loss, _ = grpo_loss(logps, old, ref, adv, mask, beta=beta, epsilon=eps, loss_type="dapo", num_items=5)
    torch.testing.assert_close(loss, per_tok[0, :2].sum() / 5)
    with pytest.raises(ValueError):
        grpo_loss(logps, old, None, adv, mask, beta=0.1)
    with pytest.raises(ValueError):
        grpo_loss(logps, old, ref, adv, mask, loss_type="nope")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# advantages
# --------------------------------------------------------------------------------------------


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    eps = 1e-4
    s = (1 / 3) ** 0.5  # unbiased std of [1, 0, 0, 1]
    expected_group = torch.tensor([0.5, -0.5, -0.5, 0.5]) / (s + eps)
    torch.testing.assert_close(
        group_advantages(rewards, 4, "group"), torch.cat([expected_group, torch.zeros(4)])
    )
    centred = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(rewards, 4, "none"), centred)
    # batch: group-centred, divided by the unbiased std of all 8 rewards (mean 1.25)
    batch_std = (((rewards - 1.25) ** 2).sum() / 7).sqrt()
    torch.testing.assert_close(group_advantages(rewards, 4, "batch"), centred / (batch_std + eps))
    with pytest.raises(ValueError):
        group_advantages(rewards, 3)
    with pytest.raises(ValueError):
        group_advantages(rewards, 4, "nope")  # type: ignore[arg-type]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_trl(scale):
    """Against the lines of ``GRPOTrainer._generate_and_score_completions`` (sum_then_normalize),
    using TRL's own ``nanstd``."""
    from trl.trainer.utils import nanstd

    k = 4
    rewards = torch.randn(12, generator=torch.Generator().manual_seed(3))
    mean_grouped = torch.nanmean(rewards.view(-1, k), dim=1).repeat_interleave(k, dim=0)
    if scale in ("group", "none"):
        std = nanstd(rewards.view(-1, k), dim=1).repeat_interleave(k, dim=0)
    else:
        std = nanstd(rewards).expand_as(rewards)
    expected = rewards - mean_grouped
    if scale != "none":
        expected = expected / (std + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, k, scale), expected, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------
# log-probs
# --------------------------------------------------------------------------------------------


def test_selective_log_softmax_matches_log_softmax_gather():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 50, generator=gen)
    index = torch.randint(0, 50, (3, 7), generator=gen)
    expected = torch.log_softmax(logits, dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    out = selective_log_softmax(logits, index)
    assert out.dtype == torch.float32 and out.shape == (3, 7)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    # Peaked logits (log-probs down to about -40): the two differ by float32 rounding only
    # (an ulp at |x| ~ 20 is 1.9e-6, so the check is relative here).
    peaked = 8 * logits
    expected = torch.log_softmax(peaked, dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(selective_log_softmax(peaked, index), expected, atol=1e-6, rtol=1e-6)
    # low-precision logits are upcast before the log-softmax
    half = logits.to(torch.bfloat16)
    expected = torch.log_softmax(half.float(), dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    out = selective_log_softmax(half, index)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def make_gpt2(seed: int = 0):
    """Tiny random GPT-2: learned absolute position embeddings, so unlike RoPE (where shifting
    every position by the same offset leaves attention unchanged) wrong position ids show."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, initializer_range=0.2,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=1,
    )
    return transformers.GPT2LMHeadModel(cfg).float().eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_completion_logps_left_padding(arch):
    """Left-padded prompts (and right-padded completions) give the same log-probs as each
    sequence scored alone, unpadded: position ids follow the attention mask. The GPT-2 case is
    the one that catches missing position ids (with them dropped, it is off by ~1 nat)."""
    model = make_model() if arch == "llama" else make_gpt2()
    prompts = [[5, 6, 7, 8, 9], [10], [11, 12, 13]]
    completions = [[20, 21, 22], [23, 24, 25, 26], [27]]
    input_ids, attention_mask, cmask = rollout_layout(prompts, completions)
    assert (attention_mask[:, 0] == 0).any()  # some prompts really are left-padded
    for temperature in (1.0, 0.7):
        with torch.no_grad():
            batched = completion_logps(model, input_ids, attention_mask, cmask.shape[1], temperature=temperature)
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            ids = torch.tensor([p + c])
            with torch.no_grad():
                alone = completion_logps(model, ids, torch.ones_like(ids), len(c), temperature=temperature)
                logits = model(input_ids=ids).logits[0, len(p) - 1 : -1] / temperature
            torch.testing.assert_close(batched[i, : len(c)], alone[0], atol=ATOL, rtol=0)
            direct = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c).unsqueeze(-1)).squeeze(-1)
            torch.testing.assert_close(alone[0], direct, atol=ATOL, rtol=0)
