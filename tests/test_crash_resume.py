"""Crash anywhere, resume exactly: a GRPO run killed with SIGKILL inside each stage in turn.

The flow runs as `rlhf grpo` in a child process against a real Prefect server and MLflow SQLite store. Each child
is killed at the next kill point (`rlhf_core.faults`) by its own SIGKILL: no handler, `finally` or atexit runs.
After every kill: the child died of SIGKILL, every Parquet file and checkpoint folder that has its final name is
complete (reads back, and its content hash is its name), and the next run with the same parameters gets further.
The last run completes with every stage from the cache and the same final checkpoint, bit for bit, as an
uninterrupted run with the same seed; MLflow holds each checkpoint once and the run's metrics once per iteration.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from flow_helpers import metric_steps, mlflow_run_of, task_states
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from prefect.client.schemas.sorting import FlowRunSort
from prefect.settings import get_current_settings
from test_flow_grpo import STAGES, tiny_config

from flows.grpo import grpo
from rlhf_core.config import DataConfig, GRPOConfig, KLConfig, OptimConfig, RewardSpec, TrackingConfig
from rlhf_core.io import TEMP_PREFIX, sha256_dir, sha256_file
from tasks.paths import use_tracking_uri

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

# (kill point, arrival, where it strikes): run k is killed at KILLS[k]; each finds the stages its predecessors
# finished in the cache. Iteration 0 completes in the first run, so every later kill lands in iteration 1.
KILLS = [
    ("publish:prompts", 2, "prompt sampling: iteration 1's prompts drawn, not yet written"),
    ("write-parquet", 1, "a Parquet write: the temporary file written, not yet renamed"),
    ("progress:generate", 3, "generation: the third decode step"),
    ("publish:scored", 1, "scoring: rewards and reference log-probs computed, not yet written"),
    ("publish:advantages", 1, "advantages: computed, not yet written"),
    ("progress:update", 1, "the update: after its first of two optimizer steps"),
    ("write-dir", 1, "the checkpoint write: the folder written, not yet renamed"),
    ("mlflow-log", 2, "MLflow logging: iteration 1's checkpoint registered, its metrics not yet logged"),
]


def crash_config(model_dir) -> GRPOConfig:
    """Two iterations with a reward that varies between samples (a random tiny model never answers arithmetic
    right, so that reward would leave the weights unchanged) and a KL penalty, so every stage does real work."""
    return tiny_config(model_dir, optim=OptimConfig(lr=1e-3, micro_batch_size=4, mini_batches=2),
                       rewards=[RewardSpec(function="response_length")], kl=KLConfig(coef=0.05),
                       data=DataConfig(path="data/arithmetic_train.jsonl", extra_columns=[]),
                       tracking=TrackingConfig(experiment="crash", registered_model="crash-policy"))


def cli_env(home: Path, kill_at: str | None) -> dict[str, str]:
    """A child `rlhf` process's environment: this session's Prefect server, its own data folder."""
    env = {**os.environ, "RLHF_HOME": str(home), "PREFECT_API_URL": get_current_settings().api.url}
    for inherited in ("RLHF_KILL_AT", "MLFLOW_TRACKING_URI"):  # the latter set by this process's own MLflow use
        env.pop(inherited, None)
    if kill_at:
        env["RLHF_KILL_AT"] = kill_at
    return env


def run_cli(config_file: Path, home: Path, kill_at: str | None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", "grpo", "--config", str(config_file)], cwd=REPO,
                          env=cli_env(home, kill_at), capture_output=True, text=True, timeout=600)


def assert_nothing_partial_is_readable(home: Path) -> None:
    for path in home.rglob("*.parquet"):  # the stages' outputs and their copies in MLflow
        if not path.name.startswith(TEMP_PREFIX):
            pd.read_parquet(path)  # a complete file: raises otherwise
    for path in (home / "artifacts").rglob("*.parquet"):
        if not path.name.startswith(TEMP_PREFIX):
            assert sha256_file(path).startswith(path.stem), path  # content-addressed: the name is the content
    checkpoints = home / "checkpoints"
    for folder in checkpoints.iterdir() if checkpoints.is_dir() else []:
        if not folder.name.startswith(TEMP_PREFIX):
            assert sha256_dir(folder).startswith(folder.name), folder  # every file there, as written


def latest_grpo_run_id():
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["grpo"])),
                                     sort=FlowRunSort.START_TIME_DESC, limit=1)
    return runs[0].id


def test_sigkill_in_every_stage_then_rerun_resumes_to_the_same_checkpoint(prefect_harness, tmp_path, tiny_model_dir,
                                                                          monkeypatch, reliability):
    config = crash_config(tiny_model_dir)
    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "uninterrupted"))
    expected = Path(grpo(config))
    assert sha256_file(expected / "model.safetensors") != sha256_file(tiny_model_dir / "model.safetensors")

    home = tmp_path / "crashed"
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config.model_dump(mode="json")))
    for point, arrival, _where in KILLS:
        result = run_cli(config_file, home, f"{point}:{arrival}")
        assert result.returncode == -signal.SIGKILL, (point, result.stderr[-3000:])
        assert_nothing_partial_is_readable(home)

    result = run_cli(config_file, home, None)
    assert result.returncode == 0, result.stderr[-3000:]
    final = Path(result.stdout.strip().splitlines()[-1].removeprefix("output: "))
    assert final.name == expected.name and sha256_dir(final) == sha256_dir(expected)
    assert not list(home.rglob(f"{TEMP_PREFIX}*"))  # the killed writers' temporaries were swept

    stages = [(name, state) for name, state in task_states(latest_grpo_run_id()) if name in STAGES]
    assert stages == [(name, "Cached") for name in STAGES] * 2  # every stage of both iterations reused

    monkeypatch.setenv("RLHF_HOME", str(home))
    use_tracking_uri()
    run = mlflow_run_of(latest_grpo_run_id())
    assert run.info.status == "FINISHED"
    assert metric_steps(run.info.run_id, "reward/mean") == [0, 1]
    versions = mlflow.MlflowClient().search_model_versions("name = 'crash-policy'")
    assert len(versions) == 2  # one per checkpoint, though iteration 1's was registered by two runs
    for _, _, where in KILLS:
        reliability.record("SIGKILL", where, "killed mid-stage; nothing partial readable; the next run reused the "
                           "finished stages and the last one ended on the uninterrupted run's checkpoint, bit for bit")
