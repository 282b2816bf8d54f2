"""The PPO value-function loss with value clipping, per token.

This is the variant of OpenAI's baselines ppo2 and of lm-human-preferences (Ziegler et al. 2019), kept by trl and
by Huang et al. 2024 ("The N+ implementation details of RLHF with PPO"): the new value prediction may move at most
clip_range_value from the value at rollout time, and the loss is the pessimistic max of the clipped and unclipped
squared errors, like the policy's clipped surrogate. The PPO paper itself (Schulman et al. 2017) has no value
clipping, and Engstrom et al. 2020 ("Implementation Matters") found it does not help in MuJoCo; it is kept
here because the RLHF recipes above use it.
Trap: clip_range_value is in reward units, not a ratio like clip_eps, so its effect depends on the reward scale.
The 0.5 factor makes the gradient (values - returns). The loss is not reduced here: `policy_losses.aggregate`
does that with the response mask (the actor and critic share the backbone, so the caller adds
vf_coef * value loss to the policy loss before aggregating or after, with the same mode).
"""

import torch
from torch import Tensor


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, clip_range_value: float
) -> tuple[Tensor, Tensor]:
    """Per-token 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2) (ppo2 / trl value clipping).
    values, old_values, returns: [B, T] -> loss: [B, T], clipped: [B, T] bool, True where the clipped term is
    strictly larger, i.e. the clip is active and the gradient w.r.t. values is 0 (trl's vf_clipfrac)."""
    assert values.shape == old_values.shape == returns.shape, (values.shape, old_values.shape, returns.shape)
    # = V_old + clip(V - V_old, -c, c), but exactly V inside the range (V_old + (V - V_old) can be off by an ulp,
    # which would make the clipped term "larger" and flag the clip as active where it is not)
    values_clipped = torch.clamp(values, old_values - clip_range_value, old_values + clip_range_value)
    unclipped_sq = (values - returns) ** 2
    clipped_sq = (values_clipped - returns) ** 2
    # inside the range the two terms are equal, so `>` (not `>=`) flags only tokens whose gradient the clip removes
    return 0.5 * torch.maximum(unclipped_sq, clipped_sq), clipped_sq > unclipped_sq
