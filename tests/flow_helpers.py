"""Shared by the end-to-end flow tests: task-run states from the Prefect API, runs from MLflow, and the crash
injected by the resume tests."""

from __future__ import annotations

from contextlib import contextmanager

import mlflow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from tasks.paths import use_tracking_uri


def task_states(flow_run_id) -> list[tuple[str, str]]:
    """(task name without Prefect's numeric suffix, state name) in start order."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    runs.sort(key=lambda r: r.expected_start_time)
    return [(r.name.rsplit("-", 1)[0], r.state.name) for r in runs]


def mlflow_run_of(flow_run_id):
    use_tracking_uri()
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert len(runs) == 1
    return runs[0]


def metric_steps(run_id: str, key: str) -> list[int]:
    return [m.step for m in mlflow.MlflowClient().get_metric_history(run_id, key)]


@contextmanager
def failing_call(module, name: str, call: int):
    """While open, the `call`-th call of `module.<name>` raises RuntimeError("injected failure") and every other
    call runs the real function; the real one is back on exit."""
    real, calls = getattr(module, name), []

    def fail_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    setattr(module, name, fail_once)
    try:
        yield
    finally:
        setattr(module, name, real)
