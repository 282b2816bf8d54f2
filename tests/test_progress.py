"""StageProgress: a tqdm bar mirrored, throttled, into a Prefect progress artifact; never a reason to fail."""

from __future__ import annotations

import uuid

import pytest
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterTaskRunId, ArtifactFilterType
from prefect.context import TaskRunContext

import tasks.progress
from tasks.progress import StageProgress


class FakeClock:
    """Time that moves only when the test says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def progress_artifacts(task_run_id) -> list:
    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(
            task_run_id=ArtifactFilterTaskRunId(any_=[task_run_id]), type=ArtifactFilterType(any_=["progress"])))


def test_outside_a_prefect_run_no_api_call_is_made(monkeypatch):
    def no_api(**kwargs):
        raise AssertionError("no Prefect API call outside a run")

    monkeypatch.setattr(tasks.progress, "create_progress_artifact", no_api)
    monkeypatch.setattr(tasks.progress, "update_progress_artifact", no_api)
    clock = FakeClock()
    with StageProgress(total=50, desc="offline", min_interval_s=10, clock=clock) as progress:
        for _ in range(50):
            clock.now += 1  # well past the interval: only the missing run context keeps it silent
            progress.update()
    assert progress.api_calls == 0 and progress.done == 50 and progress.percent() == 100.0


def test_percent_of_an_empty_stage_is_complete():
    progress = StageProgress(total=0, desc="empty")
    progress.close()
    assert progress.percent() == 100.0 and progress.api_calls == 0


def test_a_failing_api_warns_once_and_stops_reporting(monkeypatch, capsys):
    calls = []

    def broken(**kwargs):
        calls.append(kwargs)
        raise ConnectionError("API down")

    monkeypatch.setattr(tasks.progress, "_in_prefect_run", lambda: True)
    monkeypatch.setattr(tasks.progress, "create_progress_artifact", lambda **kwargs: uuid.uuid4())
    monkeypatch.setattr(tasks.progress, "update_progress_artifact", broken)
    clock = FakeClock()
    progress = StageProgress(total=10, desc="generate", min_interval_s=1, clock=clock)
    for _ in range(10):
        clock.now += 1
        progress.update()  # must not raise
    progress.close()
    assert len(calls) == 1 and progress.api_calls == 2  # the create, then the one update that failed
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "'generate'" in warnings[0] and "API down" in warnings[0]


@pytest.mark.slow
def test_inside_a_task_run_updates_are_throttled_and_end_at_100(prefect_harness):
    @task
    def count_to_100() -> tuple:
        clock = FakeClock()
        progress = StageProgress(total=100, desc="count", min_interval_s=10, clock=clock)
        for _ in range(95):
            clock.now += 1
            progress.update()
        progress.update(5)  # at t=95, too soon after the report at t=90
        progress.close()
        return progress.api_calls, TaskRunContext.get().task_run.id

    @flow
    def tiny_flow() -> tuple:
        return count_to_100()

    api_calls, task_run_id = tiny_flow()
    # created at t=0; update i runs at t=i and reports when t - last report >= 10: t = 10, 20, ..., 90 -> 9
    # updates (90 %); the last update is throttled, so close() reports the final 100 % -> 1 + 9 + 1
    assert api_calls == 11
    [artifact] = progress_artifacts(task_run_id)
    assert artifact.type == "progress" and artifact.data == 100.0
    assert artifact.description == "count: 100/100 step, 100%"  # the stage and how far, not just a bar


def test_the_ui_text_names_the_stage_and_the_percentage():
    progress = StageProgress(total=320, desc="generate", unit="token")
    progress.update(64)
    assert progress.description() == "generate: 64/320 token, 20%"
