"""Config of the evaluation flow: a candidate against the champion (or the reference) on held-out prompts."""

from __future__ import annotations

from pydantic import Field, model_validator

from rlhf_core.config.common import DataConfig, GenerationConfig, RewardSpec, RuntimeConfig, _Config
from rlhf_core.model_files import DEFAULT_MODEL, REGISTRY_PREFIX


class EvaluationTrackingConfig(_Config):
    """The MLflow experiment, the registry alias a winner gets, and whether the comparison is logged."""

    experiment: str = Field("evaluation", min_length=1, description="MLflow experiment")
    champion_alias: str = Field("champion", min_length=1, description="registry alias moved to a winning candidate")
    log_rollouts: bool = Field(True, description="log the per-response comparison as Parquet")


class PairwiseJudgeConfig(_Config):
    """A causal LM that reads both responses to a prompt and says which is better, asked in both orders; its
    preference decides each pair instead of the rewards (which are still measured and logged)."""

    model: str = Field(DEFAULT_MODEL, description="the judge: a built-in name, a local folder or an MLflow URI")
    template: str = Field(
        "Which response answers the request better? Answer A or B.\n\nRequest: {prompt}\n\nResponse A: {a}\n\n"
        "Response B: {b}", description="the question, with {prompt}, {a} and {b} where they go; rendered with the "
                                       "judge's chat template as one user turn")
    answers: list[str] = Field(["A", "B"], min_length=2, max_length=2, description=(
        "the answers naming the first and the second response; read from the judge's first reply token"))
    margin: float = Field(0.0, ge=0.0, lt=0.5, description=(
        "a pair is a tie unless the judge's preference (0..1, both orders averaged) is beyond 0.5 +- margin"))

    @model_validator(mode="after")
    def _template(self) -> "PairwiseJudgeConfig":
        try:
            self.template.format(prompt="", a="", b="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"template: only {{prompt}}, {{a}} and {{b}} may be filled in ({e!r}); write a literal "
                             "brace as {{ or }}") from None
        return self


class EvaluationConfig(_Config):
    """Sample the candidate and the baseline on the same held-out prompts with the same seeds, judge each pair,
    measure KL to the reference and response length; move the champion alias when the candidate wins."""

    candidate: str = Field("models:/grpo-policy@newest", description=(
        "the model under test: a registry URI (`models:/<name>@<alias>` or `models:/<name>/<version>`; needed to "
        "promote it), a local folder or a built-in name"))
    baseline: str = Field("champion", description=(
        "'champion': models:/<candidate's name>@champion, or the reference while there is no champion yet; "
        "'reference'; or any model (registry URI, folder, built-in name)"))
    reference: str = Field(DEFAULT_MODEL, description="KL is measured against this model (the one training "
                                                      "started from)")
    trust_remote_code: bool = Field(False, description="run Python code shipped with the models (off: safer)")
    data: DataConfig = DataConfig(path="data/arithmetic_eval.jsonl")
    num_prompts: int | None = Field(None, ge=1, description="held-out prompts used (None: all of them)")
    generation: GenerationConfig = GenerationConfig(group_size=4, max_new_tokens=32, temperature=0.7)
    rewards: list[RewardSpec] = Field([RewardSpec(function="arithmetic_answer")],
                                      min_length=1, description="the judge: reward functions and/or models, summed")
    pairwise_judge: PairwiseJudgeConfig | None = Field(None, description=(
        "decide each pair by an LLM judge comparing the two responses (None: by the rewards)"))
    seed: int = Field(0, ge=0, description="sampling seeds, the same for candidate and baseline")
    micro_batch_size: int = Field(16, ge=1, description="sequences per forward pass when scoring")
    promote: bool = Field(True, description="move the champion alias to the candidate when it wins")
    min_win_rate: float = Field(0.5, ge=0.0, lt=1.0, description="the candidate wins with a win rate above this")
    max_kl: float | None = Field(None, ge=0.0, description="and, if set, a mean KL to the reference at most this "
                                                           "(nats per response)")
    runtime: RuntimeConfig = RuntimeConfig()
    tracking: EvaluationTrackingConfig = EvaluationTrackingConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "EvaluationConfig":
        registered = self.candidate.startswith(REGISTRY_PREFIX)
        if self.promote and not registered:
            raise ValueError(f"promote: the candidate {self.candidate!r} is not a registry URI (models:/...); "
                             "register it or set promote: false")
        if self.baseline == "champion" and not registered:
            raise ValueError(f"baseline 'champion' needs a registry candidate (models:/...), got {self.candidate!r}; "
                             "name the baseline model instead")
        if self.generation.temperature == 0:
            raise ValueError("generation.temperature: the KL estimate needs sampled responses (temperature > 0)")
        names = [r.name for r in self.rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"rewards: a source is listed twice: {names}")
        return self
