"""Property-based checks of the math (hypothesis): identities that must hold for any input, not just the
hand-computed examples of the per-module tests."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_core.advantages import OUTCOME_ADVANTAGES
from rlhf_core.gae import gae_advantages
from rlhf_core.kl import KL_ESTIMATORS
from rlhf_core.preference_losses import PREFERENCE_LOSSES

FLOATS = st.floats(-10, 10, allow_nan=False, width=32)


@st.composite
def grouped_rewards(draw):
    groups, size = draw(st.integers(1, 5)), draw(st.integers(2, 6))
    rewards = torch.tensor(draw(st.lists(FLOATS, min_size=groups * size, max_size=groups * size)))
    return rewards, torch.arange(groups).repeat_interleave(size)


@settings(max_examples=200, deadline=None)
@given(grouped_rewards(), st.floats(-5, 5, width=32), st.floats(0.125, 10, width=32))
def test_group_normalized_advantages_are_centred_and_shift_and_scale_invariant(batch, shift, scale):
    rewards, group_ids = batch
    advantages = OUTCOME_ADVANTAGES["grpo"](rewards, group_ids)
    assert torch.isfinite(advantages).all()
    for group in group_ids.unique():
        assert advantages[group_ids == group].sum().abs() < 1e-3  # centred within each group
    moved = OUTCOME_ADVANTAGES["grpo"](rewards * scale + shift, group_ids)
    # invariance up to float32 rounding of groups that are constant or nearly so
    spread = torch.stack([rewards[group_ids == g].std() for g in group_ids]).ge(1e-2)
    torch.testing.assert_close(moved[spread], advantages[spread], rtol=1e-3, atol=1e-3)


@settings(max_examples=200, deadline=None)
@given(grouped_rewards())
def test_every_estimator_gives_zero_advantage_to_a_group_with_one_reward(batch):
    _, group_ids = batch
    rewards = group_ids.float() * 0.7  # constant within each group
    for name, estimator in OUTCOME_ADVANTAGES.items():
        assert torch.equal(estimator(rewards, group_ids), torch.zeros_like(rewards)), name


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(FLOATS, FLOATS), min_size=1, max_size=20))
def test_kl_estimators_vanish_on_equal_log_probs_and_k2_k3_are_never_negative(pairs):
    logprobs = -torch.tensor([abs(a) for a, _ in pairs])
    ref_logprobs = -torch.tensor([abs(b) for _, b in pairs])
    for name, estimator in KL_ESTIMATORS.items():
        assert torch.equal(estimator(logprobs, logprobs), torch.zeros_like(logprobs)), name
    assert (KL_ESTIMATORS["k2"](logprobs, ref_logprobs) >= 0).all()
    assert (KL_ESTIMATORS["k3"](logprobs, ref_logprobs) >= -1e-6).all()  # r - 1 - log r >= 0


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 4), st.integers(1, 7), st.data())
def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value(rows, width, data):
    lengths = data.draw(st.lists(st.integers(1, width), min_size=rows, max_size=rows))
    rewards = torch.tensor(data.draw(st.lists(FLOATS, min_size=rows * width, max_size=rows * width))).view(rows, width)
    values = torch.tensor(data.draw(st.lists(FLOATS, min_size=rows * width, max_size=rows * width))).view(rows, width)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    advantages, returns = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    masked_rewards = torch.where(mask, rewards, 0.0)
    reward_to_go = masked_rewards.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(advantages, torch.where(mask, reward_to_go - values, 0.0), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(returns, torch.where(mask, reward_to_go, 0.0), rtol=1e-4, atol=1e-3)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(FLOATS, FLOATS, FLOATS, FLOATS), min_size=1, max_size=10), st.floats(0.0625, 2, width=32))
def test_sigmoid_dpo_loss_difference_when_chosen_and_rejected_swap_is_the_scaled_margin(rows, beta):
    chosen, rejected, ref_chosen, ref_rejected = (torch.tensor(c) for c in zip(*rows))
    loss = PREFERENCE_LOSSES["sigmoid"].loss
    kwargs = dict(beta=beta, label_smoothing=0.0)
    forward = loss(chosen, rejected, ref_chosen, ref_rejected, **kwargs)
    swapped = loss(rejected, chosen, ref_rejected, ref_chosen, **kwargs)
    margin = (chosen - ref_chosen) - (rejected - ref_rejected)
    # -log s(x) + log s(-x) = -x
    torch.testing.assert_close(forward - swapped, -beta * margin, rtol=1e-4, atol=1e-4)
    assert (forward >= 0).all()
