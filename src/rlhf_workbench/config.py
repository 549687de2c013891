"""Run configuration: typed pydantic models loaded from YAML.

Every hyperparameter lives here with a one-line description. ``load_config`` validates a
YAML file and reports the file and the field at fault; unknown keys are errors, so a
typo never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraConfig(_Strict):
    r: int = Field(16, description="LoRA rank")
    alpha: int = Field(32, description="LoRA scaling numerator (lora_alpha)")
    dropout: float = Field(0.0, description="dropout on the LoRA path")
    target_modules: list[str] | str = Field("all-linear", description="modules to adapt (peft syntax)")


class ModelConfig(_Strict):
    name: str = Field("smollm2-135m", description="preset short name, HF hub id, or local path")
    dtype: Literal["fp32", "bf16"] = Field("fp32", description="dtype of the stored weights")
    mixed_precision: Literal["no", "bf16"] = Field("bf16", description="autocast for forward passes (accelerate)")
    lora: LoraConfig | None = Field(None, description="train LoRA adapters instead of all weights")
    gradient_checkpointing: bool = Field(False, description="trade compute for activation memory")
    cache_dir: str | None = Field(None, description="where converted GGUF models are cached (default ~/.cache/rlhf-workbench)")


class TaskConfig(_Strict):
    path: str = Field("bundled:arithmetic", description="task file, or bundled:<name>")
    format: str = Field("auto", description="auto, jsonl, gsm8k, pubmedqa, mcq or hf")
    limit: int | None = Field(None, description="read at most this many tasks")
    heldout_fraction: float | None = Field(None, description="fraction held out when the file has no split")
    heldout_size: int | None = Field(None, description="number held out when the file has no split")
    instruction: str | None = Field(None, description="final-answer instruction appended to every prompt (default per answer type)")
    max_heldout: int | None = Field(None, description="evaluate on at most this many held-out tasks")


class RolloutConfig(_Strict):
    num_generations: int = Field(8, ge=2, description="K, traces sampled per prompt (TRL's num_generations)")
    prompts_per_round: int = Field(16, ge=1, description="prompts sampled per round")
    temperature: float = Field(0.7, gt=0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling")
    max_new_tokens: int = Field(64, ge=1, description="completion length cap")
    stop: list[str] = Field(default_factory=list, description="stop strings (completion cut after them)")
    batch_size: int = Field(64, ge=1, description="sequences generated per forward batch")


class FeedbackSource(_Strict):
    name: Literal["format", "length", "verifier"] = Field(..., description="rule reward source")
    weight: float = Field(1.0, description="weight in the mixed score")
    target_tokens: int | None = Field(None, description="length source: preferred length (shorter is better if None)")


class FeedbackConfig(_Strict):
    source: Literal["rules", "human"] = Field(
        "rules", description="who ranks the verified traces: rule rewards now, or annotators in the web app"
    )
    min_rankings: int = Field(8, ge=1, description="human: submitted items needed before an update runs")
    annotators_per_item: int = Field(1, ge=1, description="human: annotators each item is shown to")
    poll_seconds: float = Field(2.0, gt=0, description="human: how often the worker checks for new rankings")
    min_verified: int = Field(2, ge=0, description="human: verified traces an item needs to be shown for ranking")
    sources: list[FeedbackSource] = Field(
        default_factory=lambda: [FeedbackSource(name="format", weight=1.0), FeedbackSource(name="length", weight=0.1)],
        description="sources whose weighted sum ranks the verified traces of a prompt",
    )
    ranking_weight: float = Field(0.2, ge=0, description="GRPO reward = correct + ranking_weight * rank_reward (correct only)")


class DPOConfig(_Strict):
    beta: float = Field(0.1, gt=0, description="β of the implicit reward")
    loss_type: Literal["sigmoid", "hinge", "ipo", "robust"] = Field("sigmoid", description="DPO loss variant")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="cDPO / robust ε")
    pairing: Literal["best_vs_worst", "best_vs_wrong", "all_correct_vs_wrong"] = Field(
        "best_vs_wrong", description="which pairs a ranking yields (chosen is always verified-correct)"
    )
    max_pairs_per_prompt: int = Field(2, ge=1, description="cap on pairs per prompt per round")


class GRPOConfig(_Strict):
    beta: float = Field(0.0, ge=0, description="k3 KL coefficient β (0 skips the reference pass)")
    epsilon: float = Field(0.2, gt=0, description="clip range ε")
    epsilon_high: float | None = Field(None, description="upper clip range (DAPO clip-higher); default ε")
    loss_type: Literal["grpo", "dr_grpo", "bnpo", "dapo"] = Field("grpo", description="token aggregation")
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="advantage std scaling")


class OptimConfig(_Strict):
    lr: float = Field(1e-5, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    micro_batch_size: int = Field(16, ge=1, description="sequences per forward/backward")
    steps_per_round: int = Field(1, ge=1, description="optimizer steps per round (the batch is split evenly)")


class EvalConfig(_Strict):
    max_new_tokens: int = Field(64, ge=1, description="completion cap for greedy evaluation")
    batch_size: int = Field(64, ge=1, description="prompts per generation batch")
    every_round: bool = Field(True, description="evaluate after every round (else only before and after)")
    round_subset: int | None = Field(None, description="intermediate rounds evaluate only the first N held-out tasks")
    kl_samples: int = Field(32, ge=0, description="held-out completions used for the KL to the reference")


class RunConfig(_Strict):
    """A whole run: the loop in :func:`rlhf_workbench.loop.run` reads nothing else."""

    algorithm: Literal["grpo", "dpo"] = Field("grpo", description="policy update")
    rounds: int = Field(10, ge=0, description="online rounds (rollout -> update -> eval)")
    seed: int = Field(0, description="seed for sampling, task order and initialisation")
    db_url: str | None = Field(None, description="SQLAlchemy URL (default: sqlite file in the run directory)")
    keep_checkpoints: int = Field(2, ge=1, description="per-round checkpoints kept on disk (newest); resume needs 1")
    model: ModelConfig = Field(default_factory=ModelConfig)
    tasks: TaskConfig = Field(default_factory=TaskConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)


class ConfigError(ValueError):
    """A config file that cannot be read or validated; the message names the file and fields."""


def load_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    """Read a YAML file into a :class:`RunConfig`.

    Args:
        path: YAML file.
        overrides: dotted keys to set after reading, e.g. ``{"tasks.path": "data.jsonl"}``.

    Raises:
        ConfigError: missing file, bad YAML, or a field that fails validation (named with its
            dotted path).
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: config file not found") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    for key, value in (overrides or {}).items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        lines = [f"{path}: invalid config"]
        for err in e.errors():
            lines.append(f"  field {'.'.join(str(x) for x in err['loc'])}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from e
