"""`python -m bench.flow_overhead [--iterations 3]`: what Prefect, Parquet, model loading and MLflow add to a GRPO
iteration on the `smol` workload.

Runs the real GRPO flow (ephemeral Prefect, MLflow SQLite store, Parquet stages, a registered checkpoint per
iteration) on a random-init SmolLM2-shaped model with SmolLM2's tokenizer (8 prompts x 4 samples, 64 new tokens),
in a throw-away data folder, then the same step through `bench.algorithms` (the same rlhf_core calls, no flow).
Overhead = flow iteration wall time (the sum of its stage clocks, tracking included) - the bare step's wall time,
medians over the iterations after the first; the bare step uses the flow's padded prompt length (the arithmetic
prompts with the chat template are longer than the workload's 32 tokens). Part of the overhead is the checkpoint
each iteration writes for crash-resume (weights + optimizer state + hash), timed inside the update task
(`time/checkpoint_s`) and reported apart: the rest is what Prefect, Parquet and MLflow cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

import pandas as pd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=3)
    args = parser.parse_args()

    from bench.workloads import scratch_data_folder

    with scratch_data_folder("MLFLOW_TRACKING_URI", "PREFECT_API_URL") as (home, tokenizer_dir):
        print(json.dumps(measure_overhead(home, tokenizer_dir, args.iterations), indent=1))


def measure_overhead(home: Path, tokenizer_dir: Path, iterations: int) -> dict:
    import mlflow

    from bench.algorithms import measure
    from bench.workloads import WORKLOADS, random_model_folder
    from flows.grpo import grpo
    from rlhf_core.config import GenerationConfig, GRPOConfig, KLConfig, ModelConfig, OptimConfig, TrackingConfig
    from tasks.paths import use_tracking_uri

    workload = WORKLOADS["smol"]
    model_dir = random_model_folder(workload, home, tokenizer_dir)

    config = GRPOConfig(iterations=iterations, prompts_per_iteration=workload.prompts,
                        model=ModelConfig(name_or_path=str(model_dir)),
                        generation=GenerationConfig(group_size=workload.samples, max_new_tokens=workload.response_len,
                                                    temperature=1.0),
                        kl=KLConfig(coef=0.05), optim=OptimConfig(lr=1e-6, micro_batch_size=workload.micro_batch_size),
                        tracking=TrackingConfig(experiment="bench-overhead", registered_model="bench-smol"))
    state = grpo(config, return_state=True)
    use_tracking_uri()
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("bench-overhead").experiment_id])
    time_keys = [k for k in run.data.metrics if k.startswith("time/")]
    per_iteration = {k: {m.step: m.value for m in client.get_metric_history(run.info.run_id, k)} for k in time_keys}
    stage_keys = [k for k in time_keys if k != "time/checkpoint_s"]  # the stage clocks; the checkpoint is in update
    warm = range(1, iterations)
    flow_wall = statistics.median(sum(per_iteration[k][i] for k in stage_keys) for i in warm)
    prompt_len = max(len(ids) for path in (home / "artifacts" / "rollouts").glob("*.parquet")
                     for ids in pd.read_parquet(path)["prompt_ids"])
    bare = measure("grpo", replace(workload, prompt_len=prompt_len), "cpu", "fp32", steps=max(2, len(warm)),
                   warmup=1)
    checkpoint_s = statistics.median(per_iteration["time/checkpoint_s"][i] for i in warm)  # timed in the task
    return {
        "flow_state": state.name, "iterations_measured": len(warm),
        "flow_iteration_s": flow_wall,
        "flow_stages_s": {k: statistics.median(per_iteration[k][i] for i in warm) for k in stage_keys},
        "bare_step_s": bare["step_s"], "bare_stages_s": bare["stages_s"],
        "bare_prompt_len": prompt_len,
        "overhead_s": flow_wall - bare["step_s"],
        "overhead_fraction": (flow_wall - bare["step_s"]) / flow_wall,
        "checkpoint_write_s": checkpoint_s,
        "prefect_parquet_mlflow_fraction": (flow_wall - bare["step_s"] - checkpoint_s) / flow_wall,
        "tracking_fraction": statistics.median(per_iteration["time/tracking_s"][i] for i in warm) / flow_wall,
    }


if __name__ == "__main__":
    main()
