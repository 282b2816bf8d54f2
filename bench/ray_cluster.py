"""`python -m bench.ray_cluster [--workload small] [--iterations 3]`: what Ray costs next to torchrun and threads.

The real GRPO flow (ephemeral Prefect, MLflow, Parquet) on a random-init model of the workload's shape with
SmolLM2's tokenizer, 8 prompts x 4 samples of at most 32 new tokens, KL to the start model (so scoring runs a
reference pass), in a throw-away data folder, once per variant;
each stage's wall seconds per iteration are read back from MLflow (`time/<stage>_s`):
- the update on 2 processes (DDP, gloo, 1 torch thread each): torchrun on this machine, Ray Train on a local Ray
  instance the stage starts and stops, and Ray Train on a running two-node cluster (two raylets on this machine,
  1 CPU each, started by the benchmark as `ray start` would on two machines); and in one process for scale;
- generation and scoring in 2 shards: threads of the flow's process, and two Ray actors on that cluster (iteration
  0 loads the models into the actors; later iterations find them there and copy each new policy in place).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="small")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--only", default="", help="run only the variants whose name contains this text")
    args = parser.parse_args()

    from bench.workloads import scratch_data_folder

    with scratch_data_folder("MLFLOW_TRACKING_URI", "PREFECT_API_URL") as (home, tokenizer_dir):
        address = start_two_nodes()
        try:
            print(json.dumps(measure(home, tokenizer_dir, args.workload, args.iterations, address, args.only),
                             indent=1))
        finally:
            ray_cli("stop", "--force")


def ray_cli(*args: str) -> None:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RLHF_HOME", None)
    subprocess.run([str(Path(sys.executable).parent / "ray"), *args], env=env, check=True, capture_output=True)


def start_two_nodes() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    node = ["--num-cpus", "1", "--num-gpus", "0", "--object-store-memory", str(200 * 2**20)]
    ray_cli("start", "--head", "--port", str(port), "--include-dashboard", "false", *node)
    ray_cli("start", "--address", f"127.0.0.1:{port}", *node)
    return f"127.0.0.1:{port}"


def variants(address: str) -> list[tuple[str, dict]]:
    two = {"num_processes": 2, "num_threads": 1}
    return [("update, 1 process", {}),
            ("update, 2 processes, torchrun", two),
            ("update, 2 processes, Ray Train, local instance per stage", {**two, "launcher": "ray"}),
            ("update, 2 processes, Ray Train, 2-node cluster", {**two, "launcher": "ray", "ray_address": address}),
            ("shards=2, threads", {"shards": 2, "num_threads": 1}),
            ("shards=2, Ray actors on the 2-node cluster", {"shards": 2, "task_runner": "ray", "ray_address": address})]


def measure(home: Path, tokenizer_dir: Path, workload_name: str, iterations: int, address: str,
            only: str = "") -> dict:
    import mlflow
    import torch

    from bench.workloads import WORKLOADS, random_model_folder
    from flows.grpo import grpo
    from rlhf_core.config import (GenerationConfig, GRPOConfig, KLConfig, ModelConfig, OptimConfig, RuntimeConfig,
                                  TrackingConfig)
    from tasks.paths import use_tracking_uri

    workload = WORKLOADS[workload_name]
    model_dir = random_model_folder(workload, home, tokenizer_dir)

    results = {"workload": workload_name, "iterations": iterations, "cpus": os.cpu_count(),
               "load_before": os.getloadavg()[0]}
    default_threads = torch.get_num_threads()
    for seed, (name, settings) in enumerate(variants(address)):
        if only not in name:
            continue
        torch.set_num_threads(default_threads)  # a stage's num_threads is process-wide: undo the last variant's
        config = GRPOConfig(
            iterations=iterations, prompts_per_iteration=8, seed=seed, model=ModelConfig(name_or_path=str(model_dir)),
            generation=GenerationConfig(group_size=4, max_new_tokens=32, temperature=1.0, batch_size=16),
            optim=OptimConfig(lr=1e-4, micro_batch_size=8), kl=KLConfig(coef=0.05), runtime=RuntimeConfig(**settings),
            tracking=TrackingConfig(experiment="bench-ray", registered_model="bench-ray"))
        state = grpo(config, return_state=True)
        use_tracking_uri()
        (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                    filter_string=f"tags.`prefect.flow_run_id` = '{state.state_details.flow_run_id}'")
        client = mlflow.MlflowClient()
        stages = {stage: [round(m.value, 2) for m in client.get_metric_history(run.info.run_id, f"time/{stage}_s")]
                  for stage in ("generation", "scoring", "update")}
        results[name] = {stage: {"per_iteration_s": values, "median_after_first_s": statistics.median(values[1:])}
                         for stage, values in stages.items()}
        print(name, json.dumps(results[name]), flush=True)
    results["load_after"] = os.getloadavg()[0]
    return results


if __name__ == "__main__":
    main()
