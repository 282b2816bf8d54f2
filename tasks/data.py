"""The datasets the flows load: prompts (validated once, then sampled per iteration), preference pairs (the reward
model and DPO) and unpaired examples (KTO), each validated and split into train and held-out Parquet files."""

from __future__ import annotations

import numpy as np
import pandas as pd
from prefect import task
from pydantic import BaseModel

from rlhf_core.config import DataConfig, PreferenceDataConfig, UnpairedDataConfig
from rlhf_core.data import DatasetError, load_table
from tasks.cache import STAGE_TASK_OPTIONS
from tasks.paths import resolve_data_path
from tasks.refs import ArtifactRef, publish


def read_prompts(data: DataConfig) -> pd.DataFrame:
    """The user's prompts, validated: columns prompt_id, prompt and the extra columns."""
    df = load_table(resolve_data_path(data.path), required={"prompt": str, **{c: object for c in data.extra_columns}},
                    columns={"prompt": data.prompt_column}, duplicates=data.duplicates)
    df.insert(0, "prompt_id", np.arange(len(df), dtype=np.int64))
    return df


@task(name="load-prompt-dataset", **STAGE_TASK_OPTIONS)
def load_prompt_dataset(data: DataConfig, dataset_sha256: str) -> ArtifactRef:
    """`read_prompts` as Parquet. `dataset_sha256` is the file's content hash: it keys the cache, so an edited
    file is re-read."""
    return publish(read_prompts(data), "datasets")


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


class PreferenceSplits(BaseModel):
    """Canonical Parquet data for training and evaluation: pairs (pair_id, prompt, chosen, rejected[, margin]) for
    the reward model and DPO, unpaired examples (tasks/kto.py) for KTO."""

    train: ArtifactRef
    eval: ArtifactRef


def _read_pairs(data: PreferenceDataConfig, path: str) -> pd.DataFrame:
    required = {"prompt": str, "chosen": str, "rejected": str} | ({"margin": float} if data.margin_column else {})
    columns = {"prompt": data.prompt_column, "chosen": data.chosen_column, "rejected": data.rejected_column,
               **({"margin": data.margin_column} if data.margin_column else {})}
    df = load_table(resolve_data_path(path), required=required, columns=columns, duplicates=data.duplicates)
    return df.assign(pair_id=np.arange(len(df), dtype=np.int64))[["pair_id", *required]]


def split_pairs(data: PreferenceDataConfig, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, held out) validated pairs; without `eval_path`, a seeded `eval_fraction` of them is held out."""
    train = _read_pairs(data, data.path)
    if data.eval_path is not None:
        held_out = _read_pairs(data, data.eval_path)
    else:
        order = np.random.default_rng(seed).permutation(len(train))
        count = max(1, round(data.eval_fraction * len(train)))
        held_out, train = train.iloc[np.sort(order[:count])], train.iloc[np.sort(order[count:])]
    return train.reset_index(drop=True), held_out.reset_index(drop=True)


@task(name="load-preference-dataset", **STAGE_TASK_OPTIONS)
def load_preference_dataset(data: PreferenceDataConfig, dataset_sha256s: list[str], seed: int) -> PreferenceSplits:
    """`split_pairs` as Parquet. `dataset_sha256s` are the files' content hashes: they key the cache, so an edited
    file is re-read."""
    train, held_out = split_pairs(data, seed)
    return PreferenceSplits(train=publish(train, "preferences"), eval=publish(held_out, "preferences"))


def _read_examples(data: UnpairedDataConfig, path: str) -> pd.DataFrame:
    required = {"prompt": str, "completion": str, "label": bool}  # bool only: see UnpairedDataConfig
    columns = {"prompt": data.prompt_column, "completion": data.completion_column, "label": data.label_column}
    df = load_table(resolve_data_path(path), required=required, columns=columns, duplicates=data.duplicates)
    return df.assign(example_id=np.arange(len(df), dtype=np.int64))[["example_id", *required]]


def _check_split(df: pd.DataFrame, source: str, needs_both_labels: bool) -> None:
    """KTO needs 2 distinct prompts to build mismatched pairs, and both labels to learn from."""
    if df["prompt"].nunique() < 2:
        raise DatasetError(f"{source}: {df['prompt'].nunique()} distinct prompt(s) in {len(df)} rows; the KL "
                           "reference point pairs a prompt with another prompt's completion, so at least 2 are "
                           "needed")
    if needs_both_labels and df["label"].nunique() < 2:
        raise DatasetError(f"{source}: every row's label is {bool(df['label'].iloc[0])}; KTO needs both desirable "
                           "(true) and undesirable (false) examples to train on")


def hold_out_prompts(df: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, held out): a seeded `fraction` of the distinct prompts (at least 2), each with all its rows."""
    prompts = df["prompt"].unique()
    count = max(2, round(fraction * len(prompts)))
    held_out = set(prompts[np.random.default_rng(seed).permutation(len(prompts))[:count]])
    mask = df["prompt"].isin(held_out).to_numpy()
    return df[~mask].reset_index(drop=True), df[mask].reset_index(drop=True)


def split_examples(data: UnpairedDataConfig, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, held out) validated examples; without `eval_path`, a seeded `eval_fraction` of the prompts is held
    out."""
    train = _read_examples(data, data.path)
    if data.eval_path is not None:
        held_out, train_source, eval_source = _read_examples(data, data.eval_path), data.path, data.eval_path
    else:
        train, held_out = hold_out_prompts(train, data.eval_fraction, seed)
        train_source = f"{data.path} (after holding out eval_fraction={data.eval_fraction} of its prompts)"
        eval_source = f"{data.path} (its held-out prompts)"
    _check_split(train, train_source, needs_both_labels=True)
    _check_split(held_out, eval_source, needs_both_labels=False)  # one label: accuracy is NaN, the rest holds
    return train, held_out


@task(name="load-unpaired-dataset", **STAGE_TASK_OPTIONS)
def load_unpaired_dataset(data: UnpairedDataConfig, dataset_sha256s: list[str], seed: int) -> PreferenceSplits:
    """`split_examples` as Parquet. `dataset_sha256s` are the files' content hashes: they key the cache, so an
    edited file is re-read."""
    train, held_out = split_examples(data, seed)
    return PreferenceSplits(train=publish(train, "unpaired"), eval=publish(held_out, "unpaired"))
