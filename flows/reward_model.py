"""The reward-model flow: validate preference pairs, then per epoch train -> evaluate -> log -> register.

A Bradley-Terry reward model (rlhf_core/reward_model.py) on a text backbone, the built-in MiniLM by default. Each
epoch is one cached task keyed on the previous checkpoint's content hash, so a run that crashed resumes at the
epoch that failed. Every epoch's checkpoint is registered (alias `newest`): a PPO run can then score with
`models:/reward-model@newest`.
"""

from __future__ import annotations

import time

import torch
from prefect import flow
from prefect.runtime import flow_run

from flows.inputs import check_runtime, held_out_tags, lineage_tags
from flows.tracking import StageClock, Tracker, log_epoch_outputs, mlflow_run
from rlhf_core.config import RewardModelConfig, TrackingConfig
from rlhf_core.config.training import RewardModelUpdateArgs, TrainingSetup
from rlhf_core.reward_model import bradley_terry_loss
from tasks.data import dataset_fingerprints, load_preference_dataset
from tasks.models import resolve_start_model
from tasks.refs import ArtifactRef, UpdateResult
from tasks.reward_model import evaluate_reward_model, resolve_reward_backbone, train_reward_model_epoch
from tasks.train import prune_checkpoints


@flow(name="reward-model", log_prints=True)
def reward_model(config: RewardModelConfig = RewardModelConfig()) -> str:
    """Train a Bradley-Terry reward model; returns the final checkpoint's folder."""
    check_runtime(config.runtime)
    data = config.data
    fingerprints = dataset_fingerprints(data)
    pairs = load_preference_dataset(data, fingerprints, config.seed)
    # checked before any work: the dataset is valid, the model loads
    model = resolve_start_model(config.model, resolve_reward_backbone, causal_lm=False)
    trust = config.model.trust_remote_code
    setup = TrainingSetup.of(config.model, config.runtime)
    checkpoints = []

    with mlflow_run(config.tracking.experiment, config, flow_run.id, flow_run.name,
                    held_out_tags(fingerprints, data),
                    lineage_tags(config.model, model, [data.path, data.eval_path], fingerprints)) as tracker:
        for epoch in range(config.optim.epochs):
            clock = StageClock()
            with clock("train"):
                update = train_reward_model_epoch(model, pairs.train, RewardModelUpdateArgs.from_config(config, epoch),
                                                  setup)
            with clock("eval"):
                scores = evaluate_reward_model(update.checkpoint, pairs.eval, config.optim.batch_size,
                                               config.max_length, config.runtime, trust)
            model = update.checkpoint
            metrics = log_reward_model_epoch(tracker, epoch, config.optim.epochs, update, scores, clock,
                                             config.tracking)
            checkpoints.append(model)
            prune_checkpoints(checkpoints, keep=config.keep_checkpoints)
            print(f"epoch {epoch}: train accuracy {metrics['reward_model/train_accuracy']:.3f}, held-out accuracy "
                  f"{metrics['reward_model/eval_accuracy']:.3f} ({scores.rows} pairs), {sum(clock.values()):.1f} s")
    return model.path


def log_reward_model_epoch(tracker: Tracker, epoch: int, epochs: int, update: UpdateResult, scores: ArtifactRef,
                           stage_seconds: dict[str, float], tracking: TrackingConfig) -> dict[str, float]:
    """The epoch's Parquet files, its checkpoint as a model version, then one batch of metrics (returned)."""
    start = time.perf_counter()
    log_epoch_outputs(tracker, epoch, epochs, update, scores, tracking)
    train = update.metrics.read().mean()
    pairs = scores.read()
    margin = torch.tensor(pairs["margin"].to_numpy(), dtype=torch.float32) if "margin" in pairs else None
    eval_loss, evaluation = bradley_terry_loss(torch.tensor(pairs["chosen_rewards"].to_numpy()),
                                               torch.tensor(pairs["rejected_rewards"].to_numpy()), margin)
    metrics = {
        "loss/train": train["loss/train"],
        "loss/eval": float(eval_loss),
        "reward_model/train_accuracy": train["reward_model/accuracy"],
        "reward_model/grad_norm": train["reward_model/grad_norm"],
        **{key.replace("reward_model/", "reward_model/eval_"): value for key, value in evaluation.items()},
        **{f"time/{stage}_s": seconds for stage, seconds in stage_seconds.items()},
        "time/tracking_s": time.perf_counter() - start,
    }
    tracker.log_metrics(metrics, step=epoch)
    return metrics
