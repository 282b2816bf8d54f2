"""The preference-data flow: sample G responses per prompt -> judge them (rewards, or a person in the Prefect UI)
-> pairs and unpaired labels -> Parquet files a DPO, reward-model or KTO run can read.

Any policy, any G, any judge (the shipped data/preferences set: VADER, G = 4; see
docs/algorithms/preference-data.md). Every stage but the human judge is a cached task keyed on content, so a rerun
with the same config replays them; the human's answers are kept per batch (tasks/preference_data.py), so a rerun
asks nobody twice. One MLflow run holds the params, the dataset's counts and both Parquet files.

The result is a folder holding pairs.parquet and unpaired.parquet: `output_dir` when set, else
`$RLHF_HOME/preference-data/<hash of both files>`.
"""

from __future__ import annotations

import time

from prefect import flow
from prefect.runtime import flow_run

from flows.inputs import resolve_prompts, resolve_rewards
from flows.tracking import StageClock, Tracker, mlflow_run
from rlhf_core.config import PreferenceDatasetConfig, TrackingConfig
from rlhf_core.preference_data import preference_metrics
from tasks.data import sample_prompts
from tasks.models import resolve_start_model
from tasks.preference_data import (PreferenceRefs, build_preference_data, export_preference_data, judge_by_human,
                                   judge_with_rewards)
from tasks.refs import ArtifactRef
from tasks.rollouts import generate_rollouts


@flow(name="preference-data", log_prints=True)
def preference_data(config: PreferenceDatasetConfig = PreferenceDatasetConfig()) -> str:
    """Sample, judge and pair responses; returns the folder holding pairs.parquet and unpaired.parquet."""
    judge = config.judge
    sources = resolve_rewards(judge.rewards, config.data.extra_columns) if judge.kind == "reward" else None
    dataset = resolve_prompts(config.data)
    policy = resolve_start_model(config.model)
    if config.num_prompts is not None and config.num_prompts > dataset.rows:  # a second epoch would repeat prompts
        raise ValueError(f"num_prompts={config.num_prompts} exceeds the {dataset.rows} prompts of {config.data.path}")

    with mlflow_run(config.tracking.experiment, config, flow_run.id, flow_run.name) as tracker:
        clock = StageClock()
        with clock("prompts"):
            prompts = dataset if config.num_prompts is None else sample_prompts(dataset, config.num_prompts, 0,
                                                                                config.seed)
        with clock("generation"):
            rollouts = generate_rollouts(policy, prompts, config.generation, config.runtime, config.data.system_prompt,
                                         config.seed, 0, config.model.trust_remote_code)
        with clock("judge"):
            if judge.kind == "human":
                judged = judge_by_human(rollouts, judge.human_batch_size, judge.human_timeout_s, judge.poll_interval_s)
            else:  # reward models score in batches of generation.batch_size texts
                judged = judge_with_rewards(rollouts, sources, config.runtime, config.generation.batch_size)
        with clock("pairing"):
            data = build_preference_data(judged, config.pairing, config.min_gap, judge.name)
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
