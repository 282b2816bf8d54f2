"""The scoring stage: rewards from reward functions, reward models and LLM judges and, when the loss or the reward
needs them, reference log-probs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from pydantic import BaseModel, ConfigDict

from rlhf_core.batch import collate, response_lists
from rlhf_core.judge import answer_token_ids, judge_prompts, yes_probability
from rlhf_core.config import RewardSpec, RuntimeConfig
from rlhf_core.config.training import LogprobPass
from rlhf_core.logprobs import batched_response_logprobs
from rlhf_core.reward_model import load_reward_model, reward_scores
from rlhf_core.rewards import RewardError, compute_rewards
from tasks.cache import STAGE_TASK_OPTIONS
from tasks.data import chat_prompts
from tasks.distributed import distributed_scores
from tasks.refs import ArtifactRef, CheckpointRef, publish
from tasks.runtime import load_model, reference_model

REWARD_MODEL_MAX_LENGTH = 512


def reward_column(source: str) -> str:
    return f"reward[{source}]"


class RewardSources(BaseModel):
    """What the scoring stage adds up: the reward specs, the source hashes of their functions (they key the cache,
    so an edited function is re-run) and their resolved reward models (None where a spec is a function), plus the
    dataset columns the functions read."""

    model_config = ConfigDict(frozen=True)

    specs: list[RewardSpec]
    fingerprints: list[str | None]
    models: list[CheckpointRef | None]
    extra_columns: list[str] = []


def reward_values(df: pd.DataFrame, sources: RewardSources, runtime: RuntimeConfig, batch_size: int,
                  model_scores: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Unweighted values of every reward source for every row. Reward models score the decoded text, so
    their tokenizer need not be the policy's; `model_scores` has their scores when they were computed already
    (under torchrun)."""
    prompts, responses = df["prompt"].tolist(), df["response"].tolist()
    functions = [(spec.function, 1.0) for spec in sources.specs if spec.function]
    values = {}
    if functions:
        timeouts = {spec.function: spec.timeout_s for spec in sources.specs if spec.function}
        options = {spec.function: spec.options for spec in sources.specs if spec.function}
        columns = {c: df[c].tolist() for c in sources.extra_columns}
        if "prompt_messages" in df:  # every function also gets each prompt as messages (multi-turn, system turn)
            columns["prompt_messages"] = chat_prompts(df)
        if "response_length" in df:  # and each response's length in tokens (overlong_penalty)
            columns["response_length"] = df["response_length"].tolist()
        _, values = compute_rewards(functions, prompts, responses, columns, timeouts, options)
    for spec, checkpoint in zip(sources.specs, sources.models):
        if spec.judge:
            values[spec.judge] = judge_scores(checkpoint, spec, prompts, responses, runtime, batch_size)
            continue
        if not spec.model:
            continue
        if model_scores is not None:
            scores = model_scores[spec.model]
        else:
            model, tokenizer = load_reward_model(Path(checkpoint.path), runtime.device, runtime.dtype)
            scores = reward_scores(model, tokenizer, prompts, responses, batch_size=batch_size,
                                   max_length=REWARD_MODEL_MAX_LENGTH).cpu().double().numpy()
        if not np.isfinite(scores).all():
            row = int(np.flatnonzero(~np.isfinite(scores))[0])
            raise RewardError(f"reward model {spec.model}: non-finite score {scores[row]} at row {row}")
        values[spec.model] = scores
    return values


def judge_scores(judge: CheckpointRef, spec: RewardSpec, prompts: list[str], responses: list[str],
                 runtime: RuntimeConfig, batch_size: int) -> np.ndarray:
    """An LLM judge's P(good answer) per response (rlhf_core/judge.py), in this process."""
    model, tokenizer = load_model(judge, runtime)
    ids = judge_prompts(tokenizer, spec.judge_template, prompts, responses)
    return yes_probability(model, ids, answer_token_ids(tokenizer, spec.judge_answers), tokenizer.pad_token_id,
                           batch_size).numpy()


def with_rewards(df: pd.DataFrame, total_column: str, sources: RewardSources, runtime: RuntimeConfig,
                 batch_size: int, model_scores: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """`df` with the weighted sum of the reward sources in `total_column` and one `reward[<source>]` column per
    source (unweighted)."""
    values = reward_values(df, sources, runtime, batch_size, model_scores)
    total = sum((spec.weight * values[spec.name] for spec in sources.specs), np.zeros(len(df)))  # none: 0.0
    return df.assign(**{total_column: total}, **{reward_column(name): v for name, v in values.items()})


@task(name="score-rollouts", **STAGE_TASK_OPTIONS)
def score_rollouts(rollouts: ArtifactRef, sources: RewardSources, reference: CheckpointRef | None,
                   logprobs: LogprobPass, runtime: RuntimeConfig, trust_remote_code: bool = False) -> ArtifactRef:
    """Adds `rewards` (the weighted sum), one `reward[<source>]` column per source and, given a reference
    model, `ref_logprobs`. Reward models count in the cache key through their refs' content hashes."""
    return publish(scored_frame(rollouts.read(), sources, reference, logprobs, runtime, trust_remote_code), "scored")


def scored_frame(df: pd.DataFrame, sources: RewardSources, reference: CheckpointRef | None, logprobs: LogprobPass,
                 runtime: RuntimeConfig, trust_remote_code: bool = False) -> pd.DataFrame:
    """The scoring stage's table for the rollout rows `df` (all of them, or a shard: rows are scored
    independently). With runtime.num_processes > 1 the reference and reward-model passes run under torchrun."""
    if runtime.num_processes > 1:
        return scored_frame_distributed(df, sources, reference, logprobs, runtime, trust_remote_code)
    df = with_rewards(df, "rewards", sources, runtime, logprobs.micro_batch_size)
    if reference is not None:
        with reference_model(reference, runtime, trust_remote_code) as (model, tokenizer):
            batch = collate(df["prompt_ids"], df["response_ids"], tokenizer.pad_token_id, device=runtime.device)
            ref_logprobs = batched_response_logprobs(model, batch, micro_batch_size=logprobs.micro_batch_size,
                                                     temperature=logprobs.temperature, chunk_size=logprobs.chunk_size)
        df["ref_logprobs"] = response_lists(ref_logprobs, batch["response_mask"])
    return df


def scored_frame_distributed(df: pd.DataFrame, sources: RewardSources, reference: CheckpointRef | None,
                             logprobs: LogprobPass, runtime: RuntimeConfig, trust_remote_code: bool) -> pd.DataFrame:
    """`scored_frame` with the model passes in one torchrun job, each rank scoring its share of the rows."""
    model_specs = [(spec, checkpoint) for spec, checkpoint in zip(sources.specs, sources.models) if spec.model]
    scores = distributed_scores(df, reference, [checkpoint for _, checkpoint in model_specs], runtime,
                                trust_remote_code, logprobs, max_length=REWARD_MODEL_MAX_LENGTH)
    model_scores = {spec.model: scores[f"reward.{i}"].double().numpy() for i, (spec, _) in enumerate(model_specs)}
    df = with_rewards(df, "rewards", sources, runtime, logprobs.micro_batch_size, model_scores)
    if reference is not None:
        mask = collate(df["prompt_ids"], df["response_ids"], 0)["response_mask"]
        df["ref_logprobs"] = response_lists(scores["ref_logprobs"], mask)
    return df
