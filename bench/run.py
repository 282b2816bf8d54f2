"""`python -m bench.run [--workloads smol small] [--algorithms ...] [--precisions fp32 bf16] [--out FILE]`

Runs every (workload, algorithm, precision) in its own process (so peak RSS is its own), after measuring the
machine's matmul peak per dtype, and prints a table; `--out` also writes the results as JSON with the machine and
library versions. `python -m bench.run --profile grpo smol bf16` prints one step's op-level profile instead (where
the time goes); `python -m bench.run --compare BEFORE.json AFTER.json` prints the speed-ups between two `--out`
files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

from bench.algorithms import STEPS, measure
from bench.peak import matmul_peak
from bench.workloads import WORKLOADS
from rlhf_core.allocator import keep_freed_memory

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# a precision's name -> the matmul peak its MFU is measured against
PRECISIONS = {"fp32": "fp32", "bf16": "bf16", "bf16-master": "bf16"}


def run_one(algorithm: str, workload: str, precision: str, device: str, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    w = WORKLOADS[workload]
    result = measure(algorithm, w, device, precision, steps, warmup)
    stages = result["stages_s"]
    rows = {"grpo": w.prompts * w.samples, "ppo": w.prompts * w.samples, "dpo": 2 * w.prompts,
            "kto": w.prompts, "reward_model": 2 * w.prompts}[algorithm]
    result.update(
        algorithm=algorithm, workload=workload, precision=precision, device=device,
        update_tokens_per_s=rows * (w.prompt_len + w.response_len) / stages["update"],
        update_flops_per_s=result["update_flops"] / stages["update"],
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if "generation" in stages:
        result["generated_tokens_per_s"] = w.prompts * w.samples * w.response_len / stages["generation"]
    return result


def profile_one(algorithm: str, workload: str, precision: str, device: str, top: int = 25) -> str:
    """Where one step's time goes, op by op: one warm-up step, then one step under torch.profiler; the ops with
    the most self time (matmuls vs casts vs softmax vs the optimizer vs dispatch)."""
    from torch.profiler import ProfilerActivity, profile

    from bench.algorithms import STEPS, Stages, prepare

    setup, _ = prepare(algorithm, WORKLOADS[workload], device, precision)
    STEPS[algorithm](setup, Stages(device))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    stages = Stages(device)
    with profile(activities=activities) as prof:
        STEPS[algorithm](setup, stages)
    sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    breakdown = ", ".join(f"{k} {v:.2f} s" for k, v in stages.items())
    return f"stages: {breakdown}\n" + prof.key_averages().table(sort_by=sort, row_limit=top)


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def table(results: list[dict], peaks: dict[str, float]) -> str:
    head = (f"{'workload':8} {'algorithm':12} {'prec':5} {'step s':>8} {'update s':>9} {'gen tok/s':>9} "
            f"{'upd tok/s':>9} {'MFU':>6} {'RSS MB':>7}  stages (s)")
    lines = [head, "-" * len(head)]
    for r in results:
        stages = " ".join(f"{k}={v:.2f}" for k, v in r["stages_s"].items())
        generated = f"{r['generated_tokens_per_s']:9.0f}" if "generated_tokens_per_s" in r else f"{'-':>9}"
        mfu = r["update_flops_per_s"] / peaks[PRECISIONS[r["precision"]]]
        lines.append(f"{r['workload']:8} {r['algorithm']:12} {r['precision']:11} {r['step_s']:8.2f} "
                     f"{r['stages_s']['update']:9.2f} {generated} {r['update_tokens_per_s']:9.0f} {mfu:6.1%} "
                     f"{r['peak_rss_mb']:7.0f}  {stages}")
    return "\n".join(lines)


# (label, how to read it from a result, True when larger is better)
COMPARED = [("step s", lambda r: r["step_s"], False), ("update s", lambda r: r["stages_s"]["update"], False),
            ("gen tok/s", lambda r: r.get("generated_tokens_per_s"), True), ("MFU", lambda r: r.get("mfu"), True)]


def compare(before: dict, after: dict) -> str:
    """The runs both result files hold, matched by (workload, algorithm, precision): each measure before and
    after, and the speed-up (before/after for times, after/before for throughputs and MFU: > 1 is faster). Files
    from different machines are compared too, under a warning: only MFU is normalised by each run's own peak."""
    def key(r: dict) -> tuple:
        return r["workload"], r["algorithm"], r["precision"]

    old = {key(r): r for r in before["results"]}
    lines = []
    if before["machine"].get("cpu") != after["machine"].get("cpu") or before["machine"].get("gpu") != after[
            "machine"].get("gpu"):
        lines.append(f"warning: different machines ({before['machine'].get('cpu')} vs "
                     f"{after['machine'].get('cpu')}): compare MFU, not seconds")
    head = f"{'workload':8} {'algorithm':12} {'prec':5} " + " ".join(f"{label:>24}" for label, _, _ in COMPARED)
    lines += [head, "-" * len(head)]
    for r in after["results"]:
        if key(r) not in old:
            continue
        cells = []
        for _, read, larger_is_better in COMPARED:
            a, b = read(old[key(r)]), read(r)
            if a is None or b is None or min(a, b) <= 0:
                cells.append(f"{'-':>24}")
                continue
            ratio = b / a if larger_is_better else a / b
            cells.append(f"{a:8.3g} -> {b:8.3g} {ratio:5.2f}x")
        lines.append(f"{r['workload']:8} {r['algorithm']:12} {r['precision']:11} " + " ".join(cells))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=[w for w in WORKLOADS if w != "tiny"],
                        choices=list(WORKLOADS))
    parser.add_argument("--algorithms", nargs="+", default=list(STEPS), choices=list(STEPS))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=list(PRECISIONS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--one", nargs=3, metavar=("ALGORITHM", "WORKLOAD", "PRECISION"), help=argparse.SUPPRESS)
    parser.add_argument("--profile", nargs=3, metavar=("ALGORITHM", "WORKLOAD", "PRECISION"),
                        help="print one step's op-level profile instead (where the time goes)")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"),
                        help="print the speed-ups between two --out files instead of running anything")
    args = parser.parse_args()
    keep_freed_memory()  # as every stage's process does (tasks/runtime.apply_runtime); the peak's buffers too
    if args.compare:
        before, after = (json.loads(Path(path).read_text()) for path in args.compare)
        print(compare(before, after))
        return 0
    if args.profile:
        print(profile_one(*args.profile, args.device))
        return 0
    if args.one:
        print(json.dumps(run_one(*args.one, args.device, args.steps, args.warmup)))
        return 0

    started = time.time()
    peaks = {name: matmul_peak(dtype, args.device) for name, dtype in DTYPES.items()}
    print("matmul peak: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()), flush=True)
    results = []
    for workload in args.workloads:
        for algorithm in args.algorithms:
            for precision in args.precisions:
                out = subprocess.run([sys.executable, "-m", "bench.run", "--one", algorithm, workload, precision,
                                      "--device", args.device, "--steps", str(args.steps),
                                      "--warmup", str(args.warmup)], capture_output=True, text=True, check=True)
                results.append(json.loads(out.stdout.strip().splitlines()[-1]))
                results[-1]["mfu"] = results[-1]["update_flops_per_s"] / peaks[PRECISIONS[precision]]
                print(table(results[-1:], peaks).splitlines()[-1], flush=True)
    print("\n" + table(results, peaks))
    if args.out:
        report = {"machine": machine(), "matmul_peak_flops_per_s": peaks, "steps": args.steps,
                  "warmup": args.warmup, "wall_s": time.time() - started, "results": results}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
