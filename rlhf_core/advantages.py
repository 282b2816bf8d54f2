"""Advantages from rewards, baselined within each group: outcome estimators (one per completion) and token-level ones
(REINFORCE++, one per response token).

A group is the G completions sampled for one prompt. The two registries declare their inputs by their signature:
  OUTCOME_ADVANTAGES  (rewards: [B] float, group_ids: [B] long) -> advantages: [B]; the caller broadcasts to tokens
                      (`advantages[:, None]`).
  TOKEN_ADVANTAGES    (rewards: [B], group_ids: [B], kl_per_token: [B, T], mask: [B, T] bool, kl_coef) -> [B, T]:
                      per-token rewards -kl_coef * KL_t, the reward on the last token, so the KL penalty to the
                      reference is in the reward (kl.placement: reward) and the advantage varies along the response.
`advantage.estimator` chooses from both (ADVANTAGE_ESTIMATORS); names are unique across the two. They are vectorised
over groups (scatter_reduce, no loop over groups), and groups may have unequal sizes and arbitrary, unsorted ids, so
the caller never has to reshape to [P, G].

Departures from the papers:
  * grpo (Shao et al. 2024, DeepSeekMath sec. 4.1.2): the std is the unbiased one (like torch.std) plus 1e-6;
    a group of size 1 gets advantage 0 instead of the NaN that 0/0 would give.
  * every outcome estimator gives exactly 0 to a group whose rewards are all equal (see _centered_rewards).
  * batch_std: group mean but the whole batch's std ("group mean, batch std": Lite PPO, Liu et al. 2025), so a
    near-constant group's tiny differences are not blown up to +-1.
  * dr_grpo (Liu et al. 2025, "Understanding R1-Zero-like training"): no std scaling at all.
  * rloo (Ahmadian et al. 2024, "Back to Basics"): leave-one-out mean of the other G-1 rewards; size-1 groups get 0.
  * reinforce_pp (Hu et al. 2025, "REINFORCE++", sec. 3): per-token rewards r_t = -beta KL_t (+ the reward on the
    last token), returns G_t = sum_{s >= t} r_s (gamma = 1: no discount, as the paper's runs), then whitened over
    every response token of the batch (mean 0, std 1: global advantage normalisation), no group baseline.
  * reinforce_pp_baseline (Hu et al. 2025; OpenRLHF's reinforce_baseline): the group mean is subtracted from each
    reward first (no std division), then the same KL penalty, returns and batch whitening. It differs from
    batch_std in two ways: the whitening subtracts the batch mean too (and is over tokens, so a long response
    weighs more), and the KL penalty makes the advantage differ from token to token.
  Both whiten with the population variance and rsqrt(var + 1e-8) (gae.whiten); OpenRLHF uses rsqrt(max(var, 1e-8)).
  A batch whose returns are all equal gets exactly 0, not the ulp noise of (x - mean) / sqrt(1e-8).
  The KL is computed at advantage time from the sampler's log-probs (the scoring stage's table has
  `sampling_logprobs` and `ref_logprobs`); OpenRLHF recomputes pi_old with the trainer first. The two agree up to
  the sampler's precision (generation.dtype) and top-p truncation, which is what loss.tis_cap corrects.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from rlhf_core.gae import whiten
from rlhf_core.registry import register
from rlhf_core.token_rewards import token_level_rewards

OUTCOME_ADVANTAGES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {}
TOKEN_ADVANTAGES: dict[str, Callable[[Tensor, Tensor, Tensor, Tensor, float], Tensor]] = {}

_EPS = 1e-6


def _group_reduce(values: Tensor, group_ids: Tensor, reduce: str) -> Tensor:
    """For each sample, `reduce` ("sum", "amax", "amin") of `values` over its group. values, group_ids: [B] -> [B]"""
    assert values.dim() == 1 and values.shape == group_ids.shape, (values.shape, group_ids.shape)
    _, dense_ids = torch.unique(group_ids, return_inverse=True)  # ids need not be contiguous or sorted
    per_group = values.new_zeros(values.shape[0])  # B slots >= number of groups; unused slots stay 0
    per_group = per_group.scatter_reduce(0, dense_ids, values, reduce, include_self=False)
    return per_group[dense_ids]


def is_constant_group(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """For each sample, whether all rewards in its group are equal (exact: min == max). [B], [B] -> bool [B]"""
    return _group_reduce(rewards, group_ids, "amax") == _group_reduce(rewards, group_ids, "amin")


def _centered_rewards(rewards: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """r - group mean, and the group size. rewards, group_ids: [B] -> centered: [B], size: [B] (float)"""
    size = _group_reduce(torch.ones_like(rewards), group_ids, "sum")
    centered = rewards - _group_reduce(rewards, group_ids, "sum") / size
    # Trap: the mean of G equal rewards (e.g. 16 x 0.7) is off by an ulp, and grpo's division by a std of
    # ~1e-8 turns that into advantages of ~0.1. A group with no signal must get exactly 0.
    return torch.where(is_constant_group(rewards, group_ids), 0.0, centered), size


@register(OUTCOME_ADVANTAGES, "grpo")
def group_normalized_advantages(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """(r - group mean) / (unbiased group std + eps) (DeepSeekMath, sec. 4.1.2). rewards, group_ids: [B] -> [B]"""
    centered, size = _centered_rewards(rewards, group_ids)
    # size 1: clamping n - 1 to 1 gives std 0, and centered is 0, so the advantage is 0, not NaN
    std = (_group_reduce(centered**2, group_ids, "sum") / (size - 1).clamp_min(1)).sqrt()
    return centered / (std + _EPS)


@register(OUTCOME_ADVANTAGES, "batch_std")
def batch_std_normalized_advantages(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """(r - group mean) / (unbiased std of all B rewards + eps). rewards, group_ids: [B] -> [B]"""
    centered, _ = _centered_rewards(rewards, group_ids)
    batch_std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())  # B == 1: std is NaN
    return centered / (batch_std + _EPS)


@register(OUTCOME_ADVANTAGES, "dr_grpo")
def group_centered_advantages(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """r - group mean (Dr. GRPO, Liu et al. 2025: the std division biases toward easy/hard prompts).
    rewards, group_ids: [B] -> [B]"""
    centered, _ = _centered_rewards(rewards, group_ids)
    return centered


@register(OUTCOME_ADVANTAGES, "rloo")
def leave_one_out_advantages(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - group mean) (RLOO, Ahmadian et al. 2024).
    rewards, group_ids: [B] -> [B]"""
    centered, size = _centered_rewards(rewards, group_ids)
    return size / (size - 1).clamp_min(1) * centered  # size 1: centered == 0, so advantage 0


def _whitened_returns(rewards: Tensor, kl_per_token: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Undiscounted returns of the per-token rewards -kl_coef * KL_t (+ `rewards` on the last token), whitened over
    the batch's masked tokens; exactly 0 when they are all equal. rewards: [B]; kl_per_token, mask: [B, T] -> [B, T]"""
    token_rewards = token_level_rewards(rewards, kl_per_token, mask, kl_coef)  # [B, T], 0 on padding
    returns = token_rewards.flip(-1).cumsum(-1).flip(-1)  # G_t = sum_{s >= t} r_s (gamma = 1); padding adds 0
    valid = returns[mask]
    if valid.numel() == 0 or (valid == valid[0]).all():  # no signal: not the ulp noise of (x - mean) * 1e4
        return torch.zeros_like(returns)
    return whiten(returns, mask)


@register(TOKEN_ADVANTAGES, "reinforce_pp")
def reinforce_pp_advantages(rewards: Tensor, group_ids: Tensor, kl_per_token: Tensor, mask: Tensor,
                            kl_coef: float) -> Tensor:
    """Whitened returns of r_t = -kl_coef KL_t + [t = last] r (REINFORCE++, Hu et al. 2025, sec. 3: token-level KL
    penalty, gamma = 1, global batch normalisation); no group baseline, so group_ids is unused.
    rewards, group_ids: [B]; kl_per_token, mask: [B, T] -> [B, T], 0 where mask is False"""
    assert rewards.shape == group_ids.shape == mask.shape[:1] and kl_per_token.shape == mask.shape, (
        rewards.shape, group_ids.shape, mask.shape)
    return _whitened_returns(rewards, kl_per_token, mask, kl_coef)


@register(TOKEN_ADVANTAGES, "reinforce_pp_baseline")
def reinforce_pp_baseline_advantages(rewards: Tensor, group_ids: Tensor, kl_per_token: Tensor, mask: Tensor,
                                     kl_coef: float) -> Tensor:
    """REINFORCE++-baseline (Hu et al. 2025): the group mean subtracted from each reward (0 for an all-equal group),
    then reinforce_pp's KL penalty, returns and batch whitening. rewards, group_ids: [B]; kl_per_token, mask: [B, T]
    -> [B, T], 0 where mask is False"""
    assert rewards.shape == group_ids.shape == mask.shape[:1] and kl_per_token.shape == mask.shape, (
        rewards.shape, group_ids.shape, mask.shape)
    centered, _ = _centered_rewards(rewards, group_ids)
    return _whitened_returns(centered, kl_per_token, mask, kl_coef)


assert not set(OUTCOME_ADVANTAGES) & set(TOKEN_ADVANTAGES), "an estimator name is registered twice"
ADVANTAGE_ESTIMATORS: dict[str, Callable[..., Tensor]] = {**OUTCOME_ADVANTAGES, **TOKEN_ADVANTAGES}


def zero_std_group_fraction(rewards: Tensor, group_ids: Tensor) -> float:
    """Fraction of groups whose rewards are all equal: they get zero advantage, hence give no learning signal.
    rewards, group_ids: [B] -> float"""
    constant = is_constant_group(rewards, group_ids)
    return torch.unique(group_ids[constant]).numel() / torch.unique(group_ids).numel()
