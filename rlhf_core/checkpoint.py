"""Policy checkpoints: a Hugging Face folder plus the optimizer state, written atomically.

The optimizer state is stored as safetensors (never pickle) so that a resumed or next-iteration update continues
Adam's moments instead of restarting them: a fresh Adam's first step moves every weight by ~lr regardless of
the gradient's size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from rlhf_core.io import write_dir
from rlhf_core.lora import save_model

OPTIMIZER_FILE = "optimizer.safetensors"


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Flat `{"<param index>.<name>": tensor}` view of the optimizer's per-parameter state."""
    flat = {}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            tensor = value if torch.is_tensor(value) else torch.tensor(value)
            flat[f"{index}.{name}"] = tensor.detach().cpu().contiguous()
    return flat


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    param_groups = optimizer.state_dict()["param_groups"]  # hyper-parameters come from the config, not the file
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def save_checkpoint(model, tokenizer, optimizer: torch.optim.Optimizer | None, root: str | Path,
                    write_extra: Callable[[Path], None] | None = None, merged: bool = False) -> tuple[Path, str]:
    """Save to `<root>/<sha256[:16]>/` atomically; `write_extra(folder)` adds files (a value head, say).
    A model with a LoRA adapter is saved adapter-only, or with `merged` as full merged weights plus the adapter
    (`lora.save_model`). Returns (folder, sha256 of its content)."""

    def write(tmp: Path) -> None:
        save_model(model, tmp, merged)
        tokenizer.save_pretrained(tmp)
        if optimizer is not None:
            save_file(optimizer_tensors(optimizer), str(tmp / OPTIMIZER_FILE))
        if write_extra is not None:
            write_extra(tmp)

    return write_dir(write, root)


def restore_optimizer(optimizer: torch.optim.Optimizer, checkpoint_dir: str | Path) -> bool:
    """Load the optimizer state saved beside the weights, if any. Returns whether one was found."""
    path = Path(checkpoint_dir) / OPTIMIZER_FILE
    if not path.is_file():
        return False
    device = next(iter(optimizer.param_groups[0]["params"])).device
    load_optimizer_tensors(optimizer, load_file(str(path), device=str(device)))
    return True
