"""The PPO flow: N iterations of sample prompts -> generate -> values -> score -> GAE -> update.

The reference model is the initial policy, frozen; the KL to it enters the per-token reward with coefficient
beta, fixed or adapted towards a target by the controller of Ziegler et al. (2019). The controller's value is an
input of the GAE stage, so a resumed run replays the same coefficients from the cached iterations.
Caching, tracking and checkpoints work as in the GRPO flow.
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from flows.heldout import HeldOutEvaluation
from flows.inputs import lineage_tags, resolve_online_inputs, resolve_run_seed
from flows.tracking import StageClock, log_online_iteration, mlflow_run
from rlhf_core.config import PPOConfig
from rlhf_core.config.training import LogprobPass, PPOUpdateArgs, TrainingSetup
from rlhf_core.kl_control import make_kl_controller
from rlhf_core.metrics import ppo_metrics
from tasks.data import dataset_fingerprints, sample_prompts
from tasks.ppo import compute_gae, compute_values, update_actor_critic
from tasks.runtime import reference_checkpoint
from tasks.sharded_stages import generation_stage, scoring_stage
from tasks.sharding import shard_runner
from tasks.train import prune_checkpoints


@flow(name="ppo", log_prints=True)
def ppo(config: PPOConfig = PPOConfig()) -> str:
    """Train a policy with PPO against reward models and/or functions; returns the final checkpoint's folder."""
    config = resolve_run_seed(config, flow_run.scheduled_start_time)
    rewards, dataset, policy = resolve_online_inputs(config)
    reference = policy  # the frozen initial policy
    kl_controller = make_kl_controller("adaptive" if config.kl.target else "fixed", config.kl.coef,
                                       config.kl.target, config.kl.horizon)
    runtime, trust = config.runtime, config.model.trust_remote_code
    setup, logprobs = TrainingSetup.of(config.model, runtime), LogprobPass.from_config(config)
    checkpoints = []

    with (mlflow_run(config.tracking.experiment, config, flow_run.id, flow_run.name,
                     lineage=lineage_tags(config.model, policy, [config.data.path],
                                          dataset_fingerprints(config.data))) as tracker,
          shard_runner(config.runtime) as shards):
        heldout = HeldOutEvaluation.of_online(config, policy)
        heldout.run(policy, 0, tracker, shards)
        for iteration in range(config.iterations):
            clock = StageClock()
            with clock("prompts"):
                prompts = sample_prompts(dataset, config.prompts_per_iteration, iteration, config.seed)
            with clock("generation"):
                rollouts = generation_stage(policy, prompts, config.generation, runtime, config.data.system_prompt,
                                            config.seed, iteration, trust, shards)
            with clock("values"):
                valued = compute_values(policy, rollouts, config.value.critic, logprobs, runtime, trust)
            with clock("scoring"):
                scored = scoring_stage(valued, rewards, reference_checkpoint(reference, policy, config.model.lora),
                                       logprobs, runtime, trust, shards)
            with clock("advantages"):
                batch = compute_gae(scored, kl_controller.value, config.kl.estimator, config.gae, config.scores)
            with clock("update"):
                update = update_actor_critic(policy, batch, PPOUpdateArgs.from_config(config, iteration), setup)
            policy = update.checkpoint
            table = batch.read()
            stats = ppo_metrics(table["score"].to_numpy(), table["kl_sum"].to_numpy(),
                                table["non_score_reward"].to_numpy(), table["advantages"], table["returns"],
                                table["old_values"])
            stats["kl/coef"] = kl_controller.value
            kl_controller.update(stats["kl/mean"], n_steps=batch.rows)
            log_online_iteration(tracker, iteration, config.iterations,
                                 {"prompts": prompts, "rollouts": rollouts, "values": valued, "scored": scored,
                                  "advantages": batch}, update, clock, config.tracking, stats)
            checkpoints.append(policy)
            prune_checkpoints(checkpoints, keep=config.keep_checkpoints)
            print(f"iteration {iteration}: score {stats['ppo/score_mean']:.3f}, KL {stats['kl/mean']:.3f}")
            heldout.run(policy, iteration + 1, tracker, shards)
    return policy.path
