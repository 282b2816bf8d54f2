"""The generation and scoring stages as the online flows run them: one task (runtime.shards = 1, exactly the
stage of tasks/rollouts.py and tasks/scoring.py), or shard tasks on the configured task runner whose merged table
is the unsharded one (tasks/sharding.py).

Shard tasks are cached like every stage, so a run resumed after a crash skips the shards that finished. In a
Dask worker process each shard loads its model from disk (the in-process model cache of tasks/runtime.py misses
there); a Ray actor keeps its models across iterations (tasks/ray_cluster.ShardWorker). Workers need the flow's
RLHF_HOME (shared storage when they run on other machines).
"""

from __future__ import annotations

from prefect import task

from rlhf_core.config import GenerationConfig, RuntimeConfig
from rlhf_core.config.training import LogprobPass
from tasks.cache import STAGE_TASK_OPTIONS
from tasks.paths import rlhf_home
from tasks.refs import ArtifactRef, CheckpointRef, publish
from tasks.rollouts import generate_rollouts, rollout_frame
from tasks.scoring import RewardSources, score_rollouts, scored_frame
from tasks.sharding import (ShardRunner, check_data_home, on_shard_worker, parquet_rows, run_sharded, shard_bounds,
                            shard_runtime)


@task(name="generate-rollouts-shard", **STAGE_TASK_OPTIONS)
def generate_rollouts_shard(policy: CheckpointRef, prompts: ArtifactRef, generation: GenerationConfig,
                            runtime: RuntimeConfig, system_prompt: str | None, seed: int, iteration: int,
                            trust_remote_code: bool, data_home: str, row_range: list[int]) -> ArtifactRef:
    """Rows [start, stop) of the rollout table."""
    check_data_home(data_home)
    return publish(on_shard_worker(
        "generate", rollout_frame, row_range, policy=policy, prompts=prompts, generation=generation, runtime=runtime,
        system_prompt=system_prompt, seed=seed, iteration=iteration, trust_remote_code=trust_remote_code,
        row_range=(row_range[0], row_range[1])), "rollouts-shards")


@task(name="score-rollouts-shard", **STAGE_TASK_OPTIONS)
def score_rollouts_shard(rollouts: ArtifactRef, sources: RewardSources, reference: CheckpointRef | None,
                         logprobs: LogprobPass, runtime: RuntimeConfig, trust_remote_code: bool, data_home: str,
                         row_range: list[int]) -> ArtifactRef:
    """Rows [start, stop) of the scored table."""
    check_data_home(data_home)
    rows = rollouts.read().iloc[row_range[0]:row_range[1]].reset_index(drop=True)
    return publish(on_shard_worker("score", scored_frame, row_range, df=rows, sources=sources, reference=reference,
                                   logprobs=logprobs, runtime=runtime, trust_remote_code=trust_remote_code),
                   "scored-shards")


def generation_stage(policy: CheckpointRef, prompts: ArtifactRef, generation: GenerationConfig,
                     runtime: RuntimeConfig, system_prompt: str | None, seed: int, iteration: int,
                     trust_remote_code: bool = False, runner: ShardRunner | None = None) -> ArtifactRef:
    """The rollout table of `generate_rollouts`, from runtime.shards shards cut between generation batches."""
    bounds = shard_bounds(parquet_rows(prompts) * generation.group_size, runtime.shards, generation.batch_size)
    if len(bounds) == 1:  # shards = 1, or a single batch: no runner, no merge
        return generate_rollouts(policy, prompts, generation, runtime, system_prompt, seed, iteration,
                                 trust_remote_code)
    parameters = dict(policy=policy, prompts=prompts, generation=generation, runtime=shard_runtime(runtime),
                      system_prompt=system_prompt, seed=seed, iteration=iteration,
                      trust_remote_code=trust_remote_code, data_home=str(rlhf_home()))
    return run_sharded(runner, runtime, generate_rollouts_shard, parameters, bounds, "rollouts")


def scoring_stage(rollouts: ArtifactRef, sources: RewardSources, reference: CheckpointRef | None,
                  logprobs: LogprobPass, runtime: RuntimeConfig, trust_remote_code: bool = False,
                  runner: ShardRunner | None = None) -> ArtifactRef:
    """The scored table of `score_rollouts`, from runtime.shards shards cut between micro-batches (the reward
    models' batches: their scores are unchanged; the reference log-probs' length-sorted micro-batches are formed
    within each shard, which can move fp32 rounding, see docs/scaling.md)."""
    bounds = shard_bounds(parquet_rows(rollouts), runtime.shards, logprobs.micro_batch_size)
    if len(bounds) == 1:
        return score_rollouts(rollouts, sources, reference, logprobs, runtime, trust_remote_code)
    parameters = dict(rollouts=rollouts, sources=sources, reference=reference, logprobs=logprobs,
                      runtime=shard_runtime(runtime), trust_remote_code=trust_remote_code, data_home=str(rlhf_home()))
    return run_sharded(runner, runtime, score_rollouts_shard, parameters, bounds, "scored")
