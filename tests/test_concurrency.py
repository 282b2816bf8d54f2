"""Concurrent runs sharing one data folder: three `rlhf grpo` processes at once, two with the same config and one
with another seed. Outputs are content-addressed and written once, so nobody overwrites anybody; the stages of the
two identical runs are computed once between them (the second waits on the first's lock, then reads its cache
record); and every run ends with the checkpoint that the same config gives when it runs alone."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from flow_helpers import task_states
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from prefect.client.schemas.sorting import FlowRunSort
from test_crash_resume import REPO, cli_env, crash_config
from test_flow_grpo import STAGES

from flows.grpo import grpo
from rlhf_core.io import sha256_dir

pytestmark = pytest.mark.slow


def test_concurrent_runs_share_work_and_never_each_others_files(prefect_harness, tmp_path, tiny_model_dir,
                                                                monkeypatch, reliability):
    configs = {seed: crash_config(tiny_model_dir).model_copy(update={"seed": seed}) for seed in (0, 1)}
    alone = {}
    for seed, config in configs.items():
        monkeypatch.setenv("RLHF_HOME", str(tmp_path / f"alone-{seed}"))
        alone[seed] = sha256_dir(grpo(config))
    assert alone[0] != alone[1]

    shared = tmp_path / "shared"
    processes = []
    for seed in (0, 0, 1):
        config_file = tmp_path / f"config-{len(processes)}.json"
        config_file.write_text(json.dumps(configs[seed].model_dump(mode="json")))
        processes.append((seed, subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "grpo", "--config", str(config_file)], cwd=REPO,
            env=cli_env(shared, None), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    for seed, process in processes:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
        final = Path(out.strip().splitlines()[-1].removeprefix("output: "))
        assert sha256_dir(final) == alone[seed]  # as if it had run alone

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["grpo"])),
                                     sort=FlowRunSort.START_TIME_DESC, limit=3)
    computed = Counter()
    for run in runs:
        seed = run.parameters["config"]["seed"]
        for name, state in task_states(run.id):
            if name in STAGES and state == "Completed":
                computed[seed, name] += 1
    for name in STAGES:  # 2 iterations: each stage computed twice per distinct config, whatever the overlap
        assert computed[0, name] == 2 and computed[1, name] == 2, (name, computed)
    reliability.record("concurrent runs", "two runs of the same config at once, and a third with another seed",
                       "work done once (lock, then cache hit); no file shared or overwritten; same checkpoints "
                       "as runs alone")
