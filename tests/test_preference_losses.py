import math

import pytest
import torch

from rlhf_core.preference_losses import (PREFERENCE_LOSSES, hinge_loss, implicit_rewards, ipo_loss, kto_loss,
                                         kto_reference_point, robust_loss, rpo_nll, sigmoid_loss, simpo_loss)


def _loss(name, chosen, rejected, ref_chosen, ref_rejected, *, beta=0.1, label_smoothing=0.0, simpo_gamma=0.0):
    """Run PREFERENCE_LOSSES[name] on plain lists or tensors (one entry per pair), with the options it takes."""
    tensors = [torch.as_tensor(x) for x in (chosen, rejected, ref_chosen, ref_rejected)]
    entry, given = PREFERENCE_LOSSES[name], dict(label_smoothing=label_smoothing, simpo_gamma=simpo_gamma)
    return entry.loss(*tensors, beta=beta, **{option: given[option] for option in entry.options})


def softplus(x: float) -> float:
    return math.log(1 + math.exp(x))  # -log sigma(-x)


# Pair 1: logits = (-1 - (-2)) - (-3 - (-2)) = 1 + 1 = 2, so beta * logits = 0.1 * 2 = 0.2.
# Pair 2: logits = (0 - 0) - (-20 - 0) = 20, so beta * logits = 2.
PAIRS = dict(chosen=[-1.0, 0.0], rejected=[-3.0, -20.0], ref_chosen=[-2.0, 0.0], ref_rejected=[-2.0, 0.0])


def test_registry_keys():
    assert set(PREFERENCE_LOSSES) == {"sigmoid", "robust", "hinge", "ipo", "simpo"}
    assert PREFERENCE_LOSSES["sigmoid"].loss is sigmoid_loss and PREFERENCE_LOSSES["robust"].loss is robust_loss
    assert PREFERENCE_LOSSES["hinge"].loss is hinge_loss and PREFERENCE_LOSSES["ipo"].loss is ipo_loss
    assert PREFERENCE_LOSSES["simpo"].loss is simpo_loss
    # what each declares: only SimPO is reference-free and length-normalised, and only it takes simpo_gamma
    assert [n for n, loss in PREFERENCE_LOSSES.items() if not loss.needs_reference] == ["simpo"]
    assert [n for n, loss in PREFERENCE_LOSSES.items() if loss.length_normalized] == ["simpo"]
    assert [n for n, loss in PREFERENCE_LOSSES.items() if "simpo_gamma" in loss.options] == ["simpo"]


# ---------------------------------------------------------------- hand values


def test_sigmoid_hand_values():
    # -log sigma(x) = log(1 + e^-x)
    expected = [softplus(-0.2), softplus(-2.0)]
    torch.testing.assert_close(_loss("sigmoid", **PAIRS), torch.tensor(expected))


def test_cdpo_hand_values():
    # eps = 0.1: -(1 - 0.1) log sigma(x) - 0.1 log sigma(-x) = 0.9 log(1 + e^-x) + 0.1 log(1 + e^x)
    expected = [0.9 * softplus(-0.2) + 0.1 * softplus(0.2), 0.9 * softplus(-2.0) + 0.1 * softplus(2.0)]
    torch.testing.assert_close(_loss("sigmoid", **PAIRS, label_smoothing=0.1), torch.tensor(expected))


def test_robust_hand_values():
    # eps = 0.1: (0.9 log(1 + e^-x) - 0.1 log(1 + e^x)) / (1 - 2 * 0.1)
    expected = [(0.9 * softplus(-0.2) - 0.1 * softplus(0.2)) / 0.8, (0.9 * softplus(-2.0) - 0.1 * softplus(2.0)) / 0.8]
    torch.testing.assert_close(_loss("robust", **PAIRS, label_smoothing=0.1), torch.tensor(expected))


def test_hinge_hand_values():
    # relu(1 - 0.2) = 0.8; relu(1 - 2) = 0: the margin 1 / beta = 10 is already met
    torch.testing.assert_close(_loss("hinge", **PAIRS), torch.tensor([1 - 0.2, 0.0]))


def test_ipo_hand_values():
    # 1 / (2 * 0.1) = 5: (2 - 5)^2 = 9, (20 - 5)^2 = 225
    torch.testing.assert_close(_loss("ipo", **PAIRS), torch.tensor([(2 - 5) ** 2, (20 - 5) ** 2], dtype=torch.float32))


def test_simpo_hand_values():
    # average log-probs: beta = 2, gamma = 0.5: 2 * (-0.5 - (-1.5)) - 0.5 = 1.5; 2 * (-1 - (-1)) - 0.5 = -0.5
    kwargs = dict(chosen=[-0.5, -1.0], rejected=[-1.5, -1.0], ref_chosen=[0.0, 0.0], ref_rejected=[0.0, 0.0])
    loss = _loss("simpo", **kwargs, beta=2.0, simpo_gamma=0.5)
    torch.testing.assert_close(loss, torch.tensor([softplus(-1.5), softplus(0.5)]))
    smoothed = _loss("simpo", **kwargs, beta=2.0, simpo_gamma=0.5, label_smoothing=0.2)  # cDPO-style smoothing
    expected = [0.8 * softplus(-1.5) + 0.2 * softplus(1.5), 0.8 * softplus(0.5) + 0.2 * softplus(-0.5)]
    torch.testing.assert_close(smoothed, torch.tensor(expected))


def test_simpo_ignores_reference():
    zeros = _loss("simpo", [-0.5, -1.0], [-1.5, -1.0], [0.0, 0.0], [0.0, 0.0], beta=2.0, simpo_gamma=0.5)
    others = _loss("simpo", [-0.5, -1.0], [-1.5, -1.0], [-7.0, 3.0], [1.0, -9.0], beta=2.0, simpo_gamma=0.5)
    torch.testing.assert_close(others, zeros)


# ---------------------------------------------------------------- policy == reference (logits = 0)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_losses_when_policy_equals_reference(eps):
    logps = dict(chosen=[-1.0, -4.0], rejected=[-3.0, -2.0], ref_chosen=[-1.0, -4.0], ref_rejected=[-3.0, -2.0])
    log2 = torch.full((2,), math.log(2))
    # -(1 - eps) log(1/2) - eps log(1/2) = log 2 for any eps
    torch.testing.assert_close(_loss("sigmoid", **logps, label_smoothing=eps), log2)
    # (-(1 - eps) log(1/2) + eps log(1/2)) / (1 - 2 eps) = log 2 (1 - 2 eps) / (1 - 2 eps) = log 2
    torch.testing.assert_close(_loss("robust", **logps, label_smoothing=eps), log2)
    torch.testing.assert_close(_loss("hinge", **logps), torch.ones(2))
    torch.testing.assert_close(_loss("ipo", **logps, beta=0.1), torch.full((2,), (1 / (2 * 0.1)) ** 2))


def test_smoothing_zero_is_plain_dpo():
    plain = -torch.nn.functional.logsigmoid(0.1 * torch.tensor([2.0, 20.0]))
    torch.testing.assert_close(_loss("sigmoid", **PAIRS, label_smoothing=0.0), plain)
    torch.testing.assert_close(_loss("robust", **PAIRS, label_smoothing=0.0), plain)


@pytest.mark.parametrize("eps", [0.5, 0.7])
def test_robust_rejects_eps_at_or_above_half(eps):
    with pytest.raises(ValueError, match="label_smoothing < 0.5"):
        _loss("robust", **PAIRS, label_smoothing=eps)


# ---------------------------------------------------------------- gradients and shapes


@pytest.mark.parametrize("name", ["sigmoid", "hinge", "ipo", "simpo"])
def test_gradient_raises_chosen_and_lowers_rejected(name):
    # logits = (-2 - (-2)) - (-3 - (-2)) = 1: hinge active (0.1 * 1 < 1) and ipo below target (1 < 5)
    chosen = torch.tensor([-2.0, -5.0], requires_grad=True)
    rejected = torch.tensor([-3.0, -6.0], requires_grad=True)
    ref = torch.tensor([-2.0, -5.0]), torch.tensor([-2.0, -5.0])
    loss = _loss(name, chosen, rejected, *ref, simpo_gamma=0.5)
    grad_chosen, grad_rejected = torch.autograd.grad(loss.sum(), (chosen, rejected))
    assert (grad_chosen < 0).all() and (grad_rejected > 0).all()


def test_sigmoid_gradient_hand_value():
    # d/dc -log sigma(beta h) = -beta sigma(-beta h); at beta h = 0.2 that is -0.1 / (1 + e^0.2)
    chosen = torch.tensor([-1.0], requires_grad=True)
    loss = sigmoid_loss(chosen, torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]),
                        beta=0.1, label_smoothing=0.0)
    (grad,) = torch.autograd.grad(loss.sum(), chosen)
    torch.testing.assert_close(grad, torch.tensor([-0.1 / (1 + math.exp(0.2))]))


def test_hinge_gradient_is_zero_past_the_margin():
    chosen = torch.tensor([0.0], requires_grad=True)  # logits = 20, beta * logits = 2 > 1
    loss = hinge_loss(chosen, torch.tensor([-20.0]), torch.zeros(1), torch.zeros(1), beta=0.1)
    (grad,) = torch.autograd.grad(loss.sum(), chosen)
    assert grad.item() == 0.0


@pytest.mark.parametrize("name", ["sigmoid", "robust", "hinge", "ipo", "simpo"])
def test_shapes(name):
    b = torch.zeros(3)
    assert _loss(name, b, b, b, b, label_smoothing=0.1, simpo_gamma=0.5).shape == (3,)
    with pytest.raises(AssertionError):
        _loss(name, b, torch.zeros(2), b, b, label_smoothing=0.1, simpo_gamma=0.5)


# ---------------------------------------------------------------- implicit rewards and RPO


def test_implicit_rewards_hand_values():
    logps = torch.tensor([-1.0, -3.0], requires_grad=True)
    rewards = implicit_rewards(logps, torch.tensor([-2.0, -2.0]), beta=0.1)
    torch.testing.assert_close(rewards, torch.tensor([0.1 * (-1 - (-2)), 0.1 * (-3 - (-2))]))
    assert not rewards.requires_grad


def test_rpo_nll_hand_values():
    logps_sum = torch.tensor([-6.0, -2.0], requires_grad=True)
    nll = rpo_nll(logps_sum, torch.tensor([3, 4]))
    torch.testing.assert_close(nll, torch.tensor([6 / 3, 2 / 4]))
    (grad,) = torch.autograd.grad(nll.sum(), logps_sum)  # it is a training term: the gradient flows
    torch.testing.assert_close(grad, torch.tensor([-1 / 3, -1 / 4]))


# ---------------------------------------------------------------- KTO


def _kto(z0, desirable_weight=1.0, undesirable_weight=1.0):
    # desirable: r = -1 - (-3) = 2; undesirable: r = -5 - (-3) = -2
    logps = torch.tensor([-1.0, -5.0], requires_grad=True)
    loss = kto_loss(logps, torch.tensor([-3.0, -3.0]), torch.tensor([True, False]), z0, beta=0.1,
                    desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    return loss, logps


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_kto_hand_values():
    loss, _ = _kto(torch.tensor(0.5))
    # desirable: 1 - sigma(0.1 * (2 - 0.5)) = 1 - sigma(0.15)
    # undesirable: 1 - sigma(0.1 * (0.5 - (-2))) = 1 - sigma(0.25)
    torch.testing.assert_close(loss, torch.tensor([1 - sigmoid(0.15), 1 - sigmoid(0.25)]))


def test_kto_weights_scale_each_side():
    loss, _ = _kto(torch.tensor(0.5), desirable_weight=2.0, undesirable_weight=1.5)
    torch.testing.assert_close(loss, torch.tensor([2.0 * (1 - sigmoid(0.15)), 1.5 * (1 - sigmoid(0.25))]))


def test_kto_gradient_hand_values_and_signs():
    loss, logps = _kto(torch.tensor(0.5))
    (grad,) = torch.autograd.grad(loss.sum(), logps)
    # d/dr [1 - sigma(0.1 (r - z0))] = -0.1 sigma(0.15) (1 - sigma(0.15)) < 0: raise a desirable response
    # d/dr [1 - sigma(0.1 (z0 - r))] = +0.1 sigma(0.25) (1 - sigma(0.25)) > 0: lower an undesirable one
    expected = [-0.1 * sigmoid(0.15) * (1 - sigmoid(0.15)), 0.1 * sigmoid(0.25) * (1 - sigmoid(0.25))]
    torch.testing.assert_close(grad, torch.tensor(expected))
    assert grad[0] < 0 < grad[1]


def test_kto_reference_point_is_detached():
    z0 = torch.tensor(0.5, requires_grad=True)
    loss, logps = _kto(z0)
    grad_logps, grad_z0 = torch.autograd.grad(loss.sum(), (logps, z0), allow_unused=True)
    assert grad_z0 is None and grad_logps is not None
    mismatched = torch.tensor([-1.0, -2.0], requires_grad=True)
    assert not kto_reference_point(mismatched, torch.tensor([-2.0, -2.0])).requires_grad


def test_kto_reference_point_hand_value_and_clamp():
    # mean((-1 - (-2)), (-2 - (-2))) = (1 + 0) / 2 = 0.5
    torch.testing.assert_close(kto_reference_point(torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -2.0])),
                               torch.tensor(0.5))
    # mean((-3 - (-2)), (-2 - (-2))) = -0.5 < 0 -> 0
    assert kto_reference_point(torch.tensor([-3.0, -2.0]), torch.tensor([-2.0, -2.0])).item() == 0.0
    # kto_loss clamps a negative reference point too: same loss as z0 = 0
    torch.testing.assert_close(_kto(torch.tensor(-0.7))[0], _kto(torch.tensor(0.0))[0])
