import math

import pytest
import torch

from rlhf_core.gae import explained_variance, gae_advantages, whiten

# ---------------------------------------------------------------- gae_advantages

REWARDS = torch.tensor([[0.5, -1.0, 2.0]])
VALUES = torch.tensor([[1.0, 0.5, 0.25]])
FULL = torch.ones(1, 3, dtype=torch.bool)


def test_gae_gamma_1_lam_1_is_reward_to_go_minus_value():
    adv, ret = gae_advantages(REWARDS, VALUES, FULL, gamma=1.0, lam=1.0)
    reward_to_go = [0.5 - 1.0 + 2.0, -1.0 + 2.0, 2.0]  # no bootstrap after the last token
    torch.testing.assert_close(ret, torch.tensor([reward_to_go]))
    torch.testing.assert_close(adv, torch.tensor([[1.5 - 1.0, 1.0 - 0.5, 2.0 - 0.25]]))


def test_gae_gamma_half_lam_half_hand_values():
    # delta_t = r_t + gamma * V_{t+1} - V_t, with V_3 = 0
    d2 = 2.0 + 0.5 * 0.0 - 0.25  # 1.75
    d1 = -1.0 + 0.5 * 0.25 - 0.5  # -1.375
    d0 = 0.5 + 0.5 * 0.5 - 1.0  # -0.25
    # A_t = delta_t + gamma * lam * A_{t+1}, gamma * lam = 0.25
    a2 = d2  # 1.75
    a1 = d1 + 0.25 * a2  # -0.9375
    a0 = d0 + 0.25 * a1  # -0.484375
    adv, ret = gae_advantages(REWARDS, VALUES, FULL, gamma=0.5, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 1.0, a1 + 0.5, a2 + 0.25]]))
    assert [a0, a1, a2] == [-0.484375, -0.9375, 1.75]


def test_gae_padding_is_not_bootstrapped():
    # the same row with a padded 4th column holding a huge value: the episode still ends at t = 2
    rewards = torch.tensor([[0.5, -1.0, 2.0, 7.0]])
    values = torch.tensor([[1.0, 0.5, 0.25, 1e6]])
    mask = torch.tensor([[True, True, True, False]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.5, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[-0.484375, -0.9375, 1.75, 0.0]]))
    assert ret[0, 3].item() == 0.0


def _ragged_batch(seed: int, rows: int = 7, cols: int = 9, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(rows, cols, generator=gen, dtype=dtype)
    values = torch.randn(rows, cols, generator=gen, dtype=dtype)
    lengths = torch.randint(0, cols + 1, (rows,), generator=gen)
    lengths[0], lengths[1], lengths[2] = 0, cols, 1  # an empty, a full and a one-token row
    mask = torch.arange(cols)[None, :] < lengths[:, None]  # right-padded
    return rewards, values, mask


def _loop_gae(rewards, values, mask, gamma, lam):
    """Reference: plain Python lists, one row and one token at a time, only over each row's real tokens."""
    rows, cols = len(rewards), len(rewards[0])
    adv = [[0.0] * cols for _ in range(rows)]
    for b in range(rows):
        n = sum(mask[b])
        gae = 0.0
        for t in reversed(range(n)):
            next_value = values[b][t + 1] if t + 1 < n else 0.0
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            gae = delta + gamma * lam * gae
            adv[b][t] = gae
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.95), (0.99, 0.95), (0.5, 0.0), (0.9, 0.3)])
def test_gae_vectorised_matches_loop(gamma, lam):
    rewards, values, mask = _ragged_batch(seed=0)
    expected = _loop_gae(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=1e-6)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()
    torch.testing.assert_close(ret[mask], (adv + values)[mask])


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_gae_lam_1_is_discounted_return_minus_value_and_lam_0_is_td_error(gamma):
    # two independent formulations: lam = 1 telescopes to Monte Carlo, lam = 0 is the one-step TD error
    rewards, values, mask = _ragged_batch(seed=1)
    discounted_return = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(mask[:, t], rewards[:, t] + gamma * running, 0.0)
        discounted_return[:, t] = running
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam=1.0)
    torch.testing.assert_close(adv[mask], (discounted_return - values)[mask])
    torch.testing.assert_close(ret[mask], discounted_return[mask])
    next_values = torch.cat([values[:, 1:] * mask[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    adv, _ = gae_advantages(rewards, values, mask, gamma, lam=0.0)
    torch.testing.assert_close(adv[mask], (rewards + gamma * next_values - values)[mask])


@pytest.mark.parametrize("fill", [float("nan"), float("inf"), 1e30])
def test_gae_masked_values_and_rewards_change_nothing(fill):
    rewards, values, mask = _ragged_batch(seed=2)
    adv, ret = gae_advantages(rewards, values, mask, 0.99, 0.95)
    dirty_adv, dirty_ret = gae_advantages(
        torch.where(mask, rewards, fill), torch.where(mask, values, fill), mask, 0.99, 0.95
    )
    assert torch.equal(dirty_adv, adv) and torch.equal(dirty_ret, ret)


def test_gae_rejects_non_right_padded_mask():
    with pytest.raises(AssertionError, match="right-padded"):
        gae_advantages(REWARDS, VALUES, torch.tensor([[True, False, True]]), 1.0, 1.0)


def test_gae_shape_mismatch_raises():
    with pytest.raises(AssertionError):
        gae_advantages(REWARDS, VALUES[:, :2], FULL, 1.0, 1.0)


# ---------------------------------------------------------------- whiten

# masked entries [1, 2] and [3] across two rows: mean 2, population variance (1 + 0 + 1) / 3 = 2/3
X = torch.tensor([[1.0, 2.0, float("nan")], [3.0, 100.0, 100.0]])
X_MASK = torch.tensor([[True, True, False], [True, False, False]])


def test_whiten_hand_values():
    scale = 1 / math.sqrt(2 / 3 + 1e-8)
    expected = torch.tensor([[(1 - 2) * scale, 0.0, 0.0], [(3 - 2) * scale, 0.0, 0.0]])
    torch.testing.assert_close(whiten(X, X_MASK), expected)
    torch.testing.assert_close(
        whiten(X, X_MASK, shift_mean=False),
        torch.tensor([[(1 - 2) * scale + 2, 2.0, 0.0], [(3 - 2) * scale + 2, 0.0, 0.0]]),
    )


def test_whiten_random_has_mean_0_var_1_and_shift_mean_false_keeps_mean():
    _, _, mask = _ragged_batch(seed=3, rows=16, cols=20, dtype=torch.float32)
    values = 3.0 + 5.0 * torch.randn(16, 20)
    values[~mask] = float("nan")
    out = whiten(values, mask)
    assert (out[~mask] == 0).all()
    torch.testing.assert_close(out[mask].mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[mask].var(unbiased=False), torch.tensor(1.0), atol=1e-4, rtol=0)
    kept = whiten(values, mask, shift_mean=False)
    assert (kept[~mask] == 0).all()
    torch.testing.assert_close(kept[mask].mean(), values[mask].mean())
    torch.testing.assert_close(kept[mask].var(unbiased=False), torch.tensor(1.0), atol=1e-4, rtol=0)


def test_whiten_empty_mask_and_single_token_are_zero_not_nan():
    empty = torch.zeros(2, 3, dtype=torch.bool)
    assert (whiten(X, empty) == 0).all()
    one = torch.zeros(2, 3, dtype=torch.bool)
    one[0, 0] = True
    assert (whiten(X, one) == 0).all()


# ---------------------------------------------------------------- explained_variance

RETURNS = torch.tensor([[1.0, 2.0, float("nan")], [3.0, float("nan"), float("nan")]])
RETURNS_MASK = X_MASK  # masked returns [1, 2, 3]: mean 2, population variance 2/3


def test_explained_variance_perfect_prediction_is_one():
    assert explained_variance(RETURNS.clone(), RETURNS, RETURNS_MASK) == 1.0


def test_explained_variance_predicting_the_mean_is_zero():
    values = torch.full((2, 3), 2.0)  # residual [-1, 0, 1]: variance 2/3 = Var[returns]
    assert explained_variance(values, RETURNS, RETURNS_MASK) == pytest.approx(1 - (2 / 3) / (2 / 3), abs=1e-7)


def test_explained_variance_hand_value():
    values = torch.tensor([[1.0, 2.0, 0.0], [2.0, 0.0, 0.0]])  # residual [0, 0, 1]: mean 1/3
    var_residual = ((0 - 1 / 3) ** 2 + (0 - 1 / 3) ** 2 + (1 - 1 / 3) ** 2) / 3  # 2/9
    expected = 1 - var_residual / (2 / 3)  # 2/3
    assert explained_variance(values, RETURNS, RETURNS_MASK) == pytest.approx(expected)


def test_explained_variance_constant_returns_is_nan():
    returns = torch.full((2, 3), 5.0)
    assert math.isnan(explained_variance(torch.randn(2, 3), returns, RETURNS_MASK))
