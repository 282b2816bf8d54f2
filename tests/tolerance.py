"""Bounds for "A equals B" that hold on any CPU: each is measured in the test that uses it.

Two runs that should agree (2 processes and 1, two micro-batch splits, a cached and a full forward) differ by
float32 rounding in another order; how much depends on the CPU's kernels and thread count, and Adam's division by
the root of tiny squared gradients amplifies it. So a test does not compare against a constant tuned on one
machine: it runs the reference against itself with another split (the self-difference), and allows FACTOR times
that. A real mistake (a rank's rows counted twice, a missing all-reduce) changes the update by a share of its
size, orders of magnitude above the bound; `assert_bound_is_meaningful` and the mutation checks show that.
"""

from __future__ import annotations

import os

import torch

# How far another reduction order may move a result beyond what another split moved it: the ratio of the 2-process
# difference to the self-difference measured 0.5-3 on the 2-core Xeon (docs/tolerances.md).
FACTOR = 10.0
F32_EPS = torch.finfo(torch.float32).eps


def float32_floor(values: torch.Tensor | float, ulps: float = 8.0) -> float:
    """A few float32 units in the last place of the largest value: the bound when the self-difference is 0 (the
    other split happened to round identically)."""
    return ulps * F32_EPS * float(torch.as_tensor(values).abs().max())


def assert_close_to_reference(difference: float, self_difference: float, what: str, floor: float = 0.0,
                              factor: float = FACTOR) -> float:
    """Assert `difference` <= max(factor x self_difference, floor); the message says all three numbers.
    -> the bound used"""
    bound = max(factor * self_difference, floor)
    if os.environ.get("RLHF_TOLERANCE_LOG"):  # docs/tolerances.md is made from these lines
        with open(os.environ["RLHF_TOLERANCE_LOG"], "a") as log:
            log.write(f"{what}\t{difference:.3g}\t{self_difference:.3g}\t{bound:.3g}\n")
    assert difference <= bound, (
        f"{what}: difference {difference:.3g} > bound {bound:.3g} "
        f"(= max({factor:g} x self-difference {self_difference:.3g}, float32 floor {floor:.3g}))")
    return bound


def assert_bound_is_meaningful(bound: float, effect: float, what: str, margin: float = 10.0) -> None:
    """The bound must sit well below the size of what is being compared (the update, the values), or the
    equality test could not catch a real mistake."""
    assert bound * margin < effect, f"{what}: bound {bound:.3g} is not {margin:g}x below the effect {effect:.3g}"


def norm_of_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| over all tensors of two state dicts with the same keys (float64 accumulation)."""
    assert a.keys() == b.keys()
    return sum(float((a[k].double() - b[k].double()).square().sum()) for k in a) ** 0.5


def norm_of(a: dict[str, torch.Tensor]) -> float:
    return sum(float(v.double().square().sum()) for v in a.values()) ** 0.5


def relative_update_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                               start: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b - start||: how far apart two trained weight sets are, as a share of the update. A norm,
    not a maximum: Adam can move a single element with a near-zero gradient by up to the learning rate on noise
    alone, and the maximum of such elements is not stable across CPUs; a real mistake moves all of them."""
    return norm_of_difference(a, b) / norm_of_difference(b, start)


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| (e.g. Adam's moments)."""
    return norm_of_difference(a, b) / norm_of(b)
