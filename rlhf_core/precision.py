"""bf16 compute with fp32 master weights (`runtime.mixed_precision: bf16-master`).

Autocast (`bf16`) keeps the weights in fp32 and casts each one to bf16 inside every forward pass (and again in
every recomputation), and its activations between matmuls stay fp32: on a CPU those casts and fp32 elementwise
passes cost more than the bf16 matmuls save. Here the update computes on bf16 copies of the weights, made once per
optimizer step, so the whole forward and backward run in bf16; the fp32 weights stay the masters that clipping,
AdamW, the finiteness checks and the checkpoint see. Each micro-batch's bf16 gradient is added into an fp32
gradient as soon as autograd has it, so accumulating micro-batches loses nothing to bf16 rounding.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

COMPUTE_DTYPE_ATTR = "master_weights_compute_dtype"  # set on a model by `models.use_mixed_precision`


def compute_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype the update computes in when a module of `model` asks for bf16 compute copies, else None."""
    return next((getattr(m, COMPUTE_DTYPE_ATTR) for m in model.modules() if hasattr(m, COMPUTE_DTYPE_ATTR)), None)


@contextlib.contextmanager
def compute_copies(model: torch.nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """Inside: every floating-point parameter of `model` holds a `dtype` copy of its weights (frozen ones too, so
    no matmul mixes dtypes), and each trainable one's gradient accumulates in fp32 beside it. On exit the fp32
    weights are back and each trainable parameter's `.grad` is the fp32 sum of the gradients computed inside (added
    to the one it had before, if any).
    A no-op when dtype is None. Tied parameters are one Parameter, so they stay tied."""
    if dtype is None:
        yield
        return
    params = list({id(p): p for p in model.parameters() if p.is_floating_point() and p.dtype != dtype}.values())
    masters = [p.data for p in params]
    # id(param) -> fp32 gradient: a gradient from before (none under run_update), or the first micro-batch's
    grads = {id(p): p.grad for p in params if p.grad is not None}

    def add_to_fp32(param: torch.Tensor) -> None:
        fp32 = grads.get(id(param))
        if fp32 is None:
            grads[id(param)] = param.grad.to(torch.float32)
        else:
            fp32.add_(param.grad)
        param.grad = None

    handles = [p.register_post_accumulate_grad_hook(add_to_fp32) for p in params if p.requires_grad]
    for p in params:
        p.grad = None
        p.data = p.data.to(dtype)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for p, master in zip(params, masters):
            p.data = master
            p.grad = grads.get(id(p))
