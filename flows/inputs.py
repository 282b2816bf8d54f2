"""What the flows resolve before any work (prompts, reward sources, data files' hashes): a bad input fails here,
not an hour in."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

from rlhf_core.config import DataConfig, RewardSpec
from rlhf_core.data import check_prompt_lengths, dataset_fingerprint
from rlhf_core.generation import chat_prompt_ids
from rlhf_core.models import load_tokenizer, model_config
from rlhf_core.rewards import reward_source_fingerprint
from tasks.data import load_prompt_dataset
from tasks.models import resolve_model, resolve_start_model
from tasks.paths import resolve_data_path
from tasks.refs import ArtifactRef, CheckpointRef
from tasks.scoring import RewardSources
from tasks.sharding import check_task_runner


class OnlineInputs(NamedTuple):
    rewards: RewardSources  # the reward specs, their functions' hashes and their resolved models
    dataset: ArtifactRef  # the validated prompts
    policy: CheckpointRef  # the initial policy


def resolve_rewards(rewards: list[RewardSpec], extra_columns: list[str]) -> RewardSources:
    """The reward sources with their functions' source hashes and their resolved reward models: every function
    imports and every model resolves, or this raises naming it."""
    return RewardSources(specs=rewards,
                         fingerprints=[reward_source_fingerprint(r.function) if r.function else None for r in rewards],
                         models=[resolve_model(r.model) if r.model else None for r in rewards],
                         extra_columns=extra_columns)


def data_fingerprints(*paths: str | None) -> list[str]:
    """Content hashes of a flow's data files (None skipped): the loading stages' cache keys, so an edited file is
    re-read."""
    return [dataset_fingerprint(resolve_data_path(path)) for path in paths if path is not None]


def resolve_prompts(data: DataConfig) -> ArtifactRef:
    """The validated prompt dataset, cached on the file's content hash."""
    return load_prompt_dataset(data, data_fingerprints(data.path)[0])


def resolve_run_seed(config, scheduled_start: datetime | None):
    """`config` with `seed: run-date` replaced by the run's scheduled date as YYYYMMDD (today outside a run);
    every stage then sees an int and the MLflow params record the seed actually used."""
    if config.seed != "run-date":
        return config
    seed = int((scheduled_start or datetime.now(timezone.utc)).strftime("%Y%m%d"))
    print(f"seed: run-date -> {seed}")
    return config.model_copy(update={"seed": seed})


def resolve_online_inputs(config) -> OnlineInputs:
    """Every reward function imports, every reward model and the policy resolve, the dataset is valid and every
    prompt leaves room for the responses in the policy's context. A sharded run's task runner is installed."""
    check_task_runner(config.runtime)
    inputs = OnlineInputs(resolve_rewards(config.rewards, config.data.extra_columns),
                          dataset=resolve_prompts(config.data),
                          policy=resolve_start_model(config.model))
    check_prompts_fit(inputs.dataset, inputs.policy, config.data, config.generation.max_new_tokens)
    return inputs


def check_prompts_fit(dataset: ArtifactRef, policy: CheckpointRef, data: DataConfig, max_new_tokens: int) -> None:
    """Each prompt, rendered with the chat template as the rollout stage will, plus max_new_tokens fits in the
    policy's context; else a DatasetError names the row."""
    check_prompt_list_fits(dataset.read()["prompt"].tolist(), Path(policy.path), data, max_new_tokens)


def check_prompt_list_fits(prompts: list[str], model_path: Path, data: DataConfig, max_new_tokens: int) -> None:
    tokenizer, _ = load_tokenizer(model_path)
    context = getattr(model_config(model_path), "max_position_embeddings", None)
    if context is None:  # architectures without a fixed context have nothing to check
        return
    lengths = [len(ids) for ids in chat_prompt_ids(tokenizer, prompts, data.system_prompt)]
    check_prompt_lengths(resolve_data_path(data.path), lengths, max_new_tokens, context)
