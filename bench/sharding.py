"""`python -m bench.sharding [--workload smol] [--runners thread,dask,ray]`: wall time of the generation stage
unsharded vs sharded in two, on each task runner.

A random-init model of the workload's shape with SmolLM2's tokenizer (it never samples EOS, so every response has
exactly `response_len` tokens), `prompts x samples` rows decoded in batches of half the rows: shards = 1 decodes
the two batches one after the other, shards = 2 side by side. Each variant runs the stage twice inside one Prefect
flow (different seeds, so no cache hit): `cold` includes the runner's start (a local Dask/Ray cluster) and each
worker loading the model, `warm` is the second call (models already in memory). All in a throw-away data folder.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="smol")
    parser.add_argument("--runners", default="thread,dask,ray")
    args = parser.parse_args()

    from bench.workloads import scratch_data_folder

    with scratch_data_folder("PREFECT_API_URL") as (home, tokenizer_dir):
        print(json.dumps(measure(home, tokenizer_dir, args.workload, args.runners.split(",")), indent=1))


def variants(runners: list[str]) -> list[tuple[str, dict]]:
    out = [("shards=1", {}), ("shards=1, 1 torch thread", {"num_threads": 1})]
    for runner in runners:
        out.append((f"shards=2 {runner}", {"task_runner": runner, "shards": 2}))
        if runner == "thread":  # two shards in one process share its cores: one torch thread each
            out.append(("shards=2 thread, 1 torch thread", {"task_runner": runner, "shards": 2, "num_threads": 1}))
    return out


def measure(home: Path, tokenizer_dir: Path, workload_name: str, runners: list[str]) -> dict:
    import importlib.util

    import pandas as pd
    import torch
    from prefect import flow

    from bench.workloads import WORKLOADS, random_model_folder
    from rlhf_core.config import GenerationConfig, RuntimeConfig
    from rlhf_core.io import sha256_dir
    from tasks.refs import CheckpointRef, publish
    from tasks.sharded_stages import generation_stage
    from tasks.sharding import RUNNER_EXTRAS, shard_runner

    workload = WORKLOADS[workload_name]
    model_dir = random_model_folder(workload, home, tokenizer_dir)
    policy = CheckpointRef(path=str(model_dir), sha256=sha256_dir(model_dir))
    prompts = publish(pd.DataFrame({"prompt_id": range(workload.prompts),
                                    "prompt": [f"Write a short story about the number {i}." for i in
                                               range(workload.prompts)]}), "prompts")
    rows = workload.prompts * workload.samples
    generation = GenerationConfig(group_size=workload.samples, max_new_tokens=workload.response_len,
                                  temperature=1.0, batch_size=rows // 2)

    @flow(name="bench-sharding")
    def two_calls(runtime, seed):  # unannotated: the types are imported locally, pydantic cannot see them
        times = []
        with shard_runner(runtime) as runner:
            for call in range(2):
                start = time.perf_counter()
                generation_stage(policy, prompts, generation, runtime, None, seed, call, runner=runner)
                times.append(time.perf_counter() - start)
        return times

    results = {"workload": workload_name, "rows": rows, "new_tokens": workload.response_len,
               "batch_size": generation.batch_size, "cpus": os.cpu_count(), "load_before": os.getloadavg()[0]}
    default_threads = torch.get_num_threads()
    for seed, (name, settings) in enumerate(variants(runners)):
        torch.set_num_threads(default_threads)  # a stage's num_threads is process-wide: undo the last variant's
        runner = settings.get("task_runner", "thread")
        if runner != "thread" and importlib.util.find_spec(RUNNER_EXTRAS[runner][0]) is None:
            results[name] = "not installed"
            continue
        cold, warm = two_calls(RuntimeConfig(**settings), seed)
        results[name] = {"cold_s": round(cold, 2), "warm_s": round(warm, 2),
                         "warm_tokens_per_s": round(rows * workload.response_len / warm, 1)}
        print(name, results[name], flush=True)
    results["load_after"] = os.getloadavg()[0]
    return results


if __name__ == "__main__":
    main()
