"""Generalised advantage estimation over response tokens for PPO (Schulman et al. 2016, eq. 16), plus `whiten`
and `explained_variance`.

This is the RLHF variant (Ziegler et al. 2019; Huang et al. 2024, "The N+ implementation details of RLHF with PPO"):
one episode is one response, a step is one token, and the per-token rewards come from token_rewards.py
(-kl_coef * KL on every token, the reward-model score added on the last). Departures from the paper:
  * the episode ends at the last real token: the value after it is 0, never bootstrapped, even when the response
    was truncated at max_new_tokens (as in trl; a truncated response is discouraged by the missing-EOS penalty
    instead of being treated as unfinished);
  * GAE is a plain function outside the registries: it needs values, which only PPO has (see STYLE.md);
  * whiten uses the population variance (divide by N), where trl uses the unbiased one (N - 1). The two differ by a
    factor N / (N - 1), nothing at thousands of tokens per batch, but the population one makes the whitened
    entries have variance exactly 1 and keeps a single token finite (0 instead of 0 / 0).
Masks are right-padded: True on real response tokens, a prefix of each row. Values and rewards at masked-out
positions are selected away with torch.where, so NaN or garbage there reaches nothing.
"""

import torch
from torch import Tensor

from rlhf_core.policy_losses import masked_mean


def gae_advantages(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """GAE advantages A_t = delta_t + gamma * lam * A_{t+1}, delta_t = r_t + gamma * V_{t+1} - V_t (GAE eq. 16),
    with V = 0 after the last real token, and returns A_t + V_t (the value-function targets).
    rewards, values: [B, T] float, mask: [B, T] bool (a prefix of each row)
    -> advantages: [B, T], returns: [B, T], both exactly 0 where mask is False."""
    assert rewards.shape == values.shape == mask.shape and mask.dtype == torch.bool, (rewards.shape, mask.shape)
    # a hole in the mask would silently end the episode there: only right padding is meaningful for GAE
    assert not (mask[:, 1:] & ~mask[:, :-1]).any(), "mask must be right-padded (a prefix of True per row)"
    rewards = torch.where(mask, rewards, 0.0)
    # zeroing the values past the end is what makes V_{t+1} = 0 after the last real token
    values = torch.where(mask, values, 0.0)
    advantages = torch.zeros_like(values)
    next_advantage = values.new_zeros(values.shape[0])  # [B]
    next_value = values.new_zeros(values.shape[0])  # [B]
    for t in reversed(range(values.shape[1])):  # loop over T, vectorised over B
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage  # stays 0 on padding: its rewards and values are 0
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    returns = torch.where(mask, advantages + values, 0.0)
    return advantages, returns


def whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries of the whole batch, with the POPULATION variance
    (divide by N; trl divides by N - 1). shift_mean=False adds the mean back: the scale changes, the mean does not
    (used to whiten rewards). values, mask: [B, T] -> [B, T], 0 where mask is False."""
    assert values.shape == mask.shape and mask.dtype == torch.bool, (values.shape, mask.shape, mask.dtype)
    mean = masked_mean(values, mask)  # empty mask -> 0, so the result is all 0, not NaN
    var = masked_mean((values - mean) ** 2, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, 0.0)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var[returns - values] / Var[returns] over the masked entries (population variances): 1 is a perfect
    value function, 0 is no better than predicting the mean return, < 0 is worse. NaN if Var[returns] == 0.
    Like CleanRL's, it is blind to a constant offset (values = returns + c gives 1). values, returns, mask: [B, T]"""
    assert values.shape == returns.shape == mask.shape and mask.dtype == torch.bool, (values.shape, returns.shape)
    residual = returns - values
    var_residual = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask).item()
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask).item()
    return float("nan") if var_returns == 0 else 1.0 - var_residual / var_returns
