"""Reward model: the Bradley–Terry loss against TRL 1.16's RewardTrainer and the paper formula,
pairs implied by stored rankings, training that actually separates a synthetic preference,
and the HH-RLHF loader.

TRL's loss lives inside ``RewardTrainer.compute_loss``; the comparison builds a real trainer
around a tiny random Llama sequence-classification model (from a config, fp32, CPU, nothing
downloaded), lets TRL tokenize the texts (it appends eos) and collate them (chosen rows first,
right padding), and checks that our text encoding, padding, pooling and loss give the same
loss and logged metrics.
"""

from __future__ import annotations

import gzip
import json
import math
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from rlhf_workbench.train.rm_loss import bradley_terry_loss  # noqa: E402
from rlhf_workbench.train.reward_model import (RewardModelRanker, RewardPair, encode_texts,  # noqa: E402
                                         load_preference_file, load_reward_model, pairs_from_rankings,
                                         pairwise_accuracy, sequence_rewards, split_hh_dialogue, train_reward_model)

from conftest import seed_rollout  # noqa: E402
from test_losses_vs_trl import ATOL, PAD, VOCAB  # noqa: E402
from test_losses_vs_trl import make_tokenizer as make_lm_tokenizer  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    """Every test in this module runs with one torch thread (see conftest.single_thread)."""


def make_tokenizer():
    """The in-memory word-level tokenizer of the TRL comparisons, padding on the right as a
    reward model reads its score at the last real token."""
    tok = make_lm_tokenizer()
    tok.padding_side = "right"
    return tok


def make_rm(seed: int = 0, init_range: float = 0.2):
    """Tiny random Llama with a scalar head (``num_labels=1``), fp32."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   initializer_range=init_range, pad_token_id=PAD, bos_token_id=1, eos_token_id=1,
                                   num_labels=1)
    return transformers.LlamaForSequenceClassification(cfg).float()


TRL_EXAMPLES = [  # lengths differ so that right padding and last-token pooling matter
    {"prompt": "w3 w4", "chosen": " w5 w6 w7", "rejected": " w8", "margin": 0.5},
    {"prompt": "w9", "chosen": " w10", "rejected": " w11 w12 w13 w14", "margin": 0.0},
    {"prompt": "w15 w16 w17", "chosen": " w18 w19", "rejected": " w20 w21", "margin": 2.0},
    {"prompt": "w22", "chosen": " w23 w24 w25 w26 w27", "rejected": " w28 w29", "margin": 1.0},
]


def test_bradley_terry_hand_formula():
    r_c = torch.tensor([1.0, 0.0, -1.0])
    r_r = torch.tensor([0.0, 0.0, 1.0])
    loss, stats = bradley_terry_loss(r_c, r_r)
    expected = sum(math.log1p(math.exp(-d)) for d in (1.0, 0.0, -2.0)) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["accuracy"].item() == pytest.approx(1 / 3)  # the tie counts as wrong
    assert stats["margin"].item() == pytest.approx(-1 / 3)
    assert (stats["min_reward"].item(), stats["max_reward"].item()) == (-1.0, 1.0)
    assert stats["mean_reward"].item() == pytest.approx(1 / 6)
    loss_m, stats_m = bradley_terry_loss(r_c, r_r, torch.tensor([0.5, 1.0, 0.0]))
    expected_m = sum(math.log1p(math.exp(-d)) for d in (0.5, -1.0, -2.0)) / 3
    assert loss_m.item() == pytest.approx(expected_m, abs=1e-6)
    assert stats_m["margin"].item() == pytest.approx(-1 / 3)  # the logged margin ignores the target margin
    # gradient: d/dr_c of -log σ(d) / B = -(1 - σ(d)) / B
    r_c = r_c.clone().requires_grad_(True)
    bradley_terry_loss(r_c, r_r)[0].backward()
    d = torch.tensor([1.0, 0.0, -2.0])
    assert torch.allclose(r_c.grad, -(1 - torch.sigmoid(d)) / 3)
    with pytest.raises(ValueError, match="equal length"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(2))


@pytest.mark.parametrize("with_margin", [False, True])
def test_bradley_terry_matches_trl_reward_trainer(tmp_path, with_margin):
    model, tok = make_rm(), make_tokenizer()
    examples = [ex if with_margin else {k: v for k, v in ex.items() if k != "margin"} for ex in TRL_EXAMPLES]
    args = trl.RewardConfig(output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True,
                            per_device_train_batch_size=len(examples), disable_tqdm=True, save_strategy="no",
                            logging_strategy="no", max_length=None)
    ds = datasets.Dataset.from_list(examples)
    trainer = trl.RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    trainer.model.train()
    features = [trainer.train_dataset[i] for i in range(len(examples))]
    batch = trainer.data_collator(features)
    assert ("margin" in batch) == with_margin
    trl_loss = trainer.compute_loss(trainer.model, dict(batch))
    trl_stats = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    # ours: our own encoding (prompt + completion + eos), right padding, pooling and loss
    pairs = [RewardPair(e["prompt"], e["chosen"], e["rejected"], e.get("margin")) for e in examples]
    chosen = encode_texts(tok, [p.prompt for p in pairs], [p.chosen for p in pairs])
    rejected = encode_texts(tok, [p.prompt for p in pairs], [p.rejected for p in pairs])
    assert chosen == [f["chosen_ids"] for f in features] and rejected == [f["rejected_ids"] for f in features]
    assert all(ids[-1] == tok.eos_token_id for ids in chosen + rejected)
    rewards = sequence_rewards(trainer.model, chosen + rejected, tok.pad_token_id)
    r_c, r_r = rewards.chunk(2)
    margin = torch.tensor([p.margin for p in pairs]) if with_margin else None
    loss, stats = bradley_terry_loss(r_c, r_r, margin)
    assert abs(loss.item() - trl_loss.item()) < ATOL
    assert r_c.std() > 0.05 and loss.item() != pytest.approx(math.log(2), abs=1e-3)  # not a degenerate case
    for name in ("accuracy", "margin", "min_reward", "mean_reward", "max_reward"):
        assert abs(stats[name].item() - trl_stats[name]) < ATOL, name
    # the margin changes the loss (so the with-margin comparison tests something)
    if with_margin:
        assert abs(loss.item() - bradley_terry_loss(r_c, r_r)[0].item()) > 1e-3


def _synthetic_pairs(n: int, seed: int) -> list[RewardPair]:
    """Chosen contains the marker word ``w7``; rejected is otherwise drawn the same way."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        prompt = " ".join(f"w{rng.randrange(20, 60)}" for _ in range(3))
        words_c = [f"w{rng.randrange(60, 120)}" for _ in range(rng.randrange(2, 6))]
        words_r = [f"w{rng.randrange(60, 120)}" for _ in range(rng.randrange(2, 6))]
        words_c.insert(rng.randrange(len(words_c) + 1), "w7")
        pairs.append(RewardPair(prompt, " " + " ".join(words_c), " " + " ".join(words_r)))
    return pairs


def test_training_separates_marker_preference():
    tok = make_tokenizer()
    model = make_rm(seed=1, init_range=0.02)
    train, held = _synthetic_pairs(64, seed=0), _synthetic_pairs(32, seed=1)
    before = pairwise_accuracy(model, tok, held, batch_size=16)
    assert before <= 0.75
    metrics = train_reward_model(model, tok, train, lr=3e-3, epochs=8, batch_size=16, max_length=32, seed=0)
    assert len(metrics) == 8 * 4 and metrics[0]["step"] == 1
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.3
    assert pairwise_accuracy(model, tok, train, batch_size=16) == 1.0
    assert pairwise_accuracy(model, tok, held, batch_size=16) == 1.0
    # reward is read at the last real token: right padding does not change it
    rows = encode_texts(tok, [held[0].prompt] * 2, [held[0].chosen, held[0].chosen + " w100 w101 w102"])
    with torch.no_grad():
        padded = sequence_rewards(model, rows, tok.pad_token_id)[0]
        alone = sequence_rewards(model, rows[:1], tok.pad_token_id)[0]
    assert abs(padded.item() - alone.item()) < 1e-5


def test_load_reward_model_and_ranker(tiny_model_dir):
    from rlhf_workbench.model.rollout import Completion
    from rlhf_workbench.tasks.task import Task

    model, tok = load_reward_model(str(tiny_model_dir))
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id is not None
    assert tok.padding_side == "right" and model.score.out_features == 1
    task = Task(id="q1", question="What is 1 + 1?", answer="2")
    comps = [Completion("q1", 0, [1, 2], [3], [-1.0], "Answer: 2", True),
             Completion("q1", 1, [1, 2], [4, 5], [-1.0, -1.0], "It is 2.\nAnswer: 2", True)]
    scores = RewardModelRanker(model, tok, {"q1": task})(comps, [None, None])
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores)
    from rlhf_workbench.train.reward_model import score_texts
    assert scores == pytest.approx(score_texts(model, tok, [task.prompt() + "\n\n"] * 2, [c.text for c in comps]))


def test_pairs_from_rankings(tiny_model_dir, tmp_path):
    from rlhf_workbench.config import ModelConfig, RunConfig
    from rlhf_workbench.run.loop import _record_rankings
    from rlhf_workbench.model.loading import load_policy
    from rlhf_workbench.store import Store
    from rlhf_workbench.tasks.task import Task

    tasks = [Task(id="q1", question="What is 1 + 1?", answer="2"), Task(id="q2", question="What is 2 + 2?", answer="4")]
    store = Store(run_dir=tmp_path)
    store.add_tasks(tasks, "train")
    store.publish_version(0, None, "base", None, {}, 0)
    pair = load_policy(ModelConfig(name=str(tiny_model_dir), mixed_precision="no"))
    texts = {"q1": ["Answer: 2", "1 + 1 = 2\nAnswer: 2", "The sum is 2.\nAnswer: 2", "Answer: 999", "Answer: 7"],
             "q2": ["Answer: 4", "Answer: 5"]}
    seed_rollout(store, pair, texts)
    rollout = store.rollout_for_round(1)
    c = {(x.task_id, x.index): x for x in rollout.completions}
    assert [c["q1", k].verification.correct for k in range(5)] == [True, True, True, False, False]
    scores = {"q1": {c["q1", 0].id: 1.0, c["q1", 1].id: 1.0, c["q1", 2].id: 0.5,  # 0 and 1 tie at rank 0
                     c["q1", 3].id: 5.0, c["q1", 4].id: 3.0},  # wrong traces: their scores are ignored
              "q2": {c["q2", 0].id: 0.1, c["q2", 1].id: 9.0}}
    cfg = RunConfig()
    _record_rankings(store, rollout, "rules", scores, set(), cfg)
    # a second source ranks q1 differently and flags trace 1 (flagged: unranked, like a wrong trace)
    _record_rankings(store, rollout, "human", {"q1": {c["q1", 0].id: 0.0, c["q1", 1].id: 1.0,
                                                      c["q1", 2].id: 2.0}}, {c["q1", 1].id}, cfg)

    got = pairs_from_rankings(store, source="rules", with_margin=True)
    ids = lambda t, *ks: [c[t, k].id for k in ks]  # noqa: E731
    expected = [  # (chosen, rejected, margin): ties (0,1) and (3,4) skipped; wrong ones one below the worst (rank 1)
        ("q1", 0, 2, 1.0), ("q1", 0, 3, 2.0), ("q1", 0, 4, 2.0),
        ("q1", 1, 2, 1.0), ("q1", 1, 3, 2.0), ("q1", 1, 4, 2.0),
        ("q1", 2, 3, 1.0), ("q1", 2, 4, 1.0),
        ("q2", 0, 1, 1.0),
    ]
    assert [(p.task_id, p.chosen_id, p.rejected_id, p.margin) for p in got] == [
        (t, *ids(t, a, b), m) for t, a, b, m in expected]
    assert got[0].prompt == tasks[0].prompt() + "\n\n"
    assert (got[0].chosen, got[0].rejected) == ("Answer: 2", "The sum is 2.\nAnswer: 2")
    correct = {x.id for x in rollout.completions if x.verification.correct}
    assert all(p.chosen_id in correct for p in got)
    assert all(p.margin is None for p in pairs_from_rankings(store, source="rules"))

    human = pairs_from_rankings(store, source="human")
    # ranks: trace 2 -> 0, trace 0 -> 1, flagged 1 and wrong 3, 4 unranked (ordered by id)
    assert [(p.chosen_id, p.rejected_id) for p in human] == [
        tuple(ids("q1", a, b)) for a, b in [(2, 0), (2, 1), (2, 3), (2, 4), (0, 1), (0, 3), (0, 4)]]
    assert all(p.chosen_id != c["q1", 1].id for p in human)  # flagged trace never chosen
    assert len(pairs_from_rankings(store)) == len(got) + len(human)


def test_split_hh_dialogue_and_jsonl(tmp_path):
    ch = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help me\n\nAssistant: Sure, here is how."
    rj = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help me\n\nAssistant: No."
    prompt, c, r = split_hh_dialogue(ch, rj)
    assert prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help me\n\nAssistant:"
    assert (c, r) == (" Sure, here is how.", " No.")
    # the shared prefix ends inside the assistant turn: cut at the turn's start, not mid-text
    p2, c2, r2 = split_hh_dialogue("\n\nHuman: q\n\nAssistant: Yes I can", "\n\nHuman: q\n\nAssistant: Yes I won't")
    assert (p2, c2, r2) == ("\n\nHuman: q\n\nAssistant:", " Yes I can", " Yes I won't")
    assert split_hh_dialogue(ch, ch) is None and split_hh_dialogue("abc", "abd") is None
    f = tmp_path / "p.jsonl.gz"
    with gzip.open(f, "wt") as out:
        out.write(json.dumps({"prompt": "P", "chosen": " a", "rejected": " b", "margin": 1.5}) + "\n\n")
        out.write(json.dumps({"chosen": ch, "rejected": rj}) + "\n")
        out.write(json.dumps({"chosen": ch, "rejected": ch}) + "\n")  # unsplittable: skipped
        out.write(json.dumps({"prompt": "Q", "chosen": " c", "rejected": " d"}) + "\n")
    got = load_preference_file(f)
    assert got == [RewardPair("P", " a", " b", 1.5), RewardPair(prompt, c, r), RewardPair("Q", " c", " d")]
    assert load_preference_file(f, limit=1, offset=1) == [RewardPair(prompt, c, r)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_preference_file(bad)


def test_hh_rlhf_loader(shared_data):
    path = shared_data / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    if not path.exists():
        pytest.skip(f"{path} not found")
    pairs = load_preference_file(path, limit=20)
    assert len(pairs) == 20
    with gzip.open(path, "rt") as f:
        raw = [json.loads(next(f)) for _ in range(40)]
    raw_pairs = {(r["chosen"], r["rejected"]) for r in raw}
    for p in pairs:
        assert p.prompt.startswith("\n\nHuman:") and p.prompt.endswith("\n\nAssistant:")
        assert p.chosen != p.rejected
        assert (p.prompt + p.chosen, p.prompt + p.rejected) in raw_pairs
        assert "\n\nHuman:" not in p.prompt[-len("\n\nAssistant:"):]
    assert pairs[0].prompt + pairs[0].chosen == next(r["chosen"] for r in raw if r["chosen"] != r["rejected"])
    assert load_preference_file(path, limit=5, offset=5) == pairs[5:10]


def test_train_rm_command(tiny_model_dir, tmp_path):
    """``rlhf train-rm`` on a preference file: saves a reward model that loads back with the same
    scores, and writes the held-out accuracy measured on the held-out pairs."""
    import json

    from typer.testing import CliRunner

    from rlhf_workbench.cli import app
    from rlhf_workbench.train.reward_model import load_preference_file, load_reward_model, pairwise_accuracy

    prefs = tmp_path / "prefs.jsonl"
    rows = [{"prompt": f"Q{i}: 2+{i}?\n\n", "chosen": f"Answer: {2 + i}", "rejected": f"Answer: {3 + i}"}
            for i in range(10)]
    prefs.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "rm"
    res = CliRunner().invoke(app, ["train-rm", "--preferences", str(prefs), "--out-dir", str(out),
                                   "--model", str(tiny_model_dir), "--heldout-fraction", "0.3", "--batch-size", "2",
                                   "--max-length", "64", "--full"])
    assert res.exit_code == 0, res.output
    info = json.loads((out / "metrics.json").read_text())
    assert info["train_pairs"] == 7 and info["heldout_pairs"] == 3 and len(info["steps"]) == 4
    model, tok = load_reward_model(str(out))
    import random

    pairs = load_preference_file(prefs)
    random.Random(0).shuffle(pairs)
    assert pairwise_accuracy(model, tok, pairs[:3], 2, 64) == info["heldout_accuracy"]
    bad = CliRunner().invoke(app, ["train-rm", "--out-dir", str(out)])
    assert bad.exit_code == 2 and "exactly one of --run" in bad.output


# --------------------------------------------------------------------------------------------
# frozen backbone + cached pooled features (rlhf_workbench.train.rm_features)
# --------------------------------------------------------------------------------------------


def make_pooled(pooling="mean_last", layer=-1, max_tokens=16, hidden=64, seed=0):
    """Tiny random Llama backbone (frozen) with a zero pooled head, word-level tokenizer."""
    from rlhf_workbench.train.rm_features import PooledRewardModel

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, pad_token_id=PAD, bos_token_id=1, eos_token_id=1)
    model = PooledRewardModel(transformers.LlamaModel(cfg).float(), pooling, layer, max_tokens, "no")
    model.config.pad_token_id = PAD
    return model


def test_left_truncate_keeps_final_tokens():
    from rlhf_workbench.train.rm_features import left_truncate

    ids = torch.tensor([[5, 6, 7, 8, 9], [3, 4, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    new_ids, new_mask = left_truncate(ids, mask, 3)
    assert new_ids.tolist() == [[7, 8, 9], [3, 4, 0]] and new_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    # the model's feature of a long row is that of its final max_tokens tokens alone
    tok = make_tokenizer()
    model = make_pooled(max_tokens=4)
    long = encode_texts(tok, ["w3 w4 w5 w6"], [" w7 w8 w9"])[0]
    assert len(long) > 4
    short = [long[-4:]]
    from rlhf_workbench.train.rm_inputs import right_pad

    f_long = model.features(*right_pad([long, long[:2]], PAD, "cpu"))[0]
    f_short = model.features(*right_pad(short, PAD, "cpu"))[0]
    assert torch.allclose(f_long, f_short, atol=1e-5)
    f_other = model.features(*right_pad([long[:4]], PAD, "cpu"))[0]
    assert not torch.allclose(f_long, f_other, atol=1e-3)


def test_pooled_head_learns_marker_preference_features_cached_once():
    """One backbone pass per batch of distinct texts; many head epochs on the cached features
    lower the Bradley–Terry loss and separate held-out pairs whose chosen side has ``w7``."""
    from rlhf_workbench.train.rm_features import pair_features, head_accuracy

    tok = make_tokenizer()
    model = make_pooled(pooling="mean", layer=0)
    calls = []
    model.backbone.register_forward_hook(lambda *a: calls.append(1))
    train, held = _synthetic_pairs(192, seed=0), _synthetic_pairs(64, seed=1)
    train = train + train[:10]  # repeated pairs are not forwarded again
    prompts = [p.prompt for p in train]
    distinct = {tuple(r) for r in encode_texts(tok, prompts, [p.chosen for p in train])
                + encode_texts(tok, prompts, [p.rejected for p in train])}
    metrics = train_reward_model(model, tok, train, batch_size=16, head_epochs=40, head_lr=1e-2,
                                 head_weight_decay=0.01, head_batch_size=32, eval_pairs=held)
    n_train_passes = math.ceil(len(distinct) / 16)
    assert metrics[0]["forward_passes"] == len(calls) == n_train_passes + math.ceil(2 * len(held) / 16)
    assert len(metrics) == 40 and metrics[-1]["pairs_seen"] == 40 * len(train)
    assert metrics[0]["loss"] < math.log(2) + 1e-6 and metrics[-1]["loss"] < metrics[0]["loss"] - 0.2
    assert metrics[-1]["eval_accuracy"] >= 0.9
    # the model scores through the ordinary path exactly as the head did on cached features
    assert pairwise_accuracy(model, tok, held, batch_size=8) == pytest.approx(metrics[-1]["eval_accuracy"])
    fc, fr = pair_features(model, tok, held)
    assert head_accuracy(model.head, fc, fr) == pytest.approx(metrics[-1]["eval_accuracy"])


@pytest.mark.parametrize("pooling", ["last", "mean_last"])
def test_pooled_reward_model_save_load_round_trip(tiny_model_dir, tmp_path, pooling):
    """Saved frozen-backbone model loads through load_reward_model, evaluate.load_scorer and the
    feedback source, with identical scores."""
    from rlhf_workbench.evaluation.scoring import load_scorer
    from rlhf_workbench.train.reward_model import score_texts
    from rlhf_workbench.train.rm_features import PooledRewardModel
    from rlhf_workbench.model.rollout import Completion
    from rlhf_workbench.tasks.task import Task

    model, tok = load_reward_model(str(tiny_model_dir), pooling=pooling, max_tokens=24, mixed_precision="no")
    assert isinstance(model, PooledRewardModel) and tok.padding_side == "right"
    pairs = [RewardPair(f"Q{i}: 2+{i}?\n\n", f"Answer: {2 + i}", f"No idea {i} really") for i in range(12)]
    metrics = train_reward_model(model, tok, pairs, batch_size=4, head_epochs=5, head_batch_size=4)
    assert len(metrics) == 5 and metrics[-1]["accuracy"] > 0.5
    assert float(model.head.linear.weight.detach().abs().sum()) > 0
    out = tmp_path / "rm"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    assert (out / "reward_head.json").is_file() and not list(out.glob("model*.safetensors"))
    tasks = [Task(id=f"q{i}", question=f"What is 2 + {i}?", answer=str(2 + i)) for i in range(3)]
    texts = ["Answer: 2", "It is 3 so Answer: 3 " + "and more words " * 10, "Answer: 9"]
    expected = score_texts(model, tok, [t.transcript() + "\n\n" for t in tasks], texts)
    loaded, tok2 = load_reward_model(str(out))
    assert isinstance(loaded, PooledRewardModel) and loaded.pooling == pooling and loaded.max_tokens == 24
    assert score_texts(loaded, tok2, [t.transcript() + "\n\n" for t in tasks], texts) == expected
    score, note = load_scorer(str(out))
    assert note is None and score(tasks, texts) == expected
    comps = [Completion(t.id, 0, [1, 2], [3], [-1.0], x, True) for t, x in zip(tasks, texts)]
    assert RewardModelRanker(loaded, tok2, {t.id: t for t in tasks})(comps, [None] * 3) == expected
    assert len(set(expected)) == 3


def test_train_rm_command_frozen_backbone(tiny_model_dir, tmp_path):
    """``rlhf train-rm`` (default frozen backbone): per-epoch metrics, a pooled model that loads back
    and reproduces the recorded held-out accuracy."""
    from typer.testing import CliRunner

    from rlhf_workbench.cli import app
    from rlhf_workbench.train.rm_features import PooledRewardModel

    prefs = tmp_path / "prefs.jsonl"
    rows = [{"prompt": f"Q{i}: 2+{i}?\n\n", "chosen": f"Answer: {2 + i}", "rejected": f"Sorry {i}"} for i in range(10)]
    prefs.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "rm"
    res = CliRunner().invoke(app, ["train-rm", "--preferences", str(prefs), "--out-dir", str(out),
                                   "--model", str(tiny_model_dir), "--heldout-fraction", "0.3", "--batch-size", "4",
                                   "--max-tokens", "32", "--pooling", "last", "--head-epochs", "7",
                                   "--mixed-precision", "no"])
    assert res.exit_code == 0, res.output
    info = json.loads((out / "metrics.json").read_text())
    assert info["train_pairs"] == 7 and len(info["steps"]) == 7 and info["steps"][-1]["pairs_seen"] == 49
    assert info["settings"]["freeze_backbone"] and info["settings"]["mixed_precision"] == "no"
    model, tok = load_reward_model(str(out))
    assert isinstance(model, PooledRewardModel) and model.pooling == "last" and model.max_tokens == 32
    pairs = load_preference_file(prefs)
    random.Random(0).shuffle(pairs)
    assert pairwise_accuracy(model, tok, pairs[:3], 2, 64) == info["heldout_accuracy"]
    bad = CliRunner().invoke(app, ["train-rm", "--preferences", str(prefs), "--out-dir", str(out),
                                   "--model", str(tiny_model_dir), "--pooling", "max"])
    assert bad.exit_code == 2 and "pooling must be one of" in bad.output
