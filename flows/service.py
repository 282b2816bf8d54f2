"""`rlhf up` / `rlhf down`: the Prefect server, a process worker and the MLflow server on this machine.

Each service runs in its own process group (its own session), so `down` stops it with every child it forked
(MLflow's server did not exit on SIGTERM alone when backgrounded: its group is killed). State, logs and both
databases live in the data folder (`$RLHF_HOME/service/`, `$RLHF_HOME/prefect/`, `$RLHF_HOME/mlflow/`); nothing is
written to the current directory. Servers bind to 127.0.0.1 unless `--host` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from rlhf_core.io import write_atomically
from tasks.paths import PROJECT_ROOT, rlhf_home, sqlite_uri

WORK_POOL = "local-process"  # the pool prefect.yaml's deployments use
MLFLOW_TRAINING_VIEW = "workflowType=machine_learning"  # the MLflow UI's "Model training" view (docs/operations.md)


@dataclass
class Service:
    name: str
    pid: int  # also the process-group id: each service leads its own session
    url: str
    log: str


def service_dir() -> Path:
    return rlhf_home() / "service"


def state_file() -> Path:
    return service_dir() / "state.json"


def bin_path(name: str) -> str:
    """A console script of this environment (prefect, mlflow), next to the running Python."""
    return str(Path(sys.executable).with_name(name))


def start(name: str, command: list[str], env: dict[str, str], url: str) -> Service:
    log = service_dir() / f"{name}.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=PROJECT_ROOT,
                                   start_new_session=True)
    return Service(name, process.pid, url, str(log))


def wait_healthy(service: Service, health_url: str, timeout_s: float) -> None:
    """Polls `health_url` until it answers 200; raises naming the log if the process dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(health_url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if not alive(service.pid):
            raise RuntimeError(f"{service.name} exited during start-up; see {service.log}")
        time.sleep(0.5)
    raise TimeoutError(f"{service.name} did not answer {health_url} within {timeout_s:.0f} s; see {service.log}")


def alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop(service: Service, timeout_s: float = 20.0) -> None:
    """SIGTERM to the whole process group, then SIGKILL to whatever is left after `timeout_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(service.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.waitpid(service.pid, os.WNOHANG)  # reaps it when `up` and `down` share a process (tests)
            except ChildProcessError:
                pass
            if not alive(service.pid):
                return
            time.sleep(0.2)


def read_state() -> list[Service]:
    if not state_file().is_file():
        return []
    return [Service(**entry) for entry in json.loads(state_file().read_text())]


def write_state(services: list[Service]) -> None:
    write_atomically(lambda tmp: tmp.write_text(json.dumps([asdict(s) for s in services], indent=2)), state_file())


def service_env(prefect_url: str | None = None, mlflow_url: str | None = None) -> dict[str, str]:
    home = rlhf_home()
    env = {**os.environ, "RLHF_HOME": str(home), "PREFECT_HOME": str(home / "prefect"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
           # MLflow's GenAI job runner forks 7 consumers (2.4 GB); without it: 2 processes, ~0.5 GB
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if prefect_url:  # the UI URL: the links flow runs print and put in artifacts (the human judge's form)
        env["PREFECT_API_URL"], env["PREFECT_UI_URL"] = f"{prefect_url}/api", prefect_url
    if mlflow_url:
        env["MLFLOW_TRACKING_URI"] = mlflow_url
    return env


def up(host: str, prefect_port: int, mlflow_port: int, timeout_s: float, max_runs: int = 1) -> list[Service]:
    """Starts the three services (or says they already run) and returns them, healthy."""
    running = [s for s in read_state() if alive(s.pid)]
    if running:
        raise RuntimeError(f"already running: {', '.join(s.name for s in running)} (`rlhf down` first)")
    home = rlhf_home()
    for folder in (service_dir(), home / "prefect", home / "mlflow" / "artifacts"):
        folder.mkdir(parents=True, exist_ok=True)
    prefect_url, mlflow_url = f"http://{host}:{prefect_port}", f"http://{host}:{mlflow_port}"
    services: list[Service] = []
    try:
        # the UI asks its API at PREFECT_UI_API_URL, which defaults to port 4200 whatever --port says: "/api" is
        # this server as the browser reached it, on any port and host name (a value the user set wins)
        server = start("prefect-server", [bin_path("prefect"), "server", "start", "--host", host,
                                          "--port", str(prefect_port)],
                       {"PREFECT_UI_API_URL": "/api", **service_env()}, prefect_url)
        services.append(server)
        mlflow = start("mlflow-server", [
            bin_path("mlflow"), "server", "--host", host, "--port", str(mlflow_port), "--workers", "1",
            "--backend-store-uri", sqlite_uri(home / "mlflow" / "mlflow.db"),
            "--artifacts-destination", str(home / "mlflow" / "artifacts")], service_env(), mlflow_url)
        services.append(mlflow)
        write_state(services)
        wait_healthy(server, f"{prefect_url}/api/health", timeout_s)
        env = service_env(prefect_url, mlflow_url)
        for command in (["create", WORK_POOL, "--type", "process", "--overwrite"],
                        # one flow at a time: two trainings never fight over the machine's cores
                        ["set-concurrency-limit", WORK_POOL, str(max_runs)]):
            subprocess.run([bin_path("prefect"), "work-pool", *command], env=env, cwd=PROJECT_ROOT, check=True,
                           capture_output=True)
        services.append(start("prefect-worker", [bin_path("prefect"), "worker", "start", "--pool", WORK_POOL],
                              env, f"pool {WORK_POOL}"))
        write_state(services)
        wait_healthy(mlflow, f"{mlflow_url}/health", timeout_s)
    except BaseException:
        for service in reversed(services):
            stop(service)
        state_file().unlink(missing_ok=True)
        raise
    return services


def down() -> list[str]:
    """Stops every service `up` started (worker first, servers last); returns their names."""
    services = read_state()
    for service in reversed(services):
        stop(service)
    state_file().unlink(missing_ok=True)
    return [s.name for s in services]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlhf up|down", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down"])
    parser.add_argument("--host", default="127.0.0.1", help="interface both servers bind to (default: loopback)")
    parser.add_argument("--prefect-port", type=int, default=4200)
    parser.add_argument("--mlflow-port", type=int, default=5000)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds each server may take to start")
    parser.add_argument("--max-runs", type=int, default=1, help="flow runs the worker runs at once (default 1)")
    args = parser.parse_args(argv)
    if args.command == "down":
        stopped = down()
        print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
        return 0
    try:
        services = up(args.host, args.prefect_port, args.mlflow_port, args.timeout, args.max_runs)
    except (RuntimeError, TimeoutError, subprocess.CalledProcessError) as e:
        print(f"rlhf up failed: {e}", file=sys.stderr)
        return 1
    prefect_url, mlflow_url = services[0].url, services[1].url
    # MLflow 3.17 opens in its GenAI mode unless the URL (or its sidebar switch, remembered per browser) says
    # "Model training"; the experiments' mlflow.experimentKind tag does not decide it in this version
    print(f"Prefect UI: {prefect_url}\nMLflow UI:  {mlflow_url}/#/experiments?{MLFLOW_TRAINING_VIEW}\n"
          f"logs: {service_dir()}\n"
          f"To use them from this shell:\n  export PREFECT_API_URL={prefect_url}/api "
          f"MLFLOW_TRACKING_URI={mlflow_url} RLHF_HOME={rlhf_home()}")
    return 0
