"""Per-token estimators of KL(pi || ref) from tokens sampled from pi (Schulman 2020, "Approximating KL divergence").

With r = ref(x) / pi(x) and x ~ pi:
    k1 = -log r                 unbiased, high variance, can be negative per token
    k2 = (log r)^2 / 2          biased (low bias when pi ~ ref), >= 0, low variance
    k3 = (r - 1) - log r        unbiased, >= 0, low variance (the GRPO paper's choice, eq. 4)
Departure from the blog post: k3 is computed with expm1 so that it stays accurate (and >= 0) when
log r is tiny, which is the common case when the policy is near the reference.
The estimate is per token; summing/averaging over tokens is `policy_losses.aggregate`'s job.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from rlhf_core.registry import register

KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {}


@register(KL_ESTIMATORS, "k1")
def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k1 estimate of KL(pi || ref): log pi - log ref (Schulman 2020); unbiased, may be < 0.
    logprobs, ref_logprobs: [B, T] -> [B, T]"""
    assert logprobs.shape == ref_logprobs.shape, (logprobs.shape, ref_logprobs.shape)
    return logprobs - ref_logprobs


@register(KL_ESTIMATORS, "k2")
def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k2 estimate of KL(pi || ref): (log pi - log ref)^2 / 2 (Schulman 2020); biased, >= 0.
    logprobs, ref_logprobs: [B, T] -> [B, T]"""
    assert logprobs.shape == ref_logprobs.shape, (logprobs.shape, ref_logprobs.shape)
    return 0.5 * (logprobs - ref_logprobs) ** 2


@register(KL_ESTIMATORS, "k3")
def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(pi || ref): (r - 1) - log r, r = ref / pi (Schulman 2020); unbiased, >= 0.
    logprobs, ref_logprobs: [B, T] -> [B, T]"""
    assert logprobs.shape == ref_logprobs.shape, (logprobs.shape, ref_logprobs.shape)
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio  # expm1 stays accurate for tiny log-ratios
