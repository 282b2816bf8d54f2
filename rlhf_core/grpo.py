"""GRPO (Shao et al. 2024, DeepSeekMath sec. 4.1) on the shared pieces.

The loss per response token is a policy loss from POLICY_LOSSES (PPO's clipped surrogate by default) with one
advantage per response (outcome supervision) or, from the REINFORCE++ estimators, one per token; plus, when
kl_coef > 0, the estimate of KL(pi || ref) added to the loss (GRPO eq. 3), and an optional entropy bonus.
Departures from the paper, all configurable: separate low/high clip ranges (DAPO clip-higher), token-mean
aggregation by default (DAPO) instead of the paper's per-sequence mean, no KL term by default (kl_coef = 0, as in
DAPO and Dr. GRPO), in which case no reference model is ever loaded, and the KL optionally placed in the reward
instead (kl.placement: reward, REINFORCE++: the advantage stage folds it in, the loss gets no KL term), clamped
(kl_clamp) or importance-corrected (kl_importance_corrected: k3 * pi/pi_old, whose gradient is the reverse KL's).
Other policy losses (loss.policy_loss): GSPO-token and CISPO, each with its own clip range, and dual-clip PPO.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_core.batch import collate
from rlhf_core.distributed import map_rows_across_ranks
from rlhf_core.kl import importance_weighted_kl, kl_estimate
from rlhf_core.logprobs import batched_response_logprobs, response_logprobs
from rlhf_core.policy_losses import POLICY_LOSSES, aggregate, masked_mean, policy_metrics
from rlhf_core.precision import compute_copies, compute_dtype
from rlhf_core.update import Normalizers, run_update


def grpo_loss(model, batch: dict[str, Tensor], norm: Normalizers, *, clip_eps_low: float, clip_eps_high: float,
              kl_coef: float, kl_estimator: str, aggregation: str, norm_length: int, temperature: float,
              chunk_size: int, tis_cap: float | None = None, policy_loss: str = "ppo_clip",
              dual_clip_c: float | None = None, entropy_coef: float = 0.0, kl_importance_corrected: bool = False,
              kl_clamp: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss of one micro-batch, divided by the mini-batch's global normalisers so micro-batches add up.
    batch: prompt_ids/prompt_mask [B, P], response_ids/response_mask [B, T], advantages [B] (one per response) or
    [B, T] (one per token), optional old_logprobs [B, T] (absent: on-policy, ratio 1), ref_logprobs [B, T] (needed
    if kl_coef > 0; given with kl_coef = 0, the KL is only reported) and sampling_logprobs [B, T] (the sampler's,
    needed if tis_cap is set). clip_eps_low/high: the range of `policy_loss` (LossConfig.clip_range)."""
    mask = batch["response_mask"].bool()
    logprobs, entropy = response_logprobs(model, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
                                          mask, temperature=temperature, chunk_size=chunk_size)
    old_logprobs = batch.get("old_logprobs", logprobs.detach())
    advantages = batch["advantages"]
    if advantages.dim() == 1:  # one advantage per response: the same on each of its tokens
        advantages = advantages[:, None].expand_as(logprobs)  # [B, T]
    dual = {} if dual_clip_c is None else {"dual_clip_c": dual_clip_c}  # ppo_clip's option (the config checks)
    loss_per_token, info = POLICY_LOSSES[policy_loss](logprobs, old_logprobs, advantages, mask, clip_eps_low,
                                                      clip_eps_high, **dual)
    metrics = {}
    if tis_cap is not None:
        weights = truncated_is_weights(old_logprobs, batch["sampling_logprobs"], tis_cap)
        loss_per_token = loss_per_token * weights
        metrics.update({
            "rollout/tis_weight_mean": masked_mean(weights, mask, norm.num_tokens),
            "rollout/tis_capped_frac": masked_mean(weights >= tis_cap, mask, norm.num_tokens),
            "rollout/logprob_abs_diff": masked_mean((old_logprobs - batch["sampling_logprobs"]).abs(), mask,
                                                    norm.num_tokens)})
    if kl_coef > 0 or "ref_logprobs" in batch:  # a loss term with kl_coef > 0, else only reported
        kl_term, kl_metrics = reference_kl(logprobs, old_logprobs, batch["ref_logprobs"], mask, norm.num_tokens,
                                           estimator=kl_estimator, importance_corrected=kl_importance_corrected,
                                           clamp=kl_clamp)
        if kl_coef > 0:  # not 0 * term: an overflowing k3 would turn the loss into NaN
            loss_per_token = loss_per_token + kl_coef * kl_term
        metrics.update(kl_metrics)
    if entropy_coef > 0:  # the bonus is part of each token's loss, so it is reduced (and normalised) like the loss
        loss_per_token = loss_per_token - entropy_coef * entropy
    loss = aggregate(loss_per_token, mask, aggregation, num_seqs=norm.num_seqs, num_tokens=norm.num_tokens,
                     norm_length=norm_length)
    metrics.update({"loss/policy": loss.detach(),
                    **policy_metrics(logprobs, old_logprobs, entropy, info, mask, norm.num_tokens, norm.num_seqs)})
    return loss, metrics


def reference_kl(logprobs: Tensor, old_logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, num_tokens: float, *,
                 estimator: str, importance_corrected: bool, clamp: float | None) -> tuple[Tensor, dict[str, Tensor]]:
    """The KL term to the reference per token (the estimate, times pi/pi_old when importance_corrected) and its
    metrics: the plain estimate's mean and, with a clamp, the share of tokens where it binds.
    logprobs, old_logprobs, ref_logprobs, mask: [B, T] -> ([B, T], metrics)"""
    kl_per_token = kl_estimate(logprobs, ref_logprobs, estimator, clamp)
    term = importance_weighted_kl(kl_per_token, logprobs, old_logprobs) if importance_corrected else kl_per_token
    metrics = {"kl/mean": masked_mean(kl_per_token, mask, num_tokens)}
    if clamp is not None:
        metrics["kl/clamp_frac"] = masked_mean((logprobs.detach() - ref_logprobs).abs() > clamp, mask, num_tokens)
    return term, metrics


def truncated_is_weights(old_logprobs: Tensor, sampling_logprobs: Tensor, cap: float) -> Tensor:
    """Per-token importance weights min(p_train / p_sampler, cap) of the tokens the sampler drew, no gradient.
    The rollout engine's log-probs differ from the trainer's (lower precision, another kernel, a truncated
    top-p distribution), so the on-policy gradient is biased; the weight corrects it, truncation bounds its
    variance (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training").
    old_logprobs, sampling_logprobs: [B, T] -> [B, T]"""
    return torch.exp(old_logprobs.detach() - sampling_logprobs).clamp(max=cap)


def grpo_update(model, optimizer, batch: dict[str, Tensor], *, epochs: int, mini_batches: int,
                micro_batch_size: int, max_grad_norm: float, seed: int, on_step=None,
                **loss_kwargs) -> list[dict[str, float]]:
    """Run GRPO's optimizer steps on one rollout batch; returns one metrics dict per step.
    With a single step per batch the data is exactly on-policy (ratio 1) and no extra forward pass is needed;
    with several, the pre-update log-probs are computed once so later steps are clipped against them."""
    if epochs * mini_batches > 1:
        with compute_copies(model, compute_dtype(model)):  # as the update computes them: its first ratio is 1
            batch = {**batch, "old_logprobs": map_rows_across_ranks(lambda rows: batched_response_logprobs(
                model, rows, micro_batch_size=micro_batch_size, temperature=loss_kwargs["temperature"],
                chunk_size=loss_kwargs["chunk_size"]), batch)}

    def loss_fn(m, micro, norm):
        return grpo_loss(m, micro, norm, **loss_kwargs)

    return run_update(model, optimizer, batch, loss_fn, epochs=epochs, mini_batches=mini_batches,
                      micro_batch_size=micro_batch_size, max_grad_norm=max_grad_norm, seed=seed, on_step=on_step)


def update_from_rollouts(model, optimizer, rollouts, pad_id: int, *, loss, kl, optim, device: str, temperature: float,
                         max_new_tokens: int, seed: int, on_step=None) -> list[dict[str, float]]:
    """GRPO's update on a scored rollout table (columns prompt_ids, response_ids, advantages: a number per row, or a
    list per row from a token-level estimator, and, with a KL term, ref_logprobs), with the flow's loss/kl/optim
    configs. The same call in one process and on every rank. With kl.placement 'reward' the KL is already in the
    advantages: the loss gets no KL term, the KL is only reported."""
    per_token = {"ref_logprobs": rollouts["ref_logprobs"]} if kl.coef > 0 else {}
    per_seq = {}
    if loss.tis_cap is not None:
        per_token["sampling_logprobs"] = rollouts["sampling_logprobs"]
    token_level = hasattr(rollouts["advantages"].iloc[0], "__len__")  # REINFORCE++: a list per response
    (per_token if token_level else per_seq)["advantages"] = rollouts["advantages"]
    tensors = collate(rollouts["prompt_ids"], rollouts["response_ids"], pad_id, per_token=per_token, per_seq=per_seq,
                      device=device)
    clip_eps_low, clip_eps_high = loss.clip_range
    return grpo_update(
        model, optimizer, tensors, epochs=optim.epochs, mini_batches=optim.mini_batches,
        micro_batch_size=optim.micro_batch_size, max_grad_norm=optim.max_grad_norm, seed=seed, on_step=on_step,
        clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high, kl_coef=kl.coef if kl.placement == "loss" else 0.0,
        kl_estimator=kl.estimator, aggregation=loss.aggregation, norm_length=max_new_tokens,
        temperature=temperature or 1.0, chunk_size=optim.logprob_chunk_size, tis_cap=loss.tis_cap,
        policy_loss=loss.policy_loss, dual_clip_c=loss.dual_clip_c, entropy_coef=loss.entropy_coef,
        kl_importance_corrected=kl.importance_corrected, kl_clamp=kl.clamp)
