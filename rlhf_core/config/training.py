"""What one training stage needs, typed: how the trainable model is set up (`TrainingSetup`) and each algorithm's
update arguments (`GRPOUpdateArgs`, ...), each built from its flow's config by one function (`from_config`).

The same objects are the Prefect task's inputs (and so its cache key), the torchrun job's JSON
(`rlhf_core.distributed_worker`) and what `rlhf_core.training` reads: nothing is handed on as loose values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from rlhf_core.batch import ceil_div
from rlhf_core.config.common import (KLConfig, LoraConfig, LossConfig, ModelConfig, OfflineOptimConfig, OptimConfig,
                                     RuntimeConfig)
from rlhf_core.config.offline import DPOConfig, KTOConfig, RewardModelConfig
from rlhf_core.config.online import GRPOConfig, PPOConfig, ValueConfig

if TYPE_CHECKING:  # the SFT config imports the data configs, which need nothing from here
    from rlhf_core.config.sft import SFTConfig


class _Args(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TrainingSetup(_Args):
    """How a training stage loads and runs the trainable model: where (runtime), with which code, with LoRA."""

    runtime: RuntimeConfig
    trust_remote_code: bool = False
    lora: LoraConfig | None = None

    @classmethod
    def of(cls, model: ModelConfig, runtime: RuntimeConfig) -> "TrainingSetup":
        """A policy flow's setup: its model section and runtime."""
        return cls(runtime=runtime, trust_remote_code=model.trust_remote_code, lora=model.lora)

    @property
    def merged(self) -> bool:
        """Checkpoints hold the adapter merged into full weights (plus the adapter, to continue it)."""
        return self.lora is not None and self.lora.save == "merged"


class _UpdateArgs(_Args):
    """Update arguments with an `optim` section (the AdamW settings every algorithm has)."""

    @property
    def lr(self) -> float:
        return self.optim.lr

    @property
    def weight_decay(self) -> float:
        return self.optim.weight_decay


class _OnlineArgs(_UpdateArgs):
    """An online iteration's update: optim.epochs x optim.mini_batches steps on one scored rollout batch."""

    loss: LossConfig
    optim: OptimConfig
    temperature: float = Field(gt=0.0, description="the sampling temperature the log-probs are computed at")
    max_new_tokens: int
    seed: int

    def optimizer_steps(self, rows: int) -> int:
        return self.optim.epochs * self.optim.mini_batches

    @classmethod
    def _online_fields(cls, config: GRPOConfig | PPOConfig, iteration: int) -> dict:
        return dict(loss=config.loss, optim=config.optim, temperature=config.generation.temperature or 1.0,
                    max_new_tokens=config.generation.max_new_tokens, seed=config.seed + iteration)


class GRPOUpdateArgs(_OnlineArgs):
    algorithm: Literal["grpo"] = "grpo"
    kl: KLConfig

    @classmethod
    def from_config(cls, config: GRPOConfig, iteration: int) -> "GRPOUpdateArgs":
        return cls(**cls._online_fields(config, iteration), kl=config.kl)


class PPOUpdateArgs(_OnlineArgs):
    algorithm: Literal["ppo"] = "ppo"
    value: ValueConfig

    @classmethod
    def from_config(cls, config: PPOConfig, iteration: int) -> "PPOUpdateArgs":
        return cls(**cls._online_fields(config, iteration), value=config.value)


class _EpochArgs(_UpdateArgs):
    """An offline epoch: one shuffled pass over a table, `optim.batch_size` rows per optimizer step."""

    epoch: int = Field(ge=0)
    optim: OfflineOptimConfig
    seed: int = Field(description="the run's seed; each epoch shuffles with seed + epoch")

    @property
    def shuffle_seed(self) -> int:
        return self.seed + self.epoch

    def optimizer_steps(self, rows: int) -> int:
        return ceil_div(rows, self.optim.batch_size)

    @property
    def loop(self) -> dict:
        """The epoch loop's settings, as the offline update functions take them."""
        return dict(batch_size=self.optim.batch_size, micro_batch_size=self.optim.micro_batch_size,
                    max_grad_norm=self.optim.max_grad_norm, seed=self.shuffle_seed)

    @classmethod
    def _epoch_fields(cls, config: SFTConfig | DPOConfig | KTOConfig | RewardModelConfig, epoch: int) -> dict:
        return dict(epoch=epoch, optim=config.optim, seed=config.seed)


class DPOUpdateArgs(_EpochArgs):
    algorithm: Literal["dpo"] = "dpo"
    loss_type: str
    beta: float
    label_smoothing: float
    simpo_gamma: float
    rpo_alpha: float | None

    @classmethod
    def from_config(cls, config: DPOConfig, epoch: int) -> "DPOUpdateArgs":
        return cls(**cls._epoch_fields(config, epoch), loss_type=config.loss_type, beta=config.beta,
                   label_smoothing=config.label_smoothing, simpo_gamma=config.simpo_gamma,
                   rpo_alpha=config.rpo_alpha)


class KTOUpdateArgs(_EpochArgs):
    algorithm: Literal["kto"] = "kto"
    beta: float
    desirable_weight: float
    undesirable_weight: float

    @classmethod
    def from_config(cls, config: KTOConfig, epoch: int) -> "KTOUpdateArgs":
        return cls(**cls._epoch_fields(config, epoch), beta=config.beta, desirable_weight=config.desirable_weight,
                   undesirable_weight=config.undesirable_weight)


class RewardModelUpdateArgs(_EpochArgs):
    """`seed` also draws a backbone's new score head: the same head whichever epoch loads the backbone."""

    algorithm: Literal["reward_model"] = "reward_model"
    max_length: int
    center_coef: float

    @classmethod
    def from_config(cls, config: RewardModelConfig, epoch: int) -> "RewardModelUpdateArgs":
        return cls(**cls._epoch_fields(config, epoch), max_length=config.max_length, center_coef=config.center_coef)


class SFTUpdateArgs(_EpochArgs):
    algorithm: Literal["sft"] = "sft"

    @classmethod
    def from_config(cls, config: SFTConfig, epoch: int) -> "SFTUpdateArgs":
        return cls(**cls._epoch_fields(config, epoch))


UpdateArgs = Annotated[Union[SFTUpdateArgs, GRPOUpdateArgs, PPOUpdateArgs, DPOUpdateArgs, KTOUpdateArgs,
                             RewardModelUpdateArgs], Field(discriminator="algorithm")]


class LogprobPass(_Args):
    """How a no-grad log-prob pass over rollouts runs: at the sampling temperature, `micro_batch_size` rows per
    forward, the LM head in chunks of `chunk_size` tokens."""

    temperature: float = Field(gt=0.0)
    micro_batch_size: int = Field(ge=1)
    chunk_size: int = Field(ge=1)

    @classmethod
    def from_config(cls, config: GRPOConfig | PPOConfig) -> "LogprobPass":
        return cls(temperature=config.generation.temperature or 1.0, micro_batch_size=config.optim.micro_batch_size,
                   chunk_size=config.optim.logprob_chunk_size)
