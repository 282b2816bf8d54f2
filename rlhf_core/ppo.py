"""PPO for language models (Ziegler et al. 2019; Ouyang et al. 2022), on the shared pieces.

Rewards per token are -beta * KL(pi_old || ref) with the reward-model score added on the last response token;
GAE turns them into advantages (whitened over the batch) and returns = advantages + old values. The loss is
the clipped surrogate plus vf_coef times the clipped value loss, both reduced by the same `aggregate`, over
several epochs of mini-batches of one rollout batch. The actor and the critic share the backbone
(`value_head.ActorCritic`). Departures: the clip range can be asymmetric (DAPO clip-higher; equal by default),
the loss aggregation is configurable (token-mean by default, as in most PPO-for-LM code), and so is the policy
loss (loss.policy_loss: GSPO-token, whose token form takes GAE's per-token advantages, or CISPO; dual-clip for the
surrogate), with an optional entropy bonus (loss.entropy_coef, as in Schulman et al. 2017 eq. 9, reduced like the
policy loss).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_core.batch import collate, map_micro_batches
from rlhf_core.gae import gae_advantages, whiten
from rlhf_core.kl import KL_ESTIMATORS
from rlhf_core.policy_losses import POLICY_LOSSES, aggregate, masked_mean, policy_metrics
from rlhf_core.token_rewards import token_level_rewards
from rlhf_core.update import Normalizers, run_update
from rlhf_core.value_head import ActorCritic
from rlhf_core.value_losses import clipped_value_loss


def ppo_advantages(scores: Tensor, old_logprobs: Tensor, ref_logprobs: Tensor, values: Tensor, mask: Tensor, *,
                   kl_coef: float, kl_estimator: str, gamma: float, lam: float,
                   whiten_advantages: bool) -> dict[str, Tensor]:
    """Per-token rewards, advantages and returns of a rollout batch.
    scores: [B]; old_logprobs, ref_logprobs, values: [B, T]; mask: [B, T] bool -> dict of [B, T] tensors
    (`kl`, `rewards`, `advantages`, `returns`)."""
    kl_per_token = torch.where(mask, KL_ESTIMATORS[kl_estimator](old_logprobs, ref_logprobs), 0.0)
    rewards = token_level_rewards(scores, kl_per_token, mask, kl_coef)
    advantages, returns = gae_advantages(rewards, values, mask, gamma, lam)
    if whiten_advantages:
        advantages = whiten(advantages, mask)
    return {"kl": kl_per_token, "rewards": rewards, "advantages": advantages, "returns": returns}


def ppo_loss(model: ActorCritic, batch: dict[str, Tensor], norm: Normalizers, *, clip_eps_low: float,
             clip_eps_high: float, clip_range_value: float, vf_coef: float, aggregation: str, norm_length: int,
             temperature: float, chunk_size: int, policy_loss: str = "ppo_clip", dual_clip_c: float | None = None,
             entropy_coef: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss of one micro-batch, divided by the mini-batch's global normalisers so micro-batches add up.
    batch: prompt/response ids and masks, and [B, T] old_logprobs, old_values, advantages, returns.
    clip_eps_low/high: the range of `policy_loss` (LossConfig.clip_range)."""
    mask = batch["response_mask"].bool()
    logprobs, entropy, values = model(batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"], mask,
                                      temperature=temperature, chunk_size=chunk_size)
    dual = {} if dual_clip_c is None else {"dual_clip_c": dual_clip_c}  # ppo_clip's option (the config checks)
    policy_per_token, info = POLICY_LOSSES[policy_loss](logprobs, batch["old_logprobs"], batch["advantages"], mask,
                                                        clip_eps_low, clip_eps_high, **dual)
    if entropy_coef > 0:  # the bonus is part of each token's policy loss, so it is reduced like it
        policy_per_token = policy_per_token - entropy_coef * entropy
    value_per_token, value_clipped = clipped_value_loss(values, batch["old_values"], batch["returns"],
                                                        clip_range_value)
    reduce = dict(mode=aggregation, num_seqs=norm.num_seqs, num_tokens=norm.num_tokens, norm_length=norm_length)
    policy_loss_value = aggregate(policy_per_token, mask, **reduce)
    value_loss = aggregate(value_per_token, mask, **reduce)

    metrics = {"loss/policy": policy_loss_value.detach(), "loss/value": value_loss.detach(),
               **policy_metrics(logprobs, batch["old_logprobs"], entropy, info, mask, norm.num_tokens, norm.num_seqs),
               "value/clip_frac": masked_mean(value_clipped, mask, norm.num_tokens)}
    return policy_loss_value + vf_coef * value_loss, metrics


def ppo_update(model: ActorCritic, optimizer, batch: dict[str, Tensor], *, epochs: int, mini_batches: int,
               micro_batch_size: int, max_grad_norm: float, seed: int, on_step=None,
               **loss_kwargs) -> list[dict[str, float]]:
    """PPO's optimizer steps on one rollout batch (epochs x mini-batches); returns one metrics dict per step.
    The old log-probs and values in `batch` come from the rollout stage, computed by this same model."""

    def loss_fn(m, micro, norm):
        return ppo_loss(m, micro, norm, **loss_kwargs)

    return run_update(model, optimizer, batch, loss_fn, epochs=epochs, mini_batches=mini_batches,
                      micro_batch_size=micro_batch_size, max_grad_norm=max_grad_norm, seed=seed, on_step=on_step)


def rollout_logprobs_and_values(model: ActorCritic, batch: dict[str, Tensor], *, micro_batch_size: int,
                                temperature: float, chunk_size: int) -> tuple[Tensor, Tensor]:
    """The behaviour policy's log-probs and the critic's values for a rollout batch (no grad).
    -> (old_logprobs [B, T], old_values [B, T])"""

    def outputs(micro: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        logprobs, _, values = model(micro["prompt_ids"], micro["prompt_mask"], micro["response_ids"],
                                    micro["response_mask"], temperature=temperature, chunk_size=chunk_size)
        return logprobs, values

    return map_micro_batches(outputs, batch, micro_batch_size)


def update_from_rollouts(model: ActorCritic, optimizer, rollouts, pad_id: int, *, loss, value, optim, device: str,
                         temperature: float, max_new_tokens: int, seed: int, on_step=None) -> list[dict[str, float]]:
    """PPO's update on a table with GAE's columns (prompt_ids, response_ids and per-token old_logprobs,
    old_values, advantages, returns), with the flow's loss/value/optim configs. The same call in one process
    and on every rank."""
    per_token = {k: rollouts[k] for k in ("old_logprobs", "old_values", "advantages", "returns")}
    tensors = collate(rollouts["prompt_ids"], rollouts["response_ids"], pad_id, per_token=per_token, device=device)
    clip_eps_low, clip_eps_high = loss.clip_range
    return ppo_update(
        model, optimizer, tensors, epochs=optim.epochs, mini_batches=optim.mini_batches,
        micro_batch_size=optim.micro_batch_size, max_grad_norm=optim.max_grad_norm, seed=seed, on_step=on_step,
        clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high, clip_range_value=value.clip_range_value,
        vf_coef=value.vf_coef, aggregation=loss.aggregation, norm_length=max_new_tokens, temperature=temperature,
        chunk_size=optim.logprob_chunk_size, policy_loss=loss.policy_loss, dual_clip_c=loss.dual_clip_c,
        entropy_coef=loss.entropy_coef)
