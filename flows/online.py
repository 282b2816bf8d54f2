"""What the online flows (GRPO, PPO) resolve before any work: a bad input fails here, not an hour in."""

from __future__ import annotations

from typing import NamedTuple

from rlhf_core.data import dataset_fingerprint
from rlhf_core.rewards import reward_source_fingerprint
from tasks.data import load_prompt_dataset
from tasks.models import resolve_model
from tasks.paths import resolve_data_path
from tasks.refs import ArtifactRef, CheckpointRef


class OnlineInputs(NamedTuple):
    reward_fingerprints: list[str | None]  # source hashes of reward functions (None for reward models)
    reward_models: list[CheckpointRef | None]  # resolved reward models (None for functions)
    dataset: ArtifactRef  # the validated prompts
    policy: CheckpointRef  # the initial policy


def resolve_online_inputs(config) -> OnlineInputs:
    """Every reward function imports, every reward model and the policy resolve, the dataset is valid."""
    return OnlineInputs(
        reward_fingerprints=[reward_source_fingerprint(r.function) if r.function else None for r in config.rewards],
        reward_models=[resolve_model(r.model) if r.model else None for r in config.rewards],
        dataset=load_prompt_dataset(config.data, dataset_fingerprint(resolve_data_path(config.data.path))),
        policy=resolve_model(config.model.name_or_path))
