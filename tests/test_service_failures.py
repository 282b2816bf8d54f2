"""The tracking server or the orchestration server going away in the middle of a GRPO run: the run fails with an
error naming the server, and once the server is back a rerun completes from the cache, with each metric step and
each model version once.

Clients are told not to retry (MLFLOW_HTTP_REQUEST_MAX_RETRIES=0, PREFECT_CLIENT_MAX_RETRIES=0) so the failure
shows in seconds; with the defaults both clients retry with back-off first (about a minute), which rides out a
server restart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from flow_helpers import metric_steps, mlflow_run_of, task_states
from test_crash_resume import REPO, crash_config
from test_flow_grpo import STAGES
from test_service import free_port

import flows.grpo
from flows import service
from flows.grpo import grpo
from rlhf_core.io import sha256_dir
from tasks.paths import use_tracking_uri

pytestmark = pytest.mark.slow


def start_mlflow_server(home: Path, port: int) -> service.Service:
    server = service.start("mlflow-server", [
        service.bin_path("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{home / 'mlflow' / 'mlflow.db'}",
        "--artifacts-destination", str(home / "mlflow" / "artifacts")], service.service_env(), f"port {port}")
    service.wait_healthy(server, f"http://127.0.0.1:{port}/health", timeout_s=120)
    return server


def test_mlflow_server_lost_mid_run_then_rerun_logs_each_step_and_version_once(prefect_harness, rlhf_home,
                                                                                tiny_model_dir, monkeypatch,
                                                                                reliability):
    for folder in (rlhf_home / "service", rlhf_home / "mlflow" / "artifacts"):
        folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = start_mlflow_server(rlhf_home, port)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    real_log, calls = flows.grpo.log_online_iteration, []

    def server_dies_before_iteration_1_is_logged(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            service.stop(server)
        return real_log(*args, **kwargs)

    try:
        monkeypatch.setattr(flows.grpo, "log_online_iteration", server_dies_before_iteration_1_is_logged)
        failed = grpo(crash_config(tiny_model_dir), return_state=True)
        assert failed.is_failed()
        with pytest.raises(Exception, match=f"127.0.0.1:{port}"):
            failed.result()
        monkeypatch.setattr(flows.grpo, "log_online_iteration", real_log)

        server = start_mlflow_server(rlhf_home, port)
        resumed = grpo(crash_config(tiny_model_dir), return_state=True)
        assert resumed.is_completed()
        stages = [(name, state) for name, state in task_states(resumed.state_details.flow_run_id) if name in STAGES]
        assert stages == [(name, "Cached") for name in STAGES] * 2  # the training had finished; only logging had not
        use_tracking_uri()
        run = mlflow_run_of(resumed.state_details.flow_run_id)
        assert metric_steps(run.info.run_id, "reward/mean") == [0, 1]
        versions = mlflow.MlflowClient().search_model_versions("name = 'crash-policy'")
        assert sorted(int(v.version) for v in versions) == [1, 2]  # iteration 0's, registered before the loss, reused
    finally:
        service.stop(server)
    reliability.record("service failure", "the MLflow server stops in the middle of a run",
                       "clear error naming the server; rerun after restart: all stages cached, each metric step "
                       "and model version once")


def test_prefect_server_lost_mid_run_then_rerun_resumes(tmp_path, tiny_model_dir, monkeypatch, reliability):
    home = tmp_path / "home"
    monkeypatch.setenv("RLHF_HOME", str(home))
    (home / "service").mkdir(parents=True)
    port = free_port()
    api = f"http://127.0.0.1:{port}"

    def start_prefect_server() -> service.Service:
        env = {**service.service_env(), "PREFECT_HOME": str(home / "prefect")}
        server = service.start("prefect-server", [service.bin_path("prefect"), "server", "start", "--host",
                                                  "127.0.0.1", "--port", str(port)], env, api)
        service.wait_healthy(server, f"{api}/api/health", timeout_s=120)
        return server

    config = crash_config(tiny_model_dir).model_copy(update={"iterations": 4})
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config.model_dump(mode="json")))
    env = {**os.environ, "RLHF_HOME": str(home), "PREFECT_HOME": str(home / "prefect"), "PREFECT_API_URL": f"{api}/api",
           "PREFECT_CLIENT_MAX_RETRIES": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "flows.cli", "grpo", "--config", str(config_file)]

    server = start_prefect_server()
    try:
        log = tmp_path / "failed-run.log"
        with open(log, "w") as err:
            flow = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        checkpoints = home / "checkpoints"
        while flow.poll() is None and not (checkpoints.is_dir() and any(checkpoints.iterdir())):
            time.sleep(0.1)
        service.stop(server)  # iteration 0 is done; the server goes away during iteration 1
        deadline = time.monotonic() + 300
        while "rlhf grpo failed:" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        failure = next(line for line in log.read_text().splitlines() if line.startswith("rlhf grpo failed:"))
        assert f"127.0.0.1:{port}" in failure or "connect" in failure.lower(), failure
        flow.kill()  # the failure is reported; Prefect would now spend minutes retrying to send its events
        flow.wait()

        server = start_prefect_server()
        rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        final = Path(rerun.stdout.strip().splitlines()[-1].removeprefix("output: "))
    finally:
        service.stop(server)

    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "uninterrupted"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        expected = grpo(config)
    assert sha256_dir(final) == sha256_dir(expected)
    reliability.record("service failure", "the Prefect server stops in the middle of a run",
                       "clear error naming the server; rerun after restart resumes from the cache, same final "
                       "checkpoint")
