"""Ranking, rank rewards and preference pairs: a wrong trace is never preferred."""

from rlhf_workbench.config import FeedbackSource
from rlhf_workbench.feedback.sources import RuleRanker, build_pairs, completion_rewards, rank_group, rank_rewards
from rlhf_workbench.model.rollout import Completion
from rlhf_workbench.verify import Verification


def V(correct, fmt=True):
    return Verification(correct=correct, extracted="1", format_ok=fmt, reason="")


def C(n):
    return Completion("t", 0, [1], list(range(n)), [0.0] * n, "x", True)


def test_rank_rewards_best_middle_worst():
    assert rank_rewards([0, 1, 2]) == [1.0, 0.5, 0.0]
    assert rank_rewards([0]) == [1.0]
    assert rank_rewards([None, 0, 1]) == [0.0, 1.0, 0.0]


def test_rank_group_ties_and_wrong():
    ranks = rank_group([True, False, True, True], [0.5, 9.0, 0.5, 0.7])
    assert ranks == [1, None, 1, 0]  # the wrong trace's high score does not rank it


def test_completion_rewards_wrong_below_every_correct():
    rewards = completion_rewards([None, 0, 1, None], ranking_weight=0.2)
    assert rewards == [0.0, 1.2, 1.0, 0.0]
    assert min(r for r, k in zip(rewards, [None, 0, 1, None]) if k is not None) > max(
        r for r, k in zip(rewards, [None, 0, 1, None]) if k is None)


def test_pairs_never_choose_wrong_or_flagged():
    ranks = [None, 1, 0, None]
    assert build_pairs(ranks, "best_vs_wrong", 5) == [(2, 0), (2, 3)]
    assert build_pairs(ranks, "all_correct_vs_wrong", 5) == [(2, 0), (2, 3), (1, 0), (1, 3)]
    assert build_pairs([1, 0], "best_vs_worst", 5) == [(1, 0)]
    assert build_pairs([None, None], "best_vs_wrong", 5) == []
    assert build_pairs(ranks, "best_vs_wrong", 5, flagged=[False, False, True, False]) == [(1, 0), (1, 3)]
    for pairing in ("best_vs_wrong", "best_vs_worst", "all_correct_vs_wrong"):
        for chosen, rejected in build_pairs(ranks, pairing, 10):
            assert ranks[chosen] is not None


def test_rule_ranker_prefers_format_then_short():
    ranker = RuleRanker([FeedbackSource(name="format", weight=1.0), FeedbackSource(name="length", weight=0.1)], 64)
    scores = ranker([C(10), C(40), C(10)], [V(True, True), V(True, True), V(True, False)])
    assert scores[0] > scores[1] > scores[2]
    assert rank_group([True] * 3, scores) == [0, 1, 2]


# --------------------------------------------------------------------------------------------
# mixed sources: rules + LLM judge + reward model
# --------------------------------------------------------------------------------------------

import re  # noqa: E402

import pytest  # noqa: E402

from rlhf_workbench.config import ConfigError, FeedbackConfig, load_config  # noqa: E402
from rlhf_workbench.feedback.sources import MixedRanker, make_ranker, rule_score, zscore  # noqa: E402
from rlhf_workbench.tasks.task import Task  # noqa: E402

TASK = Task(id="t", question="What is 2 + 3?", answer="5")


def CT(text, n):
    return Completion("t", 0, [1], list(range(n)), [0.0] * n, text, True)


class PrefersShorter:
    """Judge backend double: picks the shorter answer wherever it is shown."""

    def chat(self, messages, max_tokens=16):
        user = messages[-1]["content"]
        a = re.search(r"\[Answer A\]\n(.*?)\n\[End of Answer A\]", user, re.S).group(1)
        b = re.search(r"\[Answer B\]\n(.*?)\n\[End of Answer B\]", user, re.S).group(1)
        return "A" if len(a) < len(b) else "B"


def test_rule_ranker_accepts_task():
    ranker = make_ranker(FeedbackConfig(), 64)
    cs, vs = [C(10), C(40)], [V(True), V(True)]
    assert ranker(cs, vs) == ranker(cs, vs, task=TASK)


def test_mixed_rules_and_judge_weighted_sum():
    cfg = FeedbackConfig.model_validate({"sources": [
        {"name": "format", "weight": 1.0}, {"name": "length", "weight": 0.1},
        {"name": "judge", "weight": 2.0, "url": "http://127.0.0.1:9/v1", "api_model": "m"}]})
    ranker = make_ranker(cfg, 64)
    assert isinstance(ranker, MixedRanker) and [name for _, name, _ in ranker.parts] == ["rules", "judge"]
    judge_ranker = ranker.parts[1][2]
    judge_ranker.judge.backend = PrefersShorter()  # no endpoint listens on port 9: replace the backend
    cs = [CT("Answer: 5", 3), CT("2 + 3 = 5. Answer: 5", 8), CT("so 6", 2), CT("Five, Answer: 5", 6)]
    vs = [V(True, True), V(True, False), V(False), V(True, True)]
    scores = ranker(cs, vs, task=TASK)
    win = {0: 1.0, 1: 0.0, 2: 0.0, 3: 0.5}  # among the correct 0, 1, 3: shortest text wins both its pairs
    for i, (c, v) in enumerate(zip(cs, vs)):
        hand = sum(s.weight * rule_score(s, c, v, 64) for s in cfg.sources[:2]) + 2.0 * win[i]
        assert scores[i] == pytest.approx(hand)
    assert ranker.stats()["judge/calls"] == 6.0 and ranker.stats()["judge/consistency_rate"] == 1.0
    with pytest.raises(ValueError, match="task="):
        ranker(cs, vs)
    # a weight-0 source is left out (never built, never called)
    cfg.sources[2].weight = 0.0
    assert [name for _, name, _ in make_ranker(cfg, 64).parts] == ["rules"]


def test_mixed_reward_model_is_zscored_score_texts(tiny_model_dir, tmp_path):
    import torch

    from rlhf_workbench.train.reward_model import load_reward_model, score_texts

    torch.manual_seed(0)
    model, tok = load_reward_model(str(tiny_model_dir))
    rm_dir = tmp_path / "rm"
    model.save_pretrained(rm_dir)  # a "trained" reward model directory
    tok.save_pretrained(rm_dir)
    cfg = FeedbackConfig.model_validate({"sources": [{"name": "format", "weight": 1.0},
                                                     {"name": "reward_model", "weight": 0.5, "path": str(rm_dir)}]})
    ranker = make_ranker(cfg, 64)
    cs = [CT("Answer: 5", 3), CT("2 + 3 = 5. Answer: 5", 8), CT("it is 6", 2), CT("Five. Answer: 5", 6)]
    vs = [V(True, True), V(True, False), V(False), V(True, True)]
    scores = ranker(cs, vs, task=TASK)
    m2, t2 = load_reward_model(str(rm_dir))
    ok = [0, 1, 3]
    raw = score_texts(m2, t2, [TASK.prompt() + "\n\n"] * 3, [cs[i].text for i in ok])
    mean = sum(raw) / 3
    std = (sum((r - mean) ** 2 for r in raw) / 3) ** 0.5
    z = dict(zip(ok, [(r - mean) / std for r in raw]))
    for i, (c, v) in enumerate(zip(cs, vs)):
        assert scores[i] == pytest.approx(float(v.format_ok) + 0.5 * z.get(i, 0.0), abs=1e-4)
    assert zscore([1.0]) == [0.0] and zscore([2.0, 2.0]) == [0.0, 0.0]


@pytest.mark.parametrize("source, field", [
    ("{name: judge}", "exactly one of `url`"),
    ("{name: judge, url: 'http://x/v1', model: smollm2-135m}", "exactly one of `url`"),
    ("{name: judge, url: 'ftp://x'}", "field `url` must start with http"),
    ("{name: judge, url: 'http://x/v1', api_key_env: 'sk-abc123'}", "field `api_key_env` names an environment variable"),
    ("{name: judge, model: m, api_key_env: KEY}", "field `api_key_env` only applies with `url`"),
    ("{name: judge, url: 'http://x/v1', max_pairs: 0}", "max_pairs"),
    ("{name: reward_model}", "field `path` is required"),
    ("{name: format, path: rm}", "field `path` only applies to the reward_model source"),
    ("{name: length, url: 'http://x/v1'}", "field `url` only applies to the judge source"),
    ("{name: critic}", "name"),
])
def test_feedback_source_errors_name_the_field(tmp_path, source, field):
    p = tmp_path / "c.yaml"
    p.write_text(f"feedback:\n  sources:\n    - {{name: format}}\n    - {source}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "feedback.sources.1" in str(e.value) and field in str(e.value), str(e.value)


def test_feedback_config_round_trips_through_model_dump():
    from rlhf_workbench.config import RunConfig

    cfg = RunConfig.model_validate({"feedback": {
        "sources": [{"name": "format"}, {"name": "judge", "url": "http://127.0.0.1:8001/v1", "max_pairs": 3},
                    {"name": "judge", "model": "smollm2-135m"}, {"name": "reward_model", "path": "rm"}],
        "safety": {"patterns": ["x"], "classifier": "clf", "threshold": 0.8}}})
    for c in (RunConfig(), cfg):  # the loop re-validates the stored dump to resume a run
        assert RunConfig.model_validate(c.model_dump(mode="json")) == c


def test_feedback_source_yaml_examples(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("""feedback:
  sources:
    - {name: format, weight: 1.0}
    - {name: judge, weight: 0.5, url: "http://127.0.0.1:8001/v1", api_model: smollm2-135m,
       api_key_env: JUDGE_API_KEY, max_pairs: 6}
    - {name: reward_model, weight: 0.2, path: runs/rm}
  safety:
    patterns: ["stop taking (your|all) medications?"]
    patterns_file: bundled:medical
""")
    cfg = load_config(p).feedback
    assert [s.name for s in cfg.sources] == ["format", "judge", "reward_model"]
    assert cfg.sources[1].max_pairs == 6 and cfg.sources[2].path == "runs/rm" and cfg.safety.patterns_file
