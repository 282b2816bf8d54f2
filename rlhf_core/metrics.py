"""Per-iteration summaries of a scored rollout batch (plain numbers, ready for any tracker)."""

from __future__ import annotations

import numpy as np
import torch

from rlhf_core.advantages import zero_std_group_fraction


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
