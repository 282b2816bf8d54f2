"""Reward-model stages: validate the preference pairs, train one epoch, score the held-out pairs.

One task per epoch, keyed on the previous checkpoint's content hash: a run that crashed in epoch k resumes there.
"""

from __future__ import annotations

from prefect import task

from rlhf_core import reward_model as rm
from rlhf_core.config import RuntimeConfig
from rlhf_core.config.training import RewardModelUpdateArgs, TrainingSetup
from rlhf_core.io import sha256_dir
from tasks.cache import STAGE_TASK_OPTIONS
from tasks.models import download_registered_model
from tasks.paths import models_dir
from tasks.refs import ArtifactRef, CheckpointRef, UpdateResult, publish
from tasks.runtime import apply_runtime
from tasks.train import train_stage


@task(name="resolve-reward-backbone")
def resolve_reward_backbone(name_or_path: str) -> CheckpointRef:
    """The built-in MiniLM, the built-in policy, a local folder or an MLflow model URI -> folder + content hash."""
    if name_or_path.startswith("models:/"):
        path = download_registered_model(name_or_path)
    else:
        path = rm.resolve_reward_backbone(name_or_path, models_dir())
    return CheckpointRef(path=str(path), sha256=sha256_dir(path))


def load_reward_checkpoint(checkpoint: CheckpointRef, runtime: RuntimeConfig, trust_remote_code: bool):
    apply_runtime(runtime)
    return rm.load_reward_model(checkpoint.path, runtime.device, runtime.dtype, trust_remote_code)


@task(name="train-reward-model-epoch", **STAGE_TASK_OPTIONS)
def train_reward_model_epoch(checkpoint: CheckpointRef, pairs: ArtifactRef, args: RewardModelUpdateArgs,
                             setup: TrainingSetup) -> UpdateResult:
    """One shuffled pass over the pairs from `checkpoint` (a backbone or the previous epoch's checkpoint, whose
    Adam state is restored); returns the new checkpoint and one metrics row per step. With LoRA, the adapter and
    the score head train."""
    return train_stage(checkpoint, pairs, args, setup, "reward-model-metrics",
                       f"reward model epoch {args.epoch}")


@task(name="evaluate-reward-model", **STAGE_TASK_OPTIONS)
def evaluate_reward_model(checkpoint: CheckpointRef, held_out: ArtifactRef, batch_size: int, max_length: int,
                          runtime: RuntimeConfig, trust_remote_code: bool = False) -> ArtifactRef:
    """The pairs with `chosen_rewards` and `rejected_rewards`; accuracy = mean(chosen_rewards > rejected_rewards)."""
    df = held_out.read()
    model, tokenizer = load_reward_checkpoint(checkpoint, runtime, trust_remote_code)
    prompts = df["prompt"].tolist()
    rewards = rm.reward_scores(model, tokenizer, prompts + prompts, df["chosen"].tolist() + df["rejected"].tolist(),
                               batch_size=2 * batch_size, max_length=max_length)
    chosen_rewards, rejected_rewards = rewards.numpy().reshape(2, len(df))  # rows [chosen; rejected]
    return publish(df.assign(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards), "reward-model-eval")
