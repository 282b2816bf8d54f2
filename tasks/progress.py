"""A tqdm bar that also shows up in the Prefect UI, as a progress artifact of the running task.

Each artifact update is a synchronous API call (~20 ms, notes/prefect-mlflow.md section 4): updating once per
generated token would slow generation down noticeably, so updates are throttled to one per `min_interval_s`,
plus a last one on close when the UI does not show the final value yet. Progress is a nicety: a failing API never fails
training, and outside a Prefect run no API call is made at all."""

from __future__ import annotations

import time
from typing import Callable

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import FlowRunContext, TaskRunContext
from tqdm.auto import tqdm

from rlhf_core.faults import kill_point


def _in_prefect_run() -> bool:
    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


class StageProgress:
    """Drop-in for `tqdm(total=..., desc=..., unit=...)` with `update(n)`, `close()` and `with`."""

    def __init__(self, total: int, desc: str, unit: str = "step", min_interval_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit, self.done = total, desc, unit, 0
        self.min_interval_s, self._clock = min_interval_s, clock
        self.api_calls = 0
        self._bar = tqdm(total=total, desc=desc, unit=unit)
        self._artifact_id = None
        self._reported = 0.0  # the percent the UI shows
        self._closed = False
        if _in_prefect_run():
            # _sync: a sync task inside an async flow would otherwise get a coroutine back instead of an id
            self._artifact_id = self._call(create_progress_artifact, progress=0.0, description=self.description(),
                                           _sync=True)
        self._last_report = clock()

    def description(self) -> str:
        """What the UI shows beside the bar: the stage, how far it is and the percentage ("generate: 64/320 token,
        20%"); the bar alone does not say which stage it is."""
        return f"{self.desc}: {self.done}/{self.total} {self.unit}, {self.percent():.0f}%"

    def percent(self) -> float:
        return 100.0 if self.total <= 0 else min(100.0, 100.0 * self.done / self.total)

    def update(self, n: int = 1) -> None:
        kill_point(f"progress:{self.desc}")
        self.done += n
        self._bar.update(n)
        now = self._clock()
        if now - self._last_report >= self.min_interval_s:
            self._report()
            self._last_report = now

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._bar.close()
        if self.percent() != self._reported:  # the UI must end at the final value
            self._report()

    def __enter__(self) -> StageProgress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _report(self) -> None:
        if self._artifact_id is not None:
            self._reported = self.percent()
            self._call(update_progress_artifact, artifact_id=self._artifact_id, progress=self._reported,
                       description=self.description())

    def _call(self, api: Callable, **kwargs):
        """One API call; on failure, warn once and stop reporting for this bar (training must go on)."""
        self.api_calls += 1
        try:
            return api(**kwargs)
        except Exception as exc:  # any transport/server error: progress is not worth a failed run
            self._artifact_id = None
            print(f"warning: Prefect progress reporting for stage {self.desc!r} stopped: {exc!r}")
            return None
