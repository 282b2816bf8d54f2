"""DAPO's dynamic sampling, the pure part (rlhf_core/dynamic_sampling.py): which groups are informative, the batch
built from several rounds (by hand, and against a plain loop), the seeds of the rounds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from rlhf_core.config import GRPOConfig
from rlhf_core.dynamic_sampling import fill_batch, informative, round_seed


def scored(rewards_per_group: list[list[float]], tag: str) -> pd.DataFrame:
    rows = [(g, g, r, f"{tag}{g}.{k}") for g, rewards in enumerate(rewards_per_group) for k, r in enumerate(rewards)]
    return pd.DataFrame(rows, columns=["group_id", "prompt_id", "rewards", "response"])


def test_a_group_is_informative_when_its_rewards_differ():
    rewards = np.array([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5 + 1e-9])
    groups = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    assert informative(rewards, groups).tolist() == [False, False, True, True, False, False, True, True]
    # groups need not be contiguous
    assert informative(np.array([1.0, 0.0, 1.0, 1.0]), np.array([7, 3, 7, 3])).tolist() == [False, True, False,
                                                                                           True]


def test_the_batch_takes_informative_groups_in_round_order_by_hand():
    rounds = [scored([[1, 1], [0, 1], [0, 0]], "a"), scored([[0, 1], [0.5, 0.5], [2, 3]], "b")]
    batch = fill_batch(rounds, 3)
    assert batch["response"].tolist() == ["a1.0", "a1.1", "b0.0", "b0.1", "b2.0", "b2.1"]
    assert batch["group_id"].tolist() == [0, 0, 1, 1, 2, 2] == batch["prompt_id"].tolist()
    assert batch["sampling_round"].tolist() == [0, 0, 1, 1, 1, 1]
    assert batch["round_group_id"].tolist() == [1, 1, 0, 0, 2, 2]
    # short after every round: filled with the earliest zero-variance groups, after the informative ones
    short = fill_batch([scored([[1, 1], [0, 1], [0, 0]], "a")], 3)
    assert short["response"].tolist() == ["a1.0", "a1.1", "a0.0", "a0.1", "a2.0", "a2.1"]


def test_the_batch_matches_a_plain_loop_over_random_rounds():
    rng = np.random.default_rng(0)
    for _ in range(50):
        num_rounds, groups, size, wanted = (int(x) for x in rng.integers(1, 5, size=4))
        rounds = [scored(rng.integers(0, 2, size=(groups, size + 1)).astype(float).tolist(), f"r{r}.")
                  for r in range(num_rounds)]
        useful, useless = [], []
        for df in rounds:
            for _, group in df.groupby("group_id", sort=True):
                (useful if group["rewards"].nunique() > 1 else useless).append(group["response"].tolist())
        expected = [text for group in (useful + useless)[:wanted] for text in group]
        assert fill_batch(rounds, wanted)["response"].tolist() == expected


def test_round_zero_keeps_the_runs_seed_and_later_rounds_get_their_own():
    assert round_seed(7, 3, 0) == 7
    seeds = {round_seed(7, i, r) for i in range(5) for r in range(1, 5)}
    assert len(seeds) == 20 and all(0 <= s < 2 ** 63 for s in seeds)
    assert round_seed(7, 3, 1) == round_seed(7, 3, 1) != round_seed(8, 3, 1)


def test_dynamic_sampling_needs_a_group_baseline():
    with pytest.raises(ValueError, match="group_size"):
        GRPOConfig(dynamic_sampling={"enabled": True}, advantage={"estimator": "reinforce_pp"})
    assert GRPOConfig(dynamic_sampling={"enabled": True}).dynamic_sampling.max_rounds == 3
