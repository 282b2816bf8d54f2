"""Config of the whole chain as one flow (`rlhf pipeline`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rlhf_core.config.common import (DataConfig, GenerationConfig, OfflineOptimConfig, RewardSpec, TrackingConfig,
                                     _Config)
from rlhf_core.config.data import SFTDataConfig
from rlhf_core.config.evaluation import EvaluationConfig, EvaluationTrackingConfig
from rlhf_core.config.offline import DPOConfig, PreferenceDatasetConfig, RewardModelConfig
from rlhf_core.config.online import GRPOConfig, PPOConfig, PPOKLConfig, ScoreConfig
from rlhf_core.config.sft import SFTConfig

PIPELINE_EXPERIMENT = "pipeline"


def _stage_tracking(registered_model: str) -> TrackingConfig:
    return TrackingConfig(experiment=PIPELINE_EXPERIMENT, registered_model=registered_model)


class PipelineConfig(_Config):
    """The classic chain as one flow: SFT -> preference data -> reward model -> PPO, GRPO or DPO -> evaluation and
    promotion. Each stage is its flow (a subflow with its own MLflow run under the pipeline's); the pipeline links
    them: every stage after SFT starts from the SFT checkpoint's registered version, the reward model trains on
    the preference data, the RL stage optimises that reward model (DPO: the pairs), and the evaluation compares
    its result with the champion (the SFT policy while there is none)."""

    algorithm: Literal["ppo", "grpo", "dpo"] = Field("ppo", description=(
        "the RL stage: ppo or grpo against the trained reward model, or dpo on the preference pairs (then no "
        "reward model is trained)"))
    sft: SFTConfig = Field(SFTConfig(
        data=SFTDataConfig(path="data/sft/reviews_train.jsonl", eval_path="data/sft/reviews_eval.jsonl"),
        optim=OfflineOptimConfig(epochs=1, batch_size=8, micro_batch_size=8, lr=2e-5), max_length=256,
        tracking=_stage_tracking("pipeline-sft")), description=(
        "stage 1; its `model` is the chain's base model. Default: the preferred reviews of the shipped pairs"))
    preference_data: PreferenceDatasetConfig = Field(PreferenceDatasetConfig(
        num_prompts=64, tracking=TrackingConfig(experiment=PIPELINE_EXPERIMENT)), description=(
        "stage 2, sampling from the SFT policy (its `model` is replaced by it)"))
    reward_model: RewardModelConfig = Field(RewardModelConfig(tracking=_stage_tracking("pipeline-reward-model")),
                                            description=(
        "stage 3, on stage 2's pairs with eval_fraction of them held out (its data.path and eval_path are "
        "replaced)"))
    ppo: PPOConfig = Field(PPOConfig(
        iterations=8, prompts_per_iteration=16, kl=PPOKLConfig(coef=0.05, target=4.0, horizon=64),
        scores=ScoreConfig(missing_eos_penalty=1.0), tracking=_stage_tracking("pipeline-ppo")), description=(
        "stage 4 with algorithm ppo: starts from the SFT policy; rewards = the trained reward model (its `model` "
        "and the reward models in `rewards` are replaced; reward functions in `rewards` are kept)"))
    grpo: GRPOConfig = Field(GRPOConfig(
        iterations=8, prompts_per_iteration=4, data=DataConfig(path="data/review_prompts.jsonl", extra_columns=[]),
        generation=GenerationConfig(group_size=4, max_new_tokens=32, temperature=0.7),
        rewards=[RewardSpec(model="models:/pipeline-reward-model@newest")], tracking=_stage_tracking("pipeline-grpo")),
        description="stage 4 with algorithm grpo, linked like ppo")
    dpo: DPOConfig = Field(DPOConfig(tracking=_stage_tracking("pipeline-dpo")), description=(
        "stage 4 with algorithm dpo: starts from the SFT policy, on stage 2's pairs"))
    evaluation: EvaluationConfig = Field(EvaluationConfig(
        data=DataConfig(path="data/review_prompts_eval.jsonl", extra_columns=[]),
        generation=GenerationConfig(group_size=2, max_new_tokens=32, temperature=0.7),
        rewards=[RewardSpec(function="vader_sentiment")],
        tracking=EvaluationTrackingConfig(experiment=PIPELINE_EXPERIMENT)), description=(
        "stage 5: the RL stage's newest version against the champion (the SFT policy while there is none), judged "
        "by `rewards` on held-out prompts; the winner becomes the champion (its candidate and reference are "
        "replaced)"))
    tracking: TrackingConfig = Field(TrackingConfig(experiment=PIPELINE_EXPERIMENT), description=(
        "the MLflow experiment of the pipeline's run and of every stage's run nested under it"))

    @model_validator(mode="after")
    def _one_experiment(self) -> "PipelineConfig":
        """The stages' runs nest under the pipeline's run, which MLflow shows within one experiment."""
        for name in ("sft", "preference_data", "reward_model", "ppo", "grpo", "dpo", "evaluation"):
            stage = getattr(self, name)
            if stage.tracking.experiment != self.tracking.experiment:
                stage.tracking.experiment = self.tracking.experiment
        return self

