"""Online preference learning on open prompts (issue 21): experts rank the policy's own samples
through the app's HTTP API, a reward model refit on their rankings each round ranks the groups
no expert ranked, and a length penalty guards against length hacking."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from pydantic import ValidationError
from sqlalchemy import select

from conftest import gradio_api_call, loop_beside_app
from rlhf_workbench.config import RunConfig
from rlhf_workbench.feedback.sources import length_penalized
from rlhf_workbench.store import RankingRow, Store

httpx = pytest.importorskip("httpx")
PASSWORD = "password-123"
THINGS = ["tea", "rivers", "owls", "bread", "maps", "clocks", "snow", "ships", "bees", "salt", "glass", "wool",
          "kites", "moss", "bells", "caves", "figs", "ink", "lamps", "nets", "opals", "pens", "quilts", "reeds"]


def test_length_penalty_lowers_ranked_traces_by_their_share_of_the_budget():
    rewards = length_penalized([2.0, 1.0, 0.0], [0, 1, None], [48, 12, 30], 0.5, 48)
    assert rewards == pytest.approx([1.5, 0.875, 0.0])
    assert length_penalized([2.0, 0.0], [0, None], [48, 48], 0.0, 48) == [2.0, 0.0]
    with pytest.raises(ValueError, match="2 rewards, 2 ranks, 1 lengths"):
        length_penalized([1.0, 1.0], [0, 0], [3], 0.1, 8)


def test_refit_needs_experts_and_the_penalty_stays_below_one():
    with pytest.raises(ValidationError, match="feedback.source: human"):
        RunConfig.model_validate({"feedback": {"refit": {}}})
    with pytest.raises(ValidationError, match="length_penalty"):
        RunConfig.model_validate({"feedback": {"length_penalty": 1.0}})


def _tasks(tmp_path):
    rows = [{"id": f"t{i}", "prompt": f"Tell me something about {w}.", "metadata": {"split": "train"}}
            for i, w in enumerate(THINGS)]
    rows += [{"id": "h1", "prompt": "Describe the sea.", "metadata": {"split": "heldout"}},
             {"id": "h2", "prompt": "Name a colour.", "metadata": {"split": "heldout"}}]
    path = tmp_path / "open.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, {r["id"]: r["prompt"] for r in rows}


class ScriptedExpert:
    """Ranks served items by a fixed random linear preference over the backbone's pooled features
    (a reward model the refit head can represent, as the gold model is in the benchmark), only
    through the app's HTTP API, at most ``budget`` items a round."""

    def __init__(self, backbone_dir, prompts: dict, budget: int, seed: int = 11):
        from rlhf_workbench.train.reward_model import load_reward_model
        from rlhf_workbench.train.rm_inputs import encode_texts
        from rlhf_workbench.train.rm_features import extract_features

        self.model, self.tok = load_reward_model(str(backbone_dir), pooling="mean_last", mixed_precision="no")
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(self.model.head.linear.in_features, generator=g)
        self.encode, self.extract = encode_texts, extract_features
        self.prompts, self.budget, self.done = prompts, budget, {}

    def score(self, task_id: str, texts: list[str]) -> list[float]:
        rows = self.encode(self.tok, [self.prompts[task_id] + "\n\n"] * len(texts), texts)
        feats = self.extract(self.model, rows, self.tok.pad_token_id)
        return (feats @ self.w).tolist()

    def work(self, url: str, stop: threading.Event) -> None:
        with httpx.Client(base_url=url, timeout=60, trust_env=False) as http:
            http.post("/login", data={"username": "expert", "password": PASSWORD}).raise_for_status()
            while not stop.is_set():
                _, data = gradio_api_call(http, "next_item", [])
                item = json.loads(data[0])
                if not item or self.done.get(item["round"], 0) >= self.budget:
                    time.sleep(0.2)
                    continue
                scores = self.score(item["task_id"], item["texts"])
                order = sorted(set(scores), reverse=True)
                ranks = {str(c): order.index(s) for c, s in zip(item["completion_ids"], scores)}
                _, out = gradio_api_call(http, "submit", [item["rollout_id"], item["task_id"], json.dumps(ranks),
                                                          "scripted", "[]", item["revision"], "[]"])
                if str(out[0]).startswith("ok"):
                    self.done[item["round"]] = self.done.get(item["round"], 0) + 1


def test_online_arm_through_the_http_api_refit_learns_what_the_expert_prefers(tiny_model_dir, tmp_path):
    """A short online arm: the loop waits for ``budget`` expert rankings a round (submitted through
    /next_item and /submit by a scripted expert), the refit reward model ranks the rest. Its
    agreement with the expert on each round's expert pairs, measured before it is refit on them,
    starts at chance (a zero head) and rises above it."""
    from rlhf_workbench.human.accounts import create_user

    rounds, per_round, budget = 5, 6, 3
    task_file, prompts = _tasks(tmp_path)
    out = tmp_path / "run"
    cfg = RunConfig.model_validate({
        "algorithm": "grpo", "rounds": rounds, "seed": 0,
        "model": {"name": str(tiny_model_dir), "mixed_precision": "no"},
        "tasks": {"path": str(task_file)},
        "rollout": {"num_generations": 4, "prompts_per_round": per_round, "max_new_tokens": 8, "batch_size": 24,
                    "temperature": 1.0},
        "optim": {"lr": 1e-3, "micro_batch_size": 8},
        "eval": {"max_new_tokens": 6, "batch_size": 8, "kl_samples": 2},
        "feedback": {"source": "human", "min_rankings": budget, "poll_seconds": 0.2, "selection": "random",
                     "min_verified": 2, "refit": {"path": str(tiny_model_dir)}},
    })
    store = Store(cfg.db_url, out)
    create_user(store, "expert", PASSWORD)
    expert = ScriptedExpert(tiny_model_dir, prompts, budget)
    _, errors = loop_beside_app(cfg, out, expert.work, timeout=600)
    assert not errors, errors[0]
    with store.session() as s:
        sources = [(r.rollout_id, r.source) for r in s.scalars(select(RankingRow))]
    for rid in {r for r, _ in sources}:  # per round: the budget's expert groups, the refit model the rest
        assert sorted(src for r, src in sources if r == rid) == ["human"] * budget + ["reward_model"] * (per_round - budget)
    metrics = [v.metrics for v in store.versions() if v.id > 0]
    assert len(metrics) == rounds
    assert metrics[0]["train/refit/heldout_agreement"] == 0.5  # round 1: a zero head, every pair a tie
    later = [(m["train/refit/heldout_agreement"], m["train/refit/heldout_pairs"]) for m in metrics[1:]]
    pooled = sum(a * n for a, n in later) / sum(n for _, n in later)
    assert pooled > 0.7, later
    assert metrics[-1]["train/refit/expert_pairs"] == sum(n for _, n in later) + metrics[0]["train/refit/heldout_pairs"]
    assert (out / "online_reward_model" / "reward_head.safetensors").exists()

