"""The preference-data flow: sample G responses per prompt -> judge them (rewards, or a person in the Prefect UI)
-> pairs and unpaired labels -> Parquet files a DPO, reward-model or KTO run can read.

Any policy, any G, any judge (the shipped data/preferences set: VADER, G = 4; see
docs/algorithms/preference-data.md). Every stage but the human judge is a cached task keyed on content, so a rerun
with the same config replays them; the human's answers are kept per batch (tasks/preference_data.py), so a rerun
asks nobody twice, and a deployment's run waits for them suspended (no process, no concurrency slot). One MLflow run,
opened once the responses are judged, holds the params, the dataset's counts and both Parquet files.

The result is a folder holding pairs.parquet and unpaired.parquet: `output_dir` when set, else
`$RLHF_HOME/preference-data/<hash of both files>`.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from flows.inputs import (check_num_prompts, check_output_folder, check_runtime, resolve_prompts,
                          resolve_rewards)
from flows.tracking import StageClock, Tracker, mlflow_run
from rlhf_core.config import PreferenceDatasetConfig, TrackingConfig
from rlhf_core.errors import UserInputError
from rlhf_core.model_files import check_causal_lm
from rlhf_core.preference_data import preference_metrics
from tasks.data import sample_prompts
from tasks.models import resolve_model, resolve_start_model
from tasks.preference_data import (PreferenceRefs, build_preference_data, export_preference_data, judge_by_human,
                                   judge_pairwise, judge_with_rewards)
from tasks.refs import ArtifactRef
from tasks.rollouts import generate_rollouts


@flow(name="preference-data", log_prints=True)
def preference_data(config: PreferenceDatasetConfig = PreferenceDatasetConfig()) -> str:
    """Sample, judge and pair responses; returns the folder holding pairs.parquet and unpaired.parquet."""
    check_runtime(config.runtime)
    judge = config.judge
    sources = resolve_rewards(judge.rewards, config.data.extra_columns) if judge.kind == "reward" else None
    judge_model = resolve_model(judge.pairwise.model) if judge.kind == "pairwise" else None
    if judge_model is not None:
        check_causal_lm(Path(judge_model.path), f"the pairwise judge {judge.pairwise.model}")
    dataset = resolve_prompts(config.data)
    policy = resolve_start_model(config.model)
    check_output_folder(config.output_dir)
    check_num_prompts(config.num_prompts, dataset.rows, config.data.path)  # a second epoch would repeat prompts

    clock = StageClock()
    with clock("prompts"):
        prompts = dataset if config.num_prompts is None else sample_prompts(dataset, config.num_prompts, 0,
                                                                            config.seed)
    with clock("generation"):
        rollouts = generate_rollouts(policy, prompts, config.generation, config.runtime, config.data.system_prompt,
                                     config.seed, 0, config.model.trust_remote_code)
    # Judged before the MLflow run opens: a deployment's human judge suspends the run (its process exits until the
    # answer), which would mark an open MLflow run FAILED for as long as the person takes.
    with clock("judge"):
        if judge.kind == "human":
            judged = judge_by_human(rollouts, judge.human_batch_size, judge.human_timeout_s, judge.poll_interval_s)
        elif judge.kind == "pairwise":  # every two responses to a prompt, both orders: batches of batch_size
            judged = judge_pairwise(rollouts, judge_model, judge.pairwise, config.runtime, config.generation.batch_size)
        else:  # reward models score in batches of generation.batch_size texts
            judged = judge_with_rewards(rollouts, sources, config.runtime, config.generation.batch_size)

    with mlflow_run(config.tracking.experiment, config, flow_run.id, flow_run.name) as tracker:
        with clock("pairing"):
            data = build_preference_data(judged, config.pairing, config.min_gap, judge.name)
        if data.pairs.rows == 0:  # an empty pairs file would only fail the next flow, with less to go on
            raise UserInputError(f"the judge {judge.name} put no two responses to the same prompt min_gap="
                                 f"{config.min_gap} apart in {prompts.rows} prompts, so there are no pairs: lower "
                                 "min_gap, raise generation.group_size or temperature, or use another judge")
        folder = export_preference_data(data, config.output_dir)
        metrics = log_preference_data(tracker, judged, data, clock, config.tracking)
        print(f"{metrics['pairs/count']} pairs, {metrics['unpaired/desirable']} desirable and "
              f"{metrics['unpaired/undesirable']} undesirable responses from {metrics['data/prompts']} prompts "
              f"(judge {judge.name}) in {folder}")
    return folder


def log_preference_data(tracker: Tracker, judged: ArtifactRef, data: PreferenceRefs,
                        stage_seconds: dict[str, float], tracking: TrackingConfig) -> dict[str, float]:
    """Both Parquet files (and every judged response when tracking.log_rollouts), then one batch of metrics
    (returned)."""
    start = time.perf_counter()
    files = {"pairs.parquet": data.pairs.path, "unpaired.parquet": data.unpaired.path}
    tracker.log_files(files | ({"samples.parquet": judged.path} if tracking.log_rollouts else {}), "data")
    metrics = {
        **preference_metrics(judged.read(), data.pairs.read(), data.unpaired.read()),
        **{f"time/{stage}_s": seconds for stage, seconds in stage_seconds.items()},
        "time/tracking_s": time.perf_counter() - start,
    }
    tracker.log_metrics(metrics, step=0)
    return metrics
