"""The datasets the flows load, validated and brought to one canonical shape (docs/data.md shows what users bring):

- prompts (validated once, then sampled per iteration): prompt_id, prompt, prompt_messages, the extra columns
- preference pairs (the reward model and DPO): pair_id, prompt, prompt_messages, chosen, rejected[, margin]
- unpaired examples (KTO): example_id, prompt, prompt_messages, completion, label
- SFT examples: example_id, messages, text

`prompt` is the prompt as text (`rlhf_core.conversation.prompt_text`: for reward functions, reward models and
people); `prompt_messages` the prompt as messages {role, content}, without `data.system_prompt` (the chat renderer
adds it); chosen, rejected and completion the assistant's reply as text. SFT `messages` is the whole conversation
(a prompt/completion row becomes [prompt turns..., assistant]); `text` is set only for plain-text rows, whose
`messages` is empty. Read back from Parquet, message lists are numpy arrays and a missing `text` is NaN:
`conversation.as_messages` and `isinstance(text, str)` read them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from pydantic import BaseModel

from rlhf_core.config import DataConfig, PreferenceDataConfig, SFTDataConfig, UnpairedDataConfig
from rlhf_core.conversation import (as_messages, conversation_key, preference_pair, prompt_messages, prompt_text,
                                    reply_messages, reply_text, sft_messages)
from rlhf_core.data import Check, DatasetError, dataset_fingerprint, is_hub_id, load_table
from rlhf_core.dynamic_sampling import round_seed
from rlhf_core.formats import data_format
from tasks.cache import STAGE_TASK_OPTIONS
from tasks.paths import resolve_data_path
from tasks.refs import ArtifactRef, publish

PROMPT = Check(prompt_messages)  # a string, or messages ending with the user's turn
REPLY = Check(reply_messages)  # a reply, or a whole conversation ending in one (implicit-prompt pairs)
COMPLETION = Check(reply_text)  # a string, or one assistant message
CONVERSATION = Check(sft_messages, text=False)  # messages with at least one assistant turn


def chat_prompts(df: pd.DataFrame) -> list:
    """Each row's prompt as the chat template renders it: its `prompt_messages` (plain lists of messages, also
    when read back from Parquet), or its `prompt` string in a table without them."""
    if "prompt_messages" not in df:
        return df["prompt"].tolist()
    return [as_messages(messages) for messages in df["prompt_messages"]]


def data_source(path: str) -> Path | str:
    """A local file or folder (`resolve_data_path`), else a hub id `org/name` as given, which rlhf_core.data finds
    in the local datasets cache."""
    local = resolve_data_path(path)
    return path if is_hub_id(path) and not local.exists() else local


def dataset_fingerprints(data) -> list[str]:
    """Content hashes of data.path and data.eval_path (when set), hub ids included: the loading stages' cache keys,
    so an edited file or a new download is re-read."""
    paths = [data.path, getattr(data, "eval_path", None)]
    return [dataset_fingerprint(data_source(path), data.subset) for path in paths if path is not None]


def _refuse_unused_split(data) -> None:
    """data.split and data.subset choose part of a hub id or of a folder of data files: with files only, they would
    do nothing."""
    sources = [data_source(path) for path in (data.path, getattr(data, "eval_path", None)) if path is not None]
    if (data.split, data.subset) != ("train", None) and not any(isinstance(s, str) or s.is_dir() for s in sources):
        raise DatasetError(f"{data.path}: a file has no splits or subsets, but data.split is {data.split!r} and "
                           f"data.subset {data.subset!r}: they choose part of a hub id or of a folder of data files")


def _load(data, path: str, kind: str, required: dict, optional: dict, columns: dict, canonical) -> pd.DataFrame:
    """The rows of `path`, each rewritten by `data.format`'s converter (its raw fields checked only for being
    present) and then by `canonical(fields) -> fields`."""
    _refuse_unused_split(data)
    form = data_format(getattr(data, "format", "auto"), kind)
    raw = dict.fromkeys(form.raw, object)

    def converted(fields: dict) -> dict:  # the format's changes, then the canonical fields of the result
        changed = form.convert(fields)
        return {**changed, **canonical({**fields, **changed})}

    convert = canonical if form.convert is None else converted
    return load_table(data_source(path), {name: raw.get(name, check) for name, check in required.items()}, columns,
                      {name: raw.get(name, check) for name, check in optional.items()}, data.duplicates,
                      split=data.split, subset=data.subset, convert=convert)


def _prompt_fields(fields: dict) -> dict:
    messages = prompt_messages(fields["prompt"])
    return {"prompt": prompt_text(messages), "prompt_messages": messages}


def read_prompts(data: DataConfig) -> pd.DataFrame:
    """The user's prompts, validated: prompt_id, prompt, prompt_messages and the extra columns."""
    df = _load(data, data.path, "prompts", {"prompt": PROMPT, **{c: object for c in data.extra_columns}}, {},
               {"prompt": data.prompt_column}, _prompt_fields)
    df.insert(0, "prompt_id", np.arange(len(df), dtype=np.int64))
    return df[["prompt_id", "prompt", "prompt_messages", *data.extra_columns]]


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
def sample_prompts(dataset: ArtifactRef, num_prompts: int, iteration: int, seed: int,
                   sampling_round: int = 0) -> ArtifactRef:
    """Iteration `iteration`'s prompts: its slice of the seeded epochs; an extra round of dynamic sampling draws
    from a stream of its own (round_seed), so the next iterations' prompts do not depend on how many rounds ran."""
    df = dataset.read()
    if sampling_round == 0:
        rows = epoch_order(len(df), num_prompts, iteration * num_prompts, seed)
    else:
        rows = epoch_order(len(df), num_prompts, 0, round_seed(seed, iteration, sampling_round))
    return publish(df.iloc[rows].reset_index(drop=True), "prompts")


class DataSplits(BaseModel):
    """Canonical Parquet data for training and evaluation: pairs for the reward model and DPO, unpaired examples
    for KTO, conversations for SFT (the columns: this module's docstring)."""

    train: ArtifactRef
    eval: ArtifactRef


def _pair_fields(fields: dict) -> dict:
    messages, chosen, rejected = preference_pair(fields.get("prompt"), fields["chosen"], fields["rejected"])
    return {"prompt": prompt_text(messages), "prompt_messages": messages, "chosen": chosen, "rejected": rejected}


def _read_pairs(data: PreferenceDataConfig, path: str) -> pd.DataFrame:
    required = {"chosen": REPLY, "rejected": REPLY} | ({"margin": float} if data.margin_column else {})
    columns = {"prompt": data.prompt_column, "chosen": data.chosen_column, "rejected": data.rejected_column,
               **({"margin": data.margin_column} if data.margin_column else {})}
    df = without_ties(_load(data, path, "pairs", required, {"prompt": PROMPT}, columns, _pair_fields), path)
    return df.assign(pair_id=np.arange(len(df), dtype=np.int64))[
        ["pair_id", "prompt", "prompt_messages", "chosen", "rejected", *(["margin"] if data.margin_column else [])]]


def without_ties(pairs: pd.DataFrame, path: str) -> pd.DataFrame:
    """Pairs whose chosen and rejected responses differ: a pair of two equal responses teaches nothing (its loss
    gradient is exactly 0), so such rows are dropped with a count, and a file of nothing else is refused."""
    tied = (pairs["chosen"] == pairs["rejected"]).to_numpy()
    if tied.all():
        raise DatasetError(f"{path}: in every one of its {len(pairs)} pairs the chosen and rejected responses are "
                           "the same text: there is no preference to learn")
    if tied.any():
        print(f"{path}: dropped {int(tied.sum())} pair(s) of {len(pairs)} whose chosen and rejected responses are "
              f"the same text (first: row {int(np.argmax(tied))})")
    return pairs[~tied].reset_index(drop=True)


def _held_out_rows(df: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, held out): a seeded `fraction` of the rows (at least 1), both in file order."""
    order = np.random.default_rng(seed).permutation(len(df))
    count = max(1, round(fraction * len(df)))
    return df.iloc[np.sort(order[count:])].reset_index(drop=True), df.iloc[np.sort(order[:count])].reset_index(
        drop=True)


def split_pairs(data: PreferenceDataConfig, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, held out) validated pairs; without `eval_path`, a seeded `eval_fraction` of them is held out."""
    train = _read_pairs(data, data.path)
    if data.eval_path is not None:
        return train, _read_pairs(data, data.eval_path)
    return _held_out_rows(train, data.eval_fraction, seed)


@task(name="load-preference-dataset", **STAGE_TASK_OPTIONS)
def load_preference_dataset(data: PreferenceDataConfig, dataset_sha256s: list[str], seed: int) -> DataSplits:
    """`split_pairs` as Parquet. `dataset_sha256s` are the files' content hashes: they key the cache, so an edited
    file is re-read."""
    train, held_out = split_pairs(data, seed)
    return DataSplits(train=publish(train, "preferences"), eval=publish(held_out, "preferences"))


def _example_fields(fields: dict) -> dict:
    messages = prompt_messages(fields["prompt"])
    completion = reply_text(fields["completion"])
    return {"prompt": prompt_text(messages), "prompt_messages": messages, "completion": completion}


def _read_examples(data: UnpairedDataConfig, path: str) -> pd.DataFrame:
    required = {"prompt": PROMPT, "completion": COMPLETION, "label": bool}  # bool only: see UnpairedDataConfig
    columns = {"prompt": data.prompt_column, "completion": data.completion_column, "label": data.label_column}
    df = _load(data, path, "examples", required, {}, columns, _example_fields)
    return df.assign(example_id=np.arange(len(df), dtype=np.int64))[
        ["example_id", "prompt", "prompt_messages", "completion", "label"]]


def _prompt_keys(df: pd.DataFrame) -> pd.Series:
    """One key per distinct prompt conversation (two system prompts make two prompts, though their text is one)."""
    return df["prompt_messages"].map(conversation_key)


def _check_split(df: pd.DataFrame, source: str, needs_both_labels: bool) -> None:
    """KTO needs 2 distinct prompts to build mismatched pairs, and both labels to learn from."""
    if (distinct := _prompt_keys(df).nunique()) < 2:
        raise DatasetError(f"{source}: {distinct} distinct prompt(s) in {len(df)} rows; the KL reference point pairs "
                           "a prompt with another prompt's completion, so at least 2 are needed")
    if needs_both_labels and df["label"].nunique() < 2:
        raise DatasetError(f"{source}: every row's label is {bool(df['label'].iloc[0])}; KTO needs both desirable "
                           "(true) and undesirable (false) examples to train on")


def hold_out_prompts(df: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, held out): a seeded `fraction` of the distinct prompts (at least 2), each with all its rows."""
    keys = _prompt_keys(df)
    prompts = keys.unique()
    count = max(2, round(fraction * len(prompts)))
    held_out = set(prompts[np.random.default_rng(seed).permutation(len(prompts))[:count]])
    mask = keys.isin(held_out).to_numpy()
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
def load_unpaired_dataset(data: UnpairedDataConfig, dataset_sha256s: list[str], seed: int) -> DataSplits:
    """`split_examples` as Parquet. `dataset_sha256s` are the files' content hashes: they key the cache, so an
    edited file is re-read."""
    train, held_out = split_examples(data, seed)
    return DataSplits(train=publish(train, "unpaired"), eval=publish(held_out, "unpaired"))


def read_conversations(data: SFTDataConfig, path: str | None = None) -> pd.DataFrame:
    """SFT examples of `path` (data.path by default), validated: example_id, messages, text. Per row the first
    shape present wins: a conversation, a prompt with its completion, plain text."""
    columns = {"messages": data.messages_column, "prompt": data.prompt_column,
               "completion": data.completion_column, "text": data.text_column}

    def fields_of(fields: dict) -> dict:
        if fields.get("messages") is not None:
            return {"messages": sft_messages(fields["messages"]), "text": None}
        if fields.get("prompt") is not None and fields.get("completion") is not None:
            reply = {"role": "assistant", "content": reply_text(fields["completion"])}
            return {"messages": [*prompt_messages(fields["prompt"]), reply], "text": None}
        if fields.get("text") is not None:
            return {"messages": [], "text": fields["text"]}
        raise ValueError(f"no example: a row needs a conversation (column {data.messages_column!r}), a prompt and "
                         f"its completion (columns {data.prompt_column!r}, {data.completion_column!r}) or plain "
                         f"text (column {data.text_column!r})")

    optional = {"messages": CONVERSATION, "prompt": PROMPT, "completion": COMPLETION, "text": str}
    df = _load(data, path or data.path, "conversations", {}, optional, columns, fields_of)
    text = pd.Series([t if isinstance(t, str) else None for t in df["text"]], dtype=object)  # None, not NaN
    return df.assign(example_id=np.arange(len(df), dtype=np.int64), text=text)[["example_id", "messages", "text"]]


def split_conversations(data: SFTDataConfig, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, held out) SFT examples; without `eval_path`, a seeded `eval_fraction` of them is held out."""
    train = read_conversations(data)
    if data.eval_path is not None:
        return train, read_conversations(data, data.eval_path)
    return _held_out_rows(train, data.eval_fraction, seed)


@task(name="load-conversation-dataset", **STAGE_TASK_OPTIONS)
def load_conversation_dataset(data: SFTDataConfig, dataset_sha256s: list[str], seed: int) -> DataSplits:
    """`split_conversations` as Parquet. `dataset_sha256s` are the files' content hashes: they key the cache, so an
    edited file is re-read."""
    train, held_out = split_conversations(data, seed)
    return DataSplits(train=publish(train, "conversations"), eval=publish(held_out, "conversations"))
