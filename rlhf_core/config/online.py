"""Configs of the online flows: GRPO and PPO."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from rlhf_core.config.common import (GROUP_BASELINED_ESTIMATORS, REWARDS_DESCRIPTION, SEED_DESCRIPTION,
                                     TOKEN_LEVEL_ESTIMATORS, AdvantageConfig, DataConfig, GenerationConfig, KLConfig,
                                     LossConfig, ModelConfig, OptimConfig, RewardSpec, RunSeed, RuntimeConfig,
                                     TrackingConfig, _Config, check_online_config)


class HeldOutConfig(_Config):
    """Evaluation during training: the policy answers held-out prompts `samples` times each, on the start model, then
    every `every` iterations (epochs) and after the last; mean reward, pass@k and maj@k go to MLflow (step =
    iterations or epochs done)."""

    every: int = Field(0, ge=0, description="iterations (SFT, DPO, KTO: epochs) between held-out evaluations "
                                            "(0: none)")
    data: DataConfig = Field(DataConfig(path="data/arithmetic_eval.jsonl"), description="the held-out prompts")
    num_prompts: int | None = Field(None, ge=1, description="held-out prompts used, a seeded sample (None: all)")
    rewards: list[RewardSpec] | None = Field(None, description=(
        "the held-out judge: reward functions, reward models and/or LLM judges, summed (None: the flow's own "
        "rewards; needed by SFT, DPO and KTO, which have none)"))
    generation: GenerationConfig | None = Field(None, description=(
        "how the held-out responses are sampled (None: the flow's generation section; SFT, DPO, KTO: the defaults)"))
    samples: int = Field(4, ge=1, le=256, description=(
        "k: responses per prompt, sampled with the same seeds every time (generation.group_size is replaced by k)"))
    pass_threshold: float = Field(1.0, description=(
        "a response is correct when its summed reward is at least this (pass@k: a prompt with a correct response "
        "among its k; maj@k: a prompt whose most frequent answer is correct)"))


def offline_heldout(data: DataConfig, rewards: list[RewardSpec], pass_threshold: float) -> HeldOutConfig:
    """The `heldout` default of a flow without rewards of its own (SFT, DPO, KTO): its judge named, off (every 0)."""
    return HeldOutConfig(data=data, rewards=rewards, pass_threshold=pass_threshold)


def check_offline_heldout(heldout: HeldOutConfig) -> None:
    if heldout.every and not heldout.rewards:
        raise ValueError("heldout.rewards: SFT, DPO and KTO have no rewards of their own to judge the held-out "
                         "responses with: name them")


class DynamicSamplingConfig(_Config):
    """DAPO's dynamic sampling (Yu et al. 2025, section 3.2): groups whose rewards are all equal carry no
    gradient under a group baseline; they are dropped and more prompts are sampled, generated and scored until the
    batch holds prompts_per_iteration informative groups."""

    enabled: bool = Field(False, description="drop groups whose rewards are all equal and sample more prompts")
    max_rounds: int = Field(3, ge=1, le=100, description=(
        "generation rounds per iteration at most, the first included; a batch still short after them is filled "
        "with the earliest dropped groups (advantage 0: only the KL and entropy terms see them)"))


class GRPOConfig(_Config):
    """GRPO: sample G responses per prompt, reward them, normalise rewards within each group, update."""

    iterations: int = Field(12, ge=1, le=100_000, description=(
        "iterations of sample -> generate -> score -> advantages -> update"))
    prompts_per_iteration: int = Field(8, ge=1, le=100_000, description="P: prompts per iteration (B = P * G)")
    seed: RunSeed = Field(0, description=SEED_DESCRIPTION)
    keep_checkpoints: int = Field(2, ge=1, description="local checkpoints kept (the newest with its optimizer "
                                                       "state); the registry keeps those tracking.register_every names")
    model: ModelConfig = ModelConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    data: DataConfig = DataConfig()
    generation: GenerationConfig = GenerationConfig()
    kl: KLConfig = KLConfig()  # before rewards: their check reads it
    rewards: list[RewardSpec] = Field([RewardSpec(function="arithmetic_answer")], description=(
        f"{REWARDS_DESCRIPTION}; empty only where the KL is the reward (distillation: kl.placement reward)"))
    advantage: AdvantageConfig = AdvantageConfig()
    dynamic_sampling: DynamicSamplingConfig = DynamicSamplingConfig()
    heldout: HeldOutConfig = HeldOutConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("rewards")
    @classmethod
    def _some_reward(cls, rewards: list[RewardSpec], info: ValidationInfo) -> list[RewardSpec]:
        kl = info.data.get("kl")
        if not rewards and not (kl is not None and kl.placement == "reward" and kl.coef > 0):
            raise ValueError("no reward source: name one, or make the KL the reward (kl.coef > 0, kl.placement "
                             "reward: on-policy distillation from kl.reference)")
        return rewards

    @model_validator(mode="after")
    def _consistent(self) -> "GRPOConfig":
        check_online_config(self)
        batch, processes = self.prompts_per_iteration * self.generation.group_size, self.runtime.num_processes
        if batch % processes:  # the old-log-prob pass splits the batch's rows evenly over the processes
            raise ValueError(f"{batch} responses per update (prompts_per_iteration * generation.group_size) do not "
                             f"split evenly over runtime.num_processes={processes}")
        if self.loss.tis_cap is not None and self.generation.temperature == 0:
            raise ValueError("loss.tis_cap needs sampling (generation.temperature > 0): greedy decoding has no "
                             "sampling distribution to correct")
        if self.generation.group_size == 1 and self.advantage.estimator in GROUP_BASELINED_ESTIMATORS:
            raise ValueError(f"advantage.estimator {self.advantage.estimator!r} baselines each reward by the other "
                             "responses to its prompt: with generation.group_size 1 every advantage is 0 and "
                             "nothing is learnt; sample 2 or more per prompt, or use reinforce_pp")
        if self.dynamic_sampling.enabled and (self.generation.group_size == 1 or
                                              self.advantage.estimator not in GROUP_BASELINED_ESTIMATORS):
            raise ValueError("dynamic_sampling drops groups whose rewards are all equal, which only carry no "
                             "gradient when each reward is baselined by its group: it needs generation.group_size "
                             f">= 2 and a group-baselined advantage.estimator {sorted(GROUP_BASELINED_ESTIMATORS)}")
        if self.kl.placement == "reward" and self.advantage.estimator not in TOKEN_LEVEL_ESTIMATORS:
            raise ValueError(f"kl.placement 'reward' folds the KL into per-token rewards, which only the token-level "
                             f"estimators {list(TOKEN_LEVEL_ESTIMATORS)} use; advantage.estimator "
                             f"{self.advantage.estimator!r} would ignore it: choose one of them or placement 'loss'")
        return self


class PPOKLConfig(_Config):
    """The KL penalty to the reference in PPO's per-token reward, fixed or adaptive."""

    coef: float = Field(0.05, ge=0.0, description="beta: (initial) weight of the KL penalty in the per-token reward")
    estimator: Literal["k1", "k2", "k3"] = Field("k1", description=(
        "KL estimator per token in the per-token reward: k1, k2 or k3"))
    target: float | None = Field(None, gt=0.0, description="KL target of the adaptive controller (Ziegler et al. "
                                                            "2019); None keeps beta fixed")
    horizon: int = Field(10000, ge=1, description="adaptive controller horizon, in sequences")


class GAEConfig(_Config):
    """Generalised advantage estimation (Schulman et al. 2016) over the per-token rewards and values."""

    gamma: float = Field(1.0, ge=0.0, le=1.0, description="discount per token (1.0: none)")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="GAE's lambda: 1 = Monte-Carlo returns, 0 = one-step TD")
    whiten_advantages: bool = Field(True, description="normalise advantages over the batch (mean 0, std 1)")


class ValueConfig(_Config):
    """The critic: shared or separate backbone, value-loss weight and clip, value-head learning rate."""

    critic: Literal["shared", "separate"] = Field("shared", description="shared: a value head on the policy's "
                                                  "backbone; separate: a copy of the backbone for the critic")
    vf_coef: float = Field(0.1, ge=0.0, description="weight of the value loss in the total loss")
    head_lr: float | None = Field(1e-3, gt=0.0, le=1.0, description=(
        "learning rate of the value head (None: optim.lr). The zero-initialised head is tiny; at a policy-sized "
        "lr it would barely move in a short run, leaving PPO without a baseline"))
    clip_range_value: float = Field(0.2, gt=0.0, description="values move at most this far from the old values")


class ScoreConfig(_Config):
    """Shaping of the sequence score put on the response's last token."""

    missing_eos_penalty: float | None = Field(None, ge=0.0, description="subtracted from responses without EOS")
    clip: float | None = Field(None, gt=0.0, description="clip scores to [-clip, clip]")
    normalize: bool = Field(False, description="standardise scores over the batch")


class PPOConfig(_Config):
    """PPO: actor-critic sharing the backbone, KL-penalised per-token rewards, GAE, clipped policy and value
    losses, several epochs of mini-batches per rollout batch."""

    iterations: int = Field(12, ge=1, le=100_000, description=(
        "iterations of sample -> generate -> values -> score -> GAE -> update"))
    prompts_per_iteration: int = Field(16, ge=1, le=100_000, description=(
        "prompts per iteration (B = prompts_per_iteration * generation.group_size)"))
    seed: RunSeed = Field(0, description=SEED_DESCRIPTION)
    keep_checkpoints: int = Field(2, ge=1, description="local checkpoints kept (the newest with its optimizer "
                                                       "state); the registry keeps those tracking.register_every names")
    model: ModelConfig = ModelConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    data: DataConfig = DataConfig(path="data/review_prompts.jsonl", extra_columns=[])
    generation: GenerationConfig = GenerationConfig(group_size=1, max_new_tokens=32, temperature=0.7)
    rewards: list[RewardSpec] = Field([RewardSpec(model="models:/reward-model@newest")],
                                      min_length=1, description=REWARDS_DESCRIPTION)
    kl: PPOKLConfig = PPOKLConfig()
    heldout: HeldOutConfig = HeldOutConfig(data=DataConfig(path="data/review_prompts_eval.jsonl", extra_columns=[]),
                                           pass_threshold=0.0)
    gae: GAEConfig = GAEConfig()
    value: ValueConfig = ValueConfig()
    scores: ScoreConfig = ScoreConfig()
    loss: LossConfig = LossConfig(clip_eps_high=0.2)
    optim: OptimConfig = OptimConfig(lr=1e-5, epochs=2, mini_batches=2)
    tracking: TrackingConfig = TrackingConfig(experiment="ppo", registered_model="ppo-policy")

    @model_validator(mode="after")
    def _consistent(self) -> "PPOConfig":
        check_online_config(self)
        if self.model.lora is not None and self.value.critic == "separate":
            raise ValueError("model.lora trains the policy's adapter only: use value.critic='shared' (the value "
                             "head then trains in full beside the adapter)")
        if self.loss.tis_cap is not None:
            raise ValueError("loss.tis_cap (truncated importance sampling) is implemented for GRPO only; set it to "
                             "null")
        return self
