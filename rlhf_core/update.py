"""The update loop shared by every policy-gradient algorithm: epochs x mini-batches x micro-batches.

One call runs on one rank. Losses are normalised by the mini-batch's *global* counts (summed over micro-batches
and, under torch.distributed, over ranks), so accumulating micro-batch gradients, or averaging them across DDP
ranks, gives the gradient of the whole mini-batch exactly. A non-finite loss or gradient norm stops the update
before `optimizer.step()`, and non-finite weights after it stop it too, so no checkpoint ever holds a bad step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from rlhf_core.batch import ceil_div, length_sorted, select_rows
from rlhf_core.distributed import global_sum, gradient_sync, local_value, rank, rank_share, world_size
from rlhf_core.faults import kill_point
from rlhf_core.precision import compute_copies, compute_dtype


class NonFiniteError(FloatingPointError):
    """NaN or inf in a loss, gradient or reward: training stops, no checkpoint is written."""


@dataclass(frozen=True)
class Normalizers:
    num_seqs: float  # sequences in the mini-batch, all ranks
    num_tokens: float  # response tokens (mask True) in the mini-batch, all ranks


LossFn = Callable[[torch.nn.Module, dict[str, Tensor], Normalizers], tuple[Tensor, dict[str, Tensor]]]
MiniBatchStatsFn = Callable[[torch.nn.Module, dict[str, Tensor]], dict[str, Tensor]]


def forward_passes(mini_batch_size: int, micro_batch_size: int, num_ranks: int) -> int:
    """Forward passes each rank runs on a mini-batch: those of the rank with the most rows (`rank_share`)."""
    return ceil_div(ceil_div(mini_batch_size, num_ranks), micro_batch_size)


def micro_batches(rows: Tensor, size: int, passes: int) -> list[Tensor | None]:
    """This rank's micro-batches of `size` rows, then a None for every forward pass another rank runs beyond
    them: under torch.distributed every rank must run as many passes (FSDP gathers the weights inside each, DDP
    synchronises in the last)."""
    pieces = list(rows.split(size)) if len(rows) else []
    return pieces + [None] * (passes - len(pieces))


def stats_rows(batch: dict[str, Tensor], all_rows: Tensor, mini_rows: Tensor) -> dict[str, Tensor]:
    """This rank's rows of a mini-batch for `mini_batch_stats`, with `row_weight` [b] (1 for its rows): a rank
    holding fewer rows than another is padded with copies of the mini-batch's first row at weight 0, so every rank
    runs as many forward passes."""
    missing = ceil_div(len(all_rows), world_size()) - len(mini_rows)
    rows = torch.cat([mini_rows, all_rows[:1].repeat(missing)])
    weight = torch.cat([torch.ones(len(mini_rows)), torch.zeros(missing)]).to(mini_rows.device)
    return {**select_rows(batch, rows), "row_weight": weight}


def check_finite(value: Tensor, what: str) -> None:
    if not torch.isfinite(value).all():
        raise NonFiniteError(f"{what} is not finite ({value.item() if value.numel() == 1 else value}); "
                             "stopping before the optimizer step, no checkpoint is written")


def check_weights_finite(params: list[Tensor], where: str) -> None:
    """After `optimizer.step()`: every updated weight is finite, checked with one fused norm per tensor (one read
    of the trainable weights, ~1% of a step). The loss and the gradient were finite, so the optimizer's own
    settings drove the weights there (an infinite weight decay, a huge learning rate)."""
    local = [p.detach().to_local() if hasattr(p, "to_local") else p.detach() for p in params]  # FSDP: own shard
    bad = float((~torch.isfinite(torch.stack(torch._foreach_norm(local)))).sum()) if local else 0.0
    if global_sum(bad, params[0].device if params else "cpu"):
        raise NonFiniteError(f"weights are not finite after the optimizer step ({where}) although the loss and the "
                             "gradient were: the optimizer's settings drove them there (optim.lr, "
                             "optim.weight_decay); no checkpoint is written")


def check_state_finite(tensors: dict[str, Tensor], what: str) -> None:
    """Every tensor of a state about to be saved (weights, Adam's moments) is finite; else NonFiniteError naming
    the first bad one. The last line of defence: no checkpoint with NaN/inf is ever written. One fused norm per
    tensor reads the state once (a finite norm means finite elements); only a tensor whose norm is not finite (NaN,
    inf, or finite values whose squares overflow) is checked element by element."""
    floating = {name: t for name, t in tensors.items() if t.is_floating_point() and t.numel()}
    norms = torch._foreach_norm(list(floating.values())) if floating else []
    for (name, tensor), norm in zip(floating.items(), norms):
        if not torch.isfinite(norm) and not torch.isfinite(tensor).all():
            raise NonFiniteError(f"{what} {name!r} holds NaN or inf: no checkpoint is written")


def accumulate_gradients(model: torch.nn.Module, batch: dict[str, Tensor], loss_fn: LossFn, norm: Normalizers,
                         shared: dict[str, Tensor], pieces: list[Tensor | None], padding_row: Tensor,
                         where: str) -> dict[str, float]:
    """Forward and backward of each micro-batch of rows in `pieces` (None: a padding pass, `padding_row` at weight
    0), each with the mini-batch's `shared` statistics, gradients accumulating; the cross-rank reduction runs in
    the last one. -> the loss's metrics summed over the micro-batches and ranks."""
    device = padding_row.device
    totals: dict[str, float] = {}
    for micro_index, rows in enumerate(pieces):
        # a padding pass (this rank has fewer rows than another) runs a real row with weight 0
        weight = 0.0 if rows is None else float(world_size())
        rows = padding_row if rows is None else rows
        with gradient_sync(model, enabled=micro_index == len(pieces) - 1):
            loss, metrics = loss_fn(model, {**select_rows(batch, rows), **shared}, norm)
            check_finite(loss.detach(), f"loss ({where}, micro-batch {micro_index})")
            # DDP and FSDP average gradients over ranks; the normalisers already divide by global counts.
            (loss * weight).backward()
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + global_sum(float(value) * (weight > 0), device)
    return totals


def run_update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, Tensor], loss_fn: LossFn,
               *, epochs: int, mini_batches: int, micro_batch_size: int, max_grad_norm: float,
               seed: int, on_step: Callable[[dict[str, float]], None] | None = None,
               mini_batch_stats: MiniBatchStatsFn | None = None, sort_by_length: bool = True) -> list[dict[str, float]]:
    """Optimise `loss_fn` over `batch`; returns one metrics dict per optimizer step.
    batch: tensors with leading dimension B, including prompt_mask [B, P] and response_mask [B, T] (and, when
    the loss trains a subset of the response tokens, loss_mask [B, T]: the normaliser counts those). Under
    torch.distributed every rank passes the whole batch and the same seed, and trains on its share of each
    mini-batch (rlhf_core.distributed): the mini-batches are those of one process.
    loss_fn returns (loss, metrics) already divided by the global normalisers, so micro-batch values add up.
    mini_batch_stats(model, mini_batch) -> {name: tensor}, if given, runs once per mini-batch before its
    micro-batches and its values are added to every micro-batch: statistics the loss needs over the whole
    mini-batch (KTO's reference point), so they do not change with the micro-batch split. Its mini-batch has a
    `row_weight` [b] column: 0 on padding rows (`stats_rows`), which must not count.
    sort_by_length: cut each mini-batch (a random draw of rows) into micro-batches of similar lengths, which
    computes less padding and, the normalisers being global, leaves the gradient unchanged."""
    num_rows = batch["response_mask"].shape[0]
    device = batch["response_mask"].device
    # what the optimizer steps, not model.parameters(): after a forward, FSDP's root may still expose its
    # gathered (unsharded) tensors there, which hold no gradient
    params = [p for group in optimizer.param_groups for p in group["params"]]
    generator = torch.Generator().manual_seed(seed)
    dtype = compute_dtype(model)
    history = []
    for epoch in range(epochs):
        order = torch.randperm(num_rows, generator=generator)
        for mini_index, all_rows in enumerate(order.tensor_split(mini_batches)):
            mini_rows = rank_share(all_rows.to(device))
            norm = Normalizers(
                num_seqs=global_sum(len(mini_rows), device),
                num_tokens=global_sum(batch.get("loss_mask", batch["response_mask"])[mini_rows].sum().item(), device))
            optimizer.zero_grad(set_to_none=True)
            with compute_copies(model, dtype):  # bf16-master: bf16 weights inside, fp32 weights and grads after
                shared = {} if mini_batch_stats is None else mini_batch_stats(
                    model, stats_rows(batch, all_rows.to(device), mini_rows))
                in_order = length_sorted(batch, mini_rows) if sort_by_length else mini_rows
                pieces = micro_batches(in_order, micro_batch_size,
                                       forward_passes(len(all_rows), micro_batch_size, world_size()))
                totals = accumulate_gradients(model, batch, loss_fn, norm, shared, pieces, all_rows[:1].to(device),
                                              f"epoch {epoch}, mini-batch {mini_index}")
            grad_norm = local_value(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
            check_finite(grad_norm.detach(), f"gradient norm (epoch {epoch}, mini-batch {mini_index})")
            optimizer.step()
            kill_point(f"optimizer-step:rank{rank()}")
            check_weights_finite(params, f"epoch {epoch}, mini-batch {mini_index}")
            history.append({**totals, "policy/grad_norm": float(grad_norm)})
            if on_step is not None:  # progress reporting lives with the caller
                on_step(history[-1])
    return history
