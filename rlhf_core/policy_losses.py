"""Per-token policy-gradient losses, `aggregate` (the one function that reduces them to a scalar) and the policy
metrics of GRPO and PPO.

Every member of POLICY_LOSSES has one signature, so GRPO and PPO pick one by name (`loss.policy_loss`) and reduce it
with any aggregation mode:
    (logprobs, old_logprobs, advantages: [B, T], mask: [B, T] bool, clip_eps_low, clip_eps_high)
    -> (loss [B, T], info: dict of detached [B, T] tensors, plus [B] ones for sequence-level clips)
The clip range is the chosen loss's own (`LossConfig.clip_range`): PPO's 0.2 and GSPO's 3e-4 are not the same scale.

  ppo_clip  PPO's clipped surrogate (Schulman et al. 2017, eq. 7) written as a loss to minimise, with separate
            low/high clip ranges: clip_eps_high > clip_eps_low is DAPO's "clip-higher" (Yu et al. 2025, sec. 3.1),
            which lets low-probability tokens grow further and so slows entropy collapse. Equal values give plain
            PPO. Optional dual clip (Ye et al. 2020): with A < 0 the loss is also capped at -c A.
  gspo      GSPO-token (Zheng et al. 2025, eq. 13-14): the length-normalised sequence ratio s_i, broadcast to the
            response's tokens with the stop-gradient trick, so advantages may vary per token (REINFORCE++, GAE).
  cispo     CISPO (MiniMax-M1, 2025, sec. 3.1): REINFORCE weighted by the clipped, detached importance weight; no
            token's gradient is ever dropped, only its weight capped.

Not here: the KL penalty (kl.py, added by the caller) and the entropy bonus (grpo.py, ppo.py subtract
entropy_coef * entropy per token before `aggregate`, so it is reduced like the loss).

Aggregation modes (the choice matters: see Dr. GRPO, Liu et al. 2025, and DAPO's token-level loss):
  token-mean               every valid token in the batch has equal weight (DAPO).
  seq-mean-token-mean      mean over tokens in each sequence, then over sequences (original GRPO, eq. 3; GSPO's
                           own objective); biases toward short correct / long wrong answers.
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


def policy_metrics(logprobs: Tensor, old_logprobs: Tensor, entropy: Tensor, info: dict[str, Tensor],
                   mask: Tensor, num_tokens: float, num_seqs: float) -> dict[str, Tensor]:
    """GRPO's and PPO's policy metrics as shares of the mini-batch's global counts, so micro-batches add up: entropy,
    the clipped shares below and above the trust region (the policy loss's `info`), the approximate KL
    0.5 (log pi - log pi_old)^2 to the behaviour policy and, where the loss reports them, the dual-clip share
    (ppo_clip with dual_clip_c) and the share of sequences whose GSPO ratio is clipped.
    logprobs, old_logprobs, entropy, mask: [B, T]; info: [B, T] tensors and an optional "seq_clipped": [B]"""
    metrics = {"policy/entropy": masked_mean(entropy, mask, num_tokens),
               "policy/clip_frac_low": masked_mean(info["clipped_low"], mask, num_tokens),
               "policy/clip_frac_high": masked_mean(info["clipped_high"], mask, num_tokens),
               "policy/approx_kl": masked_mean(0.5 * (logprobs.detach() - old_logprobs) ** 2, mask, num_tokens)}
    if "dual_clipped" in info:
        metrics["policy/dual_clip_frac"] = masked_mean(info["dual_clipped"], mask, num_tokens)
    if "seq_clipped" in info:
        metrics["policy/seq_clip_frac"] = info["seq_clipped"].float().sum() / num_seqs
    return metrics


POLICY_LOSSES: dict[str, Callable[..., tuple[Tensor, dict[str, Tensor]]]] = {}


def _check_shapes(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor) -> None:
    assert logprobs.shape == old_logprobs.shape == advantages.shape == mask.shape, (logprobs.shape, advantages.shape)


@register(POLICY_LOSSES, "ppo_clip")
def ppo_clip_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_eps_low: float,
                  clip_eps_high: float, *, dual_clip_c: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token clipped surrogate loss max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)), r = pi / pi_old
    (PPO eq. 7 negated; DAPO clip-higher for eps_high != eps_low). dual_clip_c = c > 1: where A < 0 the loss is
    min(that, -c A) (dual-clip PPO, Ye et al. 2020, "Mastering complex control in MOBA games": a ratio far above 1
    on a bad token no longer gives an unbounded loss), as verl's clip_ratio_c; None: off. The mask is unused (one
    signature for all losses).
    logprobs, old_logprobs, advantages, mask: [B, T] -> loss: [B, T], info: dict of [B, T] tensors
    ("ratio" detached; "clipped_low" / "clipped_high" / "dual_clipped" bool, True where that clip is active, i.e.
    zero gradient)."""
    _check_shapes(logprobs, old_logprobs, advantages, mask)
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps_low, 1 + clip_eps_high)
    loss = torch.maximum(unclipped, clipped)  # pessimistic bound: the clip only ever removes an incentive
    info = {
        "ratio": ratio.detach(),
        # the clip binds only on the side where it would otherwise reward moving further
        "clipped_low": (ratio < 1 - clip_eps_low) & (advantages < 0),
        "clipped_high": (ratio > 1 + clip_eps_high) & (advantages > 0),
    }
    if dual_clip_c is not None:
        bound = -advantages * dual_clip_c  # > 0 where A < 0
        info["dual_clipped"] = (advantages < 0) & (loss > bound)
        loss = torch.where(advantages < 0, torch.minimum(loss, bound), loss)
    return loss, info


@register(POLICY_LOSSES, "gspo")
def gspo_token_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_eps_low: float,
                    clip_eps_high: float) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO-token's per-token loss max(-A s_it, -A clip(s_it, 1 - eps_low, 1 + eps_high)) (Zheng et al. 2025,
    eq. 13), s_it = sg[s_i] pi_t / sg[pi_t] (eq. 14): its value is the sequence ratio
    s_i = exp(mean over the response's tokens of (log pi - log pi_old)) (eq. 7), its gradient s_i grad log pi_t.
    With one advantage per sequence and seq-mean-token-mean aggregation this is GSPO's sequence objective (eq. 5)
    in value and gradient. Departures: verl's compute_policy_loss_gspo computes the same s_it but forces
    seq-mean-token-mean and clamps log s_i at 10; TRL's importance_sampling_level="sequence" uses s_i itself
    (the same gradient for per-sequence advantages). Here the aggregation is the caller's and log s_i is not clamped.
    logprobs, old_logprobs, advantages, mask: [B, T] -> loss: [B, T], info: "ratio" [B, T] (s_i broadcast),
    "clipped_low" / "clipped_high" [B, T] bool (zero gradient), "seq_clipped" [B] bool (s_i outside the range)."""
    _check_shapes(logprobs, old_logprobs, advantages, mask)
    log_ratio = torch.where(mask, logprobs - old_logprobs, 0.0)
    seq_log_ratio = log_ratio.sum(-1) / mask.sum(-1).clamp_min(1)  # [B]: log s_i; an empty row gives s_i = 1
    # stop-gradient trick: the value is s_i on every token, the gradient flows through the token's own log pi
    ratio = torch.exp(seq_log_ratio.detach()[:, None] + logprobs - logprobs.detach())  # [B, T]
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps_low, 1 + clip_eps_high)
    loss = torch.maximum(unclipped, clipped)
    seq_ratio = seq_log_ratio.detach().exp()  # [B]
    info = {
        "ratio": seq_ratio[:, None].expand_as(logprobs),
        "clipped_low": (seq_ratio[:, None] < 1 - clip_eps_low) & (advantages < 0),
        "clipped_high": (seq_ratio[:, None] > 1 + clip_eps_high) & (advantages > 0),
        "seq_clipped": ((seq_ratio < 1 - clip_eps_low) | (seq_ratio > 1 + clip_eps_high)) & mask.any(-1),
    }
    return loss, info


@register(POLICY_LOSSES, "cispo")
def cispo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_eps_low: float,
               clip_eps_high: float) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO's per-token loss -sg(clip(r, 1 - eps_low, 1 + eps_high)) A log pi, r = pi / pi_old (MiniMax-M1, 2025,
    sec. 3.1, eq. 4-5): REINFORCE whose importance weight is clipped and detached, so a clipped token keeps its
    gradient, only with a capped weight. The loss's value is not PPO's (it contains log pi); its gradient is
    -w A grad log pi. Departure: TRL's loss_type="cispo" caps r at epsilon_high itself (an absolute bound, no lower
    one); here the bounds are 1 - eps_low and 1 + eps_high, as in the paper (the paper sets no lower bound: pass
    eps_low >= 1). The mask is unused (one signature for all losses).
    logprobs, old_logprobs, advantages, mask: [B, T] -> loss: [B, T], info: "ratio" [B, T], "clipped_low" /
    "clipped_high" [B, T] bool (True where the weight is capped: the gradient is scaled, not zeroed)."""
    _check_shapes(logprobs, old_logprobs, advantages, mask)
    ratio = torch.exp(logprobs - old_logprobs).detach()
    weight = torch.clamp(ratio, 1 - clip_eps_low, 1 + clip_eps_high)  # detached: sg(.) in eq. 4
    loss = -weight * advantages * logprobs
    return loss, {"ratio": ratio, "clipped_low": ratio < 1 - clip_eps_low, "clipped_high": ratio > 1 + clip_eps_high}
