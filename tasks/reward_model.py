"""Reward-model stages: validate the preference pairs, train one epoch, score the held-out pairs.

One task per epoch, keyed on the previous checkpoint's content hash: a run that crashed in epoch k resumes there.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from prefect import task
from pydantic import BaseModel

from rlhf_core import reward_model as rm
from rlhf_core.checkpoint import restore_optimizer, trainable_parameters
from rlhf_core.config import LoraConfig, PreferenceDataConfig, RuntimeConfig
from rlhf_core.data import load_table
from rlhf_core.io import sha256_dir
from tasks.cache import STAGE_TASK_OPTIONS
from tasks.distributed import distributed_update
from tasks.models import download_registered_model
from tasks.paths import models_dir, resolve_data_path
from tasks.progress import StageProgress
from tasks.refs import ArtifactRef, CheckpointRef, UpdateResult, publish
from tasks.runtime import apply_runtime, prepare_training
from tasks.update import save_update


class PreferenceSplits(BaseModel):
    """Canonical Parquet data for training and evaluation: pairs (pair_id, prompt, chosen, rejected[, margin]) for
    the reward model and DPO, unpaired examples (tasks/kto.py) for KTO."""

    train: ArtifactRef
    eval: ArtifactRef


def _read_pairs(data: PreferenceDataConfig, path: str) -> pd.DataFrame:
    required = {"prompt": str, "chosen": str, "rejected": str} | ({"margin": float} if data.margin_column else {})
    columns = {"prompt": data.prompt_column, "chosen": data.chosen_column, "rejected": data.rejected_column,
               **({"margin": data.margin_column} if data.margin_column else {})}
    df = load_table(resolve_data_path(path), required=required, columns=columns)
    return df.assign(pair_id=np.arange(len(df), dtype=np.int64))[["pair_id", *required]]


@task(name="load-preference-dataset", **STAGE_TASK_OPTIONS)
def load_preference_dataset(data: PreferenceDataConfig, dataset_sha256s: list[str], seed: int) -> PreferenceSplits:
    """Validated pairs; without `eval_path`, a seeded `eval_fraction` of them is held out.
    `dataset_sha256s` are the files' content hashes: they key the cache, so an edited file is re-read."""
    train = _read_pairs(data, data.path)
    if data.eval_path is not None:
        held_out = _read_pairs(data, data.eval_path)
    else:
        order = np.random.default_rng(seed).permutation(len(train))
        count = max(1, round(data.eval_fraction * len(train)))
        held_out, train = train.iloc[np.sort(order[:count])], train.iloc[np.sort(order[count:])]
    return PreferenceSplits(train=publish(train.reset_index(drop=True), "preferences"),
                            eval=publish(held_out.reset_index(drop=True), "preferences"))


@task(name="resolve-reward-backbone")
def resolve_reward_backbone(name_or_path: str) -> CheckpointRef:
    """The built-in MiniLM, the built-in policy, a local folder or an MLflow model URI -> folder + content hash."""
    if name_or_path.startswith("models:/"):
        path = download_registered_model(name_or_path)
    else:
        path = rm.resolve_reward_backbone(name_or_path, models_dir())
    return CheckpointRef(path=str(path), sha256=sha256_dir(path))


def load_reward_checkpoint(ref: CheckpointRef, runtime: RuntimeConfig, trust_remote_code: bool, seed: int = 0,
                           with_adapter: bool = False):
    apply_runtime(runtime)
    torch.manual_seed(seed)  # a backbone's new score head is drawn from it: same seed, same run
    return rm.load_reward_model(ref.path, runtime.device, runtime.dtype, trust_remote_code, with_adapter)


@task(name="train-reward-model-epoch", **STAGE_TASK_OPTIONS)
def train_reward_model_epoch(model_ref: CheckpointRef, train_ref: ArtifactRef, epoch: int, batch_size: int,
                             micro_batch_size: int, lr: float, max_length: int, center_coef: float, max_grad_norm: float, seed: int,
                             runtime: RuntimeConfig, trust_remote_code: bool = False,
                             lora: LoraConfig | None = None) -> UpdateResult:
    """One shuffled pass over the pairs from `model_ref` (a backbone or the previous epoch's checkpoint, whose
    Adam state is restored); returns the new checkpoint and one metrics row per step. With `lora`, the adapter
    and the score head train. With runtime.num_processes > 1 the epoch runs under torchrun (tasks.distributed)."""
    if runtime.num_processes > 1:
        update_args = dict(batch_size=batch_size, micro_batch_size=micro_batch_size, max_length=max_length,
                           center_coef=center_coef, max_grad_norm=max_grad_norm, seed=seed + epoch, lr=lr,
                           init_seed=seed)
        return distributed_update("reward_model", model_ref, train_ref, runtime, trust_remote_code, update_args,
                                  "reward-model-metrics")
    df = train_ref.read()
    model, tokenizer = load_reward_checkpoint(model_ref, runtime, trust_remote_code, seed, lora is not None)
    fresh_adapter = prepare_training(model, lora, runtime, modules_to_save=rm.score_head_names(model))
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=lr, weight_decay=0.0)
    if not fresh_adapter:  # a fresh adapter's parameters are not the ones the saved state belongs to
        restore_optimizer(optimizer, model_ref.path)
    margin = torch.tensor(df["margin"].to_numpy(), dtype=torch.float32) if "margin" in df else None
    progress = StageProgress(total=-(-len(df) // batch_size), desc=f"reward model epoch {epoch}", unit="step")
    history = rm.train_reward_model_epoch(
        model, optimizer, tokenizer, df["prompt"].tolist(), df["chosen"].tolist(), df["rejected"].tolist(), margin,
        batch_size=batch_size, micro_batch_size=micro_batch_size, max_length=max_length, center_coef=center_coef, max_grad_norm=max_grad_norm,
        seed=seed + epoch, on_step=lambda metrics: progress.update(1))
    progress.close()
    return save_update(model, tokenizer, optimizer, history, "reward-model-metrics",
                       merged=lora is not None and lora.save == "merged")


@task(name="evaluate-reward-model", **STAGE_TASK_OPTIONS)
def evaluate_reward_model(model_ref: CheckpointRef, eval_ref: ArtifactRef, batch_size: int, max_length: int,
                          runtime: RuntimeConfig, trust_remote_code: bool = False) -> ArtifactRef:
    """The pairs with `chosen_rewards` and `rejected_rewards`; accuracy = mean(chosen_rewards > rejected_rewards)."""
    df = eval_ref.read()
    model, tokenizer = load_reward_checkpoint(model_ref, runtime, trust_remote_code)
    prompts = df["prompt"].tolist()
    rewards = rm.reward_scores(model, tokenizer, prompts + prompts, df["chosen"].tolist() + df["rejected"].tolist(),
                               batch_size=2 * batch_size, max_length=max_length)
    chosen_rewards, rejected_rewards = rewards.numpy().reshape(2, len(df))  # rows [chosen; rejected]
    return publish(df.assign(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards), "reward-model-eval")
