"""Per-token policy-gradient losses and `aggregate`, the one function that reduces them to a scalar.

ppo_clip is PPO's clipped surrogate (Schulman et al. 2017, eq. 7) written as a loss to minimise, with
separate low/high clip ranges: clip_eps_high > clip_eps_low is DAPO's "clip-higher" (Yu et al. 2025, sec. 3.1),
which lets low-probability tokens grow further and so slows entropy collapse. Equal values give plain PPO.
No dual-clip and no KL term here: the KL penalty is added by the caller (see kl.py).

Aggregation modes (the choice matters: see Dr. GRPO, Liu et al. 2025, and DAPO's token-level loss):
  token-mean               every valid token in the batch has equal weight (DAPO).
  seq-mean-token-mean      mean over tokens in each sequence, then over sequences (original GRPO, eq. 3);
                           biases toward short correct / long wrong answers.
  seq-mean-token-sum-norm  sum over tokens / (num_seqs * a constant length) (Dr. GRPO): no length bias.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from rlhf_core.registry import register

AGGREGATION_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def aggregate(
    values: Tensor,
    mask: Tensor,
    mode: str,
    *,
    num_seqs: float | None = None,
    num_tokens: float | None = None,
    norm_length: int | None = None,
) -> Tensor:
    """Reduce per-token `values: [B, T]` over bool `mask: [B, T]` to a scalar [] according to `mode`.

    token-mean:              sum(values * mask) / num_tokens                      (default: mask.sum())
    seq-mean-token-mean:     sum_b (masked mean of row b) / num_seqs              (default: B; empty row -> 0)
    seq-mean-token-sum-norm: sum(values * mask) / (num_seqs * norm_length)        (default: B and T)

    Gradient accumulation: each mode is a sum over rows divided by a normaliser, so when a batch is split
    into micro-batches and every micro-batch call is given the FULL batch's num_seqs / num_tokens /
    norm_length, the sum of the micro-batch losses (and of their gradients) equals the full-batch loss.
    With the defaults, each micro-batch is normalised by its own size instead, and the sum is wrong.
    Masked-out positions are selected away with torch.where, so NaN/inf there reach neither the result nor
    the gradient (multiplying by the mask would give NaN * 0 = NaN).
    """
    assert values.shape == mask.shape and mask.dtype == torch.bool, (values.shape, mask.shape, mask.dtype)
    masked = torch.where(mask, values, torch.zeros_like(values))
    if mode == "token-mean":
        denom = mask.sum().clamp_min(1) if num_tokens is None else num_tokens  # clamp: empty mask -> 0, not NaN
        return masked.sum() / denom
    if mode == "seq-mean-token-mean":
        mean_per_seq = masked.sum(-1) / mask.sum(-1).clamp_min(1)  # [B]; an all-masked row contributes 0
        return mean_per_seq.sum() / (values.shape[0] if num_seqs is None else num_seqs)
    if mode == "seq-mean-token-sum-norm":
        num_seqs = values.shape[0] if num_seqs is None else num_seqs
        norm_length = values.shape[-1] if norm_length is None else norm_length  # training: max_new_tokens
        return masked.sum() / (num_seqs * norm_length)
    raise ValueError(f"unknown aggregation mode {mode!r}; choose one of {sorted(AGGREGATION_MODES)}")


def masked_mean(values: Tensor, mask: Tensor, num_tokens: float | None = None) -> Tensor:
    """Mean of `values` over `mask` for metrics, detached, in float32 at least; 0 for an empty mask. num_tokens:
    the mini-batch's global token count, so micro-batches' metrics add up (default: this mask's).
    values, mask: [B, T] -> []"""
    values = values.detach()
    return aggregate(values if values.dtype == torch.float64 else values.float(), mask, "token-mean",
                     num_tokens=num_tokens)


def policy_metrics(logprobs: Tensor, old_logprobs: Tensor, entropy: Tensor, clip_info: dict[str, Tensor],
                   mask: Tensor, num_tokens: float) -> dict[str, Tensor]:
    """GRPO's and PPO's per-token policy metrics as shares of the mini-batch's token mean: entropy, the clipped
    shares below and above the trust region (`ppo_clip_loss`'s info) and the approximate KL
    0.5 (log pi - log pi_old)^2 to the behaviour policy. logprobs, old_logprobs, entropy, mask: [B, T]"""
    return {"policy/entropy": masked_mean(entropy, mask, num_tokens),
            "policy/clip_frac_low": masked_mean(clip_info["clipped_low"], mask, num_tokens),
            "policy/clip_frac_high": masked_mean(clip_info["clipped_high"], mask, num_tokens),
            "policy/approx_kl": masked_mean(0.5 * (logprobs.detach() - old_logprobs) ** 2, mask, num_tokens)}


POLICY_LOSSES: dict[str, Callable[..., tuple[Tensor, dict[str, Tensor]]]] = {}


@register(POLICY_LOSSES, "ppo_clip")
def ppo_clip_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    clip_eps_low: float,
    clip_eps_high: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token clipped surrogate loss max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)), r = pi / pi_old
    (PPO eq. 7 negated; DAPO clip-higher for eps_high != eps_low).
    logprobs, old_logprobs, advantages: [B, T] -> loss: [B, T], metrics: dict of [B, T] tensors
    ("ratio" detached; "clipped_low" / "clipped_high" bool, True where that clip is active, i.e. zero gradient)."""
    assert logprobs.shape == old_logprobs.shape == advantages.shape, (logprobs.shape, advantages.shape)
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps_low, 1 + clip_eps_high)
    loss = torch.maximum(unclipped, clipped)  # pessimistic bound: the clip only ever removes an incentive
    metrics = {
        "ratio": ratio.detach(),
        # the clip binds only on the side where it would otherwise reward moving further
        "clipped_low": (ratio < 1 - clip_eps_low) & (advantages < 0),
        "clipped_high": (ratio > 1 + clip_eps_high) & (advantages > 0),
    }
    return loss, metrics
