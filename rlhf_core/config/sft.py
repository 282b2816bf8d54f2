"""Config of supervised fine-tuning (`rlhf sft`)."""

from __future__ import annotations

from pydantic import Field, model_validator

from rlhf_core.config.common import (DataConfig, ModelConfig, OfflineOptimConfig, RewardSpec, RuntimeConfig,
                                     TrackingConfig, _Config)
from rlhf_core.config.data import SFTDataConfig
from rlhf_core.config.online import HeldOutConfig, check_offline_heldout, offline_heldout


class SFTConfig(_Config):
    """SFT: fine-tune the policy on conversations (or prompt/completion pairs, or plain text), the loss on the
    assistant's tokens only."""

    model: ModelConfig = Field(ModelConfig(), description="the model to fine-tune")
    data: SFTDataConfig = Field(SFTDataConfig(), description="the conversations and their columns")
    max_length: int | None = Field(1024, ge=2, description=(
        "tokens per example; a longer one loses its end (None: no limit)"))
    optim: OfflineOptimConfig = Field(OfflineOptimConfig(epochs=2, batch_size=8, micro_batch_size=8, lr=2e-5),
                                      description="AdamW and the epoch loop (lr 2e-5: SmolLM2-135M on ~250 "
                                                  "conversations)")
    seed: int = Field(0, ge=0, description="eval hold-out (without eval_path) and per-epoch shuffling")
    keep_checkpoints: int = Field(2, ge=1, description="local checkpoints kept (the newest with its optimizer "
                                                       "state); the registry keeps those tracking.register_every names")
    runtime: RuntimeConfig = Field(RuntimeConfig(), description="device, dtype and processes of every model stage")
    tracking: TrackingConfig = Field(TrackingConfig(experiment="sft", registered_model="sft-policy"),
                                     description="MLflow experiment and registered model")
    heldout: HeldOutConfig = Field(
        offline_heldout(DataConfig(path="data/arithmetic_eval.jsonl"), [RewardSpec(function="arithmetic_answer")],
                        pass_threshold=1.0),
        description="evaluation during training: sampled answers to held-out prompts after epochs, judged by "
                    "heldout.rewards")

    @model_validator(mode="after")
    def _consistent(self) -> "SFTConfig":
        check_offline_heldout(self.heldout)
        return self
