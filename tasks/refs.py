"""References that flow between tasks: a path plus the sha256 of what it points to."""

from __future__ import annotations

import pandas as pd
from pydantic import BaseModel

from rlhf_core.faults import kill_point
from rlhf_core.io import file_exists, write_parquet
from tasks.paths import stage_dir


class ArtifactRef(BaseModel):
    """A write-once Parquet file named by its content hash."""

    path: str
    sha256: str
    rows: int = 0

    def read(self) -> pd.DataFrame:
        if not file_exists(self.path):  # a local path or an fsspec URI (tasks.paths.artifacts_root)
            raise FileNotFoundError(f"{self.path} is gone (deleted after it was cached?); rerun with refresh_cache")
        return pd.read_parquet(self.path)


class CheckpointRef(BaseModel):
    """A model folder (Hugging Face layout, maybe with optimizer state) and the sha256 of its content."""

    path: str
    sha256: str
    # A LoRA run's reference: these weights with the checkpoint's adapter disabled (tasks.runtime.reference_model)
    adapter_disabled: bool = False


def publish(df: pd.DataFrame, stage: str) -> ArtifactRef:
    kill_point(f"publish:{stage}")
    path, digest = write_parquet(df, stage_dir(stage))
    return ArtifactRef(path=str(path), sha256=digest, rows=len(df))


class UpdateResult(BaseModel):
    """What a policy update produces: the new checkpoint and a Parquet table of per-step metrics."""

    checkpoint: CheckpointRef
    metrics: ArtifactRef
