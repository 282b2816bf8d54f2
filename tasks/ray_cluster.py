"""Ray, the engine past one machine: the cluster that `runtime.launcher: ray` trains on (Ray Train workers running
the very job a torchrun rank runs) and that `runtime.task_runner: ray` runs the generation and scoring shards on
(one actor per shard, kept for the flow run, so each keeps its model in memory from one iteration to the next).

Both connect to `runtime.ray_address`, or start a local Ray instance for the block and stop it after. Every
process of the job gets the flow's RLHF_HOME (the job's runtime environment): checkpoints, tables and job folders
are paths under it, so on several machines it must be shared storage. Ray is the optional `ray` extra, imported
only here and only when the config asks for it.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from rlhf_core.config import RuntimeConfig
from rlhf_core.errors import UserInputError
from rlhf_core.faults import KILL_AT_ENV
from tasks.paths import rlhf_home

RAY_REQUIREMENT = "ray[train]==2.60.0"
WORKER_DIED = "a Ray Train worker died without an error of its own"


class RaySetupError(UserInputError):
    """The config asks for Ray and this machine cannot provide it."""


def uses_ray(runtime: RuntimeConfig) -> bool:
    return (runtime.launcher == "ray" and runtime.num_processes > 1) or (
        runtime.task_runner == "ray" and runtime.shards > 1)


def check_ray(runtime: RuntimeConfig) -> None:
    """Fails before any work when the Ray launcher's extra is not installed (the Ray task runner's is checked with
    the other runners', tasks/sharding.check_task_runner), or the config names a cluster address where nothing
    answers (Ray itself would retry for minutes)."""
    if runtime.launcher == "ray" and runtime.num_processes > 1 and importlib.util.find_spec("ray") is None:
        raise RaySetupError(f"runtime.launcher: ray needs the optional package {RAY_REQUIREMENT}, which is not "
                            f"installed: pip install 'rlhf-pipeline[ray]' (or pip install '{RAY_REQUIREMENT}')")
    if uses_ray(runtime) and runtime.ray_address:
        host, _, port = runtime.ray_address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=10).close()
        except (OSError, ValueError) as e:
            raise RaySetupError(f"runtime.ray_address {runtime.ray_address!r}: no Ray cluster answers there ({e}); "
                                "start one (ray start --head) or fix the address") from None


def job_environment() -> dict[str, str]:
    """The environment every Ray process of this job gets: the flow's data folder, and the crash tests' kill switch
    (it reaches torchrun's ranks by inheritance, Ray's workers only this way)."""
    kill_at = os.environ.get(KILL_AT_ENV)
    return {"RLHF_HOME": str(rlhf_home()), **({KILL_AT_ENV: kill_at} if kill_at else {})}


@contextmanager
def ray_cluster(runtime: RuntimeConfig) -> Iterator[None]:
    """Connected to the cluster at runtime.ray_address, or to a local instance started for the block and shut down
    after it. A process already connected (another stage of this flow run) stays connected and is left so."""
    import ray

    if ray.is_initialized():
        yield
        return
    try:
        # "local": a new instance even when `ray start` runs on this machine (None would join that one)
        ray.init(address=runtime.ray_address or "local", include_dashboard=False, log_to_driver=False,
                 configure_logging=False, runtime_env={"env_vars": job_environment()})
    except ConnectionError as e:
        raise RaySetupError(f"runtime.ray_address {runtime.ray_address!r}: no Ray cluster there ({e})") from None
    try:
        yield
    finally:
        ray.shutdown()


# ---------------------------------------------------------------- training: Ray Train workers


def _train_worker(config: dict) -> None:
    """The body of every Ray Train worker: one rank of the job file, in the process group Ray set up."""
    import ray.train

    from rlhf_core.distributed_worker import run_job

    os.environ["LOCAL_RANK"] = str(ray.train.get_context().get_local_rank())  # its GPU, on a CUDA device
    run_job(config["job_file"])


def run_ray_train(job_file: Path, runtime: RuntimeConfig) -> str | None:
    """Run the job in `job_file` on runtime.num_processes Ray Train workers (a TorchTrainer: gloo on CPU, NCCL and
    one GPU per worker on CUDA). Returns None when every worker finished, else Ray's account of the failure (the
    workers' own error reports are in the job's folder). No retry: a failed update fails its stage, and the
    flow's rerun redoes it from the cached inputs."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    cuda = runtime.device.startswith("cuda")
    resources = {"CPU": runtime.ray_cpus_per_worker, **({"GPU": 1} if cuda else {})}
    trainer = TorchTrainer(
        _train_worker, train_loop_config={"job_file": str(job_file)},
        scaling_config=ScalingConfig(num_workers=runtime.num_processes, use_gpu=cuda, resources_per_worker=resources),
        run_config=RunConfig(name=job_file.parent.name, storage_path=str(job_file.parent / "ray"),
                             failure_config=FailureConfig(max_failures=0)))
    with ray_cluster(runtime):
        try:
            trainer.fit()
        except TrainingFailedError as e:
            report = str(e)
            if any(sign in report for sign in ("actor died unexpectedly", "health check failed")):
                return f"{WORKER_DIED} (killed, out of memory, or its node lost); Ray's report:\n{report}"
            return report
    return None


# ---------------------------------------------------------------- rollouts: one actor per shard


class ShardWorker:
    """A Ray actor that runs shards of the generation and scoring stages in its own process, keeping the models
    it loaded (tasks/runtime.MODELS) between calls. A new policy checkpoint of the same architecture is copied into
    the module it generated with last time, unless that module is also a reference its scoring shards use."""

    def __init__(self):
        self.policy = None  # the CheckpointRef of the last generation shard
        self.references: set[str] = set()  # sha256 of the references scored with

    def generate(self, kwargs: dict) -> pd.DataFrame:
        from tasks.rollouts import rollout_frame
        from tasks.runtime import MODELS

        policy = kwargs["policy"]
        if self.policy is not None and self.policy.sha256 != policy.sha256 \
                and self.policy.sha256 not in self.references:
            MODELS.reload_in_place(self.policy, policy)
        self.policy = policy
        return rollout_frame(**kwargs)

    def score(self, kwargs: dict) -> pd.DataFrame:
        from tasks.scoring import scored_frame

        if kwargs.get("reference") is not None:
            self.references.add(kwargs["reference"].sha256)
        return scored_frame(**kwargs)

    def stats(self) -> dict:
        """How this worker got its models: {"pid", "loads" from disk, "reloads" in place}."""
        from tasks.runtime import MODELS

        return {"pid": os.getpid(), "loads": MODELS.loads, "reloads": MODELS.reloads}


class ShardActors:
    """`runtime.shards` ShardWorker actors on the Ray cluster, for one flow run. Shard i of a stage always runs on
    actor i, so each actor sees the same rows' models every iteration."""

    def __init__(self, runtime: RuntimeConfig):
        import ray

        self._cluster = ray_cluster(runtime)
        self._cluster.__enter__()
        cuda = runtime.device.startswith("cuda")
        remote = ray.remote(num_cpus=1, num_gpus=1 if cuda else 0)(ShardWorker)
        self.actors = [remote.remote() for _ in range(runtime.shards)]
        self.slots: dict[tuple[int, int], int] = {}

    def assign(self, bounds: list[tuple[int, int]]) -> None:
        """The next stage's shards: row range bounds[i] runs on actor i."""
        self.slots = {tuple(b): i for i, b in enumerate(bounds)}

    def call(self, method: str, row_range: list[int], kwargs: dict) -> pd.DataFrame:
        import ray

        actor = self.actors[self.slots[tuple(row_range)]]
        return ray.get(getattr(actor, method).remote(kwargs))

    def stats(self) -> list[dict]:
        import ray

        return ray.get([actor.stats.remote() for actor in self.actors])

    def close(self) -> None:
        """Print how the actors got their models (the log's evidence that they kept them), then stop them."""
        import ray

        stats = self.stats()
        print(f"ray shard actors: {len(stats)} actors, models loaded from disk {[s['loads'] for s in stats]}, "
              f"reloaded in place {[s['reloads'] for s in stats]}")
        for actor in self.actors:
            ray.kill(actor)
        self._cluster.__exit__(None, None, None)
