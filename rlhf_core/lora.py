"""Low-rank adapters (LoRA, Hu et al. 2021) on a Hugging Face model, through peft's in-place injection.

The adapters are injected INTO the loaded model (transformers' `add_adapter`), never wrapped around it by a
`peft.PeftModel`: the object stays a `LlamaForCausalLM` (or a sequence classifier) whose `.base_model` is the
transformer backbone, so the shared log-prob code (`logprobs.response_hidden_states`) and the value head see
the same structure with and without LoRA. W' = W + (alpha / rank) * B @ A with B = 0 at the start, so a fresh
adapter computes exactly the base model.

The reference model of every algorithm is the same object with its adapter disabled (`adapter_disabled`): no
second copy of the weights is kept.

Checkpoint formats (`save_model`):
- "adapter": adapter_config.json + adapter_model.safetensors (the adapter, and heads listed in modules_to_save);
  the base weights are referenced by adapter_config.json's `base_model_name_or_path` (an absolute local folder)
  and not copied. `transformers.AutoModel*.from_pretrained(folder)` loads base + adapter.
- "merged": a plain Hugging Face folder with W + (alpha / rank) * B @ A written as full weights (loadable by
  anything), plus the adapter under `adapter/` so that training continues the same adapter on the same base
  (the reference stays the original base, not the previous merge).
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from rlhf_core.model_files import (ADAPTER_CONFIG_FILE, ADAPTER_DIR, ADAPTER_WEIGHTS_FILE,  # noqa: F401 (re-exported)
                                   adapter_folder, base_model_path, is_adapter_folder)

ADAPTER_NAME = "default"
_TOGGLE = threading.Lock()
_DISABLED: dict[int, list] = {}  # id(model) -> [open adapter_disabled blocks, requires_grad flags before]


def _peft():
    """peft's classes, imported on first use: code that never touches an adapter runs without peft installed (a
    GPU image with torch and transformers only, bench/gpu_check.py)."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    return LoraConfig, LoraLayer, BaseTunerLayer, ModulesToSaveWrapper


def has_adapter(model: torch.nn.Module) -> bool:
    if "peft" not in sys.modules:  # adapters are made by peft (injected, or loaded by transformers through it)
        return False
    base_tuner_layer = _peft()[2]
    return any(isinstance(m, base_tuner_layer) for m in model.modules())


def add_lora(model, *, rank: int, alpha: float, dropout: float, target_modules: list[str] | str,
             modules_to_save: list[str] | None = None):
    """Inject a fresh LoRA adapter into `model` in place and make it (plus `modules_to_save`, heads that must
    train in full, such as a reward model's score head) the only trainable parameters. Returns `model`."""
    if has_adapter(model):
        raise ValueError("the model already has a LoRA adapter; continue it instead of adding a second one")
    peft_lora_config = _peft()[0]
    config = peft_lora_config(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                            modules_to_save=modules_to_save or None)
    try:
        model.add_adapter(config)
    except ValueError as error:  # peft's message names the modules; add which config key chose them
        raise ValueError(f"model.lora.target_modules={target_modules!r}: {error}") from None
    mark_adapter_trainable(model)
    return model


def mark_adapter_trainable(model) -> list[str]:
    """requires_grad on the adapter's parameters (LoRA A/B and modules_to_save copies) only; everything else
    frozen. A loaded adapter comes back frozen (peft's inference mode), so resuming calls this too.
    Returns the trainable parameter names."""
    _, lora_layer, _, modules_to_save_wrapper = _peft()
    adapter_params = {id(p) for m in model.modules() if isinstance(m, (lora_layer, modules_to_save_wrapper))
                      for n, p in m.named_parameters() if ".base_layer." not in f".{n}"
                      and "original_module." not in n}
    names = []
    for name, param in model.named_parameters():
        param.requires_grad_(id(param) in adapter_params)
        if param.requires_grad:
            names.append(name)
    if not names:
        raise ValueError("the LoRA adapter has no parameters: check model.lora.target_modules")
    return names


@contextmanager
def adapter_disabled(model) -> Iterator:
    """Within the block the model computes its base weights, as if it had no adapter (a no-op for a model without
    one): the reference model of every algorithm under LoRA. Blocks may overlap (sharded scoring threads share one
    cached model): the adapter comes back when the last one exits. peft's toggle also flips requires_grad, so
    the flags are restored as they were (an optimizer's parameter list must not change)."""
    _, _, base_tuner_layer, modules_to_save_wrapper = _peft()
    layers = [m for m in model.modules() if isinstance(m, (base_tuner_layer, modules_to_save_wrapper))]
    with _TOGGLE:
        if id(model) not in _DISABLED:
            _DISABLED[id(model)] = [0, [(p, p.requires_grad) for p in model.parameters()]]
            for layer in layers:
                layer.enable_adapters(False)
        _DISABLED[id(model)][0] += 1
    try:
        yield model
    finally:
        with _TOGGLE:
            _DISABLED[id(model)][0] -= 1
            if _DISABLED[id(model)][0] == 0:
                _, flags = _DISABLED.pop(id(model))
                for layer in layers:
                    layer.enable_adapters(True)
                for param, flag in flags:
                    param.requires_grad_(flag)


def merged_state_dict(model, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The state dict of the plain model the adapter describes: W + (alpha / rank) * B @ A for each adapted layer,
    a modules_to_save copy in place of the original, peft's key prefixes removed. state: the model's full
    weights when they are not its own tensors (gathered from FSDP's shards); default `model.state_dict()`."""
    state = model.state_dict() if state is None else state
    merged = {}
    for key, tensor in state.items():
        if ".lora_" in key or ".original_module." in key:
            continue
        key = key.replace(".base_layer.", ".").replace(f".modules_to_save.{ADAPTER_NAME}.", ".")
        merged[key] = tensor
    lora_layer = _peft()[1]
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, lora_layer) and ADAPTER_NAME in module.lora_A:
                weight = state[f"{name}.base_layer.weight"]
                lora_a, lora_b = (state[f"{name}.lora_{x}.{ADAPTER_NAME}.weight"] for x in "AB")
                # peft's get_delta_weight: half precision on the CPU is multiplied in float32
                half = lora_a.device.type == "cpu" and lora_a.dtype in (torch.float16, torch.bfloat16)
                compute = torch.float32 if half else lora_a.dtype
                delta = ((lora_b.to(compute) @ lora_a.to(compute)) * module.scaling[ADAPTER_NAME]).to(lora_a.dtype)
                merged[f"{name}.weight"] = (weight + delta).to(weight.dtype)
    return merged


def save_merged(model, folder: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """A plain Hugging Face model folder with the adapter merged into full weights. The plain model is built on
    the meta device and takes the merged tensors by reference: the only new memory is the adapted layers."""
    with torch.device("meta"):
        plain = type(model)(model.config)
    _, unexpected = plain.load_state_dict(merged_state_dict(model, state), assign=True, strict=False)
    plain.tie_weights()  # a full state gathered from shards names a tied LM head once (its embedding's)
    missing = [name for name, param in plain.named_parameters(remove_duplicate=False) if param.is_meta]
    if missing or unexpected:
        raise RuntimeError(f"merged weights do not fit {type(model).__name__}: missing {missing}, "
                           f"unexpected {unexpected}")
    plain.generation_config = model.generation_config
    plain.save_pretrained(folder)


def save_model(model, folder: str | Path, merged: bool = False,
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write `model` into `folder`: adapter-only when it has an adapter (`merged`: full merged weights plus the
    adapter under adapter/), else its full weights. state_dict: its full weights when they are not its own
    tensors (gathered from FSDP's shards)."""
    folder = Path(folder)
    if merged and has_adapter(model):
        save_merged(model, folder, state_dict)
        model.save_pretrained(folder / ADAPTER_DIR, state_dict=state_dict)
    else:
        model.save_pretrained(folder, state_dict=state_dict)
