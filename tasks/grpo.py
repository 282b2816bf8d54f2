"""GRPO's own stage: the policy update on a scored rollout batch with its group-relative advantages."""

from __future__ import annotations

from prefect import task

from rlhf_core.config.training import GRPOUpdateArgs, TrainingSetup
from tasks.cache import STAGE_TASK_OPTIONS
from tasks.refs import ArtifactRef, CheckpointRef, UpdateResult
from tasks.train import train_stage


@task(name="update-policy", **STAGE_TASK_OPTIONS)
def update_policy(policy: CheckpointRef, batch: ArtifactRef, args: GRPOUpdateArgs,
                  setup: TrainingSetup) -> UpdateResult:
    """optim.epochs x optim.mini_batches steps of GRPO's clipped loss on `batch` (the advantages stage's table)."""
    return train_stage(policy, batch, args, setup, "update-metrics", "update")
