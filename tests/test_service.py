"""`rlhf up` / `rlhf down` through the real servers on loopback ports: the Prefect server, a process worker and the
MLflow server start healthy; a deployment triggered with parameters runs on the worker and lands in MLflow (run,
metrics, artifacts, a model version), and the evaluation deployment promotes that version to champion; invalid
parameters are refused by the server; a short-interval schedule
produces a run that completes; `down` leaves no process and no open port behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import mlflow
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.client.schemas.schedules import IntervalSchedule
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows import service

PROJECT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def prefect_cli(api_url: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_API_URL": api_url}
    return subprocess.run([sys.executable, "-m", "prefect", *args], cwd=PROJECT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def run_first_scheduled(api: str, deployment_name: str, parameters: dict, timeout_s: float):
    """Adds an active 20-second interval schedule with `parameters` to the deployment, waits for the first run
    it creates to finish, then removes the schedule; returns that flow run."""
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(deployment_name)
        (schedule,) = client.create_deployment_schedules(
            deployment.id, [(IntervalSchedule(interval=timedelta(seconds=20)), True)], parameters=parameters)
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                runs = [r for r in client.read_flow_runs(deployment_filter=DeploymentFilter(
                    id=DeploymentFilterId(any_=[deployment.id]))) if r.auto_scheduled]
                finished = [r for r in runs if r.state and r.state.is_final()]
                if finished:
                    return finished[0]
                time.sleep(2)
            raise TimeoutError(f"no scheduled run of {deployment_name} finished within {timeout_s} s")
        finally:
            client.delete_deployment_schedule(deployment.id, schedule.id)


def test_up_deploy_trigger_inspect_down(rlhf_home, tiny_model_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Review the {p}.", "chosen": f"The {p} {g}.",
                                         "rejected": f"The {p} {b}."}) + "\n"
                             for g, b in [("was wonderful", "was awful"), ("is great", "is terrible")]
                             for p in ["hotel", "diner", "museum", "phone"]))
    prefect_port, mlflow_port = free_port(), free_port()
    services = service.up("127.0.0.1", prefect_port, mlflow_port, timeout_s=120)
    try:
        assert [s.name for s in services] == ["prefect-server", "mlflow-server", "prefect-worker"]
        assert json.loads((rlhf_home / "service" / "state.json").read_text())[0]["pid"] == services[0].pid
        with pytest.raises(RuntimeError, match="already running"):
            service.up("127.0.0.1", prefect_port, mlflow_port, timeout_s=5)
        api = f"http://127.0.0.1:{prefect_port}/api"
        deployed = prefect_cli(api, "--no-prompt", "deploy", "-n", "dpo", "-n", "evaluate")
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as prefect:
            assert prefect.read_work_pool(service.WORK_POOL).concurrency_limit == 1  # one flow run at a time

        refused = prefect_cli(api, "deployment", "run", "dpo/dpo", "--params", json.dumps({"config": {"lr": -1}}))
        assert refused.returncode != 0 and "validation" in (refused.stdout + refused.stderr).lower()

        config = {"model": {"name_or_path": str(tiny_model_dir)},
                  "data": {"path": str(pairs), "eval_path": None, "eval_fraction": 0.25},
                  "optim": {"epochs": 1, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-3},
                  "tracking": {"experiment": "service-e2e", "registered_model": "service-dpo"}}
        run = prefect_cli(api, "deployment", "run", "dpo/dpo", "--params", json.dumps({"config": config}), "--watch")
        assert run.returncode == 0 and "Completed" in run.stdout, run.stdout + run.stderr

        client = mlflow.MlflowClient(tracking_uri=f"http://127.0.0.1:{mlflow_port}")
        experiment = client.get_experiment_by_name("service-e2e")
        (mlflow_run,) = client.search_runs([experiment.experiment_id])
        assert mlflow_run.info.status == "FINISHED" and mlflow_run.data.tags["prefect.flow_run_id"]
        assert mlflow_run.data.params["optim.lr"] == "0.001"
        assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # MLflow's training view
        assert 0.0 <= mlflow_run.data.metrics["eval/rewards/accuracies"] <= 1.0
        assert {a.path for a in client.list_artifacts(mlflow_run.info.run_id)} >= {"config.json", "data",
                                                                                  "checkpoints"}
        (version,) = client.search_model_versions("name = 'service-dpo'")
        assert version.tags["iteration"] == "0" and version.run_id == mlflow_run.info.run_id
        (logged,) = client.search_logged_models([experiment.experiment_id])  # what the run page lists it through
        assert logged.source_run_id == mlflow_run.info.run_id and json.loads(logged.tags["mlflow.modelVersions"]) == [
            {"name": "service-dpo", "version": version.version}]
        assert not list(Path.cwd().glob("mlflow.db"))  # nothing written to the current directory

        # The registered model is evaluated against the reference (no champion yet) and promoted
        evaluation = {"candidate": "models:/service-dpo@newest", "reference": str(tiny_model_dir), "num_prompts": 2,
                      "data": {"path": str(pairs), "extra_columns": []}, "rewards": [{"function": "response_length"}],
                      "generation": {"group_size": 2, "max_new_tokens": 4, "temperature": 1.0}, "min_win_rate": 0.0}
        run = prefect_cli(api, "deployment", "run", "evaluate/evaluate", "--params",
                          json.dumps({"config": evaluation}), "--watch")
        assert run.returncode == 0 and "Completed" in run.stdout, run.stdout + run.stderr
        assert client.get_model_version_by_alias("service-dpo", "champion").version == version.version
        (evaluation_run,) = client.search_runs([client.get_experiment_by_name("evaluation").experiment_id])
        assert evaluation_run.data.metrics["promoted"] == 1.0
        assert {a.path for a in client.list_artifacts(evaluation_run.info.run_id, "plots")} == {
            "plots/length_histogram.png", "plots/reward_histogram.png", "plots/training_curves.png"}

        # A schedule fires: a 20 s interval on the same deployment, with its own parameters, yields a completed run
        scheduled = run_first_scheduled(api, "dpo/dpo", {"config": {**config, "tracking": {
            "experiment": "service-schedule", "registered_model": "service-dpo-scheduled"}}}, timeout_s=240)
        assert scheduled.state.is_completed() and scheduled.auto_scheduled
        (scheduled_run,) = client.search_runs([client.get_experiment_by_name("service-schedule").experiment_id])
        assert scheduled_run.data.tags["prefect.flow_run_id"] == str(scheduled.id)
    finally:
        stopped = service.down()
    assert stopped == ["prefect-server", "mlflow-server", "prefect-worker"]
    assert not any(service.alive(s.pid) for s in services)
    assert not port_open(prefect_port) and not port_open(mlflow_port)
    assert not (rlhf_home / "service" / "state.json").exists()
