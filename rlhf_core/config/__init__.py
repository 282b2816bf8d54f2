"""Configuration: one pydantic model per flow, built from shared sub-models.

The same object is the CLI's options, the Prefect UI's form (with server-side validation) and the MLflow
params. Fields that name a registry entry are `Literal`s equal to the registry's keys (a test checks it), so a
typo is rejected before any work starts. Core functions never receive these objects, only their values.
"""

from rlhf_core.config.common import (AdvantageConfig, GenerationConfig, KLConfig, LoraConfig, LossConfig, ModelConfig,
                                     OfflineOptimConfig, OptimConfig, RewardSpec, RuntimeConfig, TrackingConfig,
                                     check_lengths, check_online_config)
from rlhf_core.config.data import DataConfig, PreferenceDataConfig, SFTDataConfig, UnpairedDataConfig
from rlhf_core.config.evaluation import EvaluationConfig, EvaluationTrackingConfig, PairwiseJudgeConfig
from rlhf_core.config.offline import DPOConfig, JudgeConfig, KTOConfig, PreferenceDatasetConfig, RewardModelConfig
from rlhf_core.config.online import (DynamicSamplingConfig, GAEConfig, GRPOConfig, HeldOutConfig, PPOConfig,
                                     PPOKLConfig, ScoreConfig, ValueConfig)
from rlhf_core.config.sft import SFTConfig

__all__ = [
    "AdvantageConfig", "DataConfig", "GenerationConfig", "KLConfig", "LoraConfig", "LossConfig", "ModelConfig",
    "OfflineOptimConfig", "OptimConfig", "RewardSpec", "RuntimeConfig", "TrackingConfig", "check_lengths",
    "check_online_config",
    "DPOConfig", "JudgeConfig", "KTOConfig", "PreferenceDataConfig", "PreferenceDatasetConfig", "RewardModelConfig",
    "UnpairedDataConfig", "EvaluationConfig", "EvaluationTrackingConfig", "DynamicSamplingConfig", "GAEConfig",
    "HeldOutConfig", "GRPOConfig", "PPOConfig", "PPOKLConfig", "ScoreConfig", "ValueConfig", "SFTConfig",
    "SFTDataConfig", "PairwiseJudgeConfig",
]
