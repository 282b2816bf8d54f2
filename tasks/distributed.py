"""The multi-process path of the update and scoring stages: run `rlhf_core.distributed_worker` under torchrun and
collect what rank 0 wrote. Used when `runtime.num_processes > 1`; the tasks' inputs and outputs are those of the
one-process path."""

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
from rlhf_core.distributed_worker import RESULT_FILE, SCORES_FILE, encode_args
from rlhf_core.update import NonFiniteError
from tasks.paths import checkpoints_dir, rlhf_home
from tasks.refs import ArtifactRef, CheckpointRef, UpdateResult, publish


T = TypeVar("T")


class DistributedUpdateError(RuntimeError):
    """A rank of the distributed update failed; the message carries its error and traceback."""


def check_processes(runtime: RuntimeConfig) -> None:
    if runtime.device.startswith("cuda") and torch.cuda.device_count() < runtime.num_processes:
        raise ValueError(f"runtime.num_processes={runtime.num_processes} needs as many GPUs; "
                         f"{torch.cuda.device_count()} visible")


def torchrun_command(num_processes: int, spec_path: Path) -> list[str]:
    # --standalone: a rendezvous on a free local port, so concurrent runs on one machine never collide
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_processes}",
            "-m", "rlhf_core.distributed_worker", str(spec_path)]


def work_root() -> Path:
    """Where the torchrun jobs' temporary folders live (removed when the job ends; a SIGKILLed task leaves its
    small folder: a spec, and for scoring the token ids)."""
    root = rlhf_home() / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    return root


def run_torchrun(spec: dict, runtime: RuntimeConfig, read: Callable[[Path], T]) -> T:
    """Run one torchrun job of `rlhf_core.distributed_worker` in a fresh work folder and return `read(work_dir)`
    (what rank 0 wrote there); a failing rank's error is re-raised here."""
    check_processes(runtime)
    with tempfile.TemporaryDirectory(dir=work_root(), prefix=f"{spec['job']}-") as work:
        work_dir = Path(work)
        spec = {**spec, "work_dir": str(work_dir), "runtime": runtime.model_dump()}
        (work_dir / "spec.json").write_text(json.dumps(spec))
        # threads per rank: the machine's cores shared out, unless the config sets them
        threads = runtime.num_threads or max(1, (os.cpu_count() or 1) // runtime.num_processes)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        done = subprocess.run(torchrun_command(runtime.num_processes, work_dir / "spec.json"), env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise_rank_error(work_dir, done)
        return read(work_dir)


def run_scoring_job(spec: dict, runtime: RuntimeConfig) -> dict[str, torch.Tensor]:
    """A no-grad job of the worker (score, sequence_logps, values): the tensors rank 0 wrote."""
    return run_torchrun(spec, runtime, lambda work_dir: load_file(str(work_dir / SCORES_FILE)))


def distributed_update(algorithm: str, policy: CheckpointRef, batch: ArtifactRef, runtime: RuntimeConfig,
                       trust_remote_code: bool, update_args: dict, metrics_stage: str) -> UpdateResult:
    spec = {"job": "update", "algorithm": algorithm, "policy": policy.path, "batch": batch.path,
            "checkpoints_dir": str(checkpoints_dir()), "trust_remote_code": trust_remote_code,
            "update_args": encode_args(update_args)}
    result = run_torchrun(spec, runtime, lambda work_dir: json.loads((work_dir / RESULT_FILE).read_text()))
    return UpdateResult(checkpoint=CheckpointRef(path=result["path"], sha256=result["sha256"]),
                        metrics=publish(pd.DataFrame(result["history"]), metrics_stage))


def distributed_scores(df: pd.DataFrame, reference: CheckpointRef | None, reward_models: list[CheckpointRef],
                       runtime: RuntimeConfig, trust_remote_code: bool, *, temperature: float,
                       micro_batch_size: int, chunk_size: int, max_length: int) -> dict[str, torch.Tensor]:
    """The scoring stage's model passes under torchrun: {"ref_logprobs": [B, T] (with a reference),
    "reward.<i>": [B] for reward_models[i]}."""
    columns = ["prompt_ids", "response_ids", "prompt", "response"]
    with tempfile.TemporaryDirectory(dir=work_root(), prefix="score-batch-") as folder:
        batch = Path(folder) / "batch.parquet"
        df[columns].to_parquet(batch)
        spec = {"job": "score", "batch": str(batch), "reference": reference.path if reference else None,
                "reward_models": [ref.path for ref in reward_models], "trust_remote_code": trust_remote_code,
                "temperature": temperature, "micro_batch_size": micro_batch_size, "chunk_size": chunk_size,
                "max_length": max_length}
        return run_scoring_job(spec, runtime)


def raise_rank_error(work_dir: Path, done: subprocess.CompletedProcess) -> None:
    """Re-raise the first failing rank's error as its own type where the project defines it. The first report
    written is the cause: the other ranks then fail on the closed connection to it."""
    reports = sorted(work_dir.glob("error-*.json"), key=lambda path: path.stat().st_mtime_ns)
    if not reports:
        tail = (done.stdout + done.stderr)[-4000:]
        raise DistributedUpdateError(f"torchrun exited with {done.returncode} before any rank reported:\n{tail}")
    report = json.loads(reports[0].read_text())
    rank = reports[0].stem.removeprefix("error-")
    message = f"rank {rank} failed ({len(reports)} rank(s) reported an error): {report['type']}: {report['message']}"
    if report["type"] == NonFiniteError.__name__:
        raise NonFiniteError(message)
    raise DistributedUpdateError(f"{message}\n{report['traceback']}")


def distributed_sequence_logps(algorithm: str, reference: CheckpointRef, table: ArtifactRef, runtime: RuntimeConfig,
                               trust_remote_code: bool, micro_batch_size: int) -> dict[str, torch.Tensor]:
    """DPO's or KTO's reference pass under torchrun: {name: [B]} summed log-probs per sequence of `table`
    (`rlhf_core.distributed_worker.SEQUENCE_LOGPS`)."""
    spec = {"job": "sequence_logps", "algorithm": algorithm, "reference": reference.path, "batch": table.path,
            "trust_remote_code": trust_remote_code, "micro_batch_size": micro_batch_size}
    return run_scoring_job(spec, runtime)


def distributed_values(policy: CheckpointRef, rollouts: ArtifactRef, runtime: RuntimeConfig, trust_remote_code: bool,
                       *, temperature: float, micro_batch_size: int, chunk_size: int) -> dict[str, torch.Tensor]:
    """PPO's value stage under torchrun: {"old_logprobs", "old_values"}: [B, T] aligned with `collate`."""
    spec = {"job": "values", "policy": policy.path, "batch": rollouts.path, "trust_remote_code": trust_remote_code,
            "temperature": temperature, "micro_batch_size": micro_batch_size, "chunk_size": chunk_size}
    return run_scoring_job(spec, runtime)
