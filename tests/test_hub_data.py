"""Data sets by name: a hub id `org/name` read offline from the local `datasets` cache, and a local folder of data
files, through the flow-facing functions of tasks/data.py.

The cache entries are built without network, by `datasets`' own JSON builder, in the layout `load_dataset` leaves
after a download and finds again offline (datasets 5.x, `packaged_modules/cache`):

    $HF_DATASETS_CACHE/<org>___<snake_case name>/<config>/<version>/<commit sha>/
        dataset_info.json              (its config_name must be the <config> folder's name)
        <snake_case name>-<split>.arrow

Offline, `load_dataset("org/name", name=subset, split=...)` finds the newest such folder (by mtime) of the config
and reads its Arrow files memory-mapped. Every test here runs with sockets refused, so nothing is downloaded.
"""

import json
import os
import socket
import time

import datasets
import pytest
from datasets.naming import camelcase_to_snakecase
from datasets.packaged_modules.json.json import Json

from rlhf_core.config import DataConfig, PreferenceDataConfig
from rlhf_core.data import DatasetError
from tasks.data import dataset_fingerprints, read_prompts, split_pairs


def cache_hub_dataset(cache, repo_id: str, splits: dict[str, list[dict]], config: str = "default",
                      commit: str = "0" * 40) -> None:
    """Put `splits` into the datasets cache `cache` as if `load_dataset(repo_id, config)` had downloaded them at
    `commit`: the JSON builder writes the Arrow files and dataset_info.json, then its folder is named as a hub
    download's (<org>___<name> instead of <name>)."""
    org, name = repo_id.split("/")
    sources = cache.parent / f"sources-{org}-{name}-{config}-{commit[:8]}"
    sources.mkdir(parents=True)
    files = {}
    for split, rows in splits.items():
        files[split] = str(sources / f"{split}.jsonl")
        (sources / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    staging = cache.parent / f"staging-{org}-{name}-{config}-{commit[:8]}"
    Json(cache_dir=str(staging), dataset_name=name, config_name=config, config_id=config, hash=commit,
         data_files=files).download_and_prepare()
    built = staging / camelcase_to_snakecase(name) / config
    version = cache / f"{org}___{camelcase_to_snakecase(name)}" / config / "0.0.0"
    version.mkdir(parents=True, exist_ok=True)
    (built / "0.0.0" / commit).rename(version / commit)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty datasets cache in HF_DATASETS_CACHE, offline mode on, and sockets that refuse to connect."""
    cache = tmp_path / "hf-datasets"
    cache.mkdir()
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("the tests read data sets offline: no connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


PROMPTS = {"train": [{"question": f"What is {i} + 1?", "answer": i + 1} for i in range(6)],
           "test": [{"question": "What is 9 + 1?", "answer": 10}]}


def test_a_hub_id_loads_offline_from_the_cache_with_its_split_and_columns(hub_cache, no_network):
    cache_hub_dataset(hub_cache, "some-org/ArithmeticPrompts", PROMPTS)
    data = DataConfig(path="some-org/ArithmeticPrompts", prompt_column="question")
    df = read_prompts(data)
    assert df["prompt"].tolist() == [f"What is {i} + 1?" for i in range(6)] and df["answer"].tolist()[0] == 1
    assert df["prompt_messages"].tolist()[0] == [{"role": "user", "content": "What is 0 + 1?"}]
    test = read_prompts(data.model_copy(update={"split": "test"}))
    assert test["prompt"].tolist() == ["What is 9 + 1?"] and test["answer"].tolist() == [10]
    assert len(read_prompts(data.model_copy(update={"split": "train[:2]"}))) == 2


def test_conversational_pairs_from_the_hub(hub_cache, no_network):
    rows = [{"prompt": f"Q{i}?", "chosen": [{"role": "user", "content": f"Q{i}?"},
                                             {"role": "assistant", "content": "good"}],
             "rejected": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": "bad"}],
             "score_chosen": 9.0, "score_rejected": 1.0} for i in range(10)]
    cache_hub_dataset(hub_cache, "some-org/ultrafeedback_binarized", {"train_prefs": rows, "test_prefs": rows[:2]})
    data = PreferenceDataConfig(path="some-org/ultrafeedback_binarized", split="train_prefs", eval_path=None)
    train, held_out = split_pairs(data, seed=0)
    assert len(train) == 9 and len(held_out) == 1
    assert train[["chosen", "rejected"]].drop_duplicates().values.tolist() == [["good", "bad"]]
    assert train["prompt_messages"].tolist()[0] == [{"role": "user", "content": train["prompt"].iloc[0]}]


def test_a_name_neither_local_nor_cached_is_one_error_saying_how_to_fill_the_cache(hub_cache, no_network):
    with pytest.raises(DatasetError, match=rf"some-org/missing: no such file or folder \(here or in the project "
                                           rf"folder\), and no data set of that name in the local datasets cache "
                                           rf"{hub_cache}\. The pipeline runs offline: .*HF_HUB_OFFLINE=0 .*"
                                           r"load_dataset\('some-org/missing', split='train'\)"):
        read_prompts(DataConfig(path="some-org/missing"))
    with pytest.raises(DatasetError, match="no data set of that name in the local datasets cache"):
        dataset_fingerprints(DataConfig(path="some-org/missing"))


def test_an_unknown_split_names_the_splits(hub_cache, no_network):
    cache_hub_dataset(hub_cache, "some-org/prompts", PROMPTS)
    with pytest.raises(DatasetError, match=r"split 'validation'.*Unknown split \"validation\". Should be one of "
                                           r"\['train', 'test'\]"):
        read_prompts(DataConfig(path="some-org/prompts", prompt_column="question", split="validation"))


def test_a_data_set_with_several_subsets_needs_one_named(hub_cache, no_network):
    cache_hub_dataset(hub_cache, "some-org/multi", {"train": [{"prompt": "from a"}]}, config="a")
    cache_hub_dataset(hub_cache, "some-org/multi", {"train": [{"prompt": "from b"}]}, config="b")
    with pytest.raises(DatasetError, match="multiple 'some-org/multi' configurations in the cache: "):
        read_prompts(DataConfig(path="some-org/multi", extra_columns=[]))
    assert read_prompts(DataConfig(path="some-org/multi", subset="b", extra_columns=[]))["prompt"].tolist() == [
        "from b"]


def test_a_bad_row_of_a_hub_data_set_is_named_by_its_row(hub_cache, no_network):
    cache_hub_dataset(hub_cache, "some-org/bad", {"train": [{"prompt": "ok"}, {"prompt": "fine"}, {"prompt": " "}]})
    with pytest.raises(DatasetError, match=r"some-org/bad row 2: field 'prompt': expected a non-empty string"):
        read_prompts(DataConfig(path="some-org/bad", extra_columns=[]))


def test_the_fingerprint_of_a_hub_id_follows_the_cached_content(hub_cache, no_network):
    cache_hub_dataset(hub_cache, "some-org/prompts", PROMPTS)
    data = DataConfig(path="some-org/prompts")
    first = dataset_fingerprints(data)
    assert first == dataset_fingerprints(data) and len(first[0]) == 64
    # a newer download (another commit) is what load_dataset reads from then on (the newest folder), and is hashed
    cache_hub_dataset(hub_cache, "some-org/prompts", {"train": PROMPTS["train"][:3]}, commit="1" * 40)
    newer = hub_cache / "some-org___prompts" / "default" / "0.0.0" / ("1" * 40)
    os.utime(newer, (time.time() + 10, time.time() + 10))
    assert dataset_fingerprints(data) != first
    assert len(read_prompts(data.model_copy(update={"prompt_column": "question"}))) == 3


def test_a_local_folder_of_data_files_with_a_split(hub_cache, tmp_path):
    folder = tmp_path / "my-prompts"
    folder.mkdir()
    for split, rows in PROMPTS.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = DataConfig(path=str(folder), prompt_column="question", split="test")
    assert read_prompts(data)["prompt"].tolist() == ["What is 9 + 1?"]
    assert len(read_prompts(data.model_copy(update={"split": "train"}))) == 6
    fingerprint = dataset_fingerprints(data)
    (folder / "test.jsonl").write_text(json.dumps({"question": "What is 8 + 1?", "answer": 9}) + "\n")
    assert dataset_fingerprints(data) != fingerprint  # a local folder is hashed file by file


def test_a_split_or_subset_on_a_plain_file_is_refused(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n')
    with pytest.raises(DatasetError, match=r"p\.jsonl: a file has no splits or subsets, but data\.split is 'test'"):
        read_prompts(DataConfig(path=str(path), split="test", extra_columns=[]))
