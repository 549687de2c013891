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
from pydantic import field_validator, model_validator


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
    mixed_precision: Literal["no", "bf16", "auto"] = Field(
        "bf16", description="autocast for forward passes (accelerate); auto: bf16 on a GPU that supports it or a "
        "CPU whose measured bf16 matmul is >= 1.5x fp32, else no (decided when the model is loaded)")
    lora: LoraConfig | None = Field(None, description="train LoRA adapters instead of all weights")
    gradient_checkpointing: bool = Field(False, description="trade compute for activation memory")
    cache_dir: str | None = Field(None, description="where converted GGUF models are cached (default ~/.cache/rlhf-workbench)")


class TaskConfig(_Strict):
    path: str = Field("bundled:arithmetic", description="task file, or bundled:<name>")
    format: str = Field("auto", description="auto, jsonl, gsm8k, pubmedqa, mcq or hf")
    limit: int | None = Field(None, ge=1, description="read at most this many tasks (None: all)")
    heldout_fraction: float | None = Field(None, description="fraction held out when the file has no split")
    heldout_size: int | None = Field(None, description="number held out when the file has no split")
    instruction: str | None = Field(None, description="final-answer instruction appended to every prompt (default per answer type)")
    max_heldout: int | None = Field(None, ge=1, description="evaluate on at most this many held-out tasks "
                                    "(None: all; 0 is refused: a run always evaluates on at least one)")
    verifier: Literal["strict", "lenient"] = Field(
        "strict", description="strict: only an explicit, unambiguous final answer equal to the key is rewarded; "
        "lenient (opt-in): the last number/label counts too (reported as a separate metric either way)")


class TeacherConfig(_Strict):
    """An API model as a second trace source (:mod:`rlhf_workbench.model.api_rollout`): any
    OpenAI-compatible chat endpoint answers each prompt of a round ``num_generations`` (M) times,
    next to the policy's K samples. Its traces are verified, filtered, grouped and ranked like the
    policy's; only the off-policy updates (DPO, KTO, SFT) train on them."""

    base_url: str = Field(..., description="API root with its version, e.g. https://api.openai.com/v1 or "
                          "http://127.0.0.1:8001/v1 (`rlhf serve-model`)")
    model: str = Field(..., min_length=1, description="model name sent with every request")
    api_key_env: str | None = Field(None, description="environment variable holding the API key (the key itself "
                                    "is never in the config); None sends no key")
    num_generations: int = Field(4, ge=1, description="M, teacher traces per prompt (one request each)")
    max_concurrency: int = Field(4, ge=1, description="requests in flight at once")
    timeout_s: float = Field(60.0, gt=0, description="seconds allowed per request (then it is retried)")
    max_retries: int = Field(5, ge=0, description="retries of one request after a timeout, a connection error, "
                             "HTTP 429 or 5xx (exponential backoff, Retry-After honoured)")
    backoff_s: float = Field(1.0, gt=0, description="first backoff (doubled after every retry, capped at 60 s)")
    temperature: float = Field(0.7, ge=0, le=2, description="teacher's sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="teacher's nucleus sampling")
    max_tokens: int | None = Field(None, ge=1, description="teacher's completion cap (None: rollout.max_new_tokens)")
    logprobs: bool = Field(True, description="ask for the sampled tokens' log-probs (`logprobs: true`); stored "
                           "when the endpoint returns them, absent otherwise")
    show_source: bool = Field(False, description="show annotators which model wrote a trace (default blind)")

    @field_validator("base_url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, got {url!r}")
        return url.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _check_key_env(cls, name: str | None) -> str | None:
        import re

        if name is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError("names an environment variable (e.g. OPENAI_API_KEY), not the key itself")
        return name


class RolloutConfig(_Strict):
    num_generations: int = Field(8, ge=2, description="K, traces sampled per prompt (TRL's num_generations)")
    prompts_per_round: int = Field(16, ge=1, description="prompts sampled per round")
    temperature: float = Field(0.7, gt=0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling")
    max_new_tokens: int = Field(64, ge=1, description="completion length cap")
    stop: list[str] = Field(default_factory=list, description="stop strings (completion cut after them)")
    batch_size: int = Field(64, ge=1, description="sequences generated per forward batch")
    teacher: TeacherConfig | None = Field(None, description="an API model's M traces per prompt next to the policy's "
                                          "K (None: the policy's samples only)")


class FeedbackSource(_Strict):
    """One ranking signal; :func:`rlhf_workbench.feedback.sources.make_ranker` ranks a prompt's verified
    traces by ``Σ_s weight_s · score_s`` over all sources.

    Scores: the rule sources ``format``, ``length``, ``verifier`` lie in [0, 1]; ``reward_model``
    is the reward model's scalar z-scored over the prompt's verified-correct traces (mean 0,
    std 1, so weights are comparable); ``judge`` is the trace's win rate in [0, 1] in
    position-swapped pairwise comparisons by an LLM judge (:mod:`rlhf_workbench.feedback.judge`).
    Fields that do not belong to the source's ``name`` are errors.
    """

    name: Literal["format", "length", "verifier", "reward_model", "judge"] = Field(
        ..., description="rule reward (format, length, verifier), a trained reward model, or an LLM judge")
    weight: float = Field(1.0, description="weight in the mixed score")
    target_tokens: int | None = Field(None, description="length source: preferred length (shorter is better if None)")
    path: str | None = Field(None, description="reward_model: directory of a trained reward model (load_reward_model)")
    url: str | None = Field(None, description="judge: base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8001/v1")
    model: str | None = Field(None, description="judge: local model (preset, hub id or path) run in-process, greedy")
    api_model: str | None = Field(None, description="judge with url: model name sent to the API (default: first id of GET <url>/models)")
    api_key_env: str | None = Field(None, description="judge with url: environment variable holding the API key (never the key itself)")
    timeout: float = Field(60.0, gt=0, description="judge with url: seconds allowed per HTTP request")
    max_pairs: int | None = Field(None, ge=1, description="judge: at most this many trace pairs per prompt, each judged in both orders (None: all)")

    @model_validator(mode="after")
    def _check_source_fields(self) -> "FeedbackSource":
        owners = {"path": "reward_model", "url": "judge", "model": "judge", "api_model": "judge",
                  "api_key_env": "judge", "timeout": "judge", "max_pairs": "judge"}
        given = {f for f in owners if getattr(self, f) != type(self).model_fields[f].default}  # model_dump round-trips
        for field, owner in owners.items():
            if field in given and self.name != owner:
                raise ValueError(f"field `{field}` only applies to the {owner} source, not {self.name!r}")
        if self.name == "reward_model" and not self.path:
            raise ValueError("reward_model source: field `path` is required (a trained reward-model directory)")
        if self.name == "judge":
            if (self.url is None) == (self.model is None):
                raise ValueError("judge source: set exactly one of `url` (an OpenAI-compatible base URL) "
                                 "or `model` (a local model name or path)")
            if self.url is not None and not self.url.startswith(("http://", "https://")):
                raise ValueError(f"judge source: field `url` must start with http:// or https://, got {self.url!r}")
            for field in ("api_model", "api_key_env", "timeout"):
                if self.url is None and field in given:
                    raise ValueError(f"judge source: field `{field}` only applies with `url`, not with a local `model`")
            import re

            if self.api_key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):
                raise ValueError("judge source: field `api_key_env` names an environment variable (e.g. "
                                 "OPENAI_API_KEY), not the key itself")
        return self


class SafetyConfig(_Strict):
    """Safety filter (:mod:`rlhf_workbench.feedback.safety`): flagged traces are treated like wrong ones
    (unranked, reward 0, never chosen). Needs at least one of the three checks."""

    patterns: list[str] = Field(default_factory=list, description="regexes, case-insensitive, searched anywhere in a trace")
    patterns_file: str | None = Field(None, description="file of regexes, one per line, '#' comments; bundled:<name> for a shipped list")
    classifier: str | None = Field(None, description="text-classification model (local path or hub id) run with transformers.pipeline")
    classifier_label: str = Field("unsafe", description="classifier: label whose probability flags a trace")
    threshold: float = Field(0.5, gt=0, le=1, description="classifier: flag when the label's probability is >= this")

    @field_validator("patterns")
    @classmethod
    def _compile_patterns(cls, patterns: list[str]) -> list[str]:
        import re

        for i, p in enumerate(patterns):
            try:
                re.compile(p, re.IGNORECASE)
            except re.error as e:
                raise ValueError(f"patterns[{i}]: invalid regex {p!r}: {e}") from e
        return patterns

    @model_validator(mode="after")
    def _check_checks(self) -> "SafetyConfig":
        if not (self.patterns or self.patterns_file or self.classifier):
            raise ValueError("safety: set at least one of `patterns`, `patterns_file` or `classifier`")
        for field in ("classifier_label", "threshold"):
            if getattr(self, field) != type(self).model_fields[field].default and not self.classifier:
                raise ValueError(f"safety: field `{field}` only applies with `classifier`")
        return self


class ConstitutionConfig(_Strict):
    """Constitutional self-critique and revision (:mod:`rlhf_workbench.feedback.constitution`; Bai et al. 2022):
    after a round's feedback, a critic critiques selected traces against a principle drawn from the
    constitution and revises them; a (revision > original) pair is kept only if the revision verifies
    (tasks with a key) or the judge prefers it in both orders (open tasks). Only DPO trains on the pairs."""

    path: str = Field("bundled:medical", description="constitution file (markdown: '## name', 'Critique:', "
                      "'Revision:' lines), or bundled:<name> (bundled:medical is illustrative, not clinical guidance)")
    critic: Literal["policy", "judge"] = Field(
        "policy", description="who critiques and revises: the policy itself, or the judge source of feedback.sources")
    max_revisions_per_round: int = Field(8, ge=1, description="traces revised per round (one per task at most)")
    temperature: float = Field(0.7, ge=0, le=2, description="policy critic's sampling temperature (0: greedy); "
                               "a judge critic always decodes greedily")
    max_new_tokens: int = Field(128, ge=1, description="cap of each critique and each revision")


class RefitConfig(_Strict):
    """The online reward model (:mod:`rlhf_workbench.feedback.online_rm`): refit every round on the
    experts' rankings of the policy's own samples, it scores the groups no expert ranked."""

    path: str = Field("run:reward_model", description="frozen-backbone reward model whose backbone, pooling and window "
                      "the refit head reads (run:<dir> = in the run directory); a model name gives a zero head")
    prior: bool = Field(False, description="also fit on the pipeline proxy's static training pairs every round")
    epochs: int = Field(30, ge=1, description="head epochs per refit (AdamW, cosine schedule)")
    lr: float = Field(3e-3, gt=0, description="head learning rate")
    weight_decay: float = Field(0.1, ge=0, description="head weight decay")


class FeedbackConfig(_Strict):
    source: Literal["rules", "human"] = Field(
        "rules", description="who ranks the verified traces: rule rewards now, or annotators in the web app"
    )
    min_rankings: int = Field(8, ge=1, description="human: submitted items needed before an update runs")
    annotators_per_item: int = Field(1, ge=1, description="human: annotators each item is shown to")
    poll_seconds: float = Field(2.0, gt=0, description="human: how often the worker checks for new rankings")
    min_verified: int = Field(2, ge=0, description="human: verified traces an item needs to be shown for ranking")
    claim_seconds: float = Field(1800.0, gt=0, description="human: an item served to an annotator is held for them "
                                 "this long; unsubmitted after that, it returns to the pool")
    mode: Literal["ranking", "pairwise"] = Field(
        "ranking", description="human: the annotation page's starting mode (annotators can switch): a full ranking "
        "of the verified traces, or pairwise A / B / tie judgments (rlhf_workbench.human.pairwise)")
    selection: Literal["fewest", "random", "uncertainty"] = Field(
        "fewest", description="human: which open item is served first: fewest annotations (the default, unchanged), "
        "a seeded random order, or the most informative (uncertainty: distinct verified traces the policy is "
        "least sure between; rlhf_workbench.human.selection)")
    guidelines: str | None = Field(
        None, description="human: annotation guidelines (a markdown file, or bundled:<name> for "
        "src/rlhf_workbench/data/<name>.md) shown before an annotator's first item and on demand "
        "(rlhf_workbench.human.guidelines); None: no guidelines page")
    adjudication_threshold: float | None = Field(
        None, ge=-1, le=1, description="human: an item whose annotators' mean Kendall tau-b is below this goes "
        "to the admins' Adjudicate queue and trains only on the adjudicated ranking (opposite pairwise choices: "
        "tau = -1; rlhf_workbench.human.adjudication); None: no adjudication")
    sources: list[FeedbackSource] = Field(
        default_factory=lambda: [FeedbackSource(name="format", weight=1.0), FeedbackSource(name="length", weight=0.1)],
        description="sources whose weighted sum ranks the verified traces of a prompt",
    )
    ranking_weight: float = Field(0.2, ge=0, description="GRPO reward = correct + ranking_weight * rank_reward (correct only)")
    refit: RefitConfig | None = Field(
        None, description="human: refit a reward model on every expert ranking so far each round and let it rank the "
        "round's groups no expert ranked (the expert budget is min_rankings items a round; None: experts' groups only)")
    length_penalty: float = Field(
        0.0, ge=0, lt=1, description="reward of a ranked trace minus length_penalty * its tokens / rollout.max_new_tokens "
        "(guards against length hacking; below 1, so a correct trace still beats a wrong one)")
    safety: SafetyConfig | None = Field(None, description="flag unsafe traces so they are never preferred (None: no filter)")
    thumbs: bool = Field(True, description="algorithm kto: each round also trains on the thumbs up / down not yet used "
                         "(web app playground, `rlhf serve-model --run` POST /v1/feedback) as desirable / undesirable "
                         "examples (rlhf_workbench.feedback.thumbs); other algorithms leave them stored")
    constitution: ConstitutionConfig | None = Field(
        None, description="constitutional critique -> revision pairs after each round's feedback (None: off)")

    @model_validator(mode="after")
    def _check_constitution_critic(self) -> "FeedbackConfig":
        if self.constitution is not None and self.constitution.critic == "judge" and not any(
                s.name == "judge" for s in self.sources):
            raise ValueError("constitution.critic: 'judge' needs a judge source in feedback.sources")
        if self.refit is not None and self.source != "human":
            raise ValueError("feedback.refit: the online reward model learns from the experts' rankings; "
                             "it needs feedback.source: human")
        return self


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


class PPOConfig(_Strict):
    """PPO with a learned critic (Ouyang et al. 2022; Huang et al. 2024 N+ details; TRL PPOv2 defaults)."""

    kl_coef: float = Field(0.05, ge=0, description="β of the per-token k1 KL penalty in the reward (TRL PPOv2 default)")
    cliprange: float = Field(0.2, gt=0, description="ε of the clipped policy ratio")
    cliprange_value: float = Field(0.2, gt=0, description="clip of the new values around the rollout values")
    vf_coef: float = Field(0.1, ge=0, description="weight of the value loss in the total loss")
    gamma: float = Field(1.0, ge=0, le=1, description="discount γ of GAE (1: undiscounted, as TRL)")
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ")
    ppo_epochs: int = Field(4, ge=1, description="passes over the rollout batch per round (TRL num_ppo_epochs)")
    num_mini_batches: int = Field(1, ge=1, description="optimizer steps per epoch (batch split evenly, shuffled)")
    whiten_advantages: bool = Field(True, description="standardise advantages over the batch's completion tokens")
    whiten_rewards: bool = Field(False, description="rescale per-token rewards to unit variance (mean kept)")
    entropy_coef: float = Field(0.0, ge=0, description="entropy bonus weight (>0 computes full-vocabulary entropy)")
    critic_lr: float = Field(
        1e-5, gt=0, description="critic learning rate (TRL/N+ use one lr for policy and value model; default = optim.lr)"
    )
    critic_init: str | None = Field(
        None, description="model the critic's backbone starts from (e.g. a reward model); default the policy's base model"
    )
    missing_eos_penalty: float | None = Field(
        None, ge=0, description="subtracted from the score of a completion cut by max_new_tokens (TRL/N+ detail)"
    )


class RLOOConfig(_Strict):
    """REINFORCE leave-one-out (Ahmadian et al. 2024) as TRL 1.16's ``RLOOTrainer``: the KL penalty
    is folded into the sequence reward, the loss clips a sequence-level ratio (see ``losses.rloo_*``)."""

    beta: float = Field(0.05, ge=0, description="β of the k1 KL penalty subtracted from the reward (TRL default 0.05; 0 skips the reference pass)")
    epsilon: float = Field(0.2, gt=0, description="lower clip range ε of the sequence ratio")
    epsilon_high: float | None = Field(None, gt=0, description="upper clip range; default ε")
    normalize_advantages: bool = Field(False, description="standardise the advantages over the whole batch (TRL default False)")
    reward_clip_range: tuple[float, float] | None = Field(None, description="(min, max) the rewards are clamped to before the baseline")


class KTOConfig(_Strict):
    """Kahneman-Tversky Optimization on unpaired desirable / undesirable traces (Ethayarajh et al. 2024; TRL defaults)."""

    beta: float = Field(0.1, gt=0, description="β of the implicit reward")
    desirable_weight: float = Field(1.0, gt=0, description="λ_D, weight of the desirable (thumbs-up) terms")
    undesirable_weight: float = Field(1.0, gt=0, description="λ_U, weight of the undesirable (thumbs-down) terms")


class SFTConfig(_Strict):
    """Rejection-sampling fine-tuning (RAFT, Dong et al. 2023; RFT, Yuan et al. 2023) on verified-correct traces."""

    warmup_rounds: int = Field(0, ge=0, description="initial rounds that run SFT on verified traces before the main algorithm")
    lr: float | None = Field(None, gt=0, description="learning rate for SFT phases (default optim.lr)")
    epochs: int = Field(1, ge=1, description="passes over the verified traces per SFT round")


class SFTWarmupStage(_Strict):
    """Supervised warm-up on the preferred replies of the training prompts (the first stage of the
    classic pipeline, Ouyang et al. 2022 §3.5), before round 1; the loop then starts from it."""

    examples: int = Field(256, ge=1, description="chosen replies trained on (the first N training tasks that have one)")
    epochs: int = Field(1, ge=1, description="passes over them")
    lr: float = Field(1e-5, gt=0, description="AdamW learning rate of the warm-up")
    max_reply_tokens: int = Field(128, ge=1, description="replies are cut to this many tokens (no eos when cut)")


class RewardStage(_Strict):
    """A reward model trained on the training prompts' (chosen, rejected) pairs before round 1."""

    pairs: int = Field(800, ge=2, description="pairs trained on; the gold model's are taken after the proxy's, disjoint")
    pooling: Literal["last", "mean", "mean_last"] = Field(
        "mean_last", description="frozen-backbone features the head reads (rlhf_workbench.train.rm_features)")
    max_tokens: int = Field(128, ge=8, description="each text is cut to its final N tokens (where the replies differ)")
    epochs: int = Field(30, ge=1, description="passes of the head over the cached features")
    lr: float = Field(3e-3, gt=0, description="head learning rate (AdamW, cosine schedule)")
    weight_decay: float = Field(0.1, ge=0, description="head weight decay")
    eval_pairs: int = Field(128, ge=0, description="held-out prompts' pairs its accuracy is measured on (each costs "
                            "two backbone forwards; 0: none)")


class PipelineConfig(_Strict):
    """The classic RLHF pipeline around the online loop (:mod:`rlhf_workbench.run.stages`): stages
    that run once before round 1, each skipped on resume when its output exists."""

    sft_warmup: SFTWarmupStage | None = Field(None, description="supervised warm-up on chosen replies (None: skip)")
    reward_model: RewardStage | None = Field(
        None, description="proxy reward model, saved to <run>/reward_model; a feedback source uses it as `path: run:reward_model`")
    gold_reward_model: RewardStage | None = Field(
        None, description="gold reward model on pairs the proxy never saw, saved to <run>/gold_reward_model; every "
        "evaluation reports gold and proxy reward and the gold win rate against the reference")
    max_prompt_tokens: int | None = Field(
        None, ge=8, description="drop tasks whose chat-templated prompt is longer (before the split; None: keep all)")


class OptimConfig(_Strict):
    lr: float = Field(1e-5, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    micro_batch_size: int = Field(16, ge=1, description="sequences per forward/backward")
    steps_per_round: int = Field(1, ge=1, description="optimizer steps per round (the batch is split evenly)")
    old_logps: Literal["auto", "recompute", "rollout"] = Field(
        "auto", description="GRPO/RLOO/PPO old log-probs: recompute (the policy's own before the first step, no "
        "gradient, in the training micro-batches: first-step ratio exactly 1, bf16 decode/training rounding is not "
        "mistaken for a policy change; one extra forward per round), rollout (those recorded while sampling, no "
        "cost), or auto: recompute under bf16 autocast, rollout in fp32 (where both agree to ~1e-5 nats)")


class EvalConfig(_Strict):
    max_new_tokens: int = Field(64, ge=1, description="completion cap for greedy evaluation")
    batch_size: int = Field(64, ge=1, description="prompts per generation batch")
    every_round: bool = Field(True, description="evaluate after every round (else only before and after)")
    round_subset: int | None = Field(None, ge=1, description="intermediate rounds evaluate only the first N held-out "
                                     "tasks (None: all)")
    kl_samples: int = Field(32, ge=0, description="held-out completions used for the KL to the reference")


class AppConfig(_Strict):
    """The web app's logins (``rlhf serve``)."""

    session_max_age_s: float = Field(43200.0, gt=0, description="a login is valid this long (seconds), then "
                                     "the user logs in again")
    login_max_failures: int = Field(5, ge=1, description="failed logins per username, and per client address, "
                                    "within login_window_s before further logins are refused")
    login_window_s: float = Field(300.0, gt=0, description="window (seconds) in which failed logins are counted")
    login_lockout_s: float = Field(300.0, gt=0, description="how long (seconds) logins are refused after too many "
                                   "failures")
    trusted_proxies: list[str] = Field(default_factory=list, description="addresses or networks of reverse proxies "
                                       "whose X-Forwarded-For header names the client (none: the TCP peer is the "
                                       "client, whatever the header says)")


class TrackingConfig(_Strict):
    """Experiment tracking through accelerate's trackers (:mod:`rlhf_workbench.run.tracking`): each
    round's metrics under the database's names, step = round. Not part of a run's identity: it
    may change between resumes."""

    backend: str = Field("auto", description="auto (TensorBoard when installed), tensorboard, wandb, trackio, none, "
                         "or another accelerate tracker name")
    dir: str | None = Field(None, description="TensorBoard folder (default <out>/tensorboard)")
    project: str | None = Field(None, description="W&B / trackio project (default: the run directory's name)")


class RunConfig(_Strict):
    """A whole run: the loop in :func:`rlhf_workbench.run.loop.run` reads nothing else."""

    algorithm: Literal["grpo", "dpo", "ppo", "rloo", "kto", "none"] = Field(
        "grpo", description="policy update; none: collection only (rlhf_workbench.run.collect: the teacher's traces "
        "are verified and ranked, no policy is loaded or trained)")
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
    rloo: RLOOConfig = Field(default_factory=RLOOConfig)
    kto: KTOConfig = Field(default_factory=KTOConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    app: AppConfig = Field(default_factory=AppConfig)
    pipeline: PipelineConfig | None = Field(None, description="stages before the loop: SFT warm-up, proxy and gold reward models")

    @model_validator(mode="after")
    def _check_teacher(self) -> "RunConfig":
        if self.rollout.teacher is not None and self.feedback.selection == "uncertainty":
            raise ValueError("feedback.selection: 'uncertainty' reads the policy's log-probs of every trace; the "
                             "teacher's traces (rollout.teacher) have none: use 'fewest' or 'random'")
        if self.algorithm != "none":
            return self
        if self.rollout.teacher is None:
            raise ValueError("algorithm: 'none' (collection only) needs rollout.teacher, the API model whose "
                             "traces are collected")
        for field, value in (("feedback.constitution", self.feedback.constitution),
                             ("feedback.refit", self.feedback.refit), ("pipeline", self.pipeline)):
            if value is not None:
                raise ValueError(f"{field}: needs a local policy; algorithm 'none' (collection only) loads none")
        return self


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
        if not all(key.split(".")):
            raise ConfigError(f"override {key!r}: expected a dotted field path such as tasks.path")
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                where = ".".join(parents[: i + 1])
                raise ConfigError(f"{path}: override {key}: field {where} holds the value {node!r}, "
                                  "not a section of fields")
        node[leaf] = value
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        lines = [f"{path}: invalid config"]
        for err in e.errors():
            lines.append(f"  field {'.'.join(str(x) for x in err['loc'])}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from e
