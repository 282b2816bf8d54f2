"""Loading a checkpoint for a stage, on the device and dtype the config names."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

from rlhf_core.config import RuntimeConfig
from transformers import AutoModelForCausalLM

from rlhf_core.models import load_causal_lm, parse_dtype, use_mixed_precision
from rlhf_core.value_head import CRITIC_DIR, ActorCritic
from tasks.refs import CheckpointRef


def apply_runtime(runtime: RuntimeConfig) -> None:
    """Process-wide settings a stage applies before loading a model."""
    if runtime.num_threads:
        torch.set_num_threads(runtime.num_threads)


class ModelCache:
    """Models kept in memory between the stages of one process, keyed by checkpoint content hash and how they
    were loaded: an iteration's generation, scoring and update stop re-reading the same weights (and the update
    its optimizer state) from disk. Stages in other processes simply miss and load from disk.

    Readers share the cached object (`get`). A stage that changes weights `take`s its model out of the cache, so
    nothing cached ever differs from the checkpoint its key names, and puts the result back under the new
    checkpoint's hash once it is saved (`put`)."""

    def __init__(self, capacity: int = 3):
        self.capacity = capacity
        self.entries: OrderedDict[tuple, tuple] = OrderedDict()  # key -> (model, tokenizer, optimizer or None)

    @staticmethod
    def key(sha256: str, runtime: RuntimeConfig, trust_remote_code: bool) -> tuple:
        return (sha256, runtime.device, runtime.dtype, runtime.mixed_precision, trust_remote_code)

    def get(self, key: tuple) -> tuple | None:
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        return None

    def take(self, key: tuple) -> tuple | None:
        return self.entries.pop(key, None)

    def put(self, key: tuple, model, tokenizer, optimizer=None) -> None:
        self.entries[key] = (model, tokenizer, optimizer)
        self.entries.move_to_end(key)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)


MODELS = ModelCache()


def load_model(ref: CheckpointRef, runtime: RuntimeConfig, trust_remote_code: bool = False,
               for_training: bool = False):
    """(model, tokenizer) of a checkpoint, from memory when an earlier stage of this process had it.
    for_training: the caller will change the weights, so it gets an object no one else holds."""
    apply_runtime(runtime)
    key = ModelCache.key(ref.sha256, runtime, trust_remote_code)
    cached = MODELS.take(key) if for_training else MODELS.get(key)
    if cached is not None:
        return cached[0], cached[1]
    model, tokenizer = load_causal_lm(Path(ref.path), runtime.device, runtime.dtype, trust_remote_code)
    use_mixed_precision(model, runtime.device, runtime.mixed_precision)
    model.eval()  # dropout off everywhere: importance ratios need deterministic log-probs
    if not for_training:
        MODELS.put(key, model, tokenizer)
    return model, tokenizer


def load_actor_critic(ref: CheckpointRef, runtime: RuntimeConfig, critic: str = "shared",
                      trust_remote_code: bool = False, for_training: bool = False):
    """The policy with its value head (a zero head when the checkpoint has none yet), and its tokenizer.
    critic="separate": the critic backbone saved in the checkpoint, or a copy of the policy on first use."""
    model, tokenizer = load_model(ref, runtime, trust_remote_code, for_training)
    critic_model = None
    if critic == "separate":  # read from disk every time: the critic must never be the (cached) policy object
        saved = Path(ref.path) / CRITIC_DIR
        critic_model = (AutoModelForCausalLM.from_pretrained(saved, dtype=parse_dtype(runtime.dtype),
                                                             trust_remote_code=trust_remote_code).to(runtime.device)
                        if saved.is_dir() else load_causal_lm(Path(ref.path), runtime.device, runtime.dtype,
                                                              trust_remote_code)[0].eval())
    actor_critic = ActorCritic(model, critic_model)
    actor_critic.load_value_head(ref.path)
    return actor_critic.eval(), tokenizer
