"""The KTO flow end to end: the real Prefect engine (a temporary server), a real MLflow SQLite store, real Parquet
files and checkpoints, a tiny random-init Llama; then a rerun with another learning rate reuses the cached tokens
and reference log-probs. Also, without the engine: the config's rules and the data validation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from flow_helpers import metric_steps, mlflow_run_of, task_states
from pydantic import ValidationError

from flows.kto import kto, summarize_held_out
from rlhf_core.config import KTOConfig, ModelConfig, TrackingConfig, UnpairedDataConfig
from rlhf_core.data import DatasetError
from rlhf_core.io import sha256_dir
from tasks.data import load_unpaired_dataset

PLACES = ["hotel", "diner", "museum", "phone", "novel", "theme park"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_review_examples(path: Path) -> Path:
    """24 unpaired review completions, 4 per prompt: the positive ones are desirable."""
    rows = [{"prompt": f"Write a one-sentence review of the {place}.", "completion": f"The {place} {text}.",
             "label": label}
            for good, bad in [("was wonderful", "was awful"), ("is excellent", "is terrible")]
            for place in PLACES for text, label in [(good, True), (bad, False)]]
    return write_jsonl(path, rows)


@pytest.fixture
def examples_file(tmp_path) -> Path:
    return write_review_examples(tmp_path / "unpaired.jsonl")


def small_config(examples_file, model_dir, optim: dict | None = None, **overrides) -> KTOConfig:
    """2 epochs of 4-example steps; `optim` overrides some of its settings."""
    values = dict(model=ModelConfig(name_or_path=str(model_dir)), keep_checkpoints=1,
                  optim={"epochs": 2, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-3, **(optim or {})},
                  data=UnpairedDataConfig(path=str(examples_file), eval_path=None, eval_fraction=0.25),
                  tracking=TrackingConfig(experiment="kto-e2e", registered_model="tiny-kto"))
    return KTOConfig(**{**values, **overrides})


# ---------------------------------------------------------------- config and data validation (fast)


def test_config_rules():
    config = KTOConfig()
    assert (config.beta, config.desirable_weight, config.undesirable_weight) == (0.1, 1.0, 1.0)
    assert config.tracking.experiment == "kto" and config.tracking.registered_model == "kto-policy"
    assert config.data.path == "data/preferences/train/unpaired.parquet"
    assert [name for model in (KTOConfig, UnpairedDataConfig) for name, field in model.model_fields.items()
            if not field.description] == []
    for bad, location in [({"max_length": 64, "max_prompt_length": 64}, "max_prompt_length=64"),
                          ({"desirable_weight": 0.0}, "desirable_weight"), ({"beta": -0.1}, "beta"),
                          ({"optim": {"batch_size": 0}}, "optim.batch_size"), ({"data": {"labels": "x"}}, "labels")]:
        with pytest.raises(ValidationError, match=location):
            KTOConfig(**bad)
    assert KTOConfig(max_length=None, max_prompt_length=4096).max_length is None


def test_load_holds_out_whole_prompts_and_keeps_bool_labels(rlhf_home, examples_file):
    splits = load_unpaired_dataset.fn(UnpairedDataConfig(path=str(examples_file), eval_path=None,
                                                         eval_fraction=0.25), ["unused"], 0)
    train, held_out = splits.train.read(), splits.eval.read()
    assert list(train.columns) == ["example_id", "prompt", "prompt_messages", "completion", "label"]
    assert train["label"].dtype == bool
    assert held_out["prompt"].nunique() == 2 and len(held_out) == 8 and len(train) == 16  # round(0.25 * 6) = 2
    assert not set(train["prompt"]) & set(held_out["prompt"])


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "a", "completion": "x", "label": 1}], r"line 1: field 'label': expected bool, got int 1"),
    ([{"prompt": "a", "completion": "x", "label": True}, {"prompt": "b", "completion": "", "label": False}],
     r"line 2: field 'completion'"),
    ([{"prompt": "a", "completion": "x", "label": True}, {"prompt": "b", "completion": "y", "label": True}],
     r"train\.jsonl: every row's label is True; KTO needs both"),
    ([{"prompt": "a", "completion": "x", "label": True}, {"prompt": "a", "completion": "y", "label": False}],
     r"train\.jsonl: 1 distinct prompt\(s\) in 2 rows"),
])
def test_load_rejects_bad_data_naming_file_row_and_field(rlhf_home, tmp_path, rows, message):
    eval_rows = [{"prompt": "c", "completion": "z", "label": True}, {"prompt": "d", "completion": "w", "label": False}]
    data = UnpairedDataConfig(path=str(write_jsonl(tmp_path / "train.jsonl", rows)),
                              eval_path=str(write_jsonl(tmp_path / "eval.jsonl", eval_rows)))
    with pytest.raises(DatasetError, match=message):
        load_unpaired_dataset.fn(data, ["unused"], 0)


def test_renamed_columns_are_read(rlhf_home, tmp_path):
    rows = [{"q": p, "a": c, "good": g} for p, c, g in [("a", "x", True), ("b", "y", False)]]
    path = write_jsonl(tmp_path / "renamed.jsonl", rows)
    data = UnpairedDataConfig(path=str(path), eval_path=str(path), prompt_column="q", completion_column="a",
                              label_column="good")
    assert load_unpaired_dataset.fn(data, ["unused"], 0).train.read()["completion"].tolist() == ["x", "y"]


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_kto_flow_end_to_end_then_rerun_reuses_tokens_and_reference_logprobs(prefect_harness, rlhf_home,
                                                                              examples_file, tiny_model_dir):
    state = kto(small_config(examples_file, tiny_model_dir), return_state=True)
    final_checkpoint = state.result()
    run = mlflow_run_of(state.state_details.flow_run_id)
    client = mlflow.MlflowClient()

    # Parquet: examples (train 16, eval 8), tokens and reference log-probs of each, per-epoch metrics and scores
    for stage, count in [("unpaired", 2), ("kto-tokens", 2), ("kto-reference", 2), ("kto-metrics", 2),
                         ("kto-eval", 2)]:
        assert len(list((rlhf_home / "artifacts" / stage).glob("*.parquet"))) == count, stage
    assert not list(rlhf_home.rglob(".tmp-*"))
    assert [p.name for p in (rlhf_home / "checkpoints").iterdir()] == [Path(final_checkpoint).name]  # pruned
    references = [pd.read_parquet(p) for p in (rlhf_home / "artifacts" / "kto-reference").glob("*.parquet")]
    assert sorted(len(df) for df in references) == [8, 16]
    for df in references:
        assert (df[["ref_logps", "ref_mismatched_logps"]] < 0).all().all()
        assert all(df["prompt"][j] != df["prompt"][i] for i, j in enumerate(df["mismatched_row"]))
        assert {"prompt_ids", "completion_ids", "mismatched_ids"} <= set(df)

    # MLflow: params, one point per epoch, the eval Parquet, a registered version per epoch
    assert run.info.status == "FINISHED" and run.data.params["beta"] == "0.1"
    for key in ["loss/train", "loss/kto", "rewards/desirable", "rewards/undesirable", "rewards/margins",
                "logps/desirable", "logps/undesirable", "kl", "policy/grad_norm", "eval/rewards/desirable",
                "eval/rewards/undesirable", "eval/rewards/margins", "eval/rewards/accuracies", "eval/kl",
                "time/train_s",
                "time/eval_s", "time/tracking_s"]:
        assert metric_steps(run.info.run_id, key) == [0, 1], key
    scores = pd.read_parquet(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                                 artifact_path="data/epoch_001/eval.parquet"))
    assert len(scores) == 8 and {"rewards", "logps", "mismatched_logps", "ref_logps"} <= set(scores)
    assert scores["rewards"].to_numpy() == pytest.approx(0.1 * (scores["logps"] - scores["ref_logps"]).to_numpy(),
                                                         abs=1e-5)
    expected = summarize_held_out(scores)
    for key in ["rewards/accuracies", "kl", "rewards/margins"]:
        logged = client.get_metric_history(run.info.run_id, f"eval/{key}")[-1].value
        assert logged == pytest.approx(expected[key], abs=1e-6), key
    assert not math.isnan(expected["rewards/accuracies"])  # 2 held-out prompts x 2 desirable x 2 undesirable = 8 pairs

    versions = client.search_model_versions("name = 'tiny-kto'")
    assert sorted(v.tags["iteration"] for v in versions) == ["0", "1"]
    newest = client.get_model_version_by_alias("tiny-kto", "newest")
    assert newest.tags["iteration"] == "1" and newest.tags["checkpoint_sha256"] == sha256_dir(final_checkpoint)

    # Another learning rate on the same data and model: tokens and reference are cache hits, training reruns
    rerun = kto(small_config(examples_file, tiny_model_dir, optim={"lr": 5e-4}), return_state=True)
    rerun.result()
    states = task_states(rerun.state_details.flow_run_id)
    assert [s for name, s in states if name == "tokenize-unpaired"] == ["Cached", "Cached"]
    assert [s for name, s in states if name == "compute-kto-reference-logprobs"] == ["Cached", "Cached"]
    assert [s for name, s in states if name == "train-kto-epoch"] == ["Completed", "Completed"]
