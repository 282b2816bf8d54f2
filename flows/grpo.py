"""The GRPO flow: N iterations of sample prompts -> generate -> score -> advantages -> update.

Every stage is a cached Prefect task keyed on the content of its inputs, the config and the code version: a new
run with the same config after a crash replays the finished stages from the cache and resumes at the first
unfinished one. One MLflow run per flow run holds the params, per-iteration metrics, the Parquet files and a
registered model version per checkpoint.
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from flows.heldout import HeldOutEvaluation
from flows.inputs import lineage_tags, resolve_kl_reference, resolve_online_inputs, resolve_run_seed
from flows.tracking import StageClock, log_online_iteration, mlflow_run
from rlhf_core.config import GRPOConfig
from rlhf_core.config.training import GRPOUpdateArgs, LogprobPass, TrainingSetup
from rlhf_core.dynamic_sampling import round_seed
from tasks.advantages import compute_advantages
from tasks.data import dataset_fingerprints, sample_prompts
from tasks.dynamic_sampling import fill_batch_stage, group_counts
from tasks.grpo import update_policy
from tasks.refs import ArtifactRef, CheckpointRef
from tasks.runtime import reference_checkpoint
from tasks.scoring import RewardSources
from tasks.sharded_stages import generation_stage, scoring_stage
from tasks.sharding import ShardRunner, shard_runner
from tasks.train import prune_checkpoints


@flow(name="grpo", log_prints=True)
def grpo(config: GRPOConfig = GRPOConfig()) -> str:
    """Train a policy with GRPO; returns the final checkpoint's folder."""
    config = resolve_run_seed(config, flow_run.scheduled_start_time)
    rewards, dataset, policy = resolve_online_inputs(config)
    reference = resolve_kl_reference(config.kl, policy)  # beta = 0: none; the start model; or a teacher
    setup, logprobs = TrainingSetup.of(config.model, config.runtime), LogprobPass.from_config(config)
    checkpoints = []

    with (mlflow_run(config.tracking.experiment, config, flow_run.id, flow_run.name,
                     lineage=lineage_tags(config.model, policy, [config.data.path],
                                          dataset_fingerprints(config.data))) as tracker,
          shard_runner(config.runtime) as shards):
        heldout = HeldOutEvaluation.of_online(config, policy)
        heldout.run(policy, 0, tracker, shards)
        for iteration in range(config.iterations):
            clock = StageClock()
            scored, stages, sampling = sample_and_score(config, iteration, policy, dataset, rewards, reference,
                                                        logprobs, shards, clock)
            with clock("advantages"):
                batch = stages["advantages"] = compute_advantages(scored, config.advantage.estimator, config.kl)
            with clock("update"):
                update = update_policy(policy, batch, GRPOUpdateArgs.from_config(config, iteration), setup)
            policy = update.checkpoint
            log_online_iteration(tracker, iteration, config.iterations, stages, update, clock, config.tracking,
                                 extra_metrics=sampling)
            checkpoints.append(policy)
            prune_checkpoints(checkpoints, keep=config.keep_checkpoints)
            print(f"iteration {iteration}: reward mean {scored.read()['rewards'].mean():.3f}, "
                  f"{sum(clock.values()):.1f} s")
            heldout.run(policy, iteration + 1, tracker, shards)
    return policy.path


def sample_and_score(config: GRPOConfig, iteration: int, policy: CheckpointRef, dataset: ArtifactRef,
                     rewards: RewardSources, reference: CheckpointRef | None, logprobs: LogprobPass,
                     shards: ShardRunner, clock: StageClock) -> tuple[ArtifactRef, dict, dict]:
    """Sample prompts -> generate -> score, once; with dynamic sampling, in rounds of fresh prompts until
    prompts_per_iteration groups have rewards that differ (at most max_rounds). Returns the scored batch, the
    stages' tables by name (for MLflow) and the sampling metrics."""
    dynamic, num_groups = config.dynamic_sampling, config.prompts_per_iteration
    if reference is not None and not config.kl.reference:  # the start model, frozen (under LoRA: adapter off)
        reference = reference_checkpoint(reference, policy, config.model.lora)
    stages, rounds, found, dropped = {}, [], 0, 0
    for sampling_round in range(dynamic.max_rounds if dynamic.enabled else 1):
        with clock("prompts"):
            prompts = sample_prompts(dataset, num_groups, iteration, config.seed, sampling_round)
        with clock("generation"):
            rollouts = generation_stage(policy, prompts, config.generation, config.runtime, config.data.system_prompt,
                                        round_seed(config.seed, iteration, sampling_round), iteration,
                                        config.model.trust_remote_code, shards)
        with clock("scoring"):
            scored = scoring_stage(rollouts, rewards, reference, logprobs, config.runtime,
                                   config.model.trust_remote_code, shards)
        suffix = f"_round{sampling_round}" if sampling_round else ""
        stages |= {f"prompts{suffix}": prompts, f"rollouts{suffix}": rollouts, f"scored{suffix}": scored}
        rounds.append(scored)
        if not dynamic.enabled:
            return scored, stages, {}
        useful, groups = group_counts(scored)
        found, dropped = found + useful, dropped + groups - useful
        if found >= num_groups:
            break
    stages["batch"] = fill_batch_stage(rounds, num_groups)
    return stages["batch"], stages, {"sampling/rounds": len(rounds), "sampling/zero_variance_groups": dropped,
                                     "sampling/informative_groups": min(found, num_groups)}
