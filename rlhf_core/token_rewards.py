"""Per-token rewards for PPO in RLHF, and the transforms applied to the reward-model score before it goes in.

Ziegler et al. 2019 (eq. 2) and Ouyang et al. 2022 (eq. 2) maximise R(x, y) = r(x, y) - beta * log(pi(y|x) / ref(y|x)).
PPO needs a reward per step, so, as in lm-human-preferences, trl and Huang et al. 2024 ("The N+ implementation
details of RLHF with PPO"), the KL penalty is spread over the tokens (-kl_coef * KL_t, any estimator from kl.py)
and the sequence-level score is added on the last response token only (the EOS token when the response finished).
Departures:
  * penalize_missing_eos subtracts a penalty from the score of a response with no EOS (trl's missing_eos_penalty).
    lm-human-preferences instead replaced the score with a fixed -1 ("penalty_reward"); a subtraction keeps the
    ranking among unfinished responses.
  * clip_scores and normalize_scores are optional steps (reward clipping as in OpenRLHF; per-batch standardisation
    instead of lm-human-preferences' reward-model gain/bias fitted once before training). normalize_scores uses
    the population std, like gae.whiten, and gives exactly 0 to a batch whose scores are all equal.
Scores are [B] (one per sequence); `_per_token` tensors are [B, T] with a bool response mask.
"""

import torch
from torch import Tensor


def token_level_rewards(scores: Tensor, kl_per_token: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """-kl_coef * KL_t on every masked token, plus the score on the last masked token of each row (Ziegler et al.
    2019, eq. 2, spread over tokens); 0 on masked-out positions; a row with an empty mask is all 0.
    scores: [B], kl_per_token: [B, T], mask: [B, T] bool -> rewards: [B, T]"""
    assert scores.shape == kl_per_token.shape[:1] and kl_per_token.shape == mask.shape, (scores.shape, mask.shape)
    assert mask.dtype == torch.bool, mask.dtype
    # the last True of a row is the one where the running count reaches the row's total (an empty row has none)
    is_last = mask & (mask.cumsum(-1) == mask.sum(-1, keepdim=True))  # [B, T]
    rewards = torch.where(mask, -kl_coef * kl_per_token, 0.0)  # where: NaN KL on padding can't leak
    return rewards + torch.where(is_last, scores[:, None], 0.0)


def penalize_missing_eos(scores: Tensor, finished: Tensor, penalty: float) -> Tensor:
    """scores - penalty where the response ended without EOS (trl's missing_eos_penalty); penalty >= 0.
    scores: [B], finished: [B] bool -> [B]"""
    assert scores.shape == finished.shape and finished.dtype == torch.bool, (scores.shape, finished.shape)
    if penalty < 0:
        raise ValueError(f"penalty must be >= 0, got {penalty}")
    return torch.where(finished, scores, scores - penalty)


def clip_scores(scores: Tensor, limit: float | None) -> Tensor:
    """Clamp scores to [-limit, limit] (an outlier score would dominate the batch's advantages); None: unchanged.
    scores: [B] -> [B]"""
    if limit is None:
        return scores
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    return torch.clamp(scores, -limit, limit)


def normalize_scores(scores: Tensor, eps: float = 1e-8) -> Tensor:
    """(s - mean) / sqrt(var + eps) over the batch, population variance: mean 0, std 1; a batch whose scores are
    all equal gets exactly 0. scores: [B] -> [B]"""
    assert scores.dim() == 1, scores.shape
    centered = scores - scores.mean()
    # Trap: the mean of B equal scores is off by an ulp, and dividing by sqrt(0 + eps) = 1e-4 would make it ~1e-3
    constant = (scores == scores[:1]).all()  # exact comparison; True for B <= 1
    return torch.where(constant, 0.0, centered * torch.rsqrt(centered.pow(2).mean() + eps))
