import pytest
import torch

from rlhf_core.value_losses import clipped_value_loss


def test_clipped_value_loss_hand_values():
    # clip range 0.2 around old_values = 1.0: clipped values lie in [0.8, 1.2]
    old_values = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    values = torch.tensor([[1.1, 1.5, 0.5, 3.0]], requires_grad=True)
    returns = torch.tensor([[2.0, 2.0, 2.0, 2.0]])
    loss, clipped = clipped_value_loss(values, old_values, returns, 0.2)
    expected = [
        0.5 * max((1.1 - 2.0) ** 2, (1.1 - 2.0) ** 2),  # (a) inside the range: both terms equal, no clip
        0.5 * max((1.5 - 2.0) ** 2, (1.2 - 2.0) ** 2),  # (b) moved 0.5 toward the return: the clipped term wins
        0.5 * max((0.5 - 2.0) ** 2, (0.8 - 2.0) ** 2),  # (c) moved away from the return: the unclipped term wins
        0.5 * max((3.0 - 2.0) ** 2, (1.2 - 2.0) ** 2),  # (c) overshot the return: the unclipped term wins
    ]
    torch.testing.assert_close(loss, torch.tensor([expected]))
    assert expected == pytest.approx([0.405, 0.32, 1.125, 0.5])
    assert clipped.tolist() == [[False, True, False, False]]
    (grad,) = torch.autograd.grad(loss.sum(), values)
    # d/dV 0.5 (V - R)^2 = V - R where the unclipped term wins; 0 where the clipped (constant in V) term wins
    torch.testing.assert_close(grad, torch.tensor([[1.1 - 2.0, 0.0, 0.5 - 2.0, 3.0 - 2.0]]))


def test_gradient_is_zero_exactly_where_clip_is_active():
    torch.manual_seed(0)
    old_values = torch.randn(8, 16)
    values = (old_values + 0.5 * torch.randn(8, 16)).requires_grad_()
    returns = torch.randn(8, 16)
    c = 0.2
    loss, clipped = clipped_value_loss(values, old_values, returns, c)
    (grad,) = torch.autograd.grad(loss.sum(), values)
    outside = (values.detach() - old_values).abs() > c
    assert clipped.any() and (outside & ~clipped).any() and (~outside).any()  # all three cases occur
    assert not (clipped & ~outside).any()  # the clip can only be active outside the range
    assert (grad[clipped] == 0).all()
    torch.testing.assert_close(grad[~clipped], (values.detach() - returns)[~clipped])


def test_wide_clip_range_is_plain_squared_error():
    torch.manual_seed(1)
    values, old_values, returns = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    loss, clipped = clipped_value_loss(values, old_values, returns, 1e6)
    # exact: inside the range the clipped value is V itself, not V_old + (V - V_old), which can be off by an ulp
    assert torch.equal(loss, 0.5 * (values - returns) ** 2)
    assert not clipped.any()


def test_shape_mismatch_raises():
    with pytest.raises(AssertionError):
        clipped_value_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4), 0.2)
