"""The stage that ends an iteration's dynamic sampling: the scored tables of its rounds -> one batch of informative
groups (rlhf_core/dynamic_sampling.py). Each round's sampling, generation and scoring are the usual cached stages,
so a run killed between rounds resumes at the first unfinished one."""

from __future__ import annotations

from prefect import task

from rlhf_core.dynamic_sampling import fill_batch, informative
from tasks.cache import STAGE_TASK_OPTIONS
from tasks.refs import ArtifactRef, publish


@task(name="fill-batch", **STAGE_TASK_OPTIONS)
def fill_batch_stage(rounds: list[ArtifactRef], num_groups: int) -> ArtifactRef:
    """The scored rows of the batch: the first `num_groups` informative groups of the rounds (fill_batch)."""
    return publish(fill_batch([scored.read() for scored in rounds], num_groups), "scored")


def group_counts(scored: ArtifactRef) -> tuple[int, int]:
    """(informative groups, groups) of one round's scored table."""
    df = scored.read()[["group_id", "rewards"]]
    useful = informative(df["rewards"].to_numpy(), df["group_id"].to_numpy())
    return int(df["group_id"][useful].nunique()), int(df["group_id"].nunique())
