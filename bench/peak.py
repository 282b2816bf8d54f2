"""The machine's own matmul peak per dtype, measured in the same run as the workloads (the yardstick for the
update's model-FLOP utilisation): the best of several timed square matmuls, large enough to be compute bound."""

from __future__ import annotations

import time

import torch


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype, device: str = "cpu", size: int | None = None, repeats: int = 10) -> float:
    """FLOP/s of the fastest of `repeats` [size x size] @ [size x size] products (after two warm-ups). The default
    size is compute bound on either kind of device: 2048 on a CPU, 8192 on a GPU (where 2048 is launch bound)."""
    size = size or (8192 if device.startswith("cuda") else 2048)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
