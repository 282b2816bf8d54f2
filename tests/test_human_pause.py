"""The human judge as an operator meets it: prefect.yaml's `preference-data-human` deployment (concurrency_limit 1)
run by a real process worker, answered through Prefect's API like a person clicking Resume in the UI.

The worker's processes renew their deployment concurrency lease every RENEWAL_S seconds instead of Prefect's
300 * 0.75 = 225 s (a sitecustomize module on PYTHONPATH sets `prefect.concurrency._leases._RENEWAL_FRACTION`), so
a wait that outlives the lease takes seconds here. A run *paused* in place under that deployment crashed at its
first renewal after the pause ("Concurrency lease renewal failed - slots are no longer reserved"); the judge now
*suspends* a deployment's run: its process exits, the slot is released, the answer reschedules it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import mlflow
import pandas as pd
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey, LogFilter,
                                           LogFilterFlowRunId)
from prefect.client.schemas.objects import StateType
from prefect.flow_runs import resume_flow_run
from prefect.settings import PREFECT_API_URL
from prefect.states import Crashed, Scheduled

from tasks.paths import sqlite_uri

PROJECT = Path(__file__).resolve().parents[1]
POOL = "human-pause-test"
DEPLOYMENT = "preference-data/preference-data-human"
RENEWAL_S = 2.0  # how often the worker's flow processes renew their deployment concurrency lease
PLACES = ["hotel", "diner", "museum", "phone", "novel", "theme park"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def worker(prefect_harness, tmp_path_factory, tiny_model_dir):
    """The deployment (from prefect.yaml, on a pool of its own), a process worker with short lease renewals, and
    the data folder its runs write to; yields (deployment id, that folder, the run config's base)."""
    root = tmp_path_factory.mktemp("human-pause")
    site = root / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import prefect.concurrency._leases as leases\n"
        f"leases._RENEWAL_FRACTION = {RENEWAL_S} / 300  # the engine's lease is 300 s, renewed at this fraction\n")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Write a one-sentence review of the {p}."}) + "\n"
                               for p in PLACES))
    api = PREFECT_API_URL.value()
    env = {**os.environ, "PREFECT_API_URL": api, "RLHF_HOME": str(root / "rlhf-home"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1"}
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=POOL, type="process"), overwrite=True)
    deployed = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "-n",
                               "preference-data-human", "--pool", POOL], cwd=PROJECT, env=env, capture_output=True,
                              text=True, timeout=300)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    log = open(root / "worker.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL], cwd=PROJECT,
                               env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    config = {"model": {"name_or_path": str(tiny_model_dir)}, "data": {"path": str(prompts), "extra_columns": []},
              "generation": {"group_size": 4, "max_new_tokens": 12, "temperature": 1.0}, "min_gap": 0.02,
              "judge": {"kind": "human", "human_batch_size": 2, "human_timeout_s": 3600},
              "tracking": {"experiment": "human-pause", "log_rollouts": False}}
    try:
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name(DEPLOYMENT)
        assert deployment.concurrency_limit == 1 or deployment.global_concurrency_limit is not None
        yield deployment.id, root / "rlhf-home", config
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


def start_run(deployment_id: UUID, config: dict) -> UUID:
    with get_client(sync_client=True) as client:
        return client.create_flow_run_from_deployment(deployment_id, parameters={"config": config}).id


def wait_for(run_id: UUID, types: set[StateType], timeout_s: float, after: int = 0):
    """The run's state once it is of one of `types` and the run has gone through more than `after` states."""
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            states = client.read_flow_run_states(run_id)
            if len(states) > after and states[-1].type in types:
                return states[-1]
            time.sleep(0.5)
        raise TimeoutError(f"run {run_id} not in {types} after {timeout_s} s: {[s.name for s in states]}")


def answer(run_id: UUID, choice: str = "2") -> dict:
    """Like a person: opens the paused run's form and picks response `choice` for every prompt."""
    with get_client(sync_client=True) as client:
        keyset = client.read_flow_run(run_id).state.state_details.run_input_keyset
        schema = json.loads(client.read_flow_run_input(run_id, keyset["schema"]))
    values = {field: choice for field in schema["properties"]}
    resume_flow_run(run_id, run_input=values)
    return values


def state_count(run_id: UUID) -> int:
    with get_client(sync_client=True) as client:
        return len(client.read_flow_run_states(run_id))


def pause_keys(run_id: UUID) -> list[str]:
    with get_client(sync_client=True) as client:
        return [s.state_details.pause_key for s in client.read_flow_run_states(run_id) if s.type == StateType.PAUSED]


def test_a_deployment_run_waits_for_the_human_past_lease_renewals_then_completes(worker, reliability):
    deployment_id, home, config = worker
    run_id = start_run(deployment_id, {**config, "num_prompts": 2})  # one form
    paused = wait_for(run_id, {StateType.PAUSED, StateType.CRASHED, StateType.FAILED}, timeout_s=300)
    assert paused.type == StateType.PAUSED, paused
    # 15 renewal intervals: paused in place, the run crashed within ~RENEWAL_S + its 3 renewal tries (~5 s)
    time.sleep(15 * RENEWAL_S)
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run_id).state
        assert state.type == StateType.PAUSED, f"{state.name}: {state.message}"
        assert state.name == "Suspended" and state.state_details.pause_reschedule  # no process waits
        deployment = client.read_deployment(deployment_id)
        limit = client.read_global_concurrency_limit_by_name(deployment.global_concurrency_limit.name)
        assert limit.limit == 1 and limit.active_slots == 0  # the slot is free while the person thinks
        (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]), key=ArtifactFilterKey(any_=["human-judge"])))
        logs = [log.message for log in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))]
    link = f"/runs/flow-run/{run_id}"
    assert link in artifact.data and "Resume" in artifact.data
    assert any("batch 1/1 is waiting for you" in m and link in m for m in logs), "\n".join(logs)

    answer(run_id)
    done = wait_for(run_id, {StateType.COMPLETED, StateType.CRASHED, StateType.FAILED}, timeout_s=300)
    assert done.type == StateType.COMPLETED, done
    assert len(pause_keys(run_id)) == 1 and len(list((home / "judgments").glob("*.parquet"))) == 1
    assert mlflow_run(home, run_id).info.status == "FINISHED"  # opened after the judge: never FAILED meanwhile
    reliability.record("service failure", "a human-judge deployment run waiting past its concurrency lease's "
                       "renewals", "suspended (no lease, no process), resumed by the answer, completes")


def test_a_retry_after_a_crash_asks_again_only_the_unanswered_form(worker, reliability):
    deployment_id, home, config = worker
    config = {**config, "num_prompts": 3, "seed": 7}  # two forms: 2 prompts, then 1
    run_id = start_run(deployment_id, config)
    first = wait_for(run_id, {StateType.PAUSED, StateType.CRASHED, StateType.FAILED}, timeout_s=300)
    assert first.type == StateType.PAUSED, first
    answer(run_id)
    second = wait_for(run_id, {StateType.PAUSED, StateType.CRASHED, StateType.FAILED}, timeout_s=300,
                      after=state_count(run_id))
    assert second.type == StateType.PAUSED and second.state_details.pause_key != first.state_details.pause_key

    # What a crash (the lease crash of the issue, a killed worker) leaves: a Crashed run whose second form is stored
    # but unanswered; then Retry, as the UI does it (set_state Scheduled "AwaitingRetry", not forced)
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, Crashed(message="Concurrency lease renewal failed"), force=True)
        retried = client.set_flow_run_state(run_id, Scheduled(name="AwaitingRetry", message="Retry from the UI"))
    assert retried.status.value == "ACCEPT"
    again = wait_for(run_id, {StateType.PAUSED, StateType.CRASHED, StateType.FAILED}, timeout_s=300,
                     after=state_count(run_id))
    assert again.type == StateType.PAUSED, again
    assert again.state_details.pause_key == second.state_details.pause_key  # the first form is not asked again

    answer(run_id)
    done = wait_for(run_id, {StateType.COMPLETED, StateType.CRASHED, StateType.FAILED}, timeout_s=300)
    assert done.type == StateType.COMPLETED, done  # before: Failed, 409 "A flow run input with this key already..."
    keys = pause_keys(run_id)
    assert keys == [first.state_details.pause_key] + [second.state_details.pause_key] * 2
    run = mlflow_run(home, run_id)
    client = mlflow.MlflowClient(tracking_uri=sqlite_uri(home / "mlflow" / "mlflow.db"))
    pairs = pd.read_parquet(client.download_artifacts(run.info.run_id, "data/pairs.parquet", str(home)))
    assert pairs["prompt_id"].nunique() == 3 and (pairs["chosen_index"] == 1).all()  # both forms' answers
    reliability.record("service failure", "Retry of a human-judge run that crashed while waiting",
                       "asks only the unanswered form again (no 409); the answered batch is reused")


def mlflow_run(home: Path, flow_run_id: UUID):
    """The one MLflow run of a flow run, from the worker's store."""
    client = mlflow.MlflowClient(tracking_uri=sqlite_uri(home / "mlflow" / "mlflow.db"))
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    return run
