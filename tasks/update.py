"""The update stage: load the policy and its optimizer state, run GRPO's steps, save a new checkpoint."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pandas as pd
import torch
from prefect import task

from rlhf_core.checkpoint import restore_optimizer, save_checkpoint, trainable_parameters
from rlhf_core.config import KLConfig, LoraConfig, LossConfig, OptimConfig, RuntimeConfig
from rlhf_core.grpo import update_from_rollouts
from tasks.cache import STAGE_TASK_OPTIONS
from tasks.distributed import distributed_update
from tasks.paths import checkpoints_dir
from tasks.progress import StageProgress
from tasks.refs import ArtifactRef, CheckpointRef, UpdateResult, publish
from tasks.runtime import MODELS, ModelCache, load_model, prepare_training


@task(name="update-policy", **STAGE_TASK_OPTIONS)
def update_policy(policy: CheckpointRef, batch: ArtifactRef, loss: LossConfig, kl: KLConfig, optim: OptimConfig,
                  runtime: RuntimeConfig, temperature: float, max_new_tokens: int, seed: int,
                  trust_remote_code: bool = False, lora: LoraConfig | None = None) -> UpdateResult:
    update_args = dict(loss=loss, kl=kl, optim=optim, temperature=temperature, max_new_tokens=max_new_tokens,
                       seed=seed)
    if runtime.num_processes > 1:
        return distributed_update("grpo", policy, batch, runtime, trust_remote_code, update_args, "update-metrics")
    model, tokenizer, optimizer = resume_training(policy, runtime, trust_remote_code, optim.lr, optim.weight_decay,
                                                  lora)
    progress = StageProgress(total=optim.epochs * optim.mini_batches, desc="update", unit="step")
    history = update_from_rollouts(model, optimizer, batch.read(), tokenizer.pad_token_id, device=runtime.device,
                                   on_step=lambda metrics: progress.update(1), **update_args)
    progress.close()
    return save_update(model, tokenizer, optimizer, history, "update-metrics", keep=(runtime, trust_remote_code, True),
                       merged=lora is not None and lora.save == "merged")


def resume_training(policy: CheckpointRef, runtime: RuntimeConfig, trust_remote_code: bool, lr: float,
                    weight_decay: float = 0.0, lora: LoraConfig | None = None):
    """(model, tokenizer, AdamW) of a policy checkpoint, the optimizer's state restored when the checkpoint has
    one, so consecutive training tasks continue one optimisation. The previous training task of this process
    left both in memory (`save_update(keep=...)`): then nothing is read from disk. With `lora`, only the adapter
    trains (a fresh one on a checkpoint without one; `prepare_training`)."""
    key = ModelCache.key(policy.sha256, runtime, trust_remote_code)
    cached = MODELS.get(key)
    if cached is None or cached[2] is None:  # no optimizer in memory: a reader (generation) cached the model
        model, tokenizer = load_model(policy, runtime, trust_remote_code, for_training=True, lora=lora)
        optimizer = None
    else:
        model, tokenizer, optimizer = MODELS.take(key)
    fresh_adapter = prepare_training(model, lora, runtime)
    if optimizer is None:
        optimizer = torch.optim.AdamW(trainable_parameters(model), lr=lr, weight_decay=weight_decay)
        if not fresh_adapter:  # a fresh adapter's parameters are not the ones the saved state belongs to
            restore_optimizer(optimizer, policy.path)
    else:
        for group in optimizer.param_groups:
            group.update(lr=lr, weight_decay=weight_decay)
    return model, tokenizer, optimizer


def save_update(model, tokenizer, optimizer, history: list[dict], metrics_stage: str,
                write_extra=None, keep: tuple[RuntimeConfig, bool, bool] | None = None,
                merged: bool = False) -> UpdateResult:
    """A finished update's outputs, shared by every training task: the new checkpoint (with optimizer state and
    `write_extra`'s files) and the per-step metrics as Parquet. keep=(runtime, trust_remote_code, with_optimizer)
    leaves the model (and the optimizer) in memory under the new checkpoint's hash for the next stages. A LoRA
    model is saved adapter-only, or with `merged` as merged full weights plus its adapter."""
    start = time.perf_counter()
    path, digest = save_checkpoint(model, tokenizer, optimizer, checkpoints_dir(), write_extra=write_extra,
                                   merged=merged)
    history = [{**row, "time/checkpoint_s": time.perf_counter() - start} for row in history]  # what resume costs
    if keep is not None:
        runtime, trust_remote_code, with_optimizer = keep
        MODELS.put(ModelCache.key(digest, runtime, trust_remote_code), model, tokenizer,
                   optimizer if with_optimizer else None)
    return UpdateResult(checkpoint=CheckpointRef(path=str(path), sha256=digest),
                        metrics=publish(pd.DataFrame(history), metrics_stage))


def prune_checkpoints(produced: list[CheckpointRef], keep: int) -> None:
    """Delete all but the newest `keep` of the checkpoints a run produced (the MLflow registry holds every one's
    weights). Only folders inside the checkpoints folder are touched, never a user's model. Safe for resume:
    cache hits use the hashes carried by references and never reopen old folders."""
    root = checkpoints_dir().resolve()
    for ref in produced[:-keep]:
        path = Path(ref.path).resolve()
        if path.parent == root and path.is_dir():
            shutil.rmtree(path)
