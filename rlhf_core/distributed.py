"""torch.distributed for the update: each rank runs the same `run_update` on its share of every mini-batch.

Every rank holds the whole rollout batch (token ids: small next to the model) and draws the same mini-batches
from the same seed; rank r trains on rows r, r+W, r+2W... of each. Losses are divided by the mini-batch's global
counts, so the summed gradient over ranks is the one-process gradient of the same mini-batch: the result does not
depend on the number of processes beyond float summation order.

Two engines, both torch's own: DDP (every rank a full replica, gradients all-reduced) and FSDP (`fully_shard`:
weights, gradients and optimizer state sharded, each decoder layer gathered only while it runs). Both act on a
module's forward, so what they wrap is a module whose forward is the whole log-prob pass: a causal LM inside
`rlhf_core.logprobs.ResponseScorer`, or PPO's ActorCritic.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from rlhf_core.batch import ceil_div

STRATEGIES = ("ddp", "fsdp")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def global_sum(value: float, device) -> float:
    if world_size() == 1:
        return float(value)
    tensor = torch.tensor(float(value), device=device, dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor)


def init_process_group(device: str) -> str:
    """Join the group torchrun set up (RANK, WORLD_SIZE, MASTER_ADDR in the environment): NCCL on CUDA, gloo on
    CPU; a Ray Train worker finds its group already initialised by Ray. Returns this rank's device:
    cuda:<LOCAL_RANK> when `device` is CUDA, else `device`."""
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device


def rank_share(rows: Tensor) -> Tensor:
    """This rank's rows of a mini-batch: positions r, r+W, r+2W... [N] -> [N / W]"""
    return rows[rank()::world_size()]


def map_rows_across_ranks(fn: Callable[[dict[str, Tensor]], Tensor], batch: dict[str, Tensor]) -> Tensor:
    """fn over the whole batch, each rank computing its share of rows, the results gathered on every rank.
    fn: batch of b rows -> [b, ...] (the same trailing shape for any rows: no trimming); returns [B, ...] in batch
    order. Every rank must run the same number of forward passes (FSDP gathers weights inside each), so when B is
    not a multiple of the world size the last row is repeated to make it one and the copies are dropped."""
    num_rows = batch["response_mask"].shape[0]
    if world_size() == 1:
        return fn(batch)
    padded = ceil_div(num_rows, world_size()) * world_size()
    index = torch.arange(padded, device=batch["response_mask"].device).clamp(max=num_rows - 1)
    local = fn({k: v[rank_share(index)] for k, v in batch.items()}).contiguous()  # [padded / W, ...]
    pieces = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(pieces, local)
    gathered = torch.stack(pieces, dim=1).reshape(padded, *local.shape[1:])  # row j*W + r came from rank r
    return gathered[:num_rows]


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks FSDP shards one by one: in every Hugging Face model inside `model`, the classes it
    lists as never to be split (`_no_split_modules`)."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def wrap_for_training(module: torch.nn.Module, strategy: str, device: str) -> torch.nn.Module:
    """The module the update trains (a ResponseScorer around a causal LM, or PPO's ActorCritic: a module whose
    forward is the whole log-prob pass) under DDP or FSDP. Call after `init_process_group`; build the optimizer
    over the returned module's parameters (FSDP replaces them with shards)."""
    if strategy == "ddp":
        device_ids = [torch.device(device).index] if device.startswith("cuda") else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(torch.device(device).type, (world_size(),))
        for layer in decoder_layers(module):
            fully_shard(layer, mesh=mesh)
        return fully_shard(module, mesh=mesh)  # the root: embeddings, final norm, (tied) LM head, value head
    raise ValueError(f"unknown distributed strategy {strategy!r}; expected one of {STRATEGIES}")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (DDP keeps it in .module); FSDP modules are their own."""
    return getattr(model, "module", model)


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool):
    """Skip the cross-rank gradient reduction while micro-batches accumulate; the last one of a mini-batch
    reduces them all at once. A no-op outside DDP/FSDP."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    yield


def local_value(tensor: Tensor) -> Tensor:
    """A DTensor (FSDP's grad norm) as a plain tensor holding the global value."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def is_sharded(model: torch.nn.Module) -> bool:
    return hasattr(model, "set_requires_gradient_sync")


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(weights, optimizer state) of the whole model, as one process would hold them: the wrapped module's weight
    names (a tied alias once), optimizer state keyed by parameter index (rlhf_core.checkpoint's format). A
    collective call under FSDP (every rank must make it, only rank 0 gets the tensors); the tensors are on the
    CPU."""
    from rlhf_core.checkpoint import optimizer_tensors

    if not is_sharded(model):
        weights = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()
                   if k not in tied_aliases(unwrap(model))}
        return weights, optimizer_tensors(optimizer)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    for alias in tied_aliases(model):  # a tied LM head comes back as a copy: save it once, as HF does
        weights.pop(alias, None)
    # with cpu_offload only rank 0 receives the tensors; the other ranks get empty dicts
    by_name = get_optimizer_state_dict(model, optimizer, options=options).get("state", {})
    flat = {}
    for index, name in enumerate(trainable_names(model)):
        for key, value in by_name.get(name, {}).items():
            flat[f"{index}.{key}"] = (value if torch.is_tensor(value) else torch.tensor(value)).contiguous()
    return weights, flat


def tied_aliases(model: torch.nn.Module) -> set[str]:
    """Names under which an already-named parameter appears again (a tied LM head)."""
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return every - {name for name, _ in model.named_parameters()}


def trainable_names(model: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters in optimizer order (the order of `model.parameters()`)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                              flat: dict[str, Tensor]) -> None:
    """Load an index-keyed optimizer state (written by one process or by `full_state`) into a sharded model's
    optimizer: each rank keeps the slices of its shards."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    names = trainable_names(model)
    state: dict[str, dict[str, Tensor]] = {}
    for key, tensor in flat.items():
        index, field = key.split(".", 1)
        state.setdefault(names[int(index)], {})[field] = tensor
    options = StateDictOptions(full_state_dict=True)
    template = get_optimizer_state_dict(model, optimizer, options=options)
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": template["param_groups"]},
                             options=options)
