"""PPO's own stages: the critic's values on the rollouts, GAE advantages, and the actor-critic update."""

from __future__ import annotations

import torch
from prefect import task

from rlhf_core.batch import collate, response_lists
from rlhf_core.config import GAEConfig, RuntimeConfig, ScoreConfig
from rlhf_core.config.training import LogprobPass, PPOUpdateArgs, TrainingSetup
from rlhf_core.ppo import ppo_advantages, rollout_logprobs_and_values
from rlhf_core.token_rewards import clip_scores, normalize_scores, penalize_missing_eos
from tasks.cache import STAGE_TASK_OPTIONS
from tasks.distributed import distributed_values
from tasks.refs import ArtifactRef, CheckpointRef, UpdateResult, publish
from tasks.runtime import load_actor_critic
from tasks.train import train_stage

PER_TOKEN = ["old_logprobs", "ref_logprobs", "old_values"]


@task(name="compute-values", **STAGE_TASK_OPTIONS)
def compute_values(policy: CheckpointRef, rollouts: ArtifactRef, critic: str, logprobs: LogprobPass,
                   runtime: RuntimeConfig, trust_remote_code: bool = False) -> ArtifactRef:
    """Adds the behaviour policy's `old_logprobs` and the critic's `old_values`, one per response token (under
    torchrun with runtime.num_processes > 1)."""
    df = rollouts.read()
    if runtime.num_processes > 1:
        out = distributed_values(policy, rollouts, critic, runtime, trust_remote_code, logprobs)
        old_logprobs, values = out["old_logprobs"], out["old_values"]
        mask = collate(df["prompt_ids"], df["response_ids"], 0)["response_mask"]
    else:
        model, tokenizer = load_actor_critic(policy, runtime, critic, trust_remote_code)
        batch = collate(df["prompt_ids"], df["response_ids"], tokenizer.pad_token_id, device=runtime.device)
        old_logprobs, values = rollout_logprobs_and_values(model, batch, micro_batch_size=logprobs.micro_batch_size,
                                                           temperature=logprobs.temperature,
                                                           chunk_size=logprobs.chunk_size)
        mask = batch["response_mask"]
    return publish(df.assign(old_logprobs=response_lists(old_logprobs, mask),
                             old_values=response_lists(values, mask)), "values")


@task(name="compute-gae", **STAGE_TASK_OPTIONS)
def compute_gae(scored: ArtifactRef, kl_coef: float, kl_estimator: str, gae: GAEConfig,
                scores: ScoreConfig) -> ArtifactRef:
    """Per-token rewards (-beta KL + score on the last token), GAE advantages and returns."""
    df = scored.read()
    batch = collate(df["prompt_ids"], df["response_ids"], 0, per_token={k: df[k] for k in PER_TOKEN})
    score = torch.tensor(df["rewards"].to_numpy(), dtype=torch.float32)
    if scores.missing_eos_penalty is not None:
        score = penalize_missing_eos(score, torch.tensor(df["finished"].to_numpy()), scores.missing_eos_penalty)
    score = clip_scores(score, scores.clip)
    score = normalize_scores(score) if scores.normalize else score
    out = ppo_advantages(score, batch["old_logprobs"], batch["ref_logprobs"], batch["old_values"],
                         batch["response_mask"], kl_coef=kl_coef, kl_estimator=kl_estimator, gamma=gae.gamma,
                         lam=gae.lam, whiten_advantages=gae.whiten_advantages)
    mask = batch["response_mask"]
    return publish(df.assign(
        score=score.numpy(), kl_sum=out["kl"].sum(-1).numpy(), non_score_reward=(-kl_coef * out["kl"]).sum(-1).numpy(),
        **{name: response_lists(out[name], mask) for name in ("advantages", "returns")}), "gae")


@task(name="update-actor-critic", **STAGE_TASK_OPTIONS)
def update_actor_critic(policy: CheckpointRef, batch: ArtifactRef, args: PPOUpdateArgs,
                        setup: TrainingSetup) -> UpdateResult:
    """optim.epochs x optim.mini_batches steps of PPO's clipped policy and value losses on `batch` (the GAE
    stage's table). With LoRA, the policy's adapter and the value head train; the backbone stays frozen."""
    return train_stage(policy, batch, args, setup, "update-metrics", "update")
