"""Resolving the model a flow starts from into a checkpoint reference."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from prefect import task

from rlhf_core.config import ModelConfig
from rlhf_core.io import sha256_dir, write_folder_atomically
from rlhf_core.model_files import check_causal_lm
from rlhf_core.models import REGISTRY_PREFIX, ModelLoadError, check_model_folder, resolve_model_path
from tasks.paths import models_dir, use_tracking_uri
from tasks.refs import CheckpointRef


class RegisteredModelMissing(ModelLoadError):
    """The registry answered, and has no such model, version or alias."""


def registered_version(uri: str):
    """The MLflow ModelVersion a `models:/<name>@<alias>` or `models:/<name>/<version>` URI names; raises
    RegisteredModelMissing when the registry has no such thing, ModelLoadError when it cannot be asked."""
    import mlflow  # only this path needs it; rlhf_core never imports mlflow

    body = uri.removeprefix(REGISTRY_PREFIX)
    store = use_tracking_uri()  # registry lookups can run before the flow's MLflow run starts
    client = mlflow.MlflowClient()
    try:
        if "@" in body:
            return client.get_model_version_by_alias(*body.split("@", 1))
        name, _, number = body.rpartition("/")
        return client.get_model_version(name, number)
    except mlflow.exceptions.MlflowException as e:
        # a missing alias is INVALID_PARAMETER_VALUE, a missing model or version RESOURCE_DOES_NOT_EXIST
        missing = e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
        raise (RegisteredModelMissing if missing else ModelLoadError)(
            f"model URI {uri!r}: {e.message} (registry searched: {store}; run the flow that registers it first, "
            "e.g. `rlhf reward-model`, with the same RLHF_HOME)") from None


def download_registered_model(uri: str) -> Path:
    """`models:/<name>@<alias>` or `models:/<name>/<version>` -> a local folder (downloaded once per version)."""
    import mlflow

    version = registered_version(uri)
    name = version.name
    dest = models_dir() / "registry" / re.sub(r"[^A-Za-z0-9_.-]", "_", f"{name}-v{version.version}")
    if not dest.is_dir():  # a crashed download leaves a temporary folder, swept by the next one
        write_folder_atomically(lambda tmp: mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{version.version}", dst_path=str(tmp)), dest)
    check_model_folder(dest)
    return dest


@task(name="resolve-model")
def resolve_model(name_or_path: str) -> CheckpointRef:
    """A built-in name, a local folder or an MLflow model URI -> a folder and the hash of its content."""
    if name_or_path.startswith(REGISTRY_PREFIX):
        path = download_registered_model(name_or_path)
    else:
        path = resolve_model_path(name_or_path, models_dir())
    return CheckpointRef(path=str(path), sha256=sha256_dir(path))


def resolve_start_model(model: ModelConfig, resolve: Callable[[str], CheckpointRef] = resolve_model,
                        causal_lm: bool = True) -> CheckpointRef:
    """The model a flow starts from: `model.name_or_path`, or `model.fallback` when that is a registry URI the
    registry does not have yet (the first scheduled run before any `champion` exists). `resolve` turns the name
    into a folder (the reward model's resolves its own built-in backbones); causal_lm: it must be a causal LM
    (a policy), not a classifier that would load with a random LM head."""
    name = model.name_or_path
    if model.fallback and name.startswith(REGISTRY_PREFIX):
        try:
            registered_version(name)
        except RegisteredModelMissing:
            print(f"{name} is not in the registry yet: starting from model.fallback {model.fallback!r}")
            name = model.fallback
    ref = resolve(name)
    if causal_lm:
        check_causal_lm(Path(ref.path), "model.name_or_path")
    return ref
