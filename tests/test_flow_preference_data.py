"""The preference-data flow end to end on a tiny random-init Llama: the real Prefect engine (a temporary server), a
real MLflow SQLite store, real Parquet files. A reward judge, then a rerun that is all cache hits; a human judge
answered through Prefect's API from another thread, then a rerun that reuses the answers without pausing."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import mlflow
import pandas as pd
import pytest
from flow_helpers import mlflow_run_of, task_states
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
from prefect.client.schemas.objects import StateType
from prefect.flow_runs import resume_flow_run

from flows.preference_data import preference_data
from rlhf_core.config import (DataConfig, GenerationConfig, JudgeConfig, ModelConfig, PreferenceDatasetConfig,
                              RewardSpec, TrackingConfig)
from rlhf_core.preference_data import make_pairs, review_batches

pytestmark = pytest.mark.slow
PLACES = ["hotel", "diner", "museum", "phone", "novel", "theme park"]
CACHED = ["load-prompt-dataset", "sample-prompts", "generate-rollouts", "judge-with-rewards", "build-preference-data"]


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Write a one-sentence review of the {p}."}) + "\n" for p in PLACES))
    return path


def small_config(prompts_file, model_dir, **overrides) -> PreferenceDatasetConfig:
    values = dict(model=ModelConfig(name_or_path=str(model_dir)), data=DataConfig(path=str(prompts_file),
                                                                                  extra_columns=[]),
                  num_prompts=4, generation=GenerationConfig(group_size=4, max_new_tokens=12, temperature=1.0),
                  judge=JudgeConfig(rewards=[RewardSpec(function="response_length")]), min_gap=0.02,
                  tracking=TrackingConfig(experiment="preference-e2e"))
    return PreferenceDatasetConfig(**{**values, **overrides})


def only_parquet(stage_dir: Path) -> pd.DataFrame:
    files = list(stage_dir.glob("*.parquet"))
    assert len(files) == 1, stage_dir
    return pd.read_parquet(files[0])


def test_reward_judge_end_to_end_then_rerun_is_all_cache_hits(prefect_harness, rlhf_home, prompts_file,
                                                              tiny_model_dir, tmp_path):
    config = small_config(prompts_file, tiny_model_dir, output_dir=str(tmp_path / "out"))
    state = preference_data(config, return_state=True)
    assert state.result() == str(tmp_path / "out")

    # Parquet: 4 of the 6 prompts x 4 responses, judged by -words/100; every pair clears min_gap
    judged = only_parquet(rlhf_home / "artifacts" / "judged")
    assert len(judged) == 16 and judged["prompt_id"].nunique() == 4
    assert judged["score"].tolist() == [-len(r.split()) / 100 for r in judged["response"]]
    pairs, unpaired = (pd.read_parquet(tmp_path / "out" / f"{name}.parquet") for name in ("pairs", "unpaired"))
    assert list(pairs.columns) == ["prompt_id", "prompt", "chosen", "rejected", "chosen_score", "rejected_score",
                                   "chosen_index", "rejected_index", "judge"]
    assert list(unpaired.columns) == ["prompt_id", "prompt", "sample_index", "completion", "label", "score", "judge"]
    assert len(pairs) > 0 and (pairs["chosen_score"] > pairs["rejected_score"] + 0.02 - 1e-9).all()
    assert (pairs["judge"] == "response_length").all() and unpaired["label"].any() and (~unpaired["label"]).any()
    assert pairs.equals(make_pairs(judged, "all", 0.02, "response_length"))
    assert pairs.equals(only_parquet(rlhf_home / "artifacts" / "preference-pairs"))
    assert not list(rlhf_home.rglob(".tmp-*")) and not list((tmp_path / "out").glob(".tmp-*"))

    # MLflow: params, one batch of metrics, both Parquet files and the judged samples
    run = mlflow_run_of(state.state_details.flow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["pairing"] == "all" and run.data.params["judge.kind"] == "reward"
    metrics = run.data.metrics
    assert metrics["data/prompts"] == 4 and metrics["data/responses"] == 16
    assert metrics["pairs/count"] == len(pairs) and metrics["unpaired/desirable"] == unpaired["label"].sum()
    assert metrics["pairs/gap_mean"] == pytest.approx((pairs["chosen_score"] - pairs["rejected_score"]).mean())
    assert metrics["judge/score_mean"] == pytest.approx(judged["score"].mean())
    assert {"data/empty_responses", "unpaired/undesirable", "time/generation_s", "time/judge_s"} <= set(metrics)
    logged = [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "data")]
    assert logged == ["data/pairs.parquet", "data/samples.parquet", "data/unpaired.parquet"]

    # The same config again: every stage is a cache hit; the export (uncached) rewrites the same files
    rerun = preference_data(config, return_state=True)
    assert rerun.result() == str(tmp_path / "out")
    states = dict(task_states(rerun.state_details.flow_run_id))
    assert {name: states[name] for name in CACHED} == {name: "Cached" for name in CACHED}
    assert states["export-preference-data"] == "Completed"
    assert pd.read_parquet(tmp_path / "out" / "pairs.parquet").equals(pairs)

    too_many = preference_data(small_config(prompts_file, tiny_model_dir, num_prompts=7), return_state=True)
    with pytest.raises(ValueError, match=r"num_prompts=7 exceeds the 6 prompts of .*prompts\.jsonl"):
        too_many.result()


class HumanJudge(threading.Thread):
    """Answers every pause it sees through Prefect's API, like a person in the UI: response 2 for every prompt,
    except "skip" for the last prompt of the last form. Records (description, schema, answer) per pause."""

    def __init__(self, forms: int):
        super().__init__(daemon=True)
        self.forms, self.answered, self.stop, self.errors = forms, [], threading.Event(), []

    def run(self):
        try:
            with get_client(sync_client=True) as client:
                while not self.stop.is_set():
                    paused = client.read_flow_runs(flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                        type=FlowRunFilterStateType(any_=[StateType.PAUSED]))))
                    for run in paused:
                        self.answer(client, run)
                    time.sleep(0.2)
        except Exception as e:  # surfaced by the test, not lost in the thread
            self.errors.append(e)

    def answer(self, client, run):
        keyset = run.state.state_details.run_input_keyset
        try:  # the flow saves the form (schema, then description) just after it pauses
            description = json.loads(client.read_flow_run_input(run.id, keyset["description"]))
            schema = json.loads(client.read_flow_run_input(run.id, keyset["schema"]))
        except httpx.HTTPStatusError:
            return
        fields = list(schema["properties"])
        last_form = len(self.answered) + 1 == self.forms
        answer = {f: "skip" if last_form and f == fields[-1] else "2" for f in fields}
        resume_flow_run(run.id, run_input=answer)
        self.answered.append((description, schema, answer))


def paused_count(flow_run_id) -> int:
    with get_client(sync_client=True) as client:
        return sum(s.type == StateType.PAUSED for s in client.read_flow_run_states(flow_run_id))


def test_human_judge_answered_through_the_prefect_api_then_rerun_reuses_the_answers(prefect_harness, rlhf_home,
                                                                                   prompts_file, tiny_model_dir):
    config = small_config(prompts_file, tiny_model_dir, num_prompts=3, judge=JudgeConfig(
        kind="human", human_batch_size=2, human_timeout_s=120, poll_interval_s=1),
        tracking=TrackingConfig(experiment="preference-e2e", log_rollouts=False))
    judge = HumanJudge(forms=2)  # ceil(3 prompts / 2 per form)
    judge.start()
    try:
        state = preference_data(config, return_state=True)
    finally:
        judge.stop.set()
        judge.join()
    assert not judge.errors and state.is_completed()
    assert paused_count(state.state_details.flow_run_id) == 2 and len(judge.answered) == 2

    # Each form showed its prompts and their numbered responses; the answers are exactly the pairs
    rollouts = only_parquet(rlhf_home / "artifacts" / "rollouts")
    batches = review_batches(rollouts, batch_size=2)
    assert [b["prompt_id"].nunique() for b in batches] == [2, 1]  # every prompt has >= 2 non-empty responses
    expected_pairs = []
    for batch, (description, schema, answer) in zip(batches, judge.answered):
        assert list(schema["properties"]) == [f"prompt_{n}" for n in range(1, batch["prompt_id"].nunique() + 1)]
        for n, (prompt_id, group) in enumerate(batch.groupby("prompt_id"), start=1):
            assert f"**Prompt {n}.** {group['prompt'].iloc[0]}" in description
            assert schema["properties"][f"prompt_{n}"]["enum"][-1] == "skip"
            if answer[f"prompt_{n}"] == "2":  # response 2 (sample_index 1) beats every other distinct text
                chosen = group["response"].iloc[1]
                expected_pairs += [(prompt_id, 1, k) for k, r in zip(group["sample_index"], group["response"])
                                   if k != 1 and r.strip() != chosen.strip()]
    folder = Path(state.result())
    assert folder.parent == rlhf_home / "preference-data"  # no output_dir: a folder named by the files' hashes
    pairs = pd.read_parquet(folder / "pairs.parquet")
    assert list(zip(pairs["prompt_id"], pairs["chosen_index"], pairs["rejected_index"])) == expected_pairs
    assert (pairs["judge"] == "human").all() and (pairs["chosen_score"] == 1.0).all()
    assert (pairs["rejected_score"] == 0.0).all()
    unpaired = pd.read_parquet(folder / "unpaired.parquet")
    assert unpaired.loc[unpaired["label"], "sample_index"].tolist() == [1, 1]  # the skipped prompt gives nothing
    run = mlflow_run_of(state.state_details.flow_run_id)
    assert run.data.metrics["pairs/gap_mean"] == 1.0 and run.data.metrics["judge/abstained"] == 4  # the skip
    assert [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "data")] == [
        "data/pairs.parquet", "data/unpaired.parquet"]  # log_rollouts=False: no samples.parquet

    # The same config again: the answers are on disk, so the run completes without pausing
    rerun = preference_data(config, return_state=True)
    assert rerun.is_completed() and paused_count(rerun.state_details.flow_run_id) == 0
    assert pd.read_parquet(Path(rerun.result()) / "pairs.parquet").equals(pairs)
