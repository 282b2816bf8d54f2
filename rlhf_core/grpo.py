"""GRPO (Shao et al. 2024, DeepSeekMath sec. 4.1) on the shared pieces.

The loss per response token is PPO's clipped surrogate with one advantage per response (outcome supervision),
plus, when kl_coef > 0, the k3 estimate of KL(pi || ref) added to the loss (GRPO eq. 3) rather than to the
reward. Departures from the paper, all configurable: separate low/high clip ranges (DAPO clip-higher),
token-mean aggregation by default (DAPO) instead of the paper's per-sequence mean, and no KL term by default
(kl_coef = 0, as in DAPO and Dr. GRPO), in which case no reference model is ever loaded.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_core.kl import KL_ESTIMATORS
from rlhf_core.logprobs import batched_response_logprobs, response_logprobs
from rlhf_core.policy_losses import POLICY_LOSSES, aggregate
from rlhf_core.update import Normalizers, run_update


def grpo_loss(model, batch: dict[str, Tensor], norm: Normalizers, *, clip_eps_low: float, clip_eps_high: float,
              kl_coef: float, kl_estimator: str, aggregation: str, norm_length: int, temperature: float,
              chunk_size: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss of one micro-batch, divided by the mini-batch's global normalisers so micro-batches add up.
    batch: prompt_ids/prompt_mask [B, P], response_ids/response_mask [B, T], advantages [B],
    optional old_logprobs [B, T] (absent: on-policy, ratio 1) and ref_logprobs [B, T] (needed if kl_coef > 0)."""
    mask = batch["response_mask"].bool()
    logprobs, entropy = response_logprobs(model, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
                                          mask, temperature=temperature, chunk_size=chunk_size)
    old_logprobs = batch.get("old_logprobs", logprobs.detach())
    advantages = batch["advantages"][:, None].expand_as(logprobs)  # [B, T]: one advantage per response
    loss_per_token, info = POLICY_LOSSES["ppo_clip"](logprobs, old_logprobs, advantages, clip_eps_low, clip_eps_high)
    metrics = {}
    if kl_coef > 0:
        kl_per_token = KL_ESTIMATORS[kl_estimator](logprobs, batch["ref_logprobs"])
        loss_per_token = loss_per_token + kl_coef * kl_per_token
        metrics["kl/mean"] = _token_sum(kl_per_token, mask) / norm.num_tokens
    loss = aggregate(loss_per_token, mask, aggregation, num_seqs=norm.num_seqs, num_tokens=norm.num_tokens,
                     norm_length=norm_length)
    metrics.update({
        "loss/policy": loss.detach(),
        "policy/entropy": _token_sum(entropy, mask) / norm.num_tokens,
        "policy/clip_frac_low": _token_sum(info["clipped_low"].float(), mask) / norm.num_tokens,
        "policy/clip_frac_high": _token_sum(info["clipped_high"].float(), mask) / norm.num_tokens,
        "policy/approx_kl": _token_sum(0.5 * (logprobs.detach() - old_logprobs) ** 2, mask) / norm.num_tokens,
    })
    return loss, metrics


def _token_sum(values: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, values.detach(), 0.0).sum()


def grpo_update(model, optimizer, batch: dict[str, Tensor], *, epochs: int, mini_batches: int,
                micro_batch_size: int, max_grad_norm: float, seed: int, on_step=None,
                **loss_kwargs) -> list[dict[str, float]]:
    """Run GRPO's optimizer steps on one rollout batch; returns one metrics dict per step.
    With a single step per batch the data is exactly on-policy (ratio 1) and no extra forward pass is needed;
    with several, the pre-update log-probs are computed once so later steps are clipped against them."""
    if epochs * mini_batches > 1:
        batch = {**batch, "old_logprobs": batched_response_logprobs(
            model, batch, micro_batch_size=micro_batch_size, temperature=loss_kwargs["temperature"],
            chunk_size=loss_kwargs["chunk_size"])}

    def loss_fn(m, micro, norm):
        return grpo_loss(m, micro, norm, **loss_kwargs)

    return run_update(model, optimizer, batch, loss_fn, epochs=epochs, mini_batches=mini_batches,
                      micro_batch_size=micro_batch_size, max_grad_norm=max_grad_norm, seed=seed, on_step=on_step)
