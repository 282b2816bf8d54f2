"""Resolving the model a flow starts from into a checkpoint reference."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from prefect import task

from rlhf_core.io import sha256_dir
from rlhf_core.models import ModelLoadError, check_model_folder, resolve_model_path
from tasks.paths import models_dir, use_tracking_uri
from tasks.refs import CheckpointRef


def download_registered_model(uri: str) -> Path:
    """`models:/<name>@<alias>` or `models:/<name>/<version>` -> a local folder (downloaded once per version)."""
    import mlflow  # only this path needs it; rlhf_core never imports mlflow

    body = uri.removeprefix("models:/")
    store = use_tracking_uri()  # registry lookups can run before the flow's MLflow run starts
    client = mlflow.MlflowClient()
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = body.rpartition("/")
            version = client.get_model_version(name, number)
    except mlflow.exceptions.MlflowException as e:
        raise ModelLoadError(f"model URI {uri!r}: {e.message} (registry searched: {store}; run the flow that "
                             "registers it first, e.g. `rlhf reward-model`, with the same RLHF_HOME)") from None
    dest = models_dir() / "registry" / re.sub(r"[^A-Za-z0-9_.-]", "_", f"{name}-v{version.version}")
    if not dest.is_dir():
        tmp = dest.with_name(dest.name + ".download")
        shutil.rmtree(tmp, ignore_errors=True)  # left by a download that crashed
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version.version}", dst_path=str(tmp))
        tmp.rename(dest)
    check_model_folder(dest)
    return dest


@task(name="resolve-model")
def resolve_model(name_or_path: str) -> CheckpointRef:
    """A built-in name, a local folder or an MLflow model URI -> a folder and the hash of its content."""
    if name_or_path.startswith("models:/"):
        path = download_registered_model(name_or_path)
    else:
        path = resolve_model_path(name_or_path, models_dir())
    return CheckpointRef(path=str(path), sha256=sha256_dir(path))
