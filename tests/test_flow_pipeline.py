"""`rlhf pipeline` end to end on tiny models: SFT -> preference data -> reward model (MiniLM) -> PPO -> evaluation,
each a subflow with its own MLflow run nested under the pipeline's; the lineage tags lead from the final version
back to the SFT version and from there to the base model and the data; a crash in the PPO stage, rerun, replays
every earlier stage from the cache and ends on the uninterrupted run's checkpoint."""

from __future__ import annotations

import json

import mlflow
import pytest
from flow_helpers import failing_call, mlflow_run_of, task_states
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

import rlhf_core.training
from flows.pipeline import pipeline
from rlhf_core.config.pipeline import PipelineConfig
from tasks.paths import use_tracking_uri

pytestmark = pytest.mark.slow
PLACES = ["hotel", "diner", "museum", "phone", "novel", "theme park"]


def tiny_pipeline(tmp_path, model_dir) -> PipelineConfig:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Review the {p}."}) + "\n" for p in PLACES))
    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text("".join(json.dumps({"prompt": f"Review the {p}.", "completion": f"The {p} was lovely."})
                                + "\n" for p in PLACES))
    small = {"max_new_tokens": 8, "temperature": 1.0}
    return PipelineConfig(
        algorithm="ppo",
        sft={"model": {"name_or_path": str(model_dir)}, "data": {"path": str(sft_data), "eval_path": None,
                                                                   "eval_fraction": 0.34},
             "optim": {"epochs": 1, "batch_size": 4, "micro_batch_size": 4, "lr": 1e-3}, "max_length": 64},
        preference_data={"data": {"path": str(prompts), "extra_columns": []}, "num_prompts": 6,
                         "generation": {"group_size": 3, **small}, "min_gap": 0.01,
                         "judge": {"rewards": [{"function": "response_length"}]}},
        reward_model={"optim": {"epochs": 1, "batch_size": 8}, "data": {"eval_fraction": 0.25}},
        ppo={"iterations": 1, "prompts_per_iteration": 2, "data": {"path": str(prompts), "extra_columns": []},
             "generation": {"group_size": 1, **small}, "rewards": [{"function": "response_length"}],
             "optim": {"lr": 1e-3, "micro_batch_size": 2, "epochs": 1, "mini_batches": 1}},
        evaluation={"data": {"path": str(prompts), "extra_columns": []}, "num_prompts": 2,
                    "generation": {"group_size": 1, **small}, "rewards": [{"function": "response_length"}]},
        tracking={"experiment": "tiny-pipeline"})


def test_pipeline_end_to_end_with_lineage_then_a_crash_in_ppo_resumes_from_the_cache(
        prefect_harness, tmp_path, tiny_model_dir, monkeypatch, reliability):
    config = tiny_pipeline(tmp_path, tiny_model_dir)
    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "uninterrupted"))
    state = pipeline(config, return_state=True)
    summary = state.result()
    assert summary["decision"] and "promoted" in summary

    # MLflow: the pipeline's run, and one nested run per stage in its experiment
    use_tracking_uri()
    parent = mlflow_run_of(state.state_details.flow_run_id)
    children = mlflow.search_runs(experiment_names=["tiny-pipeline"], output_format="list",
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 5  # sft, preference data, reward model, ppo, evaluation
    # lineage: PPO's version started from the SFT version, which started from the base model and its data
    client = mlflow.MlflowClient()
    ppo_version = client.get_model_version_by_alias("pipeline-ppo", "newest")
    sft_uri = ppo_version.tags["lineage.start_model"]
    assert sft_uri.startswith("models:/pipeline-sft/")
    sft_version = client.get_model_version("pipeline-sft", sft_uri.rsplit("/", 1)[1])
    assert sft_version.tags["lineage.start_model"] == str(tiny_model_dir)
    assert sft_version.tags["lineage.data"] == str(tmp_path / "sft.jsonl")
    rm_version = client.get_model_version_by_alias("pipeline-reward-model", "newest")
    assert rm_version.tags["lineage.data"].endswith("pairs.parquet")
    with get_client(sync_client=True) as prefect_client:
        subflows = prefect_client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])))
    assert len(subflows) >= 5
    uninterrupted = ppo_version.tags["checkpoint_sha256"]

    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "crashed"))
    with failing_call(rlhf_core.training, "save_trained", call=3):  # the saves: sft 1, reward model 2, ppo 3
        crashed = pipeline(config, return_state=True)
    assert crashed.is_failed()
    resumed = pipeline(config, return_state=True)
    resumed.result()
    with get_client(sync_client=True) as prefect_client:
        subflows = prefect_client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[resumed.state_details.flow_run_id])))
    states = {name: state for run in subflows for name, state in task_states(run.id)}
    for finished_before in ("train-sft-epoch", "generate-rollouts", "train-reward-model-epoch"):
        assert states[finished_before] == "Cached", (finished_before, states)
    use_tracking_uri()
    resumed_version = mlflow.MlflowClient().get_model_version_by_alias("pipeline-ppo", "newest")
    assert resumed_version.tags["checkpoint_sha256"] == uninterrupted
    reliability.record("crash", "a crash in the PPO stage of `rlhf pipeline`",
                       "the rerun replays SFT, preference data and the reward model from the cache and ends on "
                       "the uninterrupted run's checkpoint")
