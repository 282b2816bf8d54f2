"""Sharded stages: a stage's rows cut into contiguous shards, each shard a cached Prefect task run on the task
runner the config names (threads, a Dask cluster, or threads whose work runs on Ray actors: tasks/ray_cluster.py),
the shards' tables merged back into the table the unsharded stage writes.

Cuts fall only between the stage's batches, so every batch holds the rows it holds unsharded (same padding, same
floats); rows carry their own seeds (tasks/rollouts.row_seed), so no sample depends on its shard either. Dask and
Ray are optional extras, imported only when the config asks for them.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager

import pandas as pd
import pyarrow.parquet as pq
from prefect import Task, task
from prefect.futures import wait

from rlhf_core.batch import ceil_div
from rlhf_core.config import RuntimeConfig
from rlhf_core.errors import UserInputError
from tasks.cache import STAGE_TASK_OPTIONS
from tasks.paths import rlhf_home
from tasks.ray_cluster import RAY_REQUIREMENT, ShardActors
from tasks.refs import ArtifactRef, publish

# task_runner -> (module, requirement): the extras of pyproject.toml
RUNNER_EXTRAS = {"dask": ("prefect_dask", "prefect-dask==0.3.7"), "ray": ("ray", RAY_REQUIREMENT)}
# flow run id -> the Ray actors its shard tasks hand their work to (task_runner: ray)
_SHARD_ACTORS: dict[str, ShardActors] = {}


class ShardingError(ValueError):
    """A sharding setting that cannot work, or shards that do not add up to the stage's table."""


class RunnerSetupError(ShardingError, UserInputError):
    """A task runner this machine cannot provide as configured (a missing extra, workers on another data folder)."""


def shard_bounds(n_rows: int, shards: int, align: int) -> list[tuple[int, int]]:
    """At most `shards` contiguous, non-empty [start, stop) ranges covering rows 0..n_rows, cut only at multiples
    of `align` (the stage's batch size) and as even as that allows. Fewer batches than shards: one shard each."""
    if shards < 1 or align < 1:
        raise ShardingError(f"shards ({shards}) and the batch size ({align}) must be >= 1")
    batches = ceil_div(n_rows, align)
    k = max(1, min(shards, batches))
    return [(min(i * batches // k * align, n_rows), min((i + 1) * batches // k * align, n_rows)) for i in range(k)]


def merge_shards(bounds: list[tuple[int, int]], frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The shards' tables as one table in row order. Raises when the ranges leave a gap or overlap, or a shard's
    table does not have the rows of its range: a merged table is never silently short."""
    if len(bounds) != len(frames):
        raise ShardingError(f"{len(bounds)} shard ranges but {len(frames)} shard tables")
    order = sorted(range(len(bounds)), key=lambda i: bounds[i][0])
    expected = 0
    for i in order:
        start, stop = bounds[i]
        if start != expected:
            raise ShardingError(f"shard ranges do not tile the rows: a shard starts at row {start}, not {expected}")
        if len(frames[i]) != stop - start:
            raise ShardingError(f"shard [{start}, {stop}) holds {len(frames[i])} rows instead of {stop - start}")
        expected = stop
    return pd.concat([frames[i] for i in order], ignore_index=True)


def parquet_rows(table: ArtifactRef) -> int:
    """Row count from the Parquet footer, without reading the table."""
    import fsspec

    with fsspec.open(table.path, "rb") as f:  # a local path or an fsspec URI
        return pq.ParquetFile(f).metadata.num_rows


def check_task_runner(runtime: RuntimeConfig) -> None:
    """Fails before any work when the configured runner's extra is not installed. With shards = 1 no runner is
    used, so none is needed."""
    if runtime.shards == 1 or runtime.task_runner == "thread":
        return
    module, requirement = RUNNER_EXTRAS[runtime.task_runner]
    if importlib.util.find_spec(module) is None:
        raise RunnerSetupError(
            f"runtime.task_runner: {runtime.task_runner} needs the optional package {requirement}, which is not "
            f"installed: pip install 'rlhf-pipeline[{runtime.task_runner}]' (or pip install {requirement}); "
            "or set runtime.task_runner: thread")


def shard_runtime(runtime: RuntimeConfig) -> RuntimeConfig:
    """The runtime a shard task gets: where shards run changes no value, so the runner settings are left out of
    its cache key and a run resumed on another runner (same shard count) reuses the finished shards."""
    return runtime.model_copy(update={"task_runner": "thread", "shards": 1, "runner_address": None,
                                      "ray_address": None if runtime.launcher != "ray" else runtime.ray_address})


def check_data_home(expected: str) -> None:
    """Run inside a shard task: a worker must write where the flow reads (and find the flow's cache records)."""
    if str(rlhf_home()) != expected:
        raise RunnerSetupError(
            f"this worker's data folder is {rlhf_home()}, the flow's is {expected}: every Dask/Ray worker needs the "
            "same RLHF_HOME, on shared storage when the workers run on other machines")


def make_task_runner(runtime: RuntimeConfig):
    """A Prefect task runner (not started) for `runtime.shards` shards. Ray: threads of this process, each handing
    its shard's work to an actor (`on_shard_worker`)."""
    check_task_runner(runtime)
    workers = runtime.shards
    if runtime.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if runtime.runner_address:
            return DaskTaskRunner(address=runtime.runner_address)
        # processes: each worker its own interpreter (no GIL sharing) and its own model; no more than the cores
        return DaskTaskRunner(cluster_kwargs={"n_workers": min(workers, os.cpu_count() or 1), "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=workers)


def flow_run_id() -> str:
    """The current flow run's id, from the flow or from one of its tasks ("" outside any)."""
    from prefect.context import FlowRunContext, TaskRunContext

    task_run = TaskRunContext.get()
    if task_run is not None:
        return str(task_run.task_run.flow_run_id)
    flow_run = FlowRunContext.get()
    return str(flow_run.flow_run.id) if flow_run is not None and flow_run.flow_run is not None else ""


def on_shard_worker(method: str, local, shard: list[int], **kwargs) -> pd.DataFrame:
    """A shard task's table: `local(**kwargs)` in this process, or the same call on the Ray actor of this shard
    (ShardWorker.<method>) when the flow run's shards run on Ray. shard: the task's [start, stop) row range."""
    actors = _SHARD_ACTORS.get(flow_run_id())
    if actors is None:
        return local(**kwargs)
    return actors.call(method, shard, kwargs)


class ShardRunner:
    """The task runner of one flow run's sharded stages. Started on first use (a local Dask or Ray cluster takes
    seconds to start: once per flow run, not per stage, and never with shards = 1), stopped by `close`."""

    def __init__(self, runtime: RuntimeConfig):
        check_task_runner(runtime)
        self.runtime = runtime
        self._runner = None
        self.actors: ShardActors | None = None

    def run(self, shard_task: Task, parameters: dict, bounds: list[tuple[int, int]], stage: str) -> ArtifactRef:
        """`shard_task(**parameters, row_range=...)` once per range, then the merged table published as `stage`.
        Every shard finishes (and is cached) before a failed one raises, so a rerun redoes only the failed ones."""
        if self._runner is None:
            self._runner = make_task_runner(self.runtime).__enter__()
            if self.runtime.task_runner == "ray":
                self.actors = _SHARD_ACTORS[flow_run_id()] = ShardActors(self.runtime)
        if self.actors is not None:
            self.actors.assign(bounds)
        futures = [self._runner.submit(shard_task, {**parameters, "row_range": list(b)}) for b in bounds]
        wait(futures)
        return merge_shard_tables([f.result() for f in futures], [list(b) for b in bounds], stage)

    def close(self) -> None:
        if self.actors is not None:
            actors, self.actors = self.actors, None
            _SHARD_ACTORS.pop(flow_run_id(), None)
            actors.close()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            runner.__exit__(None, None, None)


@contextmanager
def shard_runner(runtime: RuntimeConfig) -> Iterator[ShardRunner]:
    runner = ShardRunner(runtime)
    try:
        yield runner
    finally:
        runner.close()


def run_sharded(runner: ShardRunner | None, runtime: RuntimeConfig, shard_task: Task, parameters: dict,
                bounds: list[tuple[int, int]], stage: str) -> ArtifactRef:
    """`runner.run(...)`, with a runner of its own for this one stage when the caller has none."""
    if runner is not None:
        return runner.run(shard_task, parameters, bounds, stage)
    with shard_runner(runtime) as own:
        return own.run(shard_task, parameters, bounds, stage)


@task(name="merge-shards", **STAGE_TASK_OPTIONS)
def merge_shard_tables(shards: list[ArtifactRef], bounds: list[list[int]], stage: str) -> ArtifactRef:
    """The shards' tables, in row order, published like the unsharded stage's table (same bytes, same file)."""
    return publish(merge_shards([tuple(b) for b in bounds], [s.read() for s in shards]), stage)
