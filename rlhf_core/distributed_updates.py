"""The algorithms whose update runs under torchrun (`rlhf_core.distributed_worker`), by name.

Each entry says what differs between them on a rank: how to load the module whose forward is the update's whole
forward pass (DDP and FSDP synchronise around a module's forward), the optimizer the one-process task builds (same
parameter order, so saved optimizer state moves between the two), the update itself (the very function the
one-process task calls) and the checkpoint's weight files. Loading the optimizer state, wrapping and the checkpoint
write are shared (the worker).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from rlhf_core import reward_model as rm
from rlhf_core.checkpoint import trainable_parameters
from rlhf_core.config import RuntimeConfig
from rlhf_core.distributed import unwrap
from rlhf_core.dpo import update_from_pairs as dpo_update_from_pairs
from rlhf_core.grpo import update_from_rollouts as grpo_update_from_rollouts
from rlhf_core.kto import update_from_examples as kto_update_from_examples
from rlhf_core.logprobs import ResponseScorer
from rlhf_core.models import enable_gradient_checkpointing, load_causal_lm, use_mixed_precision
from rlhf_core.ppo import update_from_rollouts as ppo_update_from_rollouts
from rlhf_core.value_head import ActorCritic, write_value_head


@dataclass(frozen=True)
class DistributedAlgorithm:
    # (checkpoint, runtime, device, trust_remote_code, update args) -> (module to wrap, tokenizer)
    load: Callable[[Path, RuntimeConfig, str, bool, dict], tuple[torch.nn.Module, object]]
    # (wrapped module, update args) -> the optimizer
    optimizer: Callable[[torch.nn.Module, dict], torch.optim.Optimizer]
    # (model, optimizer, table, tokenizer, *, device, **update args) -> one metrics dict per optimizer step
    update: Callable[..., list[dict[str, float]]]
    # (full weights of the loaded module, the loaded module, folder) -> the checkpoint's weight files
    save: Callable[[dict, torch.nn.Module, Path], None]


def load_lm(path: Path, runtime: RuntimeConfig, device: str, trust_remote_code: bool):
    """A causal LM as the one-process tasks load it: mixed precision as configured, eval mode (dropout off)."""
    lm, tokenizer = load_causal_lm(Path(path), device, runtime.dtype, trust_remote_code)
    use_mixed_precision(lm, device, runtime.mixed_precision)
    return lm.eval(), tokenizer


def trainable(model: torch.nn.Module, runtime: RuntimeConfig) -> torch.nn.Module:
    if runtime.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def load_response_scorer(path, runtime, device, trust_remote_code, args):
    lm, tokenizer = load_lm(path, runtime, device, trust_remote_code)
    return ResponseScorer(trainable(lm, runtime)), tokenizer


def load_actor_critic(path, runtime, device, trust_remote_code, args):
    lm, tokenizer = load_lm(path, runtime, device, trust_remote_code)
    model = ActorCritic(trainable(lm, runtime))
    model.load_value_head(path)
    return model, tokenizer


def load_reward_model(path, runtime, device, trust_remote_code, args):
    torch.manual_seed(args["init_seed"])  # a backbone's new score head: the one the one-process task draws
    model, tokenizer = rm.load_reward_model(Path(path), device, runtime.dtype, trust_remote_code)
    return trainable(model, runtime), tokenizer


def strip_prefix(weights: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}


def save_response_scorer(weights: dict, module: ResponseScorer, folder: Path) -> None:
    module.lm.save_pretrained(folder, state_dict=strip_prefix(weights, "lm."))


def save_actor_critic(weights: dict, module: ActorCritic, folder: Path) -> None:
    module.policy.save_pretrained(folder, state_dict=strip_prefix(weights, "policy."))
    write_value_head(strip_prefix(weights, "value_head."), folder)


def adamw(params, optim) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)


def adamw_flat(model: torch.nn.Module, args: dict) -> torch.optim.Optimizer:
    """The offline flows' optimizer: flat `lr`, no weight decay."""
    return torch.optim.AdamW(trainable_parameters(model), lr=args["lr"], weight_decay=0.0)


def update_dpo_epoch(model, optimizer, pairs, tokenizer, *, device: str, lr: float, **update_args):
    return dpo_update_from_pairs(model, optimizer, pairs, tokenizer.pad_token_id, device=device, **update_args)


def update_kto_epoch(model, optimizer, examples, tokenizer, *, device: str, lr: float, **update_args):
    return kto_update_from_examples(model, optimizer, examples, tokenizer.pad_token_id, device=device,
                                    **update_args)


def update_reward_model_epoch(model, optimizer, pairs, tokenizer, *, device: str, lr: float, init_seed: int,
                              **update_args):
    margin = torch.tensor(pairs["margin"].to_numpy(), dtype=torch.float32) if "margin" in pairs else None
    return rm.train_reward_model_epoch(model, optimizer, tokenizer, pairs["prompt"].tolist(),
                                       pairs["chosen"].tolist(), pairs["rejected"].tolist(), margin, **update_args)


UPDATES = {
    "grpo": DistributedAlgorithm(
        load=load_response_scorer,
        optimizer=lambda model, args: adamw(trainable_parameters(model), args["optim"]),
        update=lambda model, optimizer, rollouts, tokenizer, **args: grpo_update_from_rollouts(
            model, optimizer, rollouts, tokenizer.pad_token_id, **args),
        save=save_response_scorer),
    "ppo": DistributedAlgorithm(  # the shared-backbone actor-critic; the value head has its own learning rate
        load=load_actor_critic,
        optimizer=lambda model, args: adamw(
            unwrap(model).parameter_groups(args["optim"].lr, args["value"].head_lr), args["optim"]),
        update=lambda model, optimizer, rollouts, tokenizer, **args: ppo_update_from_rollouts(
            model, optimizer, rollouts, tokenizer.pad_token_id, **args),
        save=save_actor_critic),
    "dpo": DistributedAlgorithm(  # one epoch over the pairs; mini-batches of any size (padding passes)
        load=load_response_scorer, optimizer=adamw_flat, update=update_dpo_epoch, save=save_response_scorer),
    "kto": DistributedAlgorithm(  # the reference point's no-grad passes are padded like the loss's (row_weight)
        load=load_response_scorer, optimizer=adamw_flat, update=update_kto_epoch, save=save_response_scorer),
    "reward_model": DistributedAlgorithm(  # the sequence classifier itself: its forward is the whole pass
        load=load_reward_model, optimizer=adamw_flat, update=update_reward_model_epoch,
        save=lambda weights, module, folder: module.save_pretrained(folder, state_dict=weights)),
}
