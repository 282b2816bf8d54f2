"""Outcome advantages: one scalar reward per completion -> one advantage per completion, baselined within its group.

A group is the G completions sampled for one prompt. All estimators share the signature
`(rewards: [B] float, group_ids: [B] long) -> advantages: [B]`; the caller broadcasts to tokens
(`advantages[:, None]`). They are vectorised over groups (scatter_reduce, no loop over groups), and
groups may have unequal sizes and arbitrary, unsorted ids, so the caller never has to reshape to [P, G].

Departures from the papers:
  * grpo (Shao et al. 2024, DeepSeekMath sec. 4.1.2): the std is the unbiased one (like torch.std) plus 1e-6;
    a group of size 1 gets advantage 0 instead of the NaN that 0/0 would give.
  * every estimator gives exactly 0 to a group whose rewards are all equal (see _centered_rewards).
  * batch_std: group mean but the whole batch's std ("group mean, batch std": REINFORCE++-baseline, Hu et al.
    2025; Lite PPO, Liu et al. 2025), so a near-constant group's tiny differences are not blown up to +-1.
  * dr_grpo (Liu et al. 2025, "Understanding R1-Zero-like training"): no std scaling at all.
  * rloo (Ahmadian et al. 2024, "Back to Basics"): leave-one-out mean of the other G-1 rewards; size-1 groups get 0.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from rlhf_core.registry import register

OUTCOME_ADVANTAGES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {}

_EPS = 1e-6


def _group_reduce(values: Tensor, group_ids: Tensor, reduce: str) -> Tensor:
    """For each sample, `reduce` ("sum", "amax", "amin") of `values` over its group. values, group_ids: [B] -> [B]"""
    assert values.dim() == 1 and values.shape == group_ids.shape, (values.shape, group_ids.shape)
    _, dense_ids = torch.unique(group_ids, return_inverse=True)  # ids need not be contiguous or sorted
    per_group = values.new_zeros(values.shape[0])  # B slots >= number of groups; unused slots stay 0
    per_group = per_group.scatter_reduce(0, dense_ids, values, reduce, include_self=False)
    return per_group[dense_ids]


def _is_constant_group(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """For each sample, whether all rewards in its group are equal (exact: min == max). [B], [B] -> bool [B]"""
    return _group_reduce(rewards, group_ids, "amax") == _group_reduce(rewards, group_ids, "amin")


def _centered_rewards(rewards: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """r - group mean, and the group size. rewards, group_ids: [B] -> centered: [B], size: [B] (float)"""
    size = _group_reduce(torch.ones_like(rewards), group_ids, "sum")
    centered = rewards - _group_reduce(rewards, group_ids, "sum") / size
    # Trap: the mean of G equal rewards (e.g. 16 x 0.7) is off by an ulp, and grpo's division by a std of
    # ~1e-8 turns that into advantages of ~0.1. A group with no signal must get exactly 0.
    return torch.where(_is_constant_group(rewards, group_ids), 0.0, centered), size


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


def zero_std_group_fraction(rewards: Tensor, group_ids: Tensor) -> float:
    """Fraction of groups whose rewards are all equal: they get zero advantage, hence give no learning signal.
    rewards, group_ids: [B] -> float"""
    constant = _is_constant_group(rewards, group_ids)
    return torch.unique(group_ids[constant]).numel() / torch.unique(group_ids).numel()
