import math

import pytest
import torch

from rlhf_core.advantages import (ADVANTAGE_ESTIMATORS, OUTCOME_ADVANTAGES, TOKEN_ADVANTAGES,
                                  reinforce_pp_advantages, reinforce_pp_baseline_advantages, zero_std_group_fraction)

EPS = 1e-6


def test_registry_keys():
    assert set(OUTCOME_ADVANTAGES) == {"grpo", "batch_std", "dr_grpo", "rloo"}
    assert set(TOKEN_ADVANTAGES) == {"reinforce_pp", "reinforce_pp_baseline"}
    assert ADVANTAGE_ESTIMATORS == {**OUTCOME_ADVANTAGES, **TOKEN_ADVANTAGES}
    assert TOKEN_ADVANTAGES["reinforce_pp"] is reinforce_pp_advantages


def test_grpo_advantages_one_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])  # G = 4; mean 0.25, unbiased std 0.5
    adv = OUTCOME_ADVANTAGES["grpo"](rewards, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(adv, torch.tensor([1.5, -0.5, -0.5, -0.5]))
    torch.testing.assert_close(adv, torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + EPS))


# Two interleaved groups with unsorted, non-contiguous ids:
#   id 7: rewards [1, 0, 2] -> mean 1, unbiased std sqrt((0 + 1 + 1) / 2) = 1
#   id 2: rewards [3, 5, 7] -> mean 5, unbiased std sqrt((4 + 0 + 4) / 2) = 2
REWARDS = torch.tensor([1.0, 3.0, 0.0, 5.0, 2.0, 7.0])
GROUP_IDS = torch.tensor([7, 2, 7, 2, 7, 2])
CENTERED = torch.tensor([0.0, -2.0, -1.0, 0.0, 1.0, 2.0])
GROUP_STD = torch.tensor([1.0, 2.0, 1.0, 2.0, 1.0, 2.0])


def test_grpo_interleaved_groups():
    adv = OUTCOME_ADVANTAGES["grpo"](REWARDS, GROUP_IDS)
    torch.testing.assert_close(adv, CENTERED / (GROUP_STD + EPS))


def test_batch_std_interleaved_groups():
    # batch mean 3; squared deviations 4 + 0 + 9 + 4 + 1 + 16 = 34; unbiased var 34 / 5
    adv = OUTCOME_ADVANTAGES["batch_std"](REWARDS, GROUP_IDS)
    torch.testing.assert_close(adv, CENTERED / (math.sqrt(34 / 5) + EPS))


def test_dr_grpo_interleaved_groups():
    torch.testing.assert_close(OUTCOME_ADVANTAGES["dr_grpo"](REWARDS, GROUP_IDS), CENTERED)


def test_rloo_hand_values():
    # r=1 vs mean(0, 2) = 1 -> 0;  r=3 vs mean(5, 7) = 6 -> -3;  r=0 vs mean(1, 2) = 1.5 -> -1.5
    # r=5 vs mean(3, 7) = 5 -> 0;  r=2 vs mean(1, 0) = 0.5 -> 1.5;  r=7 vs mean(3, 5) = 4 -> 3
    adv = OUTCOME_ADVANTAGES["rloo"](REWARDS, GROUP_IDS)
    torch.testing.assert_close(adv, torch.tensor([0.0, -3.0, -1.5, 0.0, 1.5, 3.0]))
    torch.testing.assert_close(adv, 3 / 2 * CENTERED)  # G / (G - 1) * (r - mean)


def _loop_advantages(name: str, rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Reference: one group at a time, one sample at a time, straight from the formulas."""
    adv = torch.zeros_like(rewards)
    batch_std = rewards.std().item()
    for gid in set(group_ids.tolist()):
        idx = [i for i in range(len(rewards)) if group_ids[i].item() == gid]
        group = [rewards[i].item() for i in idx]
        n, mean = len(group), sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (n - 1)) if n > 1 else 0.0
        for i, r in zip(idx, group):
            if name == "grpo":
                adv[i] = (r - mean) / (std + EPS)
            elif name == "batch_std":
                adv[i] = (r - mean) / (batch_std + EPS)
            elif name == "dr_grpo":
                adv[i] = r - mean
            elif name == "rloo":
                adv[i] = r - (sum(group) - r) / (n - 1) if n > 1 else 0.0
    return adv


@pytest.mark.parametrize("name", ["grpo", "batch_std", "dr_grpo", "rloo"])
def test_vectorised_matches_loop_on_unequal_groups(name):
    torch.manual_seed(0)
    sizes = {42: 1, 3: 2, 17: 4, 8: 7, 5: 3}  # unequal sizes, ids neither contiguous nor sorted
    group_ids = torch.tensor([gid for gid, size in sizes.items() for _ in range(size)])
    group_ids = group_ids[torch.randperm(len(group_ids))]
    rewards = torch.rand(len(group_ids), dtype=torch.float64)
    rewards[group_ids == 17] = 0.7  # one all-equal group
    expected = _loop_advantages(name, rewards, group_ids)
    torch.testing.assert_close(OUTCOME_ADVANTAGES[name](rewards, group_ids), expected)


@pytest.mark.parametrize("name", ["grpo", "batch_std", "dr_grpo", "rloo"])
def test_size_one_group_gets_zero(name):
    rewards = torch.tensor([0.3, 1.0, 0.0])
    adv = OUTCOME_ADVANTAGES[name](rewards, torch.tensor([5, 1, 1]))
    assert adv[0].item() == 0.0
    assert torch.isfinite(adv).all()


@pytest.mark.parametrize("name", ["grpo", "batch_std", "dr_grpo", "rloo"])
def test_all_equal_group_gets_exactly_zero(name):
    # 16 x 0.7: the float32 mean is off by an ulp; without care grpo's tiny std blows that up to ~0.1
    rewards = torch.cat([torch.full((16,), 0.7), torch.tensor([1.0, 0.0])])
    group_ids = torch.tensor([0] * 16 + [1, 1])
    adv = OUTCOME_ADVANTAGES[name](rewards, group_ids)
    assert (adv[:16] == 0).all()
    assert (adv[16:] != 0).all()


def test_zero_std_group_fraction():
    # groups: 5 -> [1, 0] varies; 9 -> [2, 2] constant; 1 -> [3] constant (size 1): 2 of 3 groups
    rewards = torch.tensor([1.0, 2.0, 0.0, 3.0, 2.0])
    group_ids = torch.tensor([5, 9, 5, 1, 9])
    assert zero_std_group_fraction(rewards, group_ids) == 2 / 3
    assert zero_std_group_fraction(torch.tensor([0.0, 1.0]), torch.tensor([4, 4])) == 0.0


@pytest.mark.parametrize("name", ["grpo", "batch_std", "dr_grpo", "rloo"])
def test_shape_mismatch_raises(name):
    with pytest.raises(AssertionError):
        OUTCOME_ADVANTAGES[name](torch.zeros(4), torch.zeros(3, dtype=torch.long))


# ---------------------------------------------------------------- REINFORCE++ (token-level)


def _whitened(values: list[float]) -> list[float]:
    """(x - mean) / sqrt(population var + 1e-8), by hand."""
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / len(values)
    return [(v - mean) / math.sqrt(var + 1e-8) for v in values]


def test_reinforce_pp_hand_values():
    rewards = torch.tensor([1.0, 0.0])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])  # 9.0 is padding: never counted
    adv = reinforce_pp_advantages(rewards, torch.tensor([0, 0]), kl, mask, kl_coef=0.5)
    # per-token rewards -0.5 KL_t, the reward on the last token:
    #   row 0: [-0.05, -0.1, -0.15 + 1] -> returns (sums to the end) [0.70, 0.75, 0.85]
    #   row 1: [-0.2, -0.25]            -> returns [-0.45, -0.25]
    returns = [-0.05 - 0.1 + 0.85, -0.1 + 0.85, 0.85, -0.2 - 0.25, -0.25]
    assert returns == pytest.approx([0.70, 0.75, 0.85, -0.45, -0.25])
    expected = _whitened(returns)  # mean 0.32, population variance 0.3056
    torch.testing.assert_close(adv[mask], torch.tensor(expected))
    assert adv[1, 2].item() == 0.0


def test_reinforce_pp_baseline_hand_values():
    rewards = torch.tensor([1.0, 0.0, 3.0, 3.0])
    group_ids = torch.tensor([0, 0, 1, 1])  # group 0: mean 0.5; group 1: all equal, centred to exactly 0
    mask = torch.tensor([[True, True], [True, False], [True, False], [True, True]])
    kl = torch.full((4, 2), 0.2)
    adv = reinforce_pp_baseline_advantages(rewards, group_ids, kl, mask, kl_coef=0.5)
    # -0.5 * 0.2 = -0.1 per token, the centred reward on the last token:
    #   row 0: [-0.1, -0.1 + 0.5] -> [0.3, 0.4]; row 1: [-0.1 - 0.5] -> [-0.6]
    #   row 2: [-0.1 + 0]         -> [-0.1];     row 3: [-0.1, -0.1 + 0] -> [-0.2, -0.1]
    returns = [-0.1 + 0.4, -0.1 + 0.5, -0.6, -0.1, -0.2, -0.1]
    torch.testing.assert_close(adv[mask], torch.tensor(_whitened(returns)))


def _loop_token_advantages(name, rewards, group_ids, kl, mask, kl_coef):
    """Reference: one response and one token at a time, straight from the definitions."""
    rewards = rewards.tolist()
    if name == "reinforce_pp_baseline":
        means = {g: sum(r for r, h in zip(rewards, group_ids.tolist()) if h == g) / group_ids.tolist().count(g)
                 for g in set(group_ids.tolist())}
        rewards = [0.0 if len({r for r, h in zip(rewards, group_ids.tolist()) if h == g}) == 1 else r - means[g]
                   for r, g in zip(rewards, group_ids.tolist())]
    returns = []  # flat, in mask order
    for b, reward in enumerate(rewards):
        length = int(mask[b].sum())
        for t in range(length):
            returns.append(sum(-kl_coef * kl[b, s].item() + (reward if s == length - 1 else 0.0)
                               for s in range(t, length)))
    out = torch.zeros(mask.shape, dtype=torch.float64)
    out[mask] = torch.tensor(_whitened(returns), dtype=torch.float64)
    return out


@pytest.mark.parametrize("name", sorted(TOKEN_ADVANTAGES))
def test_token_level_vectorised_matches_loop(name):
    torch.manual_seed(0)
    sizes = {42: 1, 3: 2, 17: 4, 8: 3}
    group_ids = torch.tensor([gid for gid, size in sizes.items() for _ in range(size)])
    group_ids = group_ids[torch.randperm(len(group_ids))]
    rewards = torch.rand(len(group_ids), dtype=torch.float64)
    rewards[group_ids == 17] = 0.7  # one all-equal group
    lengths = torch.randint(1, 7, (len(group_ids),))
    mask = torch.arange(6)[None, :] < lengths[:, None]
    kl = torch.rand(len(group_ids), 6, dtype=torch.float64)
    expected = _loop_token_advantages(name, rewards, group_ids, kl, mask, kl_coef=0.3)
    torch.testing.assert_close(TOKEN_ADVANTAGES[name](rewards, group_ids, kl, mask, 0.3), expected)


@pytest.mark.parametrize("name", sorted(TOKEN_ADVANTAGES))
def test_token_level_padding_does_not_change_advantages(name):
    rewards, group_ids = torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0, 0, 1])
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    kl = torch.tensor([[0.1, 0.2], [0.3, 0.0], [0.2, 0.1]])
    adv = TOKEN_ADVANTAGES[name](rewards, group_ids, kl, mask, 0.5)
    padded = TOKEN_ADVANTAGES[name](rewards, group_ids, torch.cat([kl, torch.full((3, 2), float("nan"))], 1),
                                    torch.cat([mask, torch.zeros(3, 2, dtype=torch.bool)], 1), 0.5)
    torch.testing.assert_close(padded[:, :2], adv)
    assert (padded[:, 2:] == 0).all()


@pytest.mark.parametrize("name", sorted(TOKEN_ADVANTAGES))
def test_token_level_all_equal_returns_get_exactly_zero(name):
    rewards = torch.full((5,), 0.7)  # the float mean of 0.7s is off by an ulp; whitening would blow it up to ~1e-4
    mask = torch.ones(5, 3, dtype=torch.bool)
    adv = TOKEN_ADVANTAGES[name](rewards, torch.tensor([0, 0, 1, 1, 1]), torch.zeros(5, 3), mask, 0.1)
    assert (adv == 0).all()


def test_reinforce_pp_baseline_differs_from_batch_std():
    """Without KL and with equal lengths, reinforce_pp_baseline is batch_std's centred rewards whitened again:
    the batch mean subtracted too and the population std; the KL penalty then makes it vary along a response."""
    rewards, group_ids = torch.tensor([1.0, 0.0, 0.0, 3.0, 2.0, 7.0]), torch.tensor([7, 7, 7, 2, 2, 2])
    mask = torch.ones(6, 4, dtype=torch.bool)
    adv = reinforce_pp_baseline_advantages(rewards, group_ids, torch.zeros(6, 4), mask, 0.0)
    centered = OUTCOME_ADVANTAGES["dr_grpo"](rewards, group_ids)
    torch.testing.assert_close(adv, torch.tensor(_whitened(centered.tolist()))[:, None].expand(6, 4))
    assert not torch.allclose(adv[:, 0], OUTCOME_ADVANTAGES["batch_std"](rewards, group_ids))
    with_kl = reinforce_pp_baseline_advantages(rewards, group_ids, torch.rand(6, 4), mask, 0.5)
    assert (with_kl[:, 0] != with_kl[:, 1]).all()  # one advantage per token now


@pytest.mark.parametrize("name", sorted(TOKEN_ADVANTAGES))
def test_token_level_shape_mismatch_raises(name):
    mask = torch.ones(4, 3, dtype=torch.bool)
    with pytest.raises(AssertionError):
        TOKEN_ADVANTAGES[name](torch.zeros(4), torch.zeros(3, dtype=torch.long), torch.zeros(4, 3), mask, 0.1)
    with pytest.raises(AssertionError):
        TOKEN_ADVANTAGES[name](torch.zeros(4), torch.zeros(4, dtype=torch.long), torch.zeros(4, 2), mask, 0.1)
