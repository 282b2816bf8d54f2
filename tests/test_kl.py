import math

import pytest
import torch

from rlhf_core.kl import KL_ESTIMATORS, importance_weighted_kl, kl_estimate, kl_k1, kl_k2, kl_k3
from rlhf_core.policy_losses import aggregate


def test_registry_keys():
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}
    assert KL_ESTIMATORS["k3"] is kl_k3


# log pi - log ref = [0, 1, -1]
LOGPROBS = torch.tensor([[0.0, -1.0, -2.0]])
REF_LOGPROBS = torch.tensor([[0.0, -2.0, -1.0]])


def test_k1_hand_values():
    torch.testing.assert_close(kl_k1(LOGPROBS, REF_LOGPROBS), torch.tensor([[0.0, 1.0, -1.0]]))


def test_k2_hand_values():
    torch.testing.assert_close(kl_k2(LOGPROBS, REF_LOGPROBS), torch.tensor([[0.0, 0.5 * 1**2, 0.5 * (-1) ** 2]]))


def test_k3_hand_values():
    # log r = ref - pi = [0, -1, 1]; k3 = (e^{log r} - 1) - log r
    expected = torch.tensor([[0.0, (math.exp(-1) - 1) + 1, (math.exp(1) - 1) - 1]])
    torch.testing.assert_close(kl_k3(LOGPROBS, REF_LOGPROBS), expected)


def test_k3_is_nonnegative_everywhere():
    torch.manual_seed(0)
    logprobs = -10 * torch.rand(64, 32)
    ref_logprobs = -10 * torch.rand(64, 32)
    ref_logprobs[0] = logprobs[0] + 1e-6  # tiny log-ratios, where exp(x) - 1 - x could round below 0
    assert (kl_k3(logprobs, ref_logprobs) >= 0).all()
    assert (kl_k3(logprobs, logprobs) == 0).all()


def test_k3_accurate_for_tiny_log_ratio():
    # k3 = x^2/2 + x^3/6 + ... for log r = x; float32 exp(x) - 1 would lose it in rounding error of size 1e-7
    x = 1e-3
    k3 = kl_k3(torch.tensor([[0.0]]), torch.tensor([[x]]))
    torch.testing.assert_close(k3, torch.tensor([[x**2 / 2 + x**3 / 6]]), rtol=1e-3, atol=0.0)


def test_pi_weighted_k1_and_k3_equal_exact_kl_over_full_vocab():
    # V = 3, the vocabulary laid out along T: E_{v ~ pi}[k(v)] = sum_v pi(v) k(v)
    pi = torch.tensor([[0.5, 0.25, 0.25]])
    ref = torch.tensor([[0.25, 0.25, 0.5]])
    exact_kl = 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(1.0) + 0.25 * math.log(0.25 / 0.5)  # = log(2) / 4
    for name in ("k1", "k3"):
        expectation = (pi * KL_ESTIMATORS[name](pi.log(), ref.log())).sum()
        torch.testing.assert_close(expectation, torch.tensor(exact_kl), msg=name)
    # k2 is biased: 0.5 * (0.5 + 0.25) * log(2)^2 = 0.180 != 0.173
    k2_expectation = (pi * kl_k2(pi.log(), ref.log())).sum()
    torch.testing.assert_close(k2_expectation, torch.tensor(0.375 * math.log(2) ** 2))
    assert abs(k2_expectation.item() - exact_kl) > 1e-3


def test_k2_gradient_is_log_ratio():
    # d/d logprobs of (logprobs - ref)^2 / 2 is (logprobs - ref) = k1
    torch.manual_seed(0)
    logprobs = torch.randn(3, 4, requires_grad=True)
    ref_logprobs = torch.randn(3, 4)
    kl_k2(logprobs, ref_logprobs).sum().backward()
    torch.testing.assert_close(logprobs.grad, kl_k1(logprobs.detach(), ref_logprobs))


def test_k2_and_k3_agree_to_second_order_near_ref():
    # both are log(r)^2 / 2 + O(log(r)^3)
    logprobs = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    ref_logprobs = logprobs + torch.tensor([[1e-3, -1e-3]], dtype=torch.float64)
    diff = kl_k3(logprobs, ref_logprobs) - kl_k2(logprobs, ref_logprobs)
    torch.testing.assert_close(diff, torch.tensor([[1e-9 / 6, -1e-9 / 6]], dtype=torch.float64), rtol=1e-2, atol=0.0)


@pytest.mark.parametrize("name", sorted(KL_ESTIMATORS))
def test_shape_mismatch_raises(name):
    with pytest.raises(AssertionError):
        KL_ESTIMATORS[name](torch.zeros(2, 3), torch.zeros(2, 4))


# ---------------------------------------------------------------- clamp


def test_clamp_hand_values_and_gradient():
    # log pi - log ref = [0, 1, -3]; clamp 2 bounds it to [0, 1, -2]
    logprobs = torch.tensor([[-1.0, -1.0, -4.0]], requires_grad=True)
    ref_logprobs = torch.tensor([[-1.0, -2.0, -1.0]])
    torch.testing.assert_close(kl_estimate(logprobs, ref_logprobs, "k1", clamp=2.0), torch.tensor([[0.0, 1.0, -2.0]]))
    # k3 with log r = ref - pi = [0, -1, 2] (3 clamped to 2): (e^{log r} - 1) - log r
    k3 = kl_estimate(logprobs, ref_logprobs, "k3", clamp=2.0)
    expected = torch.tensor([[0.0, (math.exp(-1) - 1) + 1, (math.exp(2) - 1) - 2]])
    torch.testing.assert_close(k3, expected, rtol=1e-5, atol=0.0)
    (grad,) = torch.autograd.grad(k3.sum(), logprobs)
    # d k3 / d log pi = 1 - ref/pi inside the bound, 0 where the clamp binds
    torch.testing.assert_close(grad, torch.tensor([[0.0, 1 - math.exp(-1), 0.0]]))
    torch.testing.assert_close(kl_estimate(logprobs, ref_logprobs, "k3"), kl_k3(logprobs, ref_logprobs))  # None: off


def test_clamp_keeps_k3_and_its_gradient_finite_where_pi_is_tiny():
    logprobs = torch.tensor([[-100.0, -1.0]], requires_grad=True)  # pi ~ e^-100 where ref is ~1
    ref_logprobs = torch.tensor([[0.0, -1.0]])
    assert torch.isinf(kl_k3(logprobs, ref_logprobs)).any()  # e^100 overflows float32
    k3 = kl_estimate(logprobs, ref_logprobs, "k3", clamp=10.0)
    (grad,) = torch.autograd.grad(k3.sum(), logprobs)
    torch.testing.assert_close(k3, torch.tensor([[math.expm1(10.0) - 10.0, 0.0]]))
    assert torch.isfinite(grad).all() and grad[0, 0] == 0
    # clamping the value instead would leave 0 * inf = NaN in the gradient
    value_clamped = kl_k3(logprobs, ref_logprobs).clamp(max=10.0)
    (bad,) = torch.autograd.grad(value_clamped.sum(), logprobs)
    assert torch.isnan(bad).any()


@pytest.mark.parametrize("name", sorted(KL_ESTIMATORS))
def test_clamp_matches_a_loop(name):
    torch.manual_seed(0)
    logprobs, ref_logprobs = -5 * torch.rand(3, 4), -5 * torch.rand(3, 4)
    out = kl_estimate(logprobs, ref_logprobs, name, clamp=1.5)
    for b in range(3):
        for t in range(4):
            x = min(max(logprobs[b, t].item() - ref_logprobs[b, t].item(), -1.5), 1.5)  # log pi - log ref, bounded
            expected = {"k1": x, "k2": 0.5 * x * x, "k3": math.exp(-x) - 1 + x}[name]
            assert out[b, t].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------- importance-corrected KL


def test_importance_weighted_kl_hand_values():
    kl = torch.tensor([[0.5, 0.2, 0.3]])
    logprobs = torch.tensor([[math.log(0.2), math.log(0.1), -1.0]])
    old_logprobs = torch.tensor([[math.log(0.1), math.log(0.2), -1.0]])  # ratios 2, 0.5, 1
    torch.testing.assert_close(importance_weighted_kl(kl, logprobs, old_logprobs),
                               torch.tensor([[0.5 * 2, 0.2 * 0.5, 0.3 * 1]]))


def _exact_gradients():
    """Over a full vocabulary (V = 4, laid out along T) with pi = softmax(theta), pi_old and ref fixed: the gradients
    w.r.t. theta of (a) sum_x pi_old(x) r(x) k3(x), r keeping its gradient; (b) the same with r detached; (c) the
    exact KL(pi || ref); (d) the exact KL(ref || pi)."""
    theta = torch.tensor([0.3, -0.2, 0.5, -1.0], dtype=torch.float64, requires_grad=True)
    old = torch.log_softmax(torch.tensor([0.0, 0.4, -0.3, 0.2], dtype=torch.float64), -1)[None]
    ref = torch.log_softmax(torch.tensor([-0.5, 0.1, 0.3, 0.0], dtype=torch.float64), -1)[None]

    def grad(fn):
        logprobs = torch.log_softmax(theta, -1)[None]  # [1, V]
        return torch.autograd.grad(fn(logprobs), theta)[0]

    def sampled_mean(weighted):  # E_{x ~ pi_old}: the tokens were sampled by the old policy
        return (old.exp() * weighted).sum()

    return {
        "corrected": grad(lambda lp: sampled_mean(importance_weighted_kl(kl_k3(lp, ref), lp, old))),
        "detached": grad(lambda lp: sampled_mean(kl_k3(lp, ref) * torch.exp(lp - old).detach())),
        "reverse": grad(lambda lp: (lp.exp() * (lp - ref)).sum()),
        "forward": grad(lambda lp: (ref.exp() * (ref - lp)).sum()),
    }


def test_importance_corrected_k3_gives_the_reverse_kl_gradient_off_policy():
    g = _exact_gradients()
    torch.testing.assert_close(g["corrected"], g["reverse"])  # TRL's use_bias_correction_kl: the ratio not detached
    torch.testing.assert_close(g["detached"], g["forward"])  # a detached ratio gives KL(ref || pi)'s gradient
    assert not torch.allclose(g["reverse"], g["forward"], atol=1e-3)  # the two are really different


def test_plain_k3_on_policy_gives_the_forward_kl_gradient():
    """The bias the correction removes: with tokens from pi itself (old = sg[pi]), the gradient of E_pi[k3]
    as a loss term is E_pi[grad k3] = grad KL(ref || pi), while the corrected term gives grad KL(pi || ref)."""
    theta = torch.tensor([0.3, -0.2, 0.5, -1.0], dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.tensor([-0.5, 0.1, 0.3, 0.0], dtype=torch.float64), -1)[None]
    lp = torch.log_softmax(theta, -1)[None]
    plain = torch.autograd.grad((lp.exp().detach() * kl_k3(lp, ref)).sum(), theta, retain_graph=True)[0]
    corrected = torch.autograd.grad((lp.exp().detach() * importance_weighted_kl(kl_k3(lp, ref), lp, lp.detach()))
                                    .sum(), theta, retain_graph=True)[0]
    forward = torch.autograd.grad((ref.exp() * (ref - lp)).sum(), theta, retain_graph=True)[0]
    reverse = torch.autograd.grad((lp.exp() * (lp - ref)).sum(), theta)[0]
    torch.testing.assert_close(plain, forward)
    torch.testing.assert_close(corrected, reverse)


@pytest.mark.parametrize("corrected", [False, True])
@pytest.mark.parametrize("clamp", [None, 0.5])
def test_kl_term_micro_batches_add_up_with_global_normalisers(corrected, clamp):
    generator = torch.Generator().manual_seed(5)
    logprobs = (-2.0 + torch.randn(6, 5, generator=generator)).requires_grad_()
    ref, old = -2.0 + torch.randn(6, 5, generator=generator), -2.0 + torch.randn(6, 5, generator=generator)
    mask = torch.arange(5)[None, :] < torch.tensor([0, 5, 2, 4, 1, 3])[:, None]

    def term(rows):
        kl = kl_estimate(logprobs[rows], ref[rows], "k3", clamp)
        kl = importance_weighted_kl(kl, logprobs[rows], old[rows]) if corrected else kl
        return aggregate(kl, mask[rows], "token-mean", num_tokens=mask.sum().item())

    full = term(torch.arange(6))
    micro = sum(term(rows) for rows in torch.arange(6).split([1, 2, 3]))
    (full_grad,) = torch.autograd.grad(full, logprobs)
    (micro_grad,) = torch.autograd.grad(micro, logprobs)
    torch.testing.assert_close(micro, full)
    torch.testing.assert_close(micro_grad, full_grad)
