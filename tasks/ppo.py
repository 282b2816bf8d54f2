"""PPO's own stages: the critic's values on the rollouts, GAE advantages, and the actor-critic update."""

from __future__ import annotations

import torch
from prefect import task

from rlhf_core.batch import collate, response_lists
from rlhf_core.checkpoint import restore_optimizer
from rlhf_core.config import GAEConfig, LoraConfig, LossConfig, OptimConfig, RuntimeConfig, ScoreConfig, ValueConfig
from rlhf_core.ppo import ppo_advantages, rollout_logprobs_and_values, update_from_rollouts
from rlhf_core.token_rewards import clip_scores, normalize_scores, penalize_missing_eos
from tasks.cache import STAGE_TASK_OPTIONS
from tasks.distributed import distributed_update, distributed_values
from tasks.progress import StageProgress
from tasks.refs import ArtifactRef, CheckpointRef, UpdateResult, publish
from tasks.update import save_update
from tasks.runtime import load_actor_critic, prepare_training

PER_TOKEN = ["old_logprobs", "ref_logprobs", "old_values"]


@task(name="compute-values", **STAGE_TASK_OPTIONS)
def compute_values(policy: CheckpointRef, rollouts: ArtifactRef, runtime: RuntimeConfig, critic: str,
                   temperature: float, micro_batch_size: int, chunk_size: int,
                   trust_remote_code: bool = False) -> ArtifactRef:
    """Adds the behaviour policy's `old_logprobs` and the critic's `old_values`, one per response token (under
    torchrun with runtime.num_processes > 1)."""
    df = rollouts.read()
    if runtime.num_processes > 1:
        out = distributed_values(policy, rollouts, runtime, trust_remote_code, temperature=temperature,
                                 micro_batch_size=micro_batch_size, chunk_size=chunk_size)
        logprobs, values = out["old_logprobs"], out["old_values"]
        mask = collate(df["prompt_ids"], df["response_ids"], 0)["response_mask"]
    else:
        model, tokenizer = load_actor_critic(policy, runtime, critic, trust_remote_code)
        batch = collate(df["prompt_ids"], df["response_ids"], tokenizer.pad_token_id, device=runtime.device)
        logprobs, values = rollout_logprobs_and_values(model, batch, micro_batch_size=micro_batch_size,
                                                       temperature=temperature, chunk_size=chunk_size)
        mask = batch["response_mask"]
    return publish(df.assign(old_logprobs=response_lists(logprobs, mask), old_values=response_lists(values, mask)),
                   "values")


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
def update_actor_critic(policy: CheckpointRef, batch: ArtifactRef, loss: LossConfig, value: ValueConfig,
                        optim: OptimConfig, runtime: RuntimeConfig, temperature: float, max_new_tokens: int,
                        seed: int, trust_remote_code: bool = False, lora: LoraConfig | None = None) -> UpdateResult:
    """With `lora`, the policy's adapter and the value head train; the backbone stays frozen. With
    runtime.num_processes > 1 the update runs under torchrun (tasks.distributed)."""
    update_args = dict(loss=loss, value=value, optim=optim, temperature=temperature, max_new_tokens=max_new_tokens,
                       seed=seed)
    if runtime.num_processes > 1:
        return distributed_update("ppo", policy, batch, runtime, trust_remote_code, update_args, "update-metrics")
    model, tokenizer = load_actor_critic(policy, runtime, value.critic, trust_remote_code, for_training=True,
                                         lora=lora)
    fresh_adapter = prepare_training(model.policy, lora, runtime)
    optimizer = torch.optim.AdamW(model.parameter_groups(optim.lr, value.head_lr), weight_decay=optim.weight_decay)
    if not fresh_adapter:  # a fresh adapter's parameters are not the ones the saved state belongs to
        restore_optimizer(optimizer, policy.path)
    progress = StageProgress(total=optim.epochs * optim.mini_batches, desc="update", unit="step")
    history = update_from_rollouts(model, optimizer, batch.read(), tokenizer.pad_token_id, device=runtime.device,
                                   on_step=lambda metrics: progress.update(1), **update_args)
    progress.close()
    # the policy stays in memory for the next generation; the optimizer does not (it also holds the value head)
    return save_update(model.policy, tokenizer, optimizer, history, "update-metrics", write_extra=model.save_critic,
                       keep=(runtime, trust_remote_code, False), merged=lora is not None and lora.save == "merged")
