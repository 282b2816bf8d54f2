"""The scoring stage: rewards from reward functions and reward models and, when the loss or the reward needs
them, reference log-probs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task

from rlhf_core.batch import collate, response_lists
from rlhf_core.config import RewardSpec, RuntimeConfig
from rlhf_core.logprobs import batched_response_logprobs
from rlhf_core.reward_model import load_reward_model, reward_scores
from rlhf_core.rewards import RewardError, compute_rewards
from tasks.cache import STAGE_TASK_OPTIONS
from tasks.distributed import distributed_scores
from tasks.refs import ArtifactRef, CheckpointRef, publish
from tasks.runtime import reference_model

REWARD_MODEL_MAX_LENGTH = 512


def reward_column(source: str) -> str:
    return f"reward[{source}]"


def reward_values(df: pd.DataFrame, rewards: list[RewardSpec], reward_models: list[CheckpointRef | None],
                  extra_columns: list[str], runtime: RuntimeConfig, batch_size: int,
                  model_scores: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Unweighted values of every reward source for every row. Reward models score the decoded text, so
    their tokenizer need not be the policy's; `model_scores` has their scores when they were computed already
    (under torchrun)."""
    prompts, responses = df["prompt"].tolist(), df["response"].tolist()
    functions = [(spec.function, 1.0) for spec in rewards if spec.function]
    values = {}
    if functions:
        _, values = compute_rewards(functions, prompts, responses, {c: df[c].tolist() for c in extra_columns})
    for spec, ref in zip(rewards, reward_models):
        if not spec.model:
            continue
        if model_scores is not None:
            scores = model_scores[spec.model]
        else:
            model, tokenizer = load_reward_model(Path(ref.path), runtime.device, runtime.dtype)
            scores = reward_scores(model, tokenizer, prompts, responses, batch_size=batch_size,
                                   max_length=REWARD_MODEL_MAX_LENGTH).cpu().double().numpy()
        if not np.isfinite(scores).all():
            row = int(np.flatnonzero(~np.isfinite(scores))[0])
            raise RewardError(f"reward model {spec.model}: non-finite score {scores[row]} at row {row}")
        values[spec.model] = scores
    return values


def with_rewards(df: pd.DataFrame, total_column: str, rewards: list[RewardSpec],
                 reward_models: list[CheckpointRef | None], extra_columns: list[str], runtime: RuntimeConfig,
                 batch_size: int, model_scores: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """`df` with the weighted sum of the reward sources in `total_column` and one `reward[<source>]` column per
    source (unweighted)."""
    values = reward_values(df, rewards, reward_models, extra_columns, runtime, batch_size, model_scores)
    total = sum(spec.weight * values[spec.name] for spec in rewards)
    return df.assign(**{total_column: total}, **{reward_column(name): v for name, v in values.items()})


@task(name="score-rollouts", **STAGE_TASK_OPTIONS)
def score_rollouts(rollouts: ArtifactRef, rewards: list[RewardSpec], reward_fingerprints: list[str | None],
                   reward_models: list[CheckpointRef | None], extra_columns: list[str],
                   reference: CheckpointRef | None, runtime: RuntimeConfig, temperature: float,
                   micro_batch_size: int, chunk_size: int, trust_remote_code: bool = False) -> ArtifactRef:
    """Adds `rewards` (the weighted sum), one `reward[<source>]` column per source and, given a reference
    model, `ref_logprobs`. `reward_fingerprints` hash the functions' source code so edits invalidate the cache;
    reward models count through their refs' content hashes."""
    return publish(scored_frame(rollouts.read(), rewards, reward_models, extra_columns, reference, runtime,
                                temperature, micro_batch_size, chunk_size, trust_remote_code), "scored")


def scored_frame(df: pd.DataFrame, rewards: list[RewardSpec], reward_models: list[CheckpointRef | None],
                 extra_columns: list[str], reference: CheckpointRef | None, runtime: RuntimeConfig,
                 temperature: float, micro_batch_size: int, chunk_size: int,
                 trust_remote_code: bool = False) -> pd.DataFrame:
    """The scoring stage's table for the rollout rows `df` (all of them, or a shard: rows are scored
    independently). With runtime.num_processes > 1 the reference and reward-model passes run under torchrun."""
    if runtime.num_processes > 1:
        return scored_frame_distributed(df, rewards, reward_models, extra_columns, reference, runtime, temperature,
                                        micro_batch_size, chunk_size, trust_remote_code)
    df = with_rewards(df, "rewards", rewards, reward_models, extra_columns, runtime, micro_batch_size)
    if reference is not None:
        with reference_model(reference, runtime, trust_remote_code) as (model, tokenizer):
            batch = collate(df["prompt_ids"], df["response_ids"], tokenizer.pad_token_id, device=runtime.device)
            ref_logprobs = batched_response_logprobs(model, batch, micro_batch_size=micro_batch_size,
                                                     temperature=temperature, chunk_size=chunk_size)
        df["ref_logprobs"] = response_lists(ref_logprobs, batch["response_mask"])
    return df


def scored_frame_distributed(df: pd.DataFrame, rewards: list[RewardSpec], reward_models: list[CheckpointRef | None],
                             extra_columns: list[str], reference: CheckpointRef | None, runtime: RuntimeConfig,
                             temperature: float, micro_batch_size: int, chunk_size: int,
                             trust_remote_code: bool) -> pd.DataFrame:
    """`scored_frame` with the model passes in one torchrun job, each rank scoring its share of the rows."""
    model_specs = [(spec, ref) for spec, ref in zip(rewards, reward_models) if spec.model]
    scores = distributed_scores(df, reference, [ref for _, ref in model_specs], runtime, trust_remote_code,
                                temperature=temperature, micro_batch_size=micro_batch_size, chunk_size=chunk_size,
                                max_length=REWARD_MODEL_MAX_LENGTH)
    model_scores = {spec.model: scores[f"reward.{i}"].double().numpy() for i, (spec, _) in enumerate(model_specs)}
    df = with_rewards(df, "rewards", rewards, reward_models, extra_columns, runtime, micro_batch_size, model_scores)
    if reference is not None:
        mask = collate(df["prompt_ids"], df["response_ids"], 0)["response_mask"]
        df["ref_logprobs"] = response_lists(scores["ref_logprobs"], mask)
    return df
