import math

import pytest
import torch

from rlhf_core.policy_losses import AGGREGATION_MODES, POLICY_LOSSES, aggregate, masked_mean, ppo_clip_loss

# ---------------------------------------------------------------- ppo_clip


def test_registry_keys():
    assert set(POLICY_LOSSES) == {"ppo_clip"}
    assert POLICY_LOSSES["ppo_clip"] is ppo_clip_loss


def _ppo(ratios, advantages, eps_low, eps_high):
    """Run ppo_clip_loss on one row of tokens with old_logprobs = 0, so ratio = exp(logprobs)."""
    logprobs = torch.tensor([[math.log(r) for r in ratios]], requires_grad=True)
    loss, metrics = ppo_clip_loss(logprobs, torch.zeros_like(logprobs), torch.tensor([advantages]), eps_low, eps_high)
    (grad,) = torch.autograd.grad(loss.sum(), logprobs)
    return loss, metrics, grad


def test_ppo_clip_hand_values():
    # eps_low = 0.2, eps_high = 0.3: clip range [0.8, 1.3]
    ratios = [1.1, 1.5, 0.5, 1.5, 0.5]
    advantages = [2.0, 1.0, -1.0, -1.0, 1.0]
    loss, metrics, grad = _ppo(ratios, advantages, 0.2, 0.3)
    expected = [
        -2.0 * 1.1,  # inside the range: both terms equal
        max(-1.0 * 1.5, -1.0 * 1.3),  # A > 0, ratio above 1.3: clipped high
        max(1.0 * 0.5, 1.0 * 0.8),  # A < 0, ratio below 0.8: clipped low
        max(1.0 * 1.5, 1.0 * 1.3),  # A < 0, ratio above range: unclipped term is larger, not clipped
        max(-1.0 * 0.5, -1.0 * 0.8),  # A > 0, ratio below range: unclipped term is larger, not clipped
    ]
    torch.testing.assert_close(loss, torch.tensor([expected]))
    assert expected == [-2.2, -1.3, 0.8, 1.5, -0.5]
    assert metrics["clipped_low"].tolist() == [[False, False, True, False, False]]
    assert metrics["clipped_high"].tolist() == [[False, True, False, False, False]]
    torch.testing.assert_close(metrics["ratio"], torch.tensor([ratios]))
    assert not metrics["ratio"].requires_grad
    # d loss / d logprobs = -A * ratio where the unclipped term wins, 0 where the clip is active
    torch.testing.assert_close(grad, torch.tensor([[-2.0 * 1.1, 0.0, 0.0, 1.0 * 1.5, -1.0 * 0.5]]))


def test_ppo_clip_gradient_is_zero_exactly_where_clip_is_active():
    torch.manual_seed(0)
    logprobs = (0.5 * torch.randn(8, 16)).requires_grad_()
    advantages = torch.randn(8, 16)
    loss, metrics = ppo_clip_loss(logprobs, torch.zeros(8, 16), advantages, 0.2, 0.28)
    (grad,) = torch.autograd.grad(loss.sum(), logprobs)
    active = metrics["clipped_low"] | metrics["clipped_high"]
    assert active.any() and (~active).any()
    assert (grad[active] == 0).all()
    torch.testing.assert_close(grad[~active], (-advantages * metrics["ratio"])[~active])


def test_ppo_clip_asymmetric_eps():
    # ratio 1.25 with A = 1 and ratio 0.75 with A = -1
    ratios, advantages = [1.25, 0.75], [1.0, -1.0]
    loss, metrics, grad = _ppo(ratios, advantages, 0.2, 0.3)  # range [0.8, 1.3]: high side free, low side clipped
    torch.testing.assert_close(loss, torch.tensor([[-1.25, 0.8]]))
    torch.testing.assert_close(grad, torch.tensor([[-1.25, 0.0]]))
    assert metrics["clipped_low"].tolist() == [[False, True]]
    loss, metrics, grad = _ppo(ratios, advantages, 0.3, 0.2)  # range [0.7, 1.2]: the other way round
    torch.testing.assert_close(loss, torch.tensor([[-1.2, 0.75]]))
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.75]]))
    assert metrics["clipped_high"].tolist() == [[True, False]]


def test_ppo_clip_shape_mismatch_raises():
    with pytest.raises(AssertionError):
        ppo_clip_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), 0.2, 0.2)


# ---------------------------------------------------------------- aggregate

VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[True, True, False], [True, False, False]])


def test_aggregate_hand_values():
    torch.testing.assert_close(aggregate(VALUES, MASK, "token-mean"), torch.tensor((1 + 2 + 4) / 3))
    torch.testing.assert_close(aggregate(VALUES, MASK, "seq-mean-token-mean"), torch.tensor(((1 + 2) / 2 + 4 / 1) / 2))
    torch.testing.assert_close(aggregate(VALUES, MASK, "seq-mean-token-sum-norm"), torch.tensor((1 + 2 + 4) / (2 * 3)))
    torch.testing.assert_close(
        aggregate(VALUES, MASK, "seq-mean-token-sum-norm", norm_length=4), torch.tensor((1 + 2 + 4) / (2 * 4))
    )
    torch.testing.assert_close(aggregate(VALUES, MASK, "token-mean", num_tokens=7), torch.tensor((1 + 2 + 4) / 7))
    torch.testing.assert_close(aggregate(VALUES, MASK, "seq-mean-token-mean", num_seqs=4), torch.tensor(5.5 / 4))


def test_aggregate_empty_rows_and_masks_give_zero_not_nan():
    one_empty_row = torch.tensor([[True, True, False], [False, False, False]])
    torch.testing.assert_close(aggregate(VALUES, one_empty_row, "seq-mean-token-mean"), torch.tensor((1.5 + 0) / 2))
    empty = torch.zeros(2, 3, dtype=torch.bool)
    for mode in AGGREGATION_MODES:
        assert aggregate(VALUES, empty, mode).item() == 0.0


def _random_batch(seed: int, rows: int = 6, cols: int = 5):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, cols, generator=gen, requires_grad=True)
    lengths = torch.randint(0, cols + 1, (rows,), generator=gen)
    lengths[0], lengths[1] = 0, cols  # one empty and one full row
    mask = torch.arange(cols)[None, :] < lengths[:, None]  # ragged right-padded mask
    return values, mask


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
@pytest.mark.parametrize("split", [[2, 4], [1, 2, 3]])
def test_aggregate_micro_batch_sum_equals_full_batch(mode, split):
    values, mask = _random_batch(seed=0)
    full = aggregate(values, mask, mode)
    (full_grad,) = torch.autograd.grad(full, values)
    norms = dict(num_seqs=values.shape[0], num_tokens=mask.sum().item(), norm_length=values.shape[1])
    micro = sum(aggregate(v, m, mode, **norms) for v, m in zip(values.split(split), mask.split(split)))
    (micro_grad,) = torch.autograd.grad(micro, values)
    torch.testing.assert_close(micro, full)
    torch.testing.assert_close(micro_grad, full_grad)
    # without the full-batch normalisers each micro-batch divides by its own size, and the sum is off
    naive = sum(aggregate(v, m, mode) for v, m in zip(values.split(split), mask.split(split)))
    assert not torch.allclose(naive, full)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("fill", [1e30, float("nan"), float("inf")])
def test_aggregate_padding_invariance(mode, fill):
    values, mask = _random_batch(seed=1)
    norm = {"norm_length": 5} if mode == "seq-mean-token-sum-norm" else {}  # its default T grows with padding
    full = aggregate(values, mask, mode, **norm)
    (grad,) = torch.autograd.grad(full, values)
    padded_values = torch.cat([values, torch.full((6, 3), fill)], dim=1)  # 3 extra masked-out columns
    padded_mask = torch.cat([mask, torch.zeros(6, 3, dtype=torch.bool)], dim=1)
    padded = aggregate(padded_values, padded_mask, mode, **norm)
    (padded_grad,) = torch.autograd.grad(padded, values)
    torch.testing.assert_close(padded, full)
    torch.testing.assert_close(padded_grad, grad)


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_aggregate_nan_at_masked_positions_does_not_leak_into_gradient(mode):
    values = torch.tensor([[1.0, float("nan")], [float("inf"), 2.0]], requires_grad=True)
    mask = torch.tensor([[True, False], [False, True]])
    loss = aggregate(values, mask, mode)
    (grad,) = torch.autograd.grad(loss, values)
    assert torch.isfinite(loss)
    assert torch.isfinite(grad).all() and (grad[~mask] == 0).all()


def test_aggregate_unknown_mode_raises():
    with pytest.raises(ValueError, match="unknown aggregation mode 'seq-sum'"):
        aggregate(VALUES, MASK, "seq-sum")


def test_aggregate_requires_bool_mask_of_same_shape():
    with pytest.raises(AssertionError):
        aggregate(VALUES, MASK.float(), "token-mean")
    with pytest.raises(AssertionError):
        aggregate(VALUES, MASK[:, :2], "token-mean")


def test_masked_mean():
    torch.testing.assert_close(masked_mean(VALUES, MASK), torch.tensor((1 + 2 + 4) / 3))
    assert masked_mean(VALUES, torch.zeros(2, 3, dtype=torch.bool)).item() == 0.0
