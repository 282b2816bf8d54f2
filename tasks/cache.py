"""Cache keys from content, config and code, never from the flow run id: a new run after a crash finds the
stages that already finished and skips them.

Prefect's INPUTS policy would hash a reference's path; we hash the sha256 it carries, so the key follows the
content. TASK_SOURCE only sees the task function's own source, so CODE_VERSION (a hash of every source file of
rlhf_core and tasks) is added: editing a core function invalidates the stages that depend on it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import TASK_SOURCE, CachePolicy
from prefect.utilities.hashing import hash_objects
from pydantic import BaseModel

from tasks.paths import rlhf_home
from tasks.refs import ArtifactRef, CheckpointRef

_PACKAGES = [Path(__file__).resolve().parents[1] / name for name in ("rlhf_core", "tasks")]


def _code_version() -> str:
    digest = hashlib.sha256()
    for package in _PACKAGES:
        for file in sorted(package.rglob("*.py")):
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


CODE_VERSION = _code_version()


def _normalize(value: Any) -> Any:
    if isinstance(value, (ArtifactRef, CheckpointRef)):
        return ["ref", value.sha256]
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [_normalize(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalize(v) for k, v in sorted(value.items())}
    return value


@dataclass
class ContentInputs(CachePolicy):
    """Like INPUTS, but references count by content hash and the code version is part of the key."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str | None:
        normalized = {k: _normalize(v) for k, v in sorted((inputs or {}).items())}
        # Outputs live in the data folder, so a cache record only holds for the folder it was written in.
        return hash_objects(normalized, CODE_VERSION, str(rlhf_home()), raise_on_failure=True)


STAGE_CACHE = ContentInputs() + TASK_SOURCE
# Results (the small refs) are stored as JSON rather than pickles: readable, and nothing is unpickled on resume.
STAGE_TASK_OPTIONS = dict(cache_policy=STAGE_CACHE, result_serializer="json", persist_result=True)
