"""Cache keys from content, config and code, never from the flow run id: a new run after a crash finds the
stages that already finished and skips them.

Prefect's INPUTS policy would hash a reference's path; we hash the sha256 it carries, so the key follows the
content. TASK_SOURCE only sees the task function's own source, so CODE_VERSION (a hash of every source file of
rlhf_core and tasks) is added: editing a core function invalidates the stages that depend on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import TASK_SOURCE, CachePolicy
from prefect.locking.filesystem import FileSystemLockManager
from prefect.utilities.hashing import hash_objects
from pydantic import BaseModel

from rlhf_core.io import process_alive, write_atomically
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
    if isinstance(value, CheckpointRef) and value.adapter_disabled:  # other weights than the checkpoint's
        return ["ref", value.sha256, "adapter-disabled"]
    if isinstance(value, (ArtifactRef, CheckpointRef)):
        return ["ref", value.sha256]
    if isinstance(value, BaseModel):  # field by field: references inside a model count by content too
        dumped = value.model_dump(mode="json")
        return {name: _normalize(getattr(value, name)) if isinstance(getattr(value, name), (BaseModel, list, tuple))
                else dumped[name] for name in dumped}
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


class ProcessLockManager(FileSystemLockManager):
    """Prefect's file locks, kept in the data folder, recording the holder's host and process id: a lock left by
    a process that was killed (SIGKILL runs no clean-up) is taken over by the next run on that host instead of
    blocking it forever. A holder on another host is waited for: its processes cannot be seen from here."""

    def __init__(self):  # the folder follows RLHF_HOME at call time, so the base class's fixed path is not set
        self._locks = {}

    @property
    def lock_files_directory(self) -> Path:
        return rlhf_home() / "locks"

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        acquired = super().acquire_lock(key, holder, acquire_timeout, hold_timeout)
        if acquired:
            path = self._lock_path_for_key(key)
            info = {**json.loads(path.read_bytes()), "host": socket.gethostname(), "pid": os.getpid()}
            write_atomically(lambda tmp: tmp.write_text(json.dumps(info)), path)
        return acquired

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        path = self._lock_path_for_key(key)
        try:
            info = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return super().is_locked(key, use_cache)
        if info.get("host") == socket.gethostname() and not process_alive(int(info.get("pid", os.getpid()))):
            path.unlink(missing_ok=True)  # its holder is gone
            self._locks.pop(key, None)
            return False
        return super().is_locked(key, use_cache)


# SERIALIZABLE: two runs reaching the same stage with the same inputs compute it once; the second waits for the
# first's lock, then finds its cache record.
STAGE_CACHE = (ContentInputs() + TASK_SOURCE).configure(isolation_level="SERIALIZABLE",
                                                        lock_manager=ProcessLockManager())
# Results (the small refs) are stored as JSON rather than pickles: readable, and nothing is unpickled on resume.
STAGE_TASK_OPTIONS = dict(cache_policy=STAGE_CACHE, result_serializer="json", persist_result=True)
