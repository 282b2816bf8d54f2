"""Loading a checkpoint for a stage, on the device and dtype the config names."""

from __future__ import annotations

import threading
from collections import OrderedDict
from contextlib import contextmanager, nullcontext

import torch

from rlhf_core.allocator import keep_freed_memory
from rlhf_core.config import LoraConfig, RuntimeConfig
from rlhf_core.lora import adapter_disabled, adapter_folder, has_adapter
from rlhf_core.models import load_lm, load_weights_in_place
from rlhf_core.value_head import load_actor_critic as load_actor_critic_of
from rlhf_core.vllm_generation import architecture_fingerprint
from tasks.refs import CheckpointRef


def check_device(runtime: RuntimeConfig) -> None:
    """runtime.device names a device this machine's torch can use: found before any work, not inside generation."""
    from rlhf_core.errors import UserInputError

    try:
        device = torch.device(runtime.device)
    except RuntimeError as e:
        raise UserInputError(f"runtime.device {runtime.device!r}: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "a CUDA build, but no GPU is visible"
            raise UserInputError(f"runtime.device {runtime.device!r}: this torch ({torch.__version__}) is {build}; "
                                 "use runtime.device cpu, or install a CUDA torch on a machine with a GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserInputError(f"runtime.device {runtime.device!r}: only {torch.cuda.device_count()} GPU(s) "
                                 "visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserInputError(f"runtime.device {runtime.device!r}: MPS is not available on this machine")


def apply_runtime(runtime: RuntimeConfig) -> None:
    """Process-wide settings a stage applies before loading a model: torch's threads, and malloc keeping freed
    memory for the next step (`rlhf_core.allocator`)."""
    keep_freed_memory()
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
        self.entries: OrderedDict[tuple, tuple] = OrderedDict()  # key -> (model, tokenizer, TrainingState or None)
        self.loads = 0  # models built from disk by load_model
        self.reloads = 0  # checkpoints copied into a cached model (reload_in_place)

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

    def reload_in_place(self, old: CheckpointRef, new: CheckpointRef) -> None:
        """Every cached model of checkpoint `old` (read-only entries) becomes checkpoint `new`: its weights copied
        into the module already built, instead of building another (a Ray rollout actor's next policy). Nothing
        happens for LoRA checkpoints or another architecture: the next load_model builds `new` from disk."""
        if adapter_folder(old.path) or adapter_folder(new.path) or \
                architecture_fingerprint(old.path) != architecture_fingerprint(new.path):
            return
        for key in [k for k, entry in self.entries.items() if k[0] == old.sha256 and entry[2] is None]:
            model, tokenizer, _ = self.entries.pop(key)
            load_weights_in_place(model, new.path)
            self.put((new.sha256, *key[1:]), model, tokenizer)
            self.reloads += 1

    def put(self, key: tuple, model, tokenizer, training=None) -> None:
        """training: the `rlhf_core.training.TrainingState` (module and optimizer) the next training stage
        continues; None for a model only read."""
        self.entries[key] = (model, tokenizer, training)
        self.entries.move_to_end(key)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)


MODELS = ModelCache()
_LOADING = threading.RLock()


def load_model(checkpoint: CheckpointRef, runtime: RuntimeConfig, trust_remote_code: bool = False,
               for_training: bool = False, lora: LoraConfig | None = None):
    """(model, tokenizer) of a checkpoint, from memory when an earlier stage of this process had it.
    for_training: the caller will change the weights, so it gets an object no one else holds; with `lora`, a
    merged LoRA checkpoint comes back as its base + adapter, to continue that adapter (`training.prepare_training`)."""
    apply_runtime(runtime)
    key = ModelCache.key(checkpoint.sha256, runtime, trust_remote_code)
    continue_adapter = for_training and lora is not None
    with _LOADING:  # shards on the thread runner: one loads, the others then find it in the cache
        cached = MODELS.take(key) if for_training else MODELS.get(key)
        # a merged checkpoint's merged weights (cached by generation) cannot continue its adapter
        if cached is not None and not (continue_adapter and not has_adapter(cached[0])
                                       and adapter_folder(checkpoint.path)):
            return cached[0], cached[1]
        model, tokenizer = load_lm(checkpoint.path, runtime, runtime.device, trust_remote_code,
                                   with_adapter=continue_adapter)
        MODELS.loads += 1
        if not for_training:
            MODELS.put(key, model, tokenizer)
    return model, tokenizer


@contextmanager
def reference_model(checkpoint: CheckpointRef, runtime: RuntimeConfig, trust_remote_code: bool = False):
    """(model, tokenizer) of a reference checkpoint for the block; its LoRA adapter disabled when the checkpoint
    says so (`checkpoint.adapter_disabled`): a LoRA run's reference is the policy itself, already in memory, minus
    the adapter."""
    model, tokenizer = load_model(checkpoint, runtime, trust_remote_code)
    with adapter_disabled(model) if checkpoint.adapter_disabled else nullcontext():
        yield model, tokenizer


def reference_checkpoint(start: CheckpointRef, policy: CheckpointRef, lora: LoraConfig | None) -> CheckpointRef:
    """The frozen reference of a run: the start checkpoint or, under LoRA, the current policy with its adapter
    disabled (the same weights as the start, without a second model in memory)."""
    return policy.model_copy(update={"adapter_disabled": True}) if lora is not None else start


def load_actor_critic(checkpoint: CheckpointRef, runtime: RuntimeConfig, critic: str = "shared",
                      trust_remote_code: bool = False):
    """The policy with its value head (a zero head when the checkpoint has none yet), and its tokenizer, for
    PPO's value stage (`value_head.load_actor_critic`)."""
    model, tokenizer = load_model(checkpoint, runtime, trust_remote_code)
    actor_critic = load_actor_critic_of(model, checkpoint.path, critic, runtime.device, runtime.dtype,
                                        trust_remote_code)
    return actor_critic, tokenizer
