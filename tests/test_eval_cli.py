"""`rlhf eval` and `rlhf compare`: the estimators against their defining formulas, and both
commands end to end (typer's CliRunner) on tiny real models, bundled arithmetic and PubMedQA."""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil

import pytest
import torch
from typer.testing import CliRunner

from rlhf_workbench.cli import app
from rlhf_workbench.stats import (
    bootstrap_ci,
    bootstrap_ratio_ci,
    maj_at_k,
    majority_vote,
    mcnemar_exact,
    newcombe_paired_diff_ci,
    pass_at_k,
)

runner = CliRunner()
CI = re.compile(r"\[-?\d+\.\d+, -?\d+\.\d+\]")


def invoke(*args):
    r = runner.invoke(app, [str(a) for a in args])
    r.text = " ".join(r.output.split())  # rich wraps long lines at the terminal width
    return r


# --------------------------------------------------------------------------------------------
# estimators
# --------------------------------------------------------------------------------------------


def test_pass_at_k_hand_examples_and_formula():
    assert pass_at_k(5, 1, 1) == pytest.approx(0.2)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 3, 2) == 1.0 and pass_at_k(1, 1, 1) == 1.0
    for n in range(1, 11):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)
            assert pass_at_k(n, c, 1) == pytest.approx(c / n)
    for bad in ((0, 0, 1), (3, 4, 1), (3, -1, 1), (3, 1, 4), (3, 1, 0)):
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_pass_at_k_equals_brute_force_over_subsets():
    """pass@k is the fraction of the C(n, k) size-k subsets of the samples holding a correct one."""
    for n in range(1, 7):
        for outcome in itertools.product([False, True], repeat=n):
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(outcome, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, sum(outcome), k) == pytest.approx(brute, abs=1e-12)


def test_majority_vote_and_maj_at_k():
    assert majority_vote(["7", "3", "7", None]) == ("7", 2)
    assert majority_vote(["3", "7", "7", "3"]) == ("3", 2)  # tie: the answer seen first wins
    assert majority_vote([None, "7", "3"]) == ("7", 1)  # abstentions do not vote
    assert majority_vote([None, None]) == (None, 0) and majority_vote([]) == (None, 0)
    # n == k: one vote over all samples.
    assert maj_at_k(["7", "3", "7"], [True, False, True], 3) == 1.0
    assert maj_at_k(["3", "7", "7", "3"], [False, True, True, False], 4) == 0.0  # tie -> "3", wrong
    assert maj_at_k([None, None], [False, False], 2) == 0.0
    # n > k: the average over all C(n, k) subsets, ties broken by sample order within a subset.
    # {0,1}: 7 7 -> 7 ok; {0,2}: 7 3 tie -> 7 ok; {1,2}: 7 3 tie -> 7 ok
    assert maj_at_k(["7", "7", "3"], [True, True, False], 2) == 1.0
    # {0,1}: 3 7 tie -> 3 wrong; {0,2}: 3 7 tie -> 3 wrong; {1,2}: 7 7 -> ok
    assert maj_at_k(["3", "7", "7"], [False, True, True], 2) == pytest.approx(1 / 3)
    # k == 1 is the sampled pass@1, c / n.
    assert maj_at_k(["3", "7", None, "7"], [False, True, False, True], 1) == pytest.approx(0.5)
    # Too many subsets: a seeded Monte Carlo average, deterministic.
    answers = ["7", "3", None, "7", "3", "3", "7", "7"]
    correct = [a == "7" for a in answers]
    mc = maj_at_k(answers, correct, 4, max_subsets=50, seed=1)
    assert mc == maj_at_k(answers, correct, 4, max_subsets=50, seed=1)
    assert abs(mc - maj_at_k(answers, correct, 4)) < 0.3
    with pytest.raises(ValueError):
        maj_at_k(["7"], [True, False], 1)
    with pytest.raises(ValueError):
        maj_at_k(["7"], [True], 2)


def test_bootstrap_ci_contains_mean_and_is_seeded():
    values = [0.0, 1.0, 1.0, 0.5, 0.25, 1.0, 0.0, 0.75, 1.0, 0.0]
    mean = sum(values) / len(values)
    lo, hi = bootstrap_ci(values, n_boot=2000, seed=0)
    assert min(values) <= lo < mean < hi <= max(values)
    assert (lo, hi) == bootstrap_ci(values, n_boot=2000, seed=0)
    noisy = [v + 0.01 * i for i, v in enumerate(values)]  # distinct values: another seed moves the quantiles
    assert bootstrap_ci(noisy, n_boot=2000, seed=0) != bootstrap_ci(noisy, n_boot=2000, seed=1)
    wide = bootstrap_ci(values, confidence=0.99, n_boot=2000, seed=0)
    assert wide[0] <= lo and wide[1] >= hi
    assert bootstrap_ci([2.0] * 5) == (2.0, 2.0)
    assert all(math.isnan(x) for x in bootstrap_ci([]))
    num, den = [3.0, 1.0, 4.0, 0.0, 5.0], [2.0, 2.0, 3.0, 1.0, 4.0]
    rlo, rhi = bootstrap_ratio_ci(num, den, n_boot=2000)
    assert rlo < sum(num) / sum(den) < rhi
    with pytest.raises(ValueError):
        bootstrap_ci(values, n_boot=0)


def test_newcombe_paired_interval():
    a = [True] * 6 + [False] * 10 + [True] * 3 + [False] * 5
    b = [True] * 6 + [True] * 10 + [False] * 3 + [False] * 5
    d = (sum(b) - sum(a)) / len(a)
    lo, hi = newcombe_paired_diff_ci(a, b)
    assert -1 <= lo < d < hi <= 1
    assert newcombe_paired_diff_ci(b, a) == pytest.approx((-hi, -lo))  # swapping the models mirrors it
    lo, hi = newcombe_paired_diff_ci(a, a)
    assert lo == pytest.approx(-hi) and lo < 0 < hi  # identical outcomes: symmetric about 0
    lo, hi = newcombe_paired_diff_ci([True] * 4, [True] * 4)  # empty margins: phi = 0
    assert lo == pytest.approx(-hi) and lo < 0 < hi
    assert newcombe_paired_diff_ci([True] * 4, [False] * 4)[1] < 0  # A always right, B never
    with pytest.raises(ValueError):
        newcombe_paired_diff_ci([True], [True, False])


# --------------------------------------------------------------------------------------------
# tiny models that answer 7 or 3, depending on the question
# --------------------------------------------------------------------------------------------

DIGIT_QUESTIONS = (
    [(f"What is {a} + {b}?", a + b) for a, b in [(1, 2), (1, 6), (2, 1), (2, 5), (5, 2), (6, 1)]]
    + [(f"What is {a} - {b}?", a - b) for a, b in [(9, 2), (8, 1), (15, 8), (16, 9), (12, 5), (11, 4),
                                                   (5, 2), (8, 5), (9, 6), (4, 1), (12, 9), (11, 8)]]
)


@pytest.fixture(scope="module")
def digit_setup(tiny_model_dir, tmp_path_factory, single_thread):
    """Two perturbed copies of the tiny model (untied output layer) whose first greedy token is
    "7" or "3" depending on the prompt (along two different directions of the final hidden state),
    a task file whose answers are 7 or 3, and a reward model saved with its scalar head."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_workbench.train.reward_model import load_reward_model
    from rlhf_workbench.model.rollout import render_prompt
    from rlhf_workbench.tasks.loading import save_tasks
    from rlhf_workbench.tasks.task import Task

    root = tmp_path_factory.mktemp("digits")
    tasks = [Task(f"d{i:02d}", q, str(a)) for i, (q, a) in enumerate(DIGIT_QUESTIONS)]
    task_file = save_tasks(tasks, root / "digits.jsonl")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        H = torch.stack([base.model(input_ids=torch.tensor([render_prompt(tok, t)])).last_hidden_state[0, -1]
                         for t in tasks])
    mu = H.mean(0)
    _, _, V = torch.linalg.svd(H - mu, full_matrices=False)
    seven, three = tok.convert_tokens_to_ids(["7", "3"])
    dirs = {}
    for name, comp in (("A", 0), ("B", 1)):
        u = V[comp] - (V[comp] @ mu) / (mu @ mu) * mu  # orthogonal to the mean: the sign splits the prompts
        scale = 5 / (H @ u).abs().median()
        m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        m.config.tie_word_embeddings = False
        m.lm_head.weight = torch.nn.Parameter(m.model.embed_tokens.weight.detach().clone())
        with torch.no_grad():
            m.lm_head.weight[seven] = scale * u
            m.lm_head.weight[three] = -scale * u
        dirs[name] = root / name
        m.save_pretrained(dirs[name])
        tok.save_pretrained(dirs[name])
    torch.manual_seed(0)
    rm, rm_tok = load_reward_model(str(tiny_model_dir))
    rm.save_pretrained(root / "rm")
    rm_tok.save_pretrained(root / "rm")
    return {"a": dirs["A"], "b": dirs["B"], "tasks": task_file, "rm": root / "rm", "root": root}


# --------------------------------------------------------------------------------------------
# rlhf eval
# --------------------------------------------------------------------------------------------

EVAL_KEYS = {"pass@1", "lenient_pass@1", "format_rate", "clipped_rate", "length", "pass@1_sampled", "pass@k",
             "maj@k", "kl_token", "kl_seq", "reward", "reward_reference", "reference_pass@1", "win_rate"}


def check_estimates(metrics: dict) -> None:
    for name, m in metrics.items():
        assert {"value", "ci_low", "ci_high", "method", "n", "confidence"} <= set(m), name
        assert m["ci_low"] - 1e-9 <= m["value"] <= m["ci_high"] + 1e-9, (name, m)


def test_eval_arithmetic_all_metrics(tiny_model_dir, digit_setup, tmp_path):
    out = tmp_path / "eval.json"
    r = invoke("eval", "--model", tiny_model_dir, "--reference", digit_setup["b"], "--tasks", "bundled:arithmetic",
               "--split", "heldout", "--limit", 4, "--k", 2, "--n-samples", 3, "--max-new-tokens", 4,
               "--reward-model", digit_setup["rm"], "--bootstrap", 500, "--out", out)
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    assert rep["schema"] == "rlhf-eval/1" and rep["reference"] == str(digit_setup["b"])
    assert rep["tasks"]["n"] == 4 and rep["tasks"]["split"] == "heldout" and rep["tasks"]["source"] == "bundled:arithmetic"
    assert set(rep["metrics"]) == EVAL_KEYS
    check_estimates(rep["metrics"])
    m, qs = rep["metrics"], rep["questions"]
    assert [q["id"] for q in qs] == [f"add-{i:04d}" for i in range(872, 876)]  # the bundled held-out split
    assert m["pass@1"]["method"] == "wilson" and m["pass@k"]["method"] == "bootstrap"
    assert m["pass@1"]["value"] == sum(q["greedy"]["correct"] for q in qs) / 4
    for q in qs:
        s = q["samples"]
        assert s["n"] == 3 and len(s["texts"]) == 3 and s["correct"] == sum(s["verdicts"])
        assert s["pass@k"] == pytest.approx(pass_at_k(3, s["correct"], 2))
        assert s["maj@k"] == pytest.approx(maj_at_k(s["extracted"], s["verdicts"], 2))
        assert q["win"] == (0.5 if q["reward"] == q["reference"]["reward"] or q["greedy"]["text"] == q["reference"]["text"]
                            else float(q["reward"] > q["reference"]["reward"]))
        assert q["kl"]["tokens"] == q["greedy"]["tokens"] and q["kl"]["sum"] >= -1e-6
    assert m["pass@k"]["value"] == pytest.approx(sum(q["samples"]["pass@k"] for q in qs) / 4)
    assert m["win_rate"]["value"] == pytest.approx(sum(q["win"] for q in qs) / 4)
    assert m["kl_token"]["value"] == pytest.approx(sum(q["kl"]["sum"] for q in qs) / sum(q["kl"]["tokens"] for q in qs))
    assert m["kl_token"]["value"] > 0  # the reference is another model
    assert "pass@2 (unbiased)" in r.text and "win rate vs reference" in r.text
    assert len(CI.findall(r.text)) >= len(EVAL_KEYS)


def test_eval_pubmedqa(tiny_model_dir, shared_data, tmp_path):
    out = tmp_path / "pqa.json"
    r = invoke("eval", "--model", tiny_model_dir, "--tasks", shared_data / "pubmedqa" / "pqal_train.json",
               "--read-limit", 4, "--split", "all", "--max-new-tokens", 4, "--bootstrap", 200, "--out", out)
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    assert rep["tasks"]["format"] == "auto" and rep["tasks"]["n"] == 4 and rep["reference"] is None
    assert all(q["id"].startswith("pubmedqa-") and q["answer"] in ("yes", "no", "maybe") for q in rep["questions"])
    assert {"pass@1", "lenient_pass@1", "format_rate", "clipped_rate", "length"} == set(rep["metrics"])
    check_estimates(rep["metrics"])
    assert "no run found for this checkpoint" in r.text and len(CI.findall(r.text)) >= 5
    # Without a split in the file, the default held-out split is empty: a clear error.
    r = invoke("eval", "--model", tiny_model_dir, "--tasks", shared_data / "pubmedqa" / "pqal_train.json",
               "--read-limit", 4)
    assert r.exit_code == 2 and "no held-out tasks" in r.text and "--split all" in r.text


def test_eval_takes_split_and_reference_from_the_run(tiny_model_dir, digit_setup, tmp_path):
    """A checkpoint inside a run: its config gives the questions (held-out split, instruction,
    eval settings) and its base model is the reference."""
    from rlhf_workbench.store import Store
    from rlhf_workbench.tasks.loading import load_tasks
    from rlhf_workbench.tasks.split import split_tasks

    run = tmp_path / "run"
    instruction = "Reply with the result only, as 'Answer: <number>'."
    cfg = {"seed": 0, "model": {"name": str(tiny_model_dir), "mixed_precision": "no"},
           "tasks": {"path": "bundled:arithmetic", "max_heldout": 3, "instruction": instruction},
           "eval": {"max_new_tokens": 3, "batch_size": 8}}
    train, held = split_tasks(load_tasks("bundled:arithmetic"), seed=0)
    store = Store(run_dir=run)
    store.set_meta("config", cfg)
    store.add_tasks(held[:3], "heldout")
    shutil.copytree(digit_setup["a"], run / "checkpoints" / "v1")
    store.publish_version(0, None, "base", None, {}, round=0)
    store.publish_version(1, 0, "grpo", str(run / "checkpoints" / "v1"), {}, round=1)
    out = tmp_path / "run-eval.json"
    r = invoke("eval", "--checkpoint", run / "checkpoints" / "v1", "--out", out, "--bootstrap", 200)
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    assert rep["tasks"]["run"] == str(run) and rep["tasks"]["instruction"] == instruction
    assert [q["id"] for q in rep["questions"]] == [t.id for t in held[:3]]
    assert rep["reference"] == str(tiny_model_dir) and rep["settings"]["max_new_tokens"] == 3
    assert "kl_token" in rep["metrics"] and "base model of the run" in r.text
    # --run alone evaluates the run's newest checkpoint on the same questions.
    r = invoke("eval", "--run", run, "--reference", "none", "--out", out, "--bootstrap", 200)
    assert r.exit_code == 0, r.output
    again = json.loads(out.read_text())
    assert again["model"] == str(run / "checkpoints" / "v1") and again["reference"] is None
    assert [q["greedy"]["text"] for q in again["questions"]] == [q["greedy"]["text"] for q in rep["questions"]]
    r = invoke("eval", "--run", run, "--tasks", "bundled:arithmetic")
    assert r.exit_code == 2 and "not both" in r.text
    r = invoke("eval", "--run", run, "--seed", 1, "--format", "jsonl")
    assert r.exit_code == 2 and "drop --format" in r.text


def test_eval_errors(tiny_model_dir, tmp_path):
    r = invoke("eval", "--model", tiny_model_dir, "--tasks", "bundled:arithmetic", "--k", 4, "--n-samples", 2)
    assert r.exit_code == 2 and "--n-samples (2) must be at least --k (4)" in r.text
    r = invoke("eval", "--model", tmp_path / "no" / "such" / "ckpt", "--tasks", "bundled:arithmetic")
    assert r.exit_code == 2 and "no such directory" in r.text
    r = invoke("eval", "--model", tiny_model_dir)
    assert r.exit_code == 2 and "give --tasks PATH or --run RUN_DIR" in r.text
    r = invoke("eval", "--model", tiny_model_dir, "--tasks", "bundled:arithmetic", "--split", "test")
    assert r.exit_code == 2 and "--split must be one of heldout, train, all" in r.text
    r = invoke("compare", tiny_model_dir, tiny_model_dir, "--tasks", "bundled:arithmetic", "--bootstrap", 0)
    assert r.exit_code == 2 and "--bootstrap must be at least 1" in r.text


# --------------------------------------------------------------------------------------------
# rlhf compare
# --------------------------------------------------------------------------------------------


def test_compare_model_with_itself(tiny_model_dir, tmp_path):
    out = tmp_path / "self.json"
    r = invoke("compare", tiny_model_dir, tiny_model_dir, "--tasks", "bundled:arithmetic", "--limit", 4,
               "--max-new-tokens", 4, "--bootstrap", 200, "--out", out)
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    assert rep["mcnemar"]["a_only"] == 0 and rep["mcnemar"]["b_only"] == 0 and rep["mcnemar"]["p_value"] == 1.0
    assert rep["difference"]["value"] == 0 and rep["difference"]["ci_low"] <= 0 <= rep["difference"]["ci_high"]
    assert all(q["a"]["text"] == q["b"]["text"] for q in rep["questions"])
    assert "p = 1" in r.text and len(CI.findall(r.text)) >= 6


def test_compare_two_models_counts_match_outcomes(digit_setup, tmp_path):
    out = tmp_path / "ab.json"
    # The models answer with one bare digit (no answer line): only the lenient reading grades them.
    r = invoke("compare", digit_setup["a"], digit_setup["b"], "--tasks", digit_setup["tasks"], "--split", "all",
               "--max-new-tokens", 1, "--reward-model", digit_setup["rm"], "--bootstrap", 500, "--out", out,
               "--verifier", "lenient")
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    qs = rep["questions"]
    a = [q["a"]["correct"] for q in qs]
    b = [q["b"]["correct"] for q in qs]
    assert len(qs) == rep["n"] == len(DIGIT_QUESTIONS)
    assert all(q["a"]["extracted"] in ("7", "3") and q["b"]["extracted"] in ("7", "3") for q in qs)
    a_only, b_only = sum(x and not y for x, y in zip(a, b)), sum(y and not x for x, y in zip(a, b))
    assert a_only + b_only > 0  # the two models really differ on some questions
    assert (rep["mcnemar"]["a_only"], rep["mcnemar"]["b_only"]) == (a_only, b_only)
    assert rep["counts"] == {"both": sum(x and y for x, y in zip(a, b)), "a_only": a_only, "b_only": b_only,
                             "neither": sum(not x and not y for x, y in zip(a, b))}
    assert rep["mcnemar"]["p_value"] == pytest.approx(mcnemar_exact(a, b)["p_value"])
    assert rep["accuracy_a"]["value"] == sum(a) / len(a) and rep["accuracy_b"]["value"] == sum(b) / len(b)
    assert rep["lenient"]["accuracy_a"]["value"] == rep["accuracy_a"]["value"]
    assert all(q["a"]["format_ok"] is False and "fallback" in q["a"]["reason"] for q in qs)
    d = rep["difference"]
    assert d["value"] == pytest.approx((sum(b) - sum(a)) / len(a)) and d["ci_low"] <= d["value"] <= d["ci_high"]
    assert (d["ci_low"], d["ci_high"]) == pytest.approx(newcombe_paired_diff_ci(a, b))
    assert d["bootstrap"]["ci_low"] <= d["value"] <= d["bootstrap"]["ci_high"]
    w = rep["win_rate"]
    assert w["wins_b"] + w["ties"] + w["wins_a"] == len(qs)
    assert w["win_rate_b"]["value"] == pytest.approx(sum(q["win_b"] for q in qs) / len(qs))
    assert rep["examples"] and all(next(q for q in qs if q["id"] == e)["a"]["correct"] != next(
        q for q in qs if q["id"] == e)["b"]["correct"] for e in rep["examples"])
    assert f"only A right {a_only}, only B right {b_only}" in r.text
    assert "questions where they differ" in r.text and rep["examples"][0] in r.text


def test_compare_pubmedqa(tiny_model_dir, digit_setup, shared_data, tmp_path):
    out = tmp_path / "pqa-ab.json"
    r = invoke("compare", tiny_model_dir, digit_setup["b"], "--tasks", shared_data / "pubmedqa" / "pqal_train.json",
               "--format", "pubmedqa", "--read-limit", 4, "--split", "all", "--max-new-tokens", 4,
               "--bootstrap", 200, "--out", out)
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    assert rep["n"] == 4 and rep["tasks"]["format"] == "pubmedqa"
    assert all(q["id"].startswith("pubmedqa-") for q in rep["questions"])
    c = rep["counts"]
    assert c["both"] + c["a_only"] + c["b_only"] + c["neither"] == 4
    assert "McNemar exact" in r.text and len(CI.findall(r.text)) >= 6


def test_llm_judge_win_rates(tiny_model_dir, digit_setup, tmp_path):
    """The LLM judge (a local chat model, both presentation orders) as a second win-rate judge."""
    pytest.importorskip("rlhf_workbench.feedback.judge")
    out = tmp_path / "judge.json"
    r = invoke("compare", digit_setup["a"], digit_setup["b"], "--tasks", digit_setup["tasks"], "--split", "all",
               "--limit", 4, "--max-new-tokens", 1, "--judge-model", tiny_model_dir, "--bootstrap", 200, "--out", out)
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    w, qs = rep["win_rate_judge"], rep["questions"]
    assert w["wins_b"] + w["ties"] + w["wins_a"] == 4 and w["calls"] == 2 * (4 - w["identical"])
    assert w["identical"] == sum(q["a"]["text"] == q["b"]["text"] for q in qs)
    assert w["win_rate_b"]["value"] == pytest.approx(sum(q["win_b_judge"] for q in qs) / 4)
    assert "win rate B over A (LLM judge)" in r.text
    out = tmp_path / "judge-eval.json"
    r = invoke("eval", "--model", digit_setup["a"], "--reference", digit_setup["b"], "--tasks", digit_setup["tasks"],
               "--split", "all", "--limit", 4, "--max-new-tokens", 1, "--judge-model", tiny_model_dir,
               "--bootstrap", 200, "--out", out)
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    j = rep["vs_reference"]["llm_judge"]
    assert j["wins"] + j["ties"] + j["losses"] == 4 and "win_rate" not in rep["metrics"]
    assert rep["metrics"]["win_rate_judge"]["value"] == pytest.approx(sum(q["win_judge"] for q in rep["questions"]) / 4)
    assert "LLM judge" in r.text
    r = invoke("compare", digit_setup["a"], digit_setup["b"], "--tasks", digit_setup["tasks"], "--split", "all",
               "--judge-api-model", "x")
    assert r.exit_code == 2 and "need --judge-url" in r.text
