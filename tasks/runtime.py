"""Loading a checkpoint for a stage, on the device and dtype the config names."""

from __future__ import annotations

import threading
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from rlhf_core.config import LoraConfig, RuntimeConfig
from transformers import AutoModelForCausalLM

from rlhf_core.lora import adapter_disabled, adapter_folder, add_lora, has_adapter, mark_adapter_trainable
from rlhf_core.models import (ModelLoadError, enable_gradient_checkpointing, load_causal_lm, parse_dtype,
                              use_mixed_precision)
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
_LOADING = threading.RLock()


def load_model(ref: CheckpointRef, runtime: RuntimeConfig, trust_remote_code: bool = False,
               for_training: bool = False, lora: LoraConfig | None = None):
    """(model, tokenizer) of a checkpoint, from memory when an earlier stage of this process had it.
    for_training: the caller will change the weights, so it gets an object no one else holds; with `lora`, a
    merged LoRA checkpoint comes back as its base + adapter, to continue that adapter (`prepare_training`)."""
    apply_runtime(runtime)
    key = ModelCache.key(ref.sha256, runtime, trust_remote_code)
    continue_adapter = for_training and lora is not None
    with _LOADING:  # shards on the thread runner: one loads, the others then find it in the cache
        cached = MODELS.take(key) if for_training else MODELS.get(key)
        # a merged checkpoint's merged weights (cached by generation) cannot continue its adapter
        if cached is not None and not (continue_adapter and not has_adapter(cached[0]) and adapter_folder(ref.path)):
            return cached[0], cached[1]
        model, tokenizer = load_causal_lm(Path(ref.path), runtime.device, runtime.dtype, trust_remote_code,
                                          with_adapter=continue_adapter)
        use_mixed_precision(model, runtime.device, runtime.mixed_precision)
        model.eval()  # dropout off everywhere: importance ratios need deterministic log-probs
        if not for_training:
            MODELS.put(key, model, tokenizer)
    return model, tokenizer


def prepare_training(model, lora: LoraConfig | None, runtime: RuntimeConfig,
                     modules_to_save: list[str] | None = None) -> bool:
    """Make a loaded model trainable as configured: with `lora`, its adapter (continued, or a fresh one plus
    `modules_to_save`) is all that trains; gradient checkpointing when the runtime asks. Returns True for a fresh
    adapter, whose optimizer must not restore the state saved beside the checkpoint (other parameters)."""
    fresh = False
    if lora is None and has_adapter(model):
        raise ModelLoadError("the checkpoint holds a LoRA adapter: continue it with model.lora, or fully fine-tune "
                             "a merged checkpoint (model.lora.save: merged)")
    if lora is not None and has_adapter(model):
        mark_adapter_trainable(model)
    elif lora is not None:
        add_lora(model, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules,
                 modules_to_save=modules_to_save)
        fresh = True
    if runtime.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return fresh


@contextmanager
def reference_model(ref: CheckpointRef, runtime: RuntimeConfig, trust_remote_code: bool = False):
    """(model, tokenizer) of a reference checkpoint for the block; its LoRA adapter disabled when the ref says so
    (`ref.adapter_disabled`): a LoRA run's reference is the policy itself, already in memory, minus the adapter."""
    model, tokenizer = load_model(ref, runtime, trust_remote_code)
    with adapter_disabled(model) if ref.adapter_disabled else nullcontext():
        yield model, tokenizer


def reference_checkpoint(start: CheckpointRef, policy: CheckpointRef, lora: LoraConfig | None) -> CheckpointRef:
    """The frozen reference of a run: the start checkpoint or, under LoRA, the current policy with its adapter
    disabled (the same weights as the start, without a second model in memory)."""
    return policy.model_copy(update={"adapter_disabled": True}) if lora is not None else start


def load_actor_critic(ref: CheckpointRef, runtime: RuntimeConfig, critic: str = "shared",
                      trust_remote_code: bool = False, for_training: bool = False, lora: LoraConfig | None = None):
    """The policy with its value head (a zero head when the checkpoint has none yet), and its tokenizer.
    critic="separate": the critic backbone saved in the checkpoint, or a copy of the policy on first use."""
    model, tokenizer = load_model(ref, runtime, trust_remote_code, for_training, lora)
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
