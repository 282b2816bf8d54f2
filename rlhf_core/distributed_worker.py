"""`python -m rlhf_core.distributed_worker SPEC.json`: one rank of a distributed update, started by torchrun.

The update task writes SPEC.json (the policy checkpoint, the scored Parquet batch, the flow's configs) and runs
`torchrun --nproc_per_node N -m rlhf_core.distributed_worker SPEC.json`. Every rank loads the checkpoint, wraps it
for DDP or FSDP, restores the optimizer state and runs the algorithm's update on its share of each mini-batch;
rank 0 writes the new checkpoint (same layout as one process writes) and `result.json`. A rank that fails writes
`error-<rank>.json` so the task can re-raise the original error type (a NaN loss stays a NonFiniteError).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from rlhf_core import config as configs
from rlhf_core.checkpoint import OPTIMIZER_FILE, restore_optimizer, trainable_parameters
from rlhf_core.distributed import (full_state, init_process_group, is_sharded, load_full_optimizer_state, rank,
                                   unwrap, wrap_for_training)
from rlhf_core.dpo import update_from_pairs as dpo_update_from_pairs
from rlhf_core.grpo import update_from_rollouts as grpo_update_from_rollouts
from rlhf_core.io import write_atomically, write_dir
from rlhf_core.logprobs import ResponseScorer
from rlhf_core.models import enable_gradient_checkpointing, load_causal_lm, use_mixed_precision
from rlhf_core.ppo import update_from_rollouts as ppo_update_from_rollouts
from rlhf_core.value_head import ActorCritic, write_value_head


@dataclass(frozen=True)
class DistributedAlgorithm:
    """What differs between algorithms on a rank; loading, wrapping, the optimizer state and the checkpoint
    write are shared."""

    # (causal LM, checkpoint folder) -> the module whose forward is the update's whole forward pass
    build: Callable[[torch.nn.Module, Path], torch.nn.Module]
    # (wrapped module, update args) -> the optimizer the one-process task builds (same parameter order)
    optimizer: Callable[[torch.nn.Module, dict], torch.optim.Optimizer]
    # (model, optimizer, table, pad_id, *, device, **update args) -> one metrics dict per optimizer step
    update: Callable[..., list[dict[str, float]]]
    # (full weights of the built module, causal LM, folder) -> the checkpoint's weight files
    save: Callable[[dict, torch.nn.Module, Path], None]


def strip_prefix(weights: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}


def adamw(params, optim) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)


def update_dpo_epoch(model, optimizer, pairs, pad_id: int, *, device: str, lr: float, **update_args):
    """DPO's epoch; `lr` is the optimizer's (DPO's configs are flat values, not an OptimConfig)."""
    return dpo_update_from_pairs(model, optimizer, pairs, pad_id, device=device, **update_args)


def load_actor_critic(lm: torch.nn.Module, checkpoint: Path) -> ActorCritic:
    model = ActorCritic(lm)
    model.load_value_head(checkpoint)
    return model


def save_causal_lm(weights: dict, lm: torch.nn.Module, folder: Path) -> None:
    lm.save_pretrained(folder, state_dict=strip_prefix(weights, "lm."))  # a ResponseScorer's weights


def save_actor_critic(weights: dict, lm: torch.nn.Module, folder: Path) -> None:
    lm.save_pretrained(folder, state_dict=strip_prefix(weights, "policy."))
    write_value_head(strip_prefix(weights, "value_head."), folder)


UPDATES = {
    "grpo": DistributedAlgorithm(
        build=lambda lm, checkpoint: ResponseScorer(lm),
        optimizer=lambda model, args: adamw(trainable_parameters(model), args["optim"]),
        update=grpo_update_from_rollouts,
        save=save_causal_lm),
    "ppo": DistributedAlgorithm(  # the shared-backbone actor-critic; the value head has its own learning rate
        build=load_actor_critic,
        optimizer=lambda model, args: adamw(
            unwrap(model).parameter_groups(args["optim"].lr, args["value"].head_lr), args["optim"]),
        update=ppo_update_from_rollouts,
        save=save_actor_critic),
    "dpo": DistributedAlgorithm(  # one epoch over the pairs; mini-batches of any size (padding passes)
        build=lambda lm, checkpoint: ResponseScorer(lm),
        optimizer=lambda model, args: torch.optim.AdamW(trainable_parameters(model), lr=args["lr"],
                                                        weight_decay=0.0),
        update=update_dpo_epoch,
        save=save_causal_lm),
}
RESULT_FILE = "result.json"


def encode_args(args: dict) -> dict:
    """Update arguments -> JSON: config models are stored with their class name (rlhf_core.config)."""
    return {k: {"config": type(v).__name__, "value": v.model_dump()} if hasattr(v, "model_dump") else {"value": v}
            for k, v in args.items()}


def decode_args(encoded: dict) -> dict:
    return {k: getattr(configs, v["config"])(**v["value"]) if "config" in v else v["value"]
            for k, v in encoded.items()}


def restore_optimizer_state(model, optimizer, checkpoint: Path) -> None:
    """Adam's moments from the checkpoint, whichever number of processes wrote it."""
    if not is_sharded(model):
        restore_optimizer(optimizer, checkpoint)
    elif (checkpoint / OPTIMIZER_FILE).is_file():
        load_full_optimizer_state(model, optimizer, load_file(str(checkpoint / OPTIMIZER_FILE)))


def run(spec: dict) -> None:
    runtime = configs.RuntimeConfig(**spec["runtime"])
    device = init_process_group(runtime.device)
    if runtime.num_threads:
        torch.set_num_threads(runtime.num_threads)
    args = decode_args(spec["update_args"])
    lm, tokenizer = load_causal_lm(Path(spec["policy"]), device, runtime.dtype, spec["trust_remote_code"])
    use_mixed_precision(lm, device, runtime.mixed_precision)
    lm.eval()  # dropout off, as in one process
    if runtime.gradient_checkpointing:
        enable_gradient_checkpointing(lm)
    algorithm = UPDATES[spec["algorithm"]]
    model = wrap_for_training(algorithm.build(lm, Path(spec["policy"])), runtime.distributed, device)
    optimizer = algorithm.optimizer(model, args)
    restore_optimizer_state(model, optimizer, Path(spec["policy"]))
    rollouts = pd.read_parquet(spec["batch"])
    history = algorithm.update(model, optimizer, rollouts, tokenizer.pad_token_id, device=device, **args)
    start = time.perf_counter()
    weights, optimizer_state = full_state(model, optimizer)  # collective under FSDP: every rank takes part
    if rank() == 0:
        def write(tmp: Path) -> None:
            algorithm.save(weights, lm, tmp)
            tokenizer.save_pretrained(tmp)
            save_file(optimizer_state, str(tmp / OPTIMIZER_FILE))

        path, digest = write_dir(write, spec["checkpoints_dir"])
        history = [{**row, "time/checkpoint_s": time.perf_counter() - start} for row in history]
        result = {"path": str(path), "sha256": digest, "history": history}
        write_atomically(lambda tmp: tmp.write_text(json.dumps(result)), Path(spec["work_dir"]) / RESULT_FILE)


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    try:
        run(spec)
    except BaseException as error:
        report = {"type": type(error).__name__, "message": str(error), "traceback": traceback.format_exc()}
        (Path(spec["work_dir"]) / f"error-{rank()}.json").write_text(json.dumps(report))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
