import math

import pytest
import torch

from rlhf_core.kl import KL_ESTIMATORS, kl_k1, kl_k2, kl_k3


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
