"""The GRPO flow: N iterations of sample prompts -> generate -> score -> advantages -> update.

Every stage is a cached Prefect task keyed on the content of its inputs, the config and the code version: a new
run with the same config after a crash replays the finished stages from the cache and resumes at the first
unfinished one. One MLflow run per flow run holds the params, per-iteration metrics, the Parquet files and a
registered model version per checkpoint.
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from flows.inputs import lineage_tags, resolve_online_inputs, resolve_run_seed
from flows.tracking import StageClock, log_online_iteration, mlflow_run
from rlhf_core.config import GRPOConfig
from rlhf_core.config.training import GRPOUpdateArgs, LogprobPass, TrainingSetup
from tasks.advantages import compute_advantages
from tasks.data import dataset_fingerprints, sample_prompts
from tasks.grpo import update_policy
from tasks.runtime import reference_checkpoint
from tasks.sharded_stages import generation_stage, scoring_stage
from tasks.sharding import shard_runner
from tasks.train import prune_checkpoints


@flow(name="grpo", log_prints=True)
def grpo(config: GRPOConfig = GRPOConfig()) -> str:
    """Train a policy with GRPO; returns the final checkpoint's folder."""
    config = resolve_run_seed(config, flow_run.scheduled_start_time)
    rewards, dataset, policy = resolve_online_inputs(config)
    reference = policy if config.kl.coef > 0 else None  # beta = 0: no reference model at all
    trust = config.model.trust_remote_code
    setup, logprobs = TrainingSetup.of(config.model, config.runtime), LogprobPass.from_config(config)
    checkpoints = []

    with (mlflow_run(config.tracking.experiment, config, flow_run.id, flow_run.name,
                     lineage=lineage_tags(config.model, policy, [config.data.path],
                                          dataset_fingerprints(config.data))) as tracker,
          shard_runner(config.runtime) as shards):
        for iteration in range(config.iterations):
            clock = StageClock()
            with clock("prompts"):
                prompts = sample_prompts(dataset, config.prompts_per_iteration, iteration, config.seed)
            with clock("generation"):
                rollouts = generation_stage(policy, prompts, config.generation, config.runtime,
                                            config.data.system_prompt, config.seed, iteration, trust, shards)
            with clock("scoring"):
                scored = scoring_stage(rollouts, rewards,
                                       reference and reference_checkpoint(reference, policy, config.model.lora),
                                       logprobs, config.runtime, trust, shards)
            with clock("advantages"):
                batch = compute_advantages(scored, config.advantage.estimator, config.kl)
            with clock("update"):
                update = update_policy(policy, batch, GRPOUpdateArgs.from_config(config, iteration), setup)
            policy = update.checkpoint
            log_online_iteration(tracker, iteration, {"prompts": prompts, "rollouts": rollouts, "scored": scored,
                                                       "advantages": batch}, update, clock,
                                 config.tracking.registered_model, config.tracking.log_rollouts)
            checkpoints.append(policy)
            prune_checkpoints(checkpoints, keep=config.keep_checkpoints)
            print(f"iteration {iteration}: reward mean {scored.read()['rewards'].mean():.3f}, "
                  f"{sum(clock.values()):.1f} s")
    return policy.path
