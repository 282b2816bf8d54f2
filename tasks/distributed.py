"""The update task's multi-process path: run `rlhf_core.distributed_worker` under torchrun and collect what rank
0 wrote. Used when `runtime.num_processes > 1`; the task's inputs and outputs are those of the one-process path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

from rlhf_core.config import RuntimeConfig
from rlhf_core.distributed_worker import RESULT_FILE, encode_args
from rlhf_core.update import NonFiniteError
from tasks.paths import checkpoints_dir, rlhf_home
from tasks.refs import ArtifactRef, CheckpointRef, UpdateResult, publish


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


def distributed_update(algorithm: str, policy: CheckpointRef, batch: ArtifactRef, runtime: RuntimeConfig,
                       trust_remote_code: bool, update_args: dict, metrics_stage: str) -> UpdateResult:
    check_processes(runtime)
    work_root = rlhf_home() / "tmp"
    work_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_root, prefix="update-") as work:
        work_dir = Path(work)
        spec = {"algorithm": algorithm, "policy": policy.path, "batch": batch.path,
                "checkpoints_dir": str(checkpoints_dir()), "work_dir": str(work_dir),
                "runtime": runtime.model_dump(), "trust_remote_code": trust_remote_code,
                "update_args": encode_args(update_args)}
        (work_dir / "spec.json").write_text(json.dumps(spec))
        # threads per rank: the machine's cores shared out, unless the config sets them
        threads = runtime.num_threads or max(1, (os.cpu_count() or 1) // runtime.num_processes)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        done = subprocess.run(torchrun_command(runtime.num_processes, work_dir / "spec.json"), env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise_rank_error(work_dir, done)
        result = json.loads((work_dir / RESULT_FILE).read_text())
    return UpdateResult(checkpoint=CheckpointRef(path=result["path"], sha256=result["sha256"]),
                        metrics=publish(pd.DataFrame(result["history"]), metrics_stage))


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
