"""What the flows resolve before any work (prompts, reward sources, data files' hashes): a bad input fails here,
not an hour in."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import NamedTuple

from rlhf_core.config import DataConfig, RewardSpec
from rlhf_core.data import dataset_fingerprint
from rlhf_core.rewards import reward_source_fingerprint
from tasks.data import load_prompt_dataset
from tasks.models import resolve_model, resolve_start_model
from tasks.paths import resolve_data_path
from tasks.refs import ArtifactRef, CheckpointRef


class OnlineInputs(NamedTuple):
    reward_fingerprints: list[str | None]  # source hashes of reward functions (None for reward models)
    reward_models: list[CheckpointRef | None]  # resolved reward models (None for functions)
    dataset: ArtifactRef  # the validated prompts
    policy: CheckpointRef  # the initial policy


def resolve_rewards(rewards: list[RewardSpec]) -> tuple[list[str | None], list[CheckpointRef | None]]:
    """(source hashes of the reward functions, resolved reward models), None where a spec is the other kind:
    every function imports and every model resolves, or this raises naming it."""
    return ([reward_source_fingerprint(r.function) if r.function else None for r in rewards],
            [resolve_model(r.model) if r.model else None for r in rewards])


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
    """Every reward function imports, every reward model and the policy resolve, the dataset is valid."""
    reward_fingerprints, reward_models = resolve_rewards(config.rewards)
    return OnlineInputs(reward_fingerprints, reward_models, dataset=resolve_prompts(config.data),
                        policy=resolve_start_model(config.model))
