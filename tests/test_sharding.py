"""Sharded generation and scoring: split/merge helpers, the stages on the thread, Dask and Ray runners against the
unsharded stage (real Prefect engine, real Parquet, tiny random-init model), crash and resume of one shard, a GRPO
flow with shards = 2, and the errors of a missing extra or a bad config."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from flow_helpers import failing_call, task_states
from prefect import flow
from pydantic import ValidationError
from test_flow_grpo import tiny_config

import tasks.sharded_stages
from flows.grpo import grpo
from rlhf_core.config import GenerationConfig, KLConfig, OptimConfig, RewardSpec, RuntimeConfig
from rlhf_core.config.training import LogprobPass
from rlhf_core.io import sha256_dir
from tasks.refs import CheckpointRef, publish
from tasks.rollouts import generate_rollouts
from tasks.scoring import RewardSources, score_rollouts
from tasks.sharded_stages import generation_stage, scoring_stage
from tasks.sharding import RUNNER_EXTRAS, ShardingError, check_data_home, merge_shards, shard_bounds

GENERATION = GenerationConfig(group_size=4, max_new_tokens=8, temperature=1.0, batch_size=4)
EXACT_COLUMNS = ["group_id", "sample_index", "prompt_id", "prompt", "prompt_ids", "response_ids", "finished",
                 "response", "response_length"]


# (a) pure helpers ---------------------------------------------------------------------------------------------

def test_shard_bounds_cut_between_batches_as_evenly_as_possible():
    assert shard_bounds(24, 3, 4) == [(0, 8), (8, 16), (16, 24)]
    assert shard_bounds(24, 2, 4) == [(0, 12), (12, 24)]
    assert shard_bounds(10, 3, 4) == [(0, 4), (4, 8), (8, 10)]  # the last batch is short
    assert shard_bounds(10, 2, 4) == [(0, 4), (4, 10)]  # 3 batches over 2 shards: 1 + 2
    assert shard_bounds(20, 3, 4) == [(0, 4), (4, 12), (12, 20)]  # 5 batches: 1 + 2 + 2
    assert shard_bounds(5, 4, 8) == [(0, 5)]  # one batch: one shard, whatever `shards` says
    assert shard_bounds(7, 16, 1) == [(i, i + 1) for i in range(7)]
    with pytest.raises(ShardingError):
        shard_bounds(8, 0, 4)


def test_merge_restores_row_order_and_rejects_gaps_overlaps_and_short_shards():
    table = pd.DataFrame({"row": np.arange(10), "ids": [[i] * (i % 3 + 1) for i in range(10)]})
    bounds = [(0, 4), (4, 8), (8, 10)]
    parts = [table.iloc[a:b].reset_index(drop=True) for a, b in bounds]
    merged = merge_shards(bounds[::-1], parts[::-1])  # shards finishing in any order
    pd.testing.assert_frame_equal(merged, table)

    with pytest.raises(ShardingError, match="starts at row 8, not 4"):
        merge_shards([(0, 4), (8, 10)], [parts[0], parts[2]])
    with pytest.raises(ShardingError, match="starts at row 3"):
        merge_shards([(0, 4), (3, 8)], [parts[0], parts[1]])
    with pytest.raises(ShardingError, match=r"\[4, 8\) holds 3 rows instead of 4"):
        merge_shards(bounds, [parts[0], parts[1].iloc[:3], parts[2]])


# stages --------------------------------------------------------------------------------------------------------

@pytest.fixture
def inputs(rlhf_home, tiny_model_dir):
    prompts = pd.DataFrame({"prompt_id": np.arange(6, dtype=np.int64),
                            "prompt": [f"What is {i} + {i + 1}?" for i in range(6)]})
    policy = CheckpointRef(path=str(tiny_model_dir), sha256=sha256_dir(tiny_model_dir))
    return policy, publish(prompts, "prompts")


@flow
def generate_both_ways(policy, prompts, runtime: RuntimeConfig):
    single = generate_rollouts(policy, prompts, GENERATION, RuntimeConfig(), None, 3, 1)
    return single, generation_stage(policy, prompts, GENERATION, runtime, None, 3, 1)


def assert_sharded_generation_equals_single(state, rlhf_home, n_shards):
    single, sharded = state.result()
    # byte-identical Parquet: same content hash, so the very same file
    assert sharded.sha256 == single.sha256 and sharded.path == single.path
    assert len(list((rlhf_home / "artifacts" / "rollouts-shards").glob("*.parquet"))) == n_shards
    states = task_states(state.state_details.flow_run_id)
    assert [s for s in states if s[0] == "generate-rollouts-shard"] == [("generate-rollouts-shard", "Completed")] * 2
    assert ("merge-shards", "Completed") in states


def test_generation_sharded_over_a_local_dask_cluster_equals_single_process(prefect_harness, inputs, rlhf_home):
    pytest.importorskip("prefect_dask")
    state = generate_both_ways(*inputs, RuntimeConfig(task_runner="dask", shards=2), return_state=True)
    assert_sharded_generation_equals_single(state, rlhf_home, 2)
    table = pd.read_parquet(state.result()[1].path)
    assert len(table) == 24 and table["group_id"].tolist() == np.repeat(np.arange(6), 4).tolist()


def test_generation_sharded_over_a_local_ray_cluster_equals_single_process(prefect_harness, inputs, rlhf_home):
    pytest.importorskip("ray")
    state = generate_both_ways(*inputs, RuntimeConfig(task_runner="ray", shards=2), return_state=True)
    assert_sharded_generation_equals_single(state, rlhf_home, 2)


@flow
def score_both_ways(policy, rollouts, runtime: RuntimeConfig):
    rewards = [RewardSpec(function="response_length", weight=0.5)]
    args = (rollouts, RewardSources(specs=rewards, fingerprints=["fp"], models=[None]), policy,
            LogprobPass(temperature=1.0, micro_batch_size=4, chunk_size=1024))
    single = score_rollouts(*args, RuntimeConfig())
    return single, scoring_stage(*args, runtime)


def test_scoring_sharded_equals_unsharded(prefect_harness, inputs):
    policy, prompts = inputs
    rollouts = generate_rollouts.fn(policy, prompts, GENERATION, RuntimeConfig(), None, 3, 1)
    state = score_both_ways(policy, rollouts, RuntimeConfig(shards=3), return_state=True)
    single_ref, sharded_ref = state.result()
    single, sharded = single_ref.read(), sharded_ref.read()
    assert list(sharded.columns) == list(single.columns) and len(sharded) == len(single) == 24
    for column in EXACT_COLUMNS + ["rewards", "reward[response_length]"]:
        assert sharded[column].map(repr).tolist() == single[column].map(repr).tolist(), column
    # Reference log-probs: micro-batches are length-sorted within each shard, so a row may share its micro-batch
    # with other rows than unsharded: only fp32 rounding may move (docs/scaling.md states 1e-5; measured 0 here).
    for a, b in zip(sharded["ref_logprobs"], single["ref_logprobs"]):
        assert len(a) == len(b) and np.allclose(a, b, rtol=0, atol=1e-5)
    states = task_states(state.state_details.flow_run_id)
    assert [s for s in states if s[0] == "score-rollouts-shard"] == [("score-rollouts-shard", "Completed")] * 3


def test_a_crashed_shard_is_redone_and_finished_ones_come_from_the_cache(prefect_harness, inputs):
    runtime = RuntimeConfig(shards=3)
    with failing_call(tasks.sharded_stages, "rollout_frame", call=2):
        crashed = generate_both_ways(*inputs, runtime, return_state=True)
    assert crashed.is_failed()
    resumed = generate_both_ways(*inputs, runtime, return_state=True)
    single, sharded = resumed.result()
    assert sharded.sha256 == single.sha256
    shard_states = sorted(s for name, s in task_states(resumed.state_details.flow_run_id)
                          if name == "generate-rollouts-shard")
    assert shard_states == ["Cached", "Cached", "Completed"]


# (d) a whole flow ------------------------------------------------------------------------------------------------

def test_grpo_flow_with_two_shards_on_threads_equals_one_shard(prefect_harness, tmp_path, monkeypatch,
                                                               tiny_model_dir):
    def run(name, shards):
        monkeypatch.setenv("RLHF_HOME", str(tmp_path / name))
        config = tiny_config(tiny_model_dir, kl=KLConfig(coef=0.05),
                             generation=GenerationConfig(group_size=4, max_new_tokens=8, temperature=1.0,
                                                         batch_size=4),
                             optim=OptimConfig(lr=1e-3, micro_batch_size=4), runtime=RuntimeConfig(shards=shards))
        return grpo(config, return_state=True)

    single, sharded = run("single", 1), run("sharded", 2)
    assert sha256_dir(sharded.result()) == sha256_dir(single.result())
    def files(run: str, stage: str) -> list[str]:
        return sorted(p.name for p in (tmp_path / run / "artifacts" / stage).glob("*.parquet"))

    for stage in ("rollouts", "scored", "advantages"):
        assert files("sharded", stage) == files("single", stage), stage  # content-addressed: same tables
    names = [name for name, _ in task_states(sharded.state_details.flow_run_id)]
    assert names.count("generate-rollouts-shard") == 4 and names.count("score-rollouts-shard") == 4
    assert "generate-rollouts" not in names and "generate-rollouts-shard" not in [
        name for name, _ in task_states(single.state_details.flow_run_id)]


# (e) errors --------------------------------------------------------------------------------------------------------

def test_a_missing_extra_fails_before_any_work_naming_the_setting_and_the_pip_command(
        prefect_harness, rlhf_home, tiny_model_dir, monkeypatch):
    monkeypatch.setitem(RUNNER_EXTRAS, "ray", ("no_such_module_for_this_test", "ray[train]==2.60.0"))
    config = tiny_config(tiny_model_dir, runtime=RuntimeConfig(task_runner="ray", shards=2))
    with pytest.raises(ShardingError) as error:
        grpo(config)
    message = str(error.value)
    assert "runtime.task_runner: ray" in message and "pip install 'rlhf-pipeline[ray]'" in message
    assert not (rlhf_home / "artifacts").exists()  # nothing ran
    # shards = 1 uses no runner, so it needs no extra
    grpo(tiny_config(tiny_model_dir, iterations=1, runtime=RuntimeConfig(task_runner="ray", shards=1)))


def test_the_ray_launcher_without_ray_installed_fails_naming_the_setting(monkeypatch):
    """The launcher's own check; one process needs no launcher, so no Ray either."""
    import importlib.util

    from tasks.ray_cluster import RaySetupError, check_ray

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(RaySetupError, match=r"runtime.launcher: ray needs .*pip install 'rlhf-pipeline\[ray\]'"):
        check_ray(RuntimeConfig(launcher="ray", num_processes=2))
    check_ray(RuntimeConfig(launcher="ray", num_processes=1))


def test_bad_sharding_settings_are_rejected_naming_the_field(monkeypatch, tmp_path):
    with pytest.raises(ValidationError, match="runtime.runner_address 'tcp://10.0.0.1:8786' names a Dask scheduler"):
        RuntimeConfig(runner_address="tcp://10.0.0.1:8786")
    with pytest.raises(ValidationError, match="runner_address 'h:1' names a Dask scheduler.*use runtime.ray_address"):
        RuntimeConfig(task_runner="ray", runner_address="h:1")
    with pytest.raises(ValidationError, match="runtime.ray_address 'h:6379' names a Ray cluster, but neither"):
        RuntimeConfig(ray_address="h:6379")
    RuntimeConfig(launcher="ray", ray_address="h:6379")  # either use is enough
    RuntimeConfig(task_runner="ray", ray_address="h:6379")
    with pytest.raises(ValidationError, match="shards"):
        RuntimeConfig(shards=0)
    with pytest.raises(ValidationError, match="task_runner"):
        RuntimeConfig(task_runner="spark")
    expected = str(tmp_path / "flow-home")
    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "worker-home"))
    with pytest.raises(ShardingError, match="needs the same RLHF_HOME, on shared storage"):
        check_data_home(expected)
