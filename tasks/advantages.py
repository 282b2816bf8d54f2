"""The advantage stage: one advantage per response from the rewards of its group."""

from __future__ import annotations

import torch
from prefect import task

from rlhf_core.advantages import OUTCOME_ADVANTAGES
from rlhf_core.registry import lookup
from tasks.cache import STAGE_TASK_OPTIONS
from tasks.refs import ArtifactRef, publish


@task(name="compute-advantages", **STAGE_TASK_OPTIONS)
def compute_advantages(scored: ArtifactRef, estimator: str) -> ArtifactRef:
    df = scored.read()
    advantage_fn = lookup(OUTCOME_ADVANTAGES, estimator, "advantage estimator")
    rewards = torch.tensor(df["rewards"].to_numpy(), dtype=torch.float64)
    group_ids = torch.tensor(df["group_id"].to_numpy(), dtype=torch.long)
    return publish(df.assign(advantages=advantage_fn(rewards, group_ids).numpy()), "advantages")
