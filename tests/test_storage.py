"""Parquet outputs on object storage (`RLHF_ARTIFACTS_URI`, an fsspec URI): fsspec's in-memory filesystem stands
in for a bucket (a real fsspec filesystem with object-store semantics: no rename, whole-object writes)."""

from __future__ import annotations

import fsspec
import pandas as pd
import pytest

from rlhf_core.io import copy_file, file_exists, write_parquet
from tasks.paths import stage_dir
from tasks.refs import ArtifactRef, publish

BUCKET = "memory://rlhf-storage-test"


@pytest.fixture
def bucket(monkeypatch):
    monkeypatch.setenv("RLHF_ARTIFACTS_URI", BUCKET + "/artifacts/")
    yield fsspec.filesystem("memory")
    fs = fsspec.filesystem("memory")
    if fs.exists("/rlhf-storage-test"):
        fs.rm("/rlhf-storage-test", recursive=True)


def test_a_table_on_object_storage_has_the_local_file_name_and_reads_back(bucket, tmp_path):
    df = pd.DataFrame({"prompt_ids": [[1, 2], [3]], "score": [0.5, -1.0]})
    local, local_digest = write_parquet(df, tmp_path)
    assert stage_dir("rollouts") == f"{BUCKET}/artifacts/rollouts"
    ref = publish(df, "rollouts")
    assert ref.path == f"{BUCKET}/artifacts/rollouts/{local.name}" and ref.sha256 == local_digest
    assert bucket.cat_file(ref.path.removeprefix("memory://")) == local.read_bytes()
    assert publish(df, "rollouts") == ref  # write-once: the same content, the same key, no second object
    assert len(bucket.ls("/rlhf-storage-test/artifacts/rollouts")) == 1
    pd.testing.assert_frame_equal(ref.read(), df)
    copy_file(ref.path, tmp_path / "copy.parquet")
    assert (tmp_path / "copy.parquet").read_bytes() == local.read_bytes()


def test_a_missing_object_is_reported_by_its_uri(bucket):
    missing = ArtifactRef(path=f"{BUCKET}/artifacts/rollouts/0000.parquet", sha256="0")
    assert not file_exists(missing.path)
    with pytest.raises(FileNotFoundError, match="rlhf-storage-test/artifacts/rollouts/0000.parquet is gone"):
        missing.read()


@pytest.mark.slow
def test_grpo_flow_with_parquet_on_object_storage_matches_local_and_resumes(prefect_harness, bucket, tiny_model_dir,
                                                                            tmp_path, monkeypatch):
    """Every stage writes and reads its Parquet through the URI; the trained policy is the one of a run with local
    files; MLflow gets the tables; a rerun finds every stage in the cache and reads its outputs from the bucket."""
    import mlflow
    from flow_helpers import mlflow_run_of, task_states
    from test_flow_grpo import tiny_config

    from flows.grpo import grpo
    from rlhf_core.config import KLConfig
    from rlhf_core.io import sha256_dir

    config = tiny_config(tiny_model_dir, kl=KLConfig(coef=0.05))
    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "local"))
    monkeypatch.delenv("RLHF_ARTIFACTS_URI")
    local_final = grpo(config)

    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "remote"))
    monkeypatch.setenv("RLHF_ARTIFACTS_URI", BUCKET + "/artifacts")
    state = grpo(config, return_state=True)
    assert sha256_dir(state.result()) == sha256_dir(local_final)
    assert not (tmp_path / "remote" / "artifacts").exists()
    for stage in ("prompts", "rollouts", "scored", "advantages", "update-metrics"):
        assert len(bucket.ls(f"/rlhf-storage-test/artifacts/{stage}")) == 2, stage
    run = mlflow_run_of(state.state_details.flow_run_id)
    batch = pd.read_parquet(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="data/iter_001/advantages.parquet"))
    assert len(batch) == 8 and "ref_logprobs" in batch

    rerun = grpo(config, return_state=True)
    states = [name for stage, name in task_states(rerun.state_details.flow_run_id) if stage == "update-policy"]
    assert states == ["Cached", "Cached"] and sha256_dir(rerun.result()) == sha256_dir(local_final)
