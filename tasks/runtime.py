"""Loading a checkpoint for a stage, on the device and dtype the config names."""

from __future__ import annotations

from pathlib import Path

import torch

from rlhf_core.config import RuntimeConfig
from rlhf_core.models import load_causal_lm
from tasks.refs import CheckpointRef


def load_model(ref: CheckpointRef, runtime: RuntimeConfig, trust_remote_code: bool = False):
    if runtime.num_threads:
        torch.set_num_threads(runtime.num_threads)
    model, tokenizer = load_causal_lm(Path(ref.path), runtime.device, runtime.dtype, trust_remote_code)
    model.eval()  # dropout off everywhere: importance ratios need deterministic log-probs
    return model, tokenizer
