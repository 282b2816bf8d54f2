"""GRPO with dynamic sampling on a tiny model, through the real Prefect engine and MLflow store: a reward that is
flat for half the prompts (even answers) and differs between any two responses for the others, so the flow must
drop groups and sample more rounds; then a crash between two rounds, a rerun, and the same final checkpoint."""

from __future__ import annotations

import sys

import mlflow
import pandas as pd
import pytest
from flow_helpers import failing_call, mlflow_run_of, task_states
from test_flow_grpo import tiny_config

import tasks.data
from flows.grpo import grpo
from rlhf_core.config import DynamicSamplingConfig, RewardSpec
from rlhf_core.io import sha256_dir

pytestmark = pytest.mark.slow
REWARD = '''import zlib

def odd_answers_only(prompts, responses, *, answer, **columns):
    """0 for an even answer (a flat group); a number per distinct text for an odd one."""
    return [0.0 if int(a) % 2 == 0 else float(zlib.crc32(r.encode()) % 1000) for r, a in zip(responses, answer)]
'''


@pytest.fixture
def config(tmp_path, tiny_model_dir):
    (tmp_path / "half_flat_rewards.py").write_text(REWARD)
    sys.path.insert(0, str(tmp_path))
    yield tiny_config(tiny_model_dir, rewards=[RewardSpec(function="half_flat_rewards:odd_answers_only")],
                      dynamic_sampling=DynamicSamplingConfig(enabled=True, max_rounds=6), seed=3)
    sys.path.remove(str(tmp_path))
    sys.modules.pop("half_flat_rewards", None)


def test_flat_groups_are_dropped_and_the_batch_still_fills(prefect_harness, rlhf_home, config):
    state = grpo(config, return_state=True)
    assert state.is_completed()
    run = mlflow_run_of(state.state_details.flow_run_id)
    client = mlflow.MlflowClient()
    metrics = {key: [m.value for m in client.get_metric_history(run.info.run_id, key)]
               for key in ("sampling/rounds", "sampling/zero_variance_groups", "sampling/informative_groups")}
    assert metrics["sampling/informative_groups"] == [2.0, 2.0]
    assert max(metrics["sampling/rounds"]) > 1  # this seed needs more than one round somewhere
    per_iteration = zip(metrics["sampling/rounds"], metrics["sampling/zero_variance_groups"])
    for iteration, (rounds, flat) in enumerate(per_iteration):
        # the counts, recomputed from the prompt tables of the rounds MLflow holds for the iteration
        folder = mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                     artifact_path=f"data/iter_{iteration:03d}")
        prompt_tables = [pd.read_parquet(f"{folder}/prompts{f'_round{r}' if r else ''}.parquet") for r in
                         range(int(rounds))]
        assert flat == sum(int(a) % 2 == 0 for table in prompt_tables for a in table["answer"])
        batch = pd.read_parquet(f"{folder}/advantages.parquet")
        assert sorted(batch["group_id"].unique()) == [0, 1]
        assert all(group["rewards"].nunique() > 1 for _, group in batch.groupby("group_id"))
        assert set(batch["sampling_round"]) <= set(range(int(rounds)))


def test_a_crash_between_rounds_resumes_to_the_uninterrupted_checkpoint(prefect_harness, tmp_path, monkeypatch,
                                                                        config):
    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "uninterrupted"))
    uninterrupted = sha256_dir(grpo(config))

    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "crashed"))
    with failing_call(tasks.data, "round_seed", call=1):  # the first extra round's prompts: after round 0 scored
        crashed = grpo(config, return_state=True)
    assert crashed.is_failed()
    resumed = grpo(config, return_state=True)
    states = task_states(resumed.state_details.flow_run_id)
    first_extra = next(i for i, (name, _) in enumerate(states) if name == "sample-prompts" and i > 0 and
                       states[i - 1][0] == "score-rollouts")
    replayed = {state for name, state in states[:first_extra] if name != "resolve-model"}  # resolved every run
    assert replayed == {"Cached"} and states[first_extra] == ("sample-prompts", "Completed"), states
    assert sha256_dir(resumed.result()) == uninterrupted
