"""Per-iteration summaries of a scored rollout batch (plain numbers, ready for any tracker)."""

from __future__ import annotations

import numpy as np
import torch

from rlhf_core.advantages import zero_std_group_fraction
from rlhf_core.gae import explained_variance


def rollout_metrics(rewards: np.ndarray, group_ids: np.ndarray, response_lengths: np.ndarray,
                    finished: np.ndarray) -> dict[str, float]:
    """rewards, group_ids, response_lengths, finished: [B] -> scalar metrics."""
    return {
        "reward/mean": float(np.mean(rewards)),
        "reward/std": float(np.std(rewards)),
        "reward/zero_std_group_frac": zero_std_group_fraction(torch.tensor(rewards), torch.tensor(group_ids)),
        "response/length_mean": float(np.mean(response_lengths)),
        "response/length_max": float(np.max(response_lengths)),
        "response/truncated_frac": float(1.0 - np.mean(finished)),
    }


def ppo_metrics(scores: np.ndarray, kl_sums: np.ndarray, non_score_rewards: np.ndarray, advantages: list,
                returns: list, values: list) -> dict[str, float]:
    """scores, kl_sums, non_score_rewards: [B]; advantages, returns, values: B lists of per-token values."""
    flat = {name: torch.tensor(np.concatenate([np.asarray(row, dtype=np.float64) for row in rows]))
            for name, rows in (("advantages", advantages), ("returns", returns), ("values", values))}
    everywhere = torch.ones_like(flat["returns"], dtype=torch.bool)
    return {
        "ppo/score_mean": float(np.mean(scores)),
        "ppo/non_score_reward": float(np.mean(non_score_rewards)),
        "kl/mean": float(np.mean(kl_sums)),  # KL(pi_old || ref) summed over each response, averaged
        "ppo/advantages_mean": float(flat["advantages"].mean()),
        "ppo/advantages_std": float(flat["advantages"].std()),
        "ppo/returns_mean": float(flat["returns"].mean()),
        "ppo/returns_std": float(flat["returns"].std()),
        "value/explained_variance": float(explained_variance(flat["values"], flat["returns"], everywhere)),
    }
