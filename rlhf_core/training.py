"""How every algorithm trains: one lifecycle (`train`) and, by name, what differs between algorithms (`TRAINING`).

The train stage runs it in its own process (`tasks/train.py`); under torchrun every rank runs the very same call
(`rlhf_core/distributed_worker.py`). The lifecycle: load the trainable module (a module whose forward is the
update's whole forward pass, which DDP and FSDP synchronise around), make it trainable (a LoRA adapter, gradient
checkpointing), wrap it for DDP or FSDP under torch.distributed, build AdamW over its parameter groups and restore
the optimizer state saved beside the checkpoint, run the algorithm's update, write the new checkpoint (weights,
tokenizer, optimizer state). An algorithm contributes its kind of module (`TrainableModule`), its parameter groups
and its update call (`TrainingSpec`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from rlhf_core import dpo, grpo, kto, ppo, sft
from rlhf_core import reward_model as rm
from rlhf_core.checkpoint import OPTIMIZER_FILE, restore_optimizer, trainable_parameters
from rlhf_core.config import RuntimeConfig
from rlhf_core.config.training import (DPOUpdateArgs, GRPOUpdateArgs, KTOUpdateArgs, PPOUpdateArgs,
                                       RewardModelUpdateArgs, SFTUpdateArgs, TrainingSetup, UpdateArgs)
from rlhf_core.distributed import (full_state, is_distributed, is_sharded, load_full_optimizer_state, rank, unwrap,
                                   wrap_for_training)
from rlhf_core.io import write_dir
from rlhf_core.logprobs import ResponseScorer
from rlhf_core.lora import add_lora, has_adapter, mark_adapter_trainable, save_model
from rlhf_core.models import ModelLoadError, enable_gradient_checkpointing, load_lm
from rlhf_core.value_head import load_actor_critic, save_actor_critic, with_prefix_removed
from rlhf_core.update import check_state_finite

History = list[dict[str, float]]
OnStep = Callable[[dict[str, float]], None] | None
LoadLM = Callable[[], tuple[torch.nn.Module, Any]]  # -> (the policy's causal LM, its tokenizer)


@dataclass(frozen=True)
class TrainableModule:
    """A kind of trainable module. load(checkpoint, args, setup, device, load_lm) -> (module, tokenizer);
    inner(module): the Hugging Face model LoRA and gradient checkpointing apply to; heads(module): modules that
    train in full beside a fresh adapter; save(module, full weights by `module.state_dict()` name, folder,
    merged): the checkpoint's weight files; lm(module): the causal LM later stages of the process read (None:
    none does)."""

    load: Callable[[Path, UpdateArgs, TrainingSetup, str, LoadLM], tuple[torch.nn.Module, Any]]
    inner: Callable[[torch.nn.Module], torch.nn.Module]
    save: Callable[[torch.nn.Module, dict, Path, bool], None]
    lm: Callable[[torch.nn.Module], torch.nn.Module] | None
    heads: Callable[[torch.nn.Module], list[str] | None] = lambda module: None


def load_response_scorer(checkpoint: Path, args, setup: TrainingSetup, device: str, load: LoadLM):
    lm, tokenizer = load()
    return ResponseScorer(lm), tokenizer


def load_policy_and_critic(checkpoint: Path, args: PPOUpdateArgs, setup: TrainingSetup, device: str, load: LoadLM):
    lm, tokenizer = load()
    return load_actor_critic(lm, checkpoint, args.value.critic, device, setup.runtime.dtype,
                             setup.trust_remote_code), tokenizer


RESPONSE_SCORER = TrainableModule(  # a causal LM whose forward is the response log-prob pass
    load=load_response_scorer,
    inner=lambda module: module.lm,
    save=lambda module, weights, folder, merged: save_model(module.lm, folder, merged,
                                                            with_prefix_removed(weights, "lm.")),
    lm=lambda module: module.lm)

ACTOR_CRITIC = TrainableModule(  # PPO's policy + value head (+ a separate critic backbone)
    load=load_policy_and_critic,
    inner=lambda module: module.policy,
    save=save_actor_critic,
    lm=lambda module: module.policy)


def load_reward_model(checkpoint: Path, args: RewardModelUpdateArgs, setup: TrainingSetup, device: str, load):
    return rm.load_reward_model(checkpoint, device, setup.runtime.dtype, setup.trust_remote_code,
                                with_adapter=setup.lora is not None, head_seed=args.seed)


REWARD_MODEL = TrainableModule(  # the sequence classifier itself: its forward is the whole pass
    load=load_reward_model,
    inner=lambda module: module,
    save=lambda module, weights, folder, merged: save_model(module, folder, merged, weights),
    lm=None,
    heads=rm.score_head_names)


def flat_groups(model: torch.nn.Module, args: UpdateArgs) -> list[dict]:
    return [{"params": trainable_parameters(model)}]


def actor_critic_groups(model: torch.nn.Module, args: PPOUpdateArgs) -> list[dict]:
    return unwrap(model).parameter_groups(args.lr, args.value.head_lr)  # the value head has its own lr


# (model, optimizer, table, tokenizer, args, device, on_step) -> one metrics dict per optimizer step
UpdateFn = Callable[[torch.nn.Module, torch.optim.Optimizer, pd.DataFrame, Any, Any, str, OnStep], History]


def update_grpo(model, optimizer, rollouts, tokenizer, args: GRPOUpdateArgs, device: str, on_step) -> History:
    return grpo.update_from_rollouts(model, optimizer, rollouts, tokenizer.pad_token_id, loss=args.loss, kl=args.kl,
                                     optim=args.optim, device=device, temperature=args.temperature,
                                     max_new_tokens=args.max_new_tokens, seed=args.seed, on_step=on_step)


def update_ppo(model, optimizer, rollouts, tokenizer, args: PPOUpdateArgs, device: str, on_step) -> History:
    return ppo.update_from_rollouts(model, optimizer, rollouts, tokenizer.pad_token_id, loss=args.loss,
                                    value=args.value, optim=args.optim, device=device, temperature=args.temperature,
                                    max_new_tokens=args.max_new_tokens, seed=args.seed, on_step=on_step)


def update_dpo(model, optimizer, pairs, tokenizer, args: DPOUpdateArgs, device: str, on_step) -> History:
    return dpo.update_from_pairs(model, optimizer, pairs, tokenizer.pad_token_id, device=device, **args.loop,
                                 loss_type=args.loss_type, beta=args.beta, label_smoothing=args.label_smoothing,
                                 simpo_gamma=args.simpo_gamma, rpo_alpha=args.rpo_alpha, on_step=on_step)


def update_kto(model, optimizer, examples, tokenizer, args: KTOUpdateArgs, device: str, on_step) -> History:
    return kto.update_from_examples(model, optimizer, examples, tokenizer.pad_token_id, device=device, **args.loop,
                                    beta=args.beta, desirable_weight=args.desirable_weight,
                                    undesirable_weight=args.undesirable_weight, on_step=on_step)


def update_sft(model, optimizer, examples, tokenizer, args: SFTUpdateArgs, device: str, on_step) -> History:
    return sft.update_from_examples(model, optimizer, examples, tokenizer.pad_token_id, device=device, **args.loop,
                                    on_step=on_step)


def update_reward_model(model, optimizer, pairs, tokenizer, args: RewardModelUpdateArgs, device: str,
                        on_step) -> History:
    margin = torch.tensor(pairs["margin"].to_numpy(), dtype=torch.float32) if "margin" in pairs else None
    return rm.train_reward_model_epoch(model, optimizer, tokenizer, pairs["prompt"].tolist(),
                                       pairs["chosen"].tolist(), pairs["rejected"].tolist(), margin, **args.loop,
                                       max_length=args.max_length, center_coef=args.center_coef, on_step=on_step)


@dataclass(frozen=True)
class TrainingSpec:
    module: TrainableModule
    update: UpdateFn
    parameter_groups: Callable[[torch.nn.Module, Any], list[dict]] = flat_groups
    # the next training stage of this process may continue from memory (model and optimizer); PPO's optimizer
    # also holds the value head, which is re-read from its checkpoint
    keep_in_memory: bool = True


TRAINING: dict[str, TrainingSpec] = {
    "sft": TrainingSpec(RESPONSE_SCORER, update_sft),  # one epoch; the loss masks all but the assistant's tokens
    "grpo": TrainingSpec(RESPONSE_SCORER, update_grpo),
    "ppo": TrainingSpec(ACTOR_CRITIC, update_ppo, actor_critic_groups, keep_in_memory=False),
    "dpo": TrainingSpec(RESPONSE_SCORER, update_dpo),  # one epoch; mini-batches of any size (padding passes)
    "kto": TrainingSpec(RESPONSE_SCORER, update_kto),  # the reference point's passes are padded like the loss's
    "reward_model": TrainingSpec(REWARD_MODEL, update_reward_model, keep_in_memory=False),
}


@dataclass
class TrainingState:
    module: torch.nn.Module  # the trainable module as loaded
    model: torch.nn.Module  # what the update runs: `module`, or its DDP/FSDP wrapper under torch.distributed
    tokenizer: Any
    optimizer: torch.optim.Optimizer


@dataclass
class Trained:
    """A finished training call. path, sha256: the new checkpoint (None on ranks other than 0); history: one
    metrics dict per optimizer step, with `time/checkpoint_s`."""

    state: TrainingState
    history: History
    path: Path | None
    sha256: str | None


def prepare_training(model, lora, runtime: RuntimeConfig, modules_to_save: list[str] | None = None,
                     seed: int = 0) -> bool:
    """Make a loaded model trainable as configured: with `lora` (a LoraConfig), its adapter (continued, or a fresh
    one plus `modules_to_save`, drawn from `seed`) is all that trains; gradient checkpointing when the runtime
    asks. Returns True for a fresh adapter, whose optimizer must not restore the state saved beside the
    checkpoint (other parameters)."""
    fresh = False
    if lora is None and has_adapter(model):
        raise ModelLoadError("the checkpoint holds a LoRA adapter: continue it with model.lora, or fully fine-tune "
                             "a merged checkpoint (model.lora.save: merged)")
    if lora is not None and has_adapter(model):
        mark_adapter_trainable(model)
    elif lora is not None:
        with torch.random.fork_rng(devices=[]):  # the same adapter in every process, and on a resumed run
            torch.manual_seed(seed)
            add_lora(model, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                     target_modules=lora.target_modules, modules_to_save=modules_to_save)
        fresh = True
    if runtime.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return fresh


def adamw(parameter_groups: list[dict], lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """Every algorithm's optimizer (and the benchmarks'); a group's own `lr` (PPO's value head) overrides `lr`.
    Fused (one kernel over all tensors: 6x faster than foreach on a 2-core CPU, bench/results) except over FSDP's
    sharded parameters (DTensors), which keep the foreach implementation."""
    params = [p for group in parameter_groups for p in group["params"]]
    fused = bool(params) and not any(isinstance(p, DTensor) for p in params)
    return torch.optim.AdamW(parameter_groups, lr=lr, weight_decay=weight_decay, fused=fused or None)


def restore_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, checkpoint: Path) -> None:
    """Adam's moments saved beside the checkpoint, if any, whichever number of processes wrote them."""
    if not is_sharded(model):
        restore_optimizer(optimizer, checkpoint)
    elif (checkpoint / OPTIMIZER_FILE).is_file():
        load_full_optimizer_state(model, optimizer, load_file(str(checkpoint / OPTIMIZER_FILE)))


def start_training(checkpoint: Path, args: UpdateArgs, setup: TrainingSetup, device: str,
                   load: LoadLM | None = None, in_memory: TrainingState | None = None) -> TrainingState:
    """The trainable module of `checkpoint` with its optimizer, its saved state restored. load: how the policy LM
    is loaded (default: from disk, `models.load_lm`); in_memory: the state the previous training stage of this
    process left, continued without reading anything (its learning rates set from `args`)."""
    spec = TRAINING[args.algorithm]
    if in_memory is not None:
        prepare_training(spec.module.inner(in_memory.module), setup.lora, setup.runtime)
        for group, fresh in zip(in_memory.optimizer.param_groups, spec.parameter_groups(in_memory.model, args)):
            group.update(lr=fresh.get("lr", args.lr), weight_decay=args.weight_decay)
        return in_memory
    load = load or (lambda: load_lm(checkpoint, setup.runtime, device, setup.trust_remote_code,
                                    with_adapter=setup.lora is not None))
    module, tokenizer = spec.module.load(checkpoint, args, setup, device, load)
    inner = spec.module.inner(module)
    heads = spec.module.heads(inner) if setup.lora is not None else None
    fresh_adapter = prepare_training(inner, setup.lora, setup.runtime, heads, seed=args.seed)
    model = wrap_for_training(module, setup.runtime.distributed, device) if is_distributed() else module
    optimizer = adamw(spec.parameter_groups(model, args), args.lr, args.weight_decay)
    if not fresh_adapter:  # a fresh adapter's parameters are not the ones the saved state belongs to
        restore_optimizer_state(model, optimizer, checkpoint)
    return TrainingState(module=module, model=model, tokenizer=tokenizer, optimizer=optimizer)


def save_trained(state: TrainingState, setup: TrainingSetup, root: Path, algorithm: str) -> tuple[Path, str] | None:
    """Write the trained checkpoint into `root` atomically -> (folder, sha256) on rank 0, None elsewhere. A
    collective under FSDP (every rank gathers its shards): call it on every rank."""
    weights, optimizer_state = full_state(state.model, state.optimizer)
    if rank() != 0:
        return None
    check_state_finite(weights, "weight")
    check_state_finite(optimizer_state, "optimizer state")

    def write(folder: Path) -> None:
        TRAINING[algorithm].module.save(state.module, weights, folder, setup.merged)
        state.tokenizer.save_pretrained(folder)
        save_file(optimizer_state, str(folder / OPTIMIZER_FILE))

    return write_dir(write, root)


def train(checkpoint: Path, table: pd.DataFrame, args: UpdateArgs, setup: TrainingSetup, device: str, root: Path,
          load: LoadLM | None = None, in_memory: TrainingState | None = None, on_step: OnStep = None) -> Trained:
    """One training stage of `args.algorithm` from `checkpoint` on `table`; the new checkpoint goes under `root`.
    Under torch.distributed every rank calls it with the same arguments (rank 0 writes)."""
    state = start_training(Path(checkpoint), args, setup, device, load, in_memory)
    history = TRAINING[args.algorithm].update(state.model, state.optimizer, table, state.tokenizer, args, device,
                                              on_step)
    start = time.perf_counter()
    saved = save_trained(state, setup, root, args.algorithm)
    history = [{**row, "time/checkpoint_s": time.perf_counter() - start} for row in history]  # what resume costs
    path, digest = saved if saved is not None else (None, None)
    return Trained(state=state, history=history, path=path, sha256=digest)
