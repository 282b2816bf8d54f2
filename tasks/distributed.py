"""The multi-process path of the update and scoring stages: run `rlhf_core.distributed_worker` under torchrun (or
Ray Train, `runtime.launcher: ray`) and collect what rank 0 wrote. Used when `runtime.num_processes > 1`; the
tasks' inputs and outputs are those of the one-process path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

import pandas as pd
import torch
from safetensors.torch import load_file

from rlhf_core.config import RuntimeConfig
from rlhf_core.config.training import LogprobPass, TrainingSetup, UpdateArgs
from rlhf_core.distributed_worker import (RESULT_FILE, SCORES_FILE, Job, JobFile, ScoreJob, SequenceLogpsJob, TrainJob,
                                          ValuesJob)
from rlhf_core.update import NonFiniteError
from tasks.paths import checkpoints_dir, rlhf_home
from tasks.ray_cluster import WORKER_DIED, run_ray_train
from tasks.refs import ArtifactRef, CheckpointRef

T = TypeVar("T")


class DistributedUpdateError(RuntimeError):
    """A rank of the distributed update failed; the message carries its error and traceback."""


def check_processes(runtime: RuntimeConfig) -> None:
    if runtime.device.startswith("cuda") and torch.cuda.device_count() < runtime.num_processes:
        raise ValueError(f"runtime.num_processes={runtime.num_processes} needs as many GPUs; "
                         f"{torch.cuda.device_count()} visible")


def torchrun_command(num_processes: int, job_file: Path) -> list[str]:
    # --standalone: a rendezvous on a free local port, so concurrent runs on one machine never collide
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_processes}",
            "-m", "rlhf_core.distributed_worker", str(job_file)]


def work_root() -> Path:
    """Where the distributed jobs' temporary folders live (removed when the job ends; a SIGKILLed task leaves its
    small folder: the job file, and for scoring the token ids)."""
    root = rlhf_home() / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    return root


def run_job(job: Job, read: Callable[[Path], T]) -> T:
    """Run one job of `rlhf_core.distributed_worker` on runtime.num_processes ranks, started by runtime.launcher
    (torchrun on this machine, or Ray Train workers on a Ray cluster), in a fresh work folder, and return
    `read(work_dir)` (what rank 0 wrote there); a failing rank's error is re-raised here."""
    runtime = job.runtime
    check_processes(runtime)
    with tempfile.TemporaryDirectory(dir=work_root(), prefix=f"{job.kind}-") as work:
        work_dir = Path(work)
        job_file = work_dir / "job.json"
        job_file.write_text(JobFile(job=job.model_copy(update={"work_dir": str(work_dir)})).model_dump_json())
        failure = run_ray_train(job_file, runtime) if runtime.launcher == "ray" else run_torchrun(job_file, runtime)
        if failure is not None:
            raise_rank_error(work_dir, failure)
        return read(work_dir)


def run_torchrun(job_file: Path, runtime: RuntimeConfig) -> str | None:
    """The job's ranks as torchrun processes on this machine: None when all exited cleanly, else their output's
    tail."""
    # threads per rank: the machine's cores shared out, unless the config sets them
    threads = runtime.num_threads or max(1, (os.cpu_count() or 1) // runtime.num_processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(torchrun_command(runtime.num_processes, job_file), env=env, capture_output=True, text=True)
    if done.returncode == 0:
        return None
    return f"torchrun exited with {done.returncode}:\n{(done.stdout + done.stderr)[-4000:]}"


def run_scoring_job(job: Job) -> dict[str, torch.Tensor]:
    """A no-grad job of the worker (score, sequence_logps, values): the tensors rank 0 wrote."""
    return run_job(job, lambda work_dir: load_file(str(work_dir / SCORES_FILE)))


def distributed_train(start: CheckpointRef, table: ArtifactRef, args: UpdateArgs,
                      setup: TrainingSetup) -> tuple[CheckpointRef, list[dict[str, float]]]:
    """The train stage on runtime.num_processes ranks (torchrun or Ray Train): (the new checkpoint, one metrics
    dict per optimizer step)."""
    job = TrainJob(checkpoint=start.path, table=table.path, args=args, runtime=setup.runtime,
                   trust_remote_code=setup.trust_remote_code, lora=setup.lora, checkpoints_dir=str(checkpoints_dir()))
    result = run_job(job, lambda work_dir: json.loads((work_dir / RESULT_FILE).read_text()))
    return CheckpointRef(path=result["path"], sha256=result["sha256"]), result["history"]


def distributed_scores(df: pd.DataFrame, reference: CheckpointRef | None, reward_models: list[CheckpointRef],
                       runtime: RuntimeConfig, trust_remote_code: bool, logprobs: LogprobPass,
                       max_length: int) -> dict[str, torch.Tensor]:
    """The scoring stage's model passes under torchrun: {"ref_logprobs": [B, T] (with a reference),
    "reward.<i>": [B] for reward_models[i]}."""
    columns = ["prompt_ids", "response_ids", "prompt", "response"]
    with tempfile.TemporaryDirectory(dir=work_root(), prefix="score-batch-") as folder:
        table = Path(folder) / "batch.parquet"
        df[columns].to_parquet(table)
        job = ScoreJob(table=str(table), reference=reference.path if reference else None,
                       reference_adapter_disabled=bool(reference and reference.adapter_disabled),
                       reward_models=[checkpoint.path for checkpoint in reward_models], runtime=runtime,
                       trust_remote_code=trust_remote_code, logprobs=logprobs, max_length=max_length)
        return run_scoring_job(job)


def raise_rank_error(work_dir: Path, failure: str) -> None:
    """Re-raise the first failing rank's error as its own type where the project defines it. The first report
    written is the cause: the other ranks then fail on the closed connection to it. `failure`: the launcher's own
    account (torchrun's output tail, Ray Train's error), the message when no rank reported (a killed process)."""
    reports = sorted(work_dir.glob("error-*.json"), key=lambda path: path.stat().st_mtime_ns)
    if not reports:
        raise DistributedUpdateError(f"no rank reported an error: {failure}")
    report = json.loads(reports[0].read_text())
    rank = reports[0].stem.removeprefix("error-")
    message = f"rank {rank} failed ({len(reports)} rank(s) reported an error): {report['type']}: {report['message']}"
    if report["type"] == NonFiniteError.__name__:
        raise NonFiniteError(message)
    if failure.startswith(WORKER_DIED):  # the reports are the survivors' lost connections: lead with the cause
        message = f"{failure.splitlines()[0]}; then {message}"
    raise DistributedUpdateError(f"{message}\n{report['traceback']}\nlauncher: {failure[-2000:]}")


def distributed_sequence_logps(algorithm: str, reference: CheckpointRef, table: ArtifactRef, runtime: RuntimeConfig,
                               trust_remote_code: bool, micro_batch_size: int) -> dict[str, torch.Tensor]:
    """DPO's or KTO's reference pass under torchrun: {name: [B]} summed log-probs per sequence of `table`
    (`rlhf_core.sequence_logps.SEQUENCE_TABLES`)."""
    return run_scoring_job(SequenceLogpsJob(
        algorithm=algorithm, reference=reference.path, reference_adapter_disabled=reference.adapter_disabled,
        table=table.path, runtime=runtime, trust_remote_code=trust_remote_code, micro_batch_size=micro_batch_size))


def distributed_values(policy: CheckpointRef, rollouts: ArtifactRef, critic: str, runtime: RuntimeConfig,
                       trust_remote_code: bool, logprobs: LogprobPass) -> dict[str, torch.Tensor]:
    """PPO's value stage under torchrun: {"old_logprobs", "old_values"}: [B, T] aligned with `collate`."""
    return run_scoring_job(ValuesJob(policy=policy.path, critic=critic, table=rollouts.path, runtime=runtime,
                                     trust_remote_code=trust_remote_code, logprobs=logprobs))
