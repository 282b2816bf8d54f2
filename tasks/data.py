"""Prompt datasets: validate the user's file once, then sample prompts per iteration."""

from __future__ import annotations

import numpy as np
from prefect import task

from rlhf_core.config import DataConfig
from rlhf_core.data import load_table
from tasks.cache import STAGE_TASK_OPTIONS
from tasks.paths import resolve_data_path
from tasks.refs import ArtifactRef, publish


@task(name="load-prompt-dataset", **STAGE_TASK_OPTIONS)
def load_prompt_dataset(data: DataConfig, dataset_sha256: str) -> ArtifactRef:
    """The user's prompts, validated, as Parquet with columns prompt_id, prompt and the extra columns.
    `dataset_sha256` is the file's content hash: it keys the cache, so an edited file is re-read."""
    df = load_table(resolve_data_path(data.path), required={"prompt": str, **{c: object for c in data.extra_columns}},
                    columns={"prompt": data.prompt_column})
    df.insert(0, "prompt_id", np.arange(len(df), dtype=np.int64))
    return publish(df, "datasets")


def epoch_order(num_rows: int, count: int, start: int, seed: int) -> np.ndarray:
    """Rows `start .. start+count` of an endless sequence of shuffled epochs: no prompt repeats within an
    epoch, and iteration i of any run with the same seed sees the same prompts."""
    positions = np.arange(start, start + count)
    epochs, offsets = np.divmod(positions, num_rows)
    orders = {e: np.random.default_rng([seed, int(e)]).permutation(num_rows) for e in np.unique(epochs)}
    return np.array([orders[e][o] for e, o in zip(epochs, offsets)], dtype=np.int64)


@task(name="sample-prompts", **STAGE_TASK_OPTIONS)
def sample_prompts(dataset: ArtifactRef, num_prompts: int, iteration: int, seed: int) -> ArtifactRef:
    df = dataset.read()
    rows = epoch_order(len(df), num_prompts, iteration * num_prompts, seed)
    return publish(df.iloc[rows].reset_index(drop=True), "prompts")
