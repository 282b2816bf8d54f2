"""The train stage: every algorithm's update (GRPO's and PPO's per iteration, DPO's, KTO's and the reward model's
per epoch) runs through `train_stage`, in this process or under torchrun (runtime.num_processes > 1). The
algorithm-named Prefect tasks (`update_policy`, `train_dpo_epoch`, ...) are thin wrappers over it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from rlhf_core.checkpoint import OPTIMIZER_FILE
from rlhf_core.config.training import TrainingSetup, UpdateArgs
from rlhf_core.training import TRAINING, train
from tasks.distributed import distributed_train
from tasks.paths import checkpoints_dir
from tasks.progress import StageProgress
from tasks.refs import ArtifactRef, CheckpointRef, UpdateResult, publish
from tasks.runtime import MODELS, ModelCache, apply_runtime, load_model


def train_stage(start: CheckpointRef, table: ArtifactRef, args: UpdateArgs, setup: TrainingSetup,
                metrics_stage: str, description: str) -> UpdateResult:
    """Train `args.algorithm` from `start` on `table`: the new checkpoint (weights, tokenizer, optimizer state)
    and the per-step metrics as Parquet (`metrics_stage`). In one process, the previous training stage's model
    and optimizer are continued from memory when it left them there, and this one leaves its own for the next
    stages (generation reads the policy, the next update continues it)."""
    if setup.runtime.num_processes > 1:
        checkpoint, history = distributed_train(start, table, args, setup)
        return UpdateResult(checkpoint=checkpoint, metrics=publish(pd.DataFrame(history), metrics_stage))
    apply_runtime(setup.runtime)
    spec = TRAINING[args.algorithm]
    key = ModelCache.key(start.sha256, setup.runtime, setup.trust_remote_code)
    cached = MODELS.get(key)
    in_memory = MODELS.take(key)[2] if cached is not None and cached[2] is not None else None
    df = table.read()
    progress = StageProgress(total=args.optimizer_steps(len(df)), desc=description, unit="step")
    trained = train(Path(start.path), df, args, setup, setup.runtime.device, checkpoints_dir(),
                    load=lambda: load_model(start, setup.runtime, setup.trust_remote_code, for_training=True,
                                            lora=setup.lora),
                    in_memory=in_memory, on_step=lambda metrics: progress.update(1))
    progress.close()
    if spec.module.lm is not None:  # the policy stays in memory for the next stages of this process
        state = trained.state
        MODELS.put(ModelCache.key(trained.sha256, setup.runtime, setup.trust_remote_code),
                   spec.module.lm(state.module), state.tokenizer, state if spec.keep_in_memory else None)
    return UpdateResult(checkpoint=CheckpointRef(path=str(trained.path), sha256=trained.sha256),
                        metrics=publish(pd.DataFrame(trained.history), metrics_stage))


def prune_checkpoints(produced: list[CheckpointRef], keep: int) -> None:
    """Delete all but the newest `keep` of the checkpoints a run produced (the MLflow registry holds the weights of
    those it registered), and the optimizer state of all but the newest: only the newest is ever trained from
    again (the next update, or a resumed run's first uncached one). Only folders inside the checkpoints folder are
    touched, never a user's model. Safe for resume: cache hits use the hashes carried by references and never
    reopen old folders."""
    root = checkpoints_dir().resolve()
    for index, checkpoint in enumerate(produced[:-1]):
        path = Path(checkpoint.path).resolve()
        if path.parent != root or not path.is_dir():
            continue
        if index < len(produced) - keep:
            shutil.rmtree(path)
        else:
            (path / OPTIMIZER_FILE).unlink(missing_ok=True)
