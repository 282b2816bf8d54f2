"""The update loop shared by every policy-gradient algorithm: epochs x mini-batches x micro-batches.

One call runs on one rank. Losses are normalised by the mini-batch's *global* counts (summed over micro-batches
and, under torch.distributed, over ranks), so accumulating micro-batch gradients, or averaging them across DDP
ranks, gives the gradient of the whole mini-batch exactly. A non-finite loss or gradient norm stops the update
before `optimizer.step()`, so the weights on disk are never touched by a bad step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from rlhf_core.batch import length_sorted, select_rows


class NonFiniteError(FloatingPointError):
    """NaN or inf in a loss, gradient or reward: training stops, no checkpoint is written."""


@dataclass(frozen=True)
class Normalizers:
    num_seqs: float  # sequences in the mini-batch, all ranks
    num_tokens: float  # response tokens (mask True) in the mini-batch, all ranks


LossFn = Callable[[torch.nn.Module, dict[str, Tensor], Normalizers], tuple[Tensor, dict[str, Tensor]]]
MiniBatchStatsFn = Callable[[torch.nn.Module, dict[str, Tensor]], dict[str, Tensor]]


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_sum(value: float, device) -> float:
    if world_size() == 1:
        return float(value)
    tensor = torch.tensor(float(value), device=device, dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor)


def micro_batches(rows: Tensor, size: int) -> list[Tensor]:
    return list(rows.split(size))


def check_finite(value: Tensor, what: str) -> None:
    if not torch.isfinite(value).all():
        raise NonFiniteError(f"{what} is not finite ({value.item() if value.numel() == 1 else value}); "
                             "stopping before the optimizer step, no checkpoint is written")


def run_update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, Tensor], loss_fn: LossFn,
               *, epochs: int, mini_batches: int, micro_batch_size: int, max_grad_norm: float,
               seed: int, on_step: Callable[[dict[str, float]], None] | None = None,
               mini_batch_stats: MiniBatchStatsFn | None = None, sort_by_length: bool = True) -> list[dict[str, float]]:
    """Optimise `loss_fn` over `batch` (this rank's rows); returns one metrics dict per optimizer step.
    batch: tensors with leading dimension B, including prompt_mask [B, P] and response_mask [B, T].
    loss_fn returns (loss, metrics) already divided by the global normalisers, so micro-batch values add up.
    mini_batch_stats(model, mini_batch) -> {name: tensor}, if given, runs once per mini-batch before its
    micro-batches and its values are added to every micro-batch: statistics the loss needs over the whole
    mini-batch (KTO's reference point), so they do not change with the micro-batch split.
    sort_by_length: cut each mini-batch (a random draw of rows) into micro-batches of similar lengths, which
    computes less padding and, the normalisers being global, leaves the gradient unchanged."""
    num_rows = batch["response_mask"].shape[0]
    device = batch["response_mask"].device
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(epochs):
        order = torch.randperm(num_rows, generator=generator)
        for mini_index, mini_rows in enumerate(order.tensor_split(mini_batches)):
            mini_rows = mini_rows.to(device)
            norm = Normalizers(
                num_seqs=global_sum(len(mini_rows), device),
                num_tokens=global_sum(batch["response_mask"][mini_rows].sum().item(), device))
            optimizer.zero_grad(set_to_none=True)
            totals: dict[str, float] = {}
            shared = mini_batch_stats(model, select_rows(batch, mini_rows)) if mini_batch_stats else {}
            in_order = length_sorted(batch, mini_rows) if sort_by_length else mini_rows
            for micro_index, rows in enumerate(micro_batches(in_order, micro_batch_size)):
                loss, metrics = loss_fn(model, {**select_rows(batch, rows), **shared}, norm)
                check_finite(loss.detach(), f"loss (epoch {epoch}, mini-batch {mini_index}, micro-batch {micro_index})")
                # DDP averages gradients over ranks; our normalisers already divide by the global count.
                (loss * world_size()).backward()
                for key, value in metrics.items():
                    totals[key] = totals.get(key, 0.0) + float(value)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            check_finite(grad_norm.detach(), f"gradient norm (epoch {epoch}, mini-batch {mini_index})")
            optimizer.step()
            history.append({**totals, "policy/grad_norm": float(grad_norm)})
            if on_step is not None:  # progress reporting lives with the caller
                on_step(history[-1])
    return history
