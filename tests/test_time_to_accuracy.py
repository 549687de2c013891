"""The time-to-accuracy benchmark's bookkeeping (benchmarks/time_to_accuracy.py): the training
clock stops while evaluating, a side stops at the target, the turn-taking alternates the two
sides and lets the one left running go on alone, and the ratio is TRL's time over ours.
No model: the evaluations are real ``EvalResult`` objects built from given outcomes."""

from __future__ import annotations

import multiprocessing as mp
import time

from test_benchmarks_smoke import _load

from rlhf_workbench.evaluation.heldout import EvalResult

tta = _load("time_to_accuracy")


def _result(correct: list[bool]) -> EvalResult:
    n = len(correct)
    return EvalResult(task_ids=[f"t{i}" for i in range(n)], correct=correct, format_ok=[True] * n,
                      lengths=[5] * n, completions=[], lenient_correct=correct, ambiguous=[False] * n,
                      open=[False] * n)


def _slow(result: EvalResult, seconds: float):
    def run():
        time.sleep(seconds)
        return result
    return run


def test_clock_counts_training_only_and_stops_at_the_target():
    clock = tta.Clock(target=0.5, max_steps=10, max_seconds=1e9)
    _, done = clock.evaluate(0, _slow(_result([True, False, False, False]), 0.3))  # 25 %
    assert not done and clock.points[0]["wall_s"] == 0.0 and clock.points[0]["eval_s"] >= 0.3
    time.sleep(0.2)  # "training"
    _, done = clock.evaluate(1, _slow(_result([True, True, False, False]), 0.3))  # 50 % >= target
    assert done and clock.reached()
    assert 0.2 <= clock.points[1]["wall_s"] < 0.45  # the 0.6 s of evaluation are not counted
    assert clock.points[1]["accuracy"] == 0.5 and clock.points[1]["n"] == 4
    assert clock.task_ids == ["t0", "t1", "t2", "t3"]
    side = tta._side_result(clock, [0.0, 0.0, 0.0], {})
    assert side["time_to_target_s"] == clock.points[1]["wall_s"] and side["steps_to_target"] == 1


def test_untrained_model_at_the_target_does_not_stop_and_budgets_do():
    clock = tta.Clock(target=0.2, max_steps=2, max_seconds=1e9)
    assert clock.evaluate(0, _slow(_result([True, False]), 0))[1] is False  # 50 % before training
    assert clock.evaluate(1, _slow(_result([False, False]), 0))[1] is False
    assert clock.evaluate(2, _slow(_result([False, False]), 0))[1] is True  # step budget
    assert not clock.reached()
    clock = tta.Clock(target=0.9, max_steps=10, max_seconds=0.05)
    clock.evaluate(0, _slow(_result([False]), 0))
    time.sleep(0.1)
    assert clock.evaluate(1, _slow(_result([False]), 0))[1] is True  # time budget


def test_ratios():
    ours = {"reached_target": True, "time_to_target_s": 100.0, "steps_to_target": 2, "training_seconds": 100.0}
    trl = {"reached_target": True, "time_to_target_s": 250.0, "steps_to_target": 3, "training_seconds": 250.0}
    assert tta.ratios({"ours": ours, "trl": trl}) == {"time_to_target": 2.5, "steps_to_target": 1.5}
    missed = {**trl, "reached_target": False, "time_to_target_s": None, "steps_to_target": None,
              "training_seconds": 400.0}
    assert tta.ratios({"ours": ours, "trl": missed}) == {"time_to_target": None, "steps_to_target": None,
                                                         "time_to_target_lower_bound": 4.0}


def _side(turns, index: int, steps: int, log):
    turns.index = index
    clock = tta.Clock(target=2.0, max_steps=steps, max_seconds=1e9, turns=turns)
    for step in range(steps + 1):
        # stamped inside the turn (a Queue's items from two processes may arrive out of order)
        clock.evaluate(step, lambda: (log.put((time.monotonic(), index, step)), _result([False]))[1])
        time.sleep(0.01)


def test_turns_alternate_and_the_side_left_goes_on_alone():
    ctx = mp.get_context("fork")
    turns, log = tta.Turns(ctx, 2, timeout_s=20), ctx.Queue()
    procs = [ctx.Process(target=_side, args=(turns, i, n, log)) for i, n in ((0, 2), (1, 4))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0]
    order = [(i, step) for _, i, step in sorted(log.get(timeout=1) for _ in range(3 + 5))]
    # each side's evaluation k happens in its turn: 0's, then 1's, ...; 1 goes on alone after 0's last
    assert order == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2), (1, 3), (1, 4)]


def test_both_sides_follow_one_config(tmp_path):
    cfg = tta.bench_config({"config": str(tta.DEFAULT_CONFIG), "overrides": tta.QUICK, "max_steps": 2, "eval_n": 8})
    assert cfg.rounds == 2 and cfg.feedback.ranking_weight == 0 and cfg.tasks.max_heldout == 8
    assert cfg.eval.round_subset == 8 and cfg.eval.every_round and cfg.eval.kl_samples == 0
    args = tta.trl_args(cfg, str(tmp_path))
    assert args.generation_batch_size == 2 * 2 and args.per_device_train_batch_size == cfg.optim.micro_batch_size
    assert args.gradient_accumulation_steps == args.steps_per_generation == 1
    assert (args.num_generations, args.learning_rate, args.beta, args.max_completion_length) == (
        2, cfg.optim.lr, cfg.grpo.beta, 8)
    assert args.lr_scheduler_type == "constant" and args.bf16 == (cfg.model.mixed_precision == "bf16")
    # TRL's GRPOConfig defaults to gradient checkpointing on: the shared config's value (off) is set explicitly
    assert args.gradient_checkpointing is False and args.activation_checkpointing is False
    assert cfg.model.gradient_checkpointing is False
    assert args.save_steps == 1 and not args.save_only_model  # a checkpoint every step, as the loop's rounds


def _both_sides(tmp_path, overrides=()):
    cfg = tta.bench_config({"config": str(tta.DEFAULT_CONFIG), "overrides": [*tta.QUICK, *overrides],
                            "max_steps": 2, "eval_n": 8})
    args = tta.trl_args(cfg, str(tmp_path))
    precision = "bf16" if args.bf16 else "no"
    return tta.ours_settings(cfg, 2), tta.trl_settings(args, precision, 2)


def test_both_sides_record_every_compared_setting_and_they_are_equal(tmp_path):
    ours, trl = _both_sides(tmp_path)
    assert set(ours) == set(trl) == set(tta.COMPARED)
    for key in ("gradient_checkpointing", "mixed_precision", "threads", "micro_batch_size", "learning_rate",
                "epochs_per_generation", "clock", "checkpoint_saving"):
        assert key in tta.COMPARED
    assert ours == trl, {k: (ours[k], trl[k]) for k in ours if ours[k] != trl.get(k)}
    assert tta.settings_differences(ours, trl) == {"differences": {}, "unexplained": []}


def test_a_difference_without_a_reason_is_caught(tmp_path):
    """The check fails on the defect it exists for: TRL left with its default gradient checkpointing,
    another thread count, or no checkpoint saving."""
    import copy

    def changed(args, **fields):
        out = copy.copy(args)
        for k, v in fields.items():
            setattr(out, k, v)
        return out

    ours, trl = _both_sides(tmp_path)
    cfg = tta.bench_config({"config": str(tta.DEFAULT_CONFIG), "overrides": tta.QUICK, "max_steps": 2, "eval_n": 8})
    args = tta.trl_args(cfg, str(tmp_path))
    trl_default_gc = tta.trl_settings(changed(args, gradient_checkpointing=True, activation_checkpointing=True), "bf16" if args.bf16
                                      else "no", 2)
    got = tta.settings_differences(ours, trl_default_gc)
    assert got["unexplained"] == ["gradient_checkpointing"]
    assert got["differences"]["gradient_checkpointing"] == {"ours": False, "trl": True, "reason": None}
    unsaved = tta.trl_settings(changed(args, save_strategy="no"), "bf16" if args.bf16 else "no", 2)
    assert tta.settings_differences(ours, unsaved)["unexplained"] == ["checkpoint_saving"]
    assert tta.settings_differences(ours, {**trl, "threads": 1})["unexplained"] == ["threads"]
    assert tta.settings_differences(ours, {k: v for k, v in trl.items() if k != "clock"})["unexplained"] == ["clock"]
    explained = tta.settings_differences(ours, {**trl, "threads": 1}, {"threads": "a reason"})
    assert explained["unexplained"] == [] and explained["differences"]["threads"]["reason"] == "a reason"


def test_committed_result_records_equal_settings_for_both_sides():
    """``time_to_accuracy.json`` as committed: both sides' settings recorded and equal, or each
    difference with its reason. A file written before the settings were recorded needs a re-run."""
    import json
    from pathlib import Path

    import pytest

    result = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results" /
                         "time_to_accuracy.json").read_text())
    if "settings" not in result["systems"]["ours"]:
        pytest.skip("time_to_accuracy.json predates the recorded settings: re-run benchmarks/time_to_accuracy.py")
    ours, trl = result["systems"]["ours"]["settings"], result["systems"]["trl"]["settings"]
    assert set(ours) == set(trl) == set(tta.COMPARED)
    assert ours["gradient_checkpointing"] is False and trl["gradient_checkpointing"] is False
    got = tta.settings_differences(ours, trl, {k: v["reason"] for k, v in
                                               result["settings_differences"]["differences"].items() if v["reason"]})
    assert got["unexplained"] == []
    assert got == result["settings_differences"]


def test_readme_quotes_the_committed_result():
    """The README's time-to-accuracy paragraph holds the committed result file's numbers."""
    import json
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = json.loads((root / "benchmarks" / "results" / "time_to_accuracy.json").read_text())
    readme = (root / "README.md").read_text()
    start = readme.index("(`python benchmarks/time_to_accuracy.py`")
    para = readme[start: readme.index("time_to_accuracy.png", start)]
    para = re.sub(r"<!-- result: [^>]*-->", "", para)  # the figure markers (tests/test_readme_figures.py)
    ratio = result["ratios"]["time_to_target"]
    assert (f"`ratios.time_to_target` = **{ratio:.2f}**" if ratio is not None else "= null") in para
    for side in result["systems"].values():
        if side["reached_target"]:
            n = side["steps_to_target"]
            assert f"{n} step{'s' if n != 1 else ''}, **{side['time_to_target_s']:.0f} s**" in para
        else:
            assert f"not reached in {side['steps']} steps ({side['training_seconds']:.0f} s" in para
        for p in side["curve"]:
            assert f"{100 * p['accuracy']:.1f} % at {p['wall_s']:.0f} s" in para
