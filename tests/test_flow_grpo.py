"""The GRPO flow end to end on a tiny model: the real Prefect engine (a temporary server), a real MLflow SQLite
store, real Parquet files and checkpoints. Also: crash in a late stage, rerun, resume from the cache."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from flow_helpers import failing_call, mlflow_run_of, task_states
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterType, FlowRunFilter, FlowRunFilterId,
                                            TaskRunFilter, TaskRunFilterName)

import rlhf_core.training
from flows.grpo import grpo
from rlhf_core.config import (DataConfig, GenerationConfig, GRPOConfig, KLConfig, ModelConfig, OptimConfig,
                              TrackingConfig)
from rlhf_core.io import sha256_dir, sha256_file
from tasks.models import resolve_model

pytestmark = pytest.mark.slow
STAGES = ["sample-prompts", "generate-rollouts", "score-rollouts", "compute-advantages", "update-policy"]


def tiny_config(model_dir, **overrides) -> GRPOConfig:
    values = dict(
        iterations=2, prompts_per_iteration=2, seed=0,
        model=ModelConfig(name_or_path=str(model_dir)),
        data=DataConfig(path="data/arithmetic_train.jsonl"),
        generation=GenerationConfig(group_size=4, max_new_tokens=8, temperature=1.0),
        optim=OptimConfig(lr=1e-3, micro_batch_size=4),
        tracking=TrackingConfig(experiment="e2e", registered_model="tiny-policy"))
    return GRPOConfig(**{**values, **overrides})


def test_grpo_flow_end_to_end(prefect_harness, rlhf_home, tiny_model_dir):
    state = grpo(tiny_config(tiny_model_dir, kl=KLConfig(coef=0.05), keep_checkpoints=1), return_state=True)
    final_checkpoint = state.result()
    flow_run_id = state.state_details.flow_run_id

    # Parquet: one content-addressed file per stage and iteration, nothing half-written
    for stage, count in [("prompts", 2), ("rollouts", 2), ("scored", 2), ("advantages", 2), ("update-metrics", 2)]:
        files = sorted((rlhf_home / "artifacts" / stage).glob("*.parquet"))
        assert len(files) == count, stage
    assert not list(rlhf_home.rglob(".tmp-*"))
    assert [p.name for p in (rlhf_home / "checkpoints").iterdir()] == [Path(final_checkpoint).name]  # pruned
    batch = pd.read_parquet(sorted((rlhf_home / "artifacts" / "advantages").glob("*.parquet"))[0])
    assert len(batch) == 8 and {"rewards", "advantages", "response_ids", "group_id"} <= set(batch.columns)

    # Prefect UI: each iteration's rollout task run shows a progress bar that ended at 100 %
    with get_client(sync_client=True) as prefect_client:
        bars = prefect_client.read_artifacts(
            artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="generate-rollouts")))
    assert [(bar.description, bar.data) for bar in bars] == [("generate: 8/8 token, 100%", 100.0)] * 2

    # MLflow: params, one metric point per iteration, Parquet artifacts, a registered version per checkpoint
    run = mlflow_run_of(flow_run_id)
    client = mlflow.MlflowClient()
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.001" and run.data.params["generation.group_size"] == "4"
    for key in ["reward/mean", "reward/zero_std_group_frac", "policy/entropy", "policy/clip_frac_high",
                "loss/policy", "policy/grad_norm", "response/length_mean", "response/truncated_frac",
                "perf/generated_tokens_per_s", "time/generation_s", "time/update_s", "time/tracking_s", "kl/mean"]:
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1], key
    logged = [a.path for a in client.list_artifacts(run.info.run_id, "data/iter_001")]
    assert "data/iter_001/rollouts.parquet" in logged and "data/iter_001/advantages.parquet" in logged
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="data/iter_001/scored.parquet")
    assert len(pd.read_parquet(local)) == 8
    assert [a.path for a in client.list_artifacts(run.info.run_id, "samples")] == [
        "samples/iter_000.json", "samples/iter_001.json"]

    versions = client.search_model_versions("name = 'tiny-policy'")
    assert sorted(v.tags["iteration"] for v in versions) == ["0", "1"]
    newest = client.get_model_version_by_alias("tiny-policy", "newest")
    assert newest.tags["iteration"] == "1" and newest.tags["checkpoint_sha256"] == sha256_dir(final_checkpoint)
    assert "ref_logprobs" in batch.columns  # kl.coef > 0: the scoring stage ran the reference model

    # The registry's weights are hard links to the checkpoint files (no copy), and outlive the pruned checkpoints
    artifacts = Path(urllib.parse.urlparse(run.info.artifact_uri).path) / "checkpoints"
    final_weights = Path(final_checkpoint) / "model.safetensors"
    assert (artifacts / "iter_001" / "model.safetensors").stat().st_ino == final_weights.stat().st_ino
    assert (artifacts / "iter_000" / "model.safetensors").is_file()

    # A later flow can start from the registry: the alias resolves to the same weights
    registered = Path(resolve_model.fn("models:/tiny-policy@newest").path)
    assert sha256_file(registered / "model.safetensors") == sha256_file(Path(final_checkpoint) / "model.safetensors")
    assert not (registered / "optimizer.safetensors").exists()  # the training state stays local


def test_crash_in_update_then_rerun_resumes_and_matches_uninterrupted_run(prefect_harness, tmp_path, monkeypatch,
                                                                          tiny_model_dir):
    config = tiny_config(tiny_model_dir)
    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "uninterrupted"))
    uninterrupted = sha256_dir(grpo(config))

    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "crashed"))
    # iteration 1's update dies after training, before its checkpoint
    with failing_call(rlhf_core.training, "save_trained", call=2):
        crashed = grpo(config, return_state=True)
    assert crashed.is_failed()
    assert mlflow_run_of(crashed.state_details.flow_run_id).info.status == "FAILED"
    assert len(list((tmp_path / "crashed" / "checkpoints").iterdir())) == 1  # no partial checkpoint

    resumed = grpo(config, return_state=True)
    states = [s for s in task_states(resumed.state_details.flow_run_id) if s[0] in STAGES]
    assert states == [(stage, "Cached") for stage in STAGES] + [(stage, "Cached") for stage in STAGES[:-1]] + [
        ("update-policy", "Completed")]
    assert sha256_dir(resumed.result()) == uninterrupted


def test_register_every_and_optimizer_state_kept_for_the_newest_only(prefect_harness, rlhf_home, tiny_model_dir):
    """3 iterations, register_every 2: versions for iterations 1 (the 2nd) and 2 (the last); 2 checkpoints kept,
    only the newest with Adam's state (the older keeps its weights)."""
    from rlhf_core.checkpoint import OPTIMIZER_FILE
    from tasks.paths import use_tracking_uri

    final = grpo(tiny_config(tiny_model_dir, iterations=3, keep_checkpoints=2,
                             tracking=TrackingConfig(experiment="e2e", registered_model="sparse", register_every=2)))
    use_tracking_uri()
    versions = mlflow.MlflowClient().search_model_versions("name = 'sparse'")
    assert sorted(v.tags["iteration"] for v in versions) == ["1", "2"]
    kept = sorted((rlhf_home / "checkpoints").iterdir(), key=lambda p: p != Path(final))  # the newest first
    assert len(kept) == 2 and kept[0] == Path(final)
    assert [(p / OPTIMIZER_FILE).is_file() for p in kept] == [True, False]
    assert all((p / "model.safetensors").is_file() for p in kept)


def test_registers_every_nth_and_always_the_last():
    from flows.tracking import registers

    assert [registers(i, 5, 1) for i in range(5)] == [True] * 5
    assert [registers(i, 5, 2) for i in range(5)] == [False, True, False, True, True]
    assert [registers(i, 5, 0) for i in range(5)] == [False, False, False, False, True]
    assert [registers(i, 1, 3) for i in range(1)] == [True]
