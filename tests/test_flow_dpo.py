"""The DPO flow end to end: the real Prefect engine (a temporary server), a real MLflow SQLite store, real Parquet
files and checkpoints, a tiny random-init Llama; then a rerun with another learning rate reuses the cached
reference log-probs."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from flow_helpers import failing_call, metric_steps, mlflow_run_of, task_states
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

import rlhf_core.training
from flows.dpo import dpo
from rlhf_core.config import DPOConfig, ModelConfig, PreferenceDataConfig, TrackingConfig
from rlhf_core.io import sha256_dir

pytestmark = pytest.mark.slow
PLACES = ["hotel", "diner", "museum", "phone", "novel", "theme park"]


def write_review_pairs(path: Path) -> Path:
    """12 review pairs: the chosen response is the positive one."""
    rows = [{"prompt": f"Write a one-sentence review of the {place}.", "chosen": f"The {place} {good}.",
             "rejected": f"The {place} {bad}."}
            for good, bad in [("was wonderful", "was awful"), ("is excellent", "is terrible")] for place in PLACES]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    return write_review_pairs(tmp_path / "pairs.jsonl")


def small_config(pairs_file, model_dir, optim: dict | None = None, **overrides) -> DPOConfig:
    """2 epochs of 4-pair steps; `optim` overrides some of its settings."""
    values = dict(model=ModelConfig(name_or_path=str(model_dir)), keep_checkpoints=1,
                  optim={"epochs": 2, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-3, **(optim or {})},
                  data=PreferenceDataConfig(path=str(pairs_file), eval_path=None, eval_fraction=0.25),
                  tracking=TrackingConfig(experiment="dpo-e2e", registered_model="tiny-dpo"))
    return DPOConfig(**{**values, **overrides})


def test_dpo_flow_end_to_end_then_rerun_reuses_reference_logprobs(prefect_harness, rlhf_home, pairs_file,
                                                                  tiny_model_dir):
    state = dpo(small_config(pairs_file, tiny_model_dir), return_state=True)
    final_checkpoint = state.result()
    run = mlflow_run_of(state.state_details.flow_run_id)
    client = mlflow.MlflowClient()

    # Parquet: pairs (train 9, eval 3), reference log-probs of each, per-epoch step metrics and eval rewards
    for stage, count in [("preferences", 2), ("dpo-tokens", 2), ("dpo-reference", 2), ("dpo-metrics", 2),
                         ("dpo-eval", 2)]:
        assert len(list((rlhf_home / "artifacts" / stage).glob("*.parquet"))) == count, stage
    assert not list(rlhf_home.rglob(".tmp-*"))
    assert [p.name for p in (rlhf_home / "checkpoints").iterdir()] == [Path(final_checkpoint).name]  # pruned
    references = [pd.read_parquet(p) for p in (rlhf_home / "artifacts" / "dpo-reference").glob("*.parquet")]
    assert sorted(len(df) for df in references) == [3, 9]
    assert all((df[["ref_chosen_logps", "ref_rejected_logps"]] < 0).all().all() for df in references)

    # MLflow: params, one point per epoch, the eval Parquet, a registered version per epoch
    assert run.info.status == "FINISHED" and run.data.params["loss_type"] == "sigmoid"
    for key in ["loss/train", "loss/dpo", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "rewards/accuracies", "logps/chosen", "logps/rejected", "policy/grad_norm",
                "eval/rewards/accuracies", "eval/rewards/margins", "time/train_s", "time/eval_s"]:
        assert metric_steps(run.info.run_id, key) == [0, 1], key
    scores = pd.read_parquet(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                                 artifact_path="data/epoch_001/eval.parquet"))
    assert len(scores) == 3 and {"chosen_rewards", "rejected_rewards", "ref_chosen_logps"} <= set(scores)
    accuracy = client.get_metric_history(run.info.run_id, "eval/rewards/accuracies")[-1].value
    assert accuracy == pytest.approx((scores["chosen_rewards"] > scores["rejected_rewards"]).mean())
    assert scores["chosen_rewards"].to_numpy() == pytest.approx(
        0.1 * (scores["chosen_logps"] - scores["ref_chosen_logps"]).to_numpy(), abs=1e-5)

    versions = client.search_model_versions("name = 'tiny-dpo'")
    assert sorted(v.tags["iteration"] for v in versions) == ["0", "1"]
    newest = client.get_model_version_by_alias("tiny-dpo", "newest")
    assert newest.tags["iteration"] == "1" and newest.tags["checkpoint_sha256"] == sha256_dir(final_checkpoint)

    # Prefect: the flow run links to its MLflow run and carries a markdown summary of it
    with get_client(sync_client=True) as prefect_client:
        artifacts = prefect_client.read_artifacts(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    by_key = {a.key: a for a in artifacts if a.key}
    assert run.info.run_id in by_key["mlflow-run"].data  # a link artifact is stored as markdown holding the URL
    summary = by_key["run-summary"].data
    assert run.info.run_id in summary and "FINISHED" in summary and "eval/rewards/accuracies" in summary
    assert "models:/tiny-dpo/" in summary

    # Another learning rate on the same data and model: the reference stage is a cache hit, training reruns
    rerun = dpo(small_config(pairs_file, tiny_model_dir, optim={"lr": 5e-4}), return_state=True)
    rerun.result()
    states = task_states(rerun.state_details.flow_run_id)
    assert [s for name, s in states if name == "tokenize-pairs"] == ["Cached", "Cached"]
    assert [s for name, s in states if name == "compute-reference-logprobs"] == ["Cached", "Cached"]
    assert [s for name, s in states if name == "train-dpo-epoch"] == ["Completed", "Completed"]


def test_max_length_cuts_the_prompt_start_then_the_responses(prefect_harness, rlhf_home, pairs_file, tiny_model_dir):
    dpo(small_config(pairs_file, tiny_model_dir, optim={"epochs": 1}, max_length=24, max_prompt_length=16))
    for path in (rlhf_home / "artifacts" / "dpo-tokens").glob("*.parquet"):
        tokens = pd.read_parquet(path)
        for prompt, chosen, rejected in zip(tokens["prompt_ids"], tokens["chosen_ids"], tokens["rejected_ids"]):
            assert len(prompt) <= 16 and len(prompt) + max(len(chosen), len(rejected)) <= 24
        assert tokens["truncated"].all()  # the chat template alone is longer than 24 tokens
    references = [pd.read_parquet(p) for p in (rlhf_home / "artifacts" / "dpo-reference").glob("*.parquet")]
    assert all(len(df) and "prompt_ids" in df for df in references)  # the reference scored the cut tokens


def test_crash_in_epoch_1_then_rerun_resumes_and_matches_uninterrupted_run(prefect_harness, tmp_path, monkeypatch,
                                                                          pairs_file, tiny_model_dir):
    config = small_config(pairs_file, tiny_model_dir)
    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "uninterrupted"))
    uninterrupted = sha256_dir(dpo(config))

    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "crashed"))
    with failing_call(rlhf_core.training, "save_trained", call=2):  # epoch 1 dies before its checkpoint is written
        crashed = dpo(config, return_state=True)
    assert crashed.is_failed()
    assert mlflow_run_of(crashed.state_details.flow_run_id).info.status == "FAILED"
    assert len(list((tmp_path / "crashed" / "checkpoints").iterdir())) == 1  # epoch 0's; no partial one

    resumed = dpo(config, return_state=True)
    stages = task_states(resumed.state_details.flow_run_id)
    assert [s for name, s in stages if name == "train-dpo-epoch"] == ["Cached", "Completed"]
    assert [s for name, s in stages if name == "compute-reference-logprobs"] == ["Cached", "Cached"]
    assert dict(stages)["load-preference-dataset"] == "Cached"
    assert sha256_dir(resumed.result()) == uninterrupted
