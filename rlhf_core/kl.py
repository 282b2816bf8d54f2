"""Per-token estimators of KL(pi || ref) from tokens sampled from pi (Schulman 2020, "Approximating KL divergence").

With r = ref(x) / pi(x) and x ~ pi:
    k1 = -log r                 unbiased, high variance, can be negative per token
    k2 = (log r)^2 / 2          biased (low bias when pi ~ ref), >= 0, low variance
    k3 = (r - 1) - log r        unbiased, >= 0, low variance (the GRPO paper's choice, eq. 4)
Departure from the blog post: k3 is computed with expm1 so that it stays accurate (and >= 0) when
log r is tiny, which is the common case when the policy is near the reference.
The estimate is per token; summing/averaging over tokens is `policy_losses.aggregate`'s job.

Two options on top of an estimator (GRPO's `kl` section):
  * `kl_estimate(..., clamp=c)` bounds log(pi / ref) to [-c, c] before the estimator, so k3's exp cannot overflow
    (a token pi gives ~0 and ref does not) and no token's KL exceeds e^c - 1 - c; the gradient is 0 where it binds.
    verl's low_var_kl clamps the log-ratio at +-20 and then k3 itself at +-10, OpenRLHF clamps the estimate at
    +-10; here one bound, on the log-ratio (clamping only the value would leave exp's inf in the gradient: 0 * inf).
  * `importance_weighted_kl` multiplies the per-token KL by pi / pi_old, the ratio keeping its gradient (TRL's
    use_bias_correction_kl; DeepSeek-V3.2's "unbiased KL estimate"). The tokens were sampled from pi_old, not pi,
    and the gradient of plain k3 is E_pi[(1 - ref/pi) grad log pi] = grad KL(ref || pi), the *forward* KL's; with
    the ratio it is E_pi_old[r (k3 + 1 - ref/pi) grad log pi] = E_pi[log(pi/ref) grad log pi] = grad KL(pi || ref).
    Detaching the ratio would give back the forward KL's gradient (tests/test_kl.py checks all three exactly).
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


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: str, clamp: float | None = None) -> Tensor:
    """Per-token KL(pi || ref) by the registered `estimator`, with log(pi / ref) first clamped to [-clamp, clamp]
    (None: not clamped). logprobs, ref_logprobs: [B, T] -> [B, T]"""
    if clamp is not None:
        # move logprobs, not ref: the estimator sees the bounded log-ratio, and the clamp's gradient is 0 where it binds
        logprobs = ref_logprobs + (logprobs - ref_logprobs).clamp(-clamp, clamp)
    return KL_ESTIMATORS[estimator](logprobs, ref_logprobs)


def importance_weighted_kl(kl_per_token: Tensor, logprobs: Tensor, old_logprobs: Tensor) -> Tensor:
    """kl_per_token * pi / pi_old, the ratio NOT detached (TRL use_bias_correction_kl, where coef_1 keeps its
    gradient; DeepSeek-V3.2, "unbiased KL estimate"): the estimate of KL(pi || ref) from tokens sampled by pi_old,
    whose gradient is the reverse KL's (module docstring). On-policy (old = sg[pi]) the value is unchanged and only
    the gradient differs. kl_per_token, logprobs, old_logprobs: [B, T] -> [B, T]"""
    assert kl_per_token.shape == logprobs.shape == old_logprobs.shape, (kl_per_token.shape, logprobs.shape)
    return kl_per_token * torch.exp(logprobs - old_logprobs)
