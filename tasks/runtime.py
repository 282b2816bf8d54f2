"""Loading a checkpoint for a stage, on the device and dtype the config names."""

from __future__ import annotations

from pathlib import Path

import torch

from rlhf_core.config import RuntimeConfig
from transformers import AutoModelForCausalLM

from rlhf_core.models import load_causal_lm, parse_dtype
from rlhf_core.value_head import CRITIC_DIR, ActorCritic
from tasks.refs import CheckpointRef


def apply_runtime(runtime: RuntimeConfig) -> None:
    """Process-wide settings a stage applies before loading a model."""
    if runtime.num_threads:
        torch.set_num_threads(runtime.num_threads)


def load_model(ref: CheckpointRef, runtime: RuntimeConfig, trust_remote_code: bool = False):
    apply_runtime(runtime)
    model, tokenizer = load_causal_lm(Path(ref.path), runtime.device, runtime.dtype, trust_remote_code)
    model.eval()  # dropout off everywhere: importance ratios need deterministic log-probs
    return model, tokenizer


def load_actor_critic(ref: CheckpointRef, runtime: RuntimeConfig, critic: str = "shared",
                      trust_remote_code: bool = False):
    """The policy with its value head (a zero head when the checkpoint has none yet), and its tokenizer.
    critic="separate": the critic backbone saved in the checkpoint, or a copy of the policy on first use."""
    model, tokenizer = load_model(ref, runtime, trust_remote_code)
    critic_model = None
    if critic == "separate":
        saved = Path(ref.path) / CRITIC_DIR
        critic_model = (AutoModelForCausalLM.from_pretrained(saved, dtype=parse_dtype(runtime.dtype),
                                                             trust_remote_code=trust_remote_code).to(runtime.device)
                        if saved.is_dir() else load_model(ref, runtime, trust_remote_code)[0])
    actor_critic = ActorCritic(model, critic_model)
    actor_critic.load_value_head(ref.path)
    return actor_critic.eval(), tokenizer
