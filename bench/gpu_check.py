"""`python -m bench.gpu_check [--device cuda] [--dry] [--out DIR]`: the prepared GPU check, one command.

Sized for one lent GPU machine (an H200 with torch + transformers preinstalled, no network, so nothing is
installed there; Prefect, MLflow and peft may be missing, and only rlhf_core and bench are needed): it runs

1. the environment: torch, transformers, the device, which optional packages import;
2. the CUDA tests of rlhf_core (`tests/test_cuda.py`: every algorithm's step on the device, CPU-vs-GPU agreement),
   when pytest is there;
3. the bench harness on the device for every algorithm, fp32 and bf16, MFU against the matmul peak measured in
   the same run (`bench.run`; the smol workload is SmolLM2-135M's shape, so its GRPO bf16 row is a GRPO update on
   SmolLM2's shape);
4. generation tokens/s of the rollout sampler against transformers `generate` (`bench.generation`), fp32 and bf16.

Each step runs in its own process with its own time limit, so one failing step leaves the others' results; the
whole check writes `gpu_check.json` and `gpu_check.md` under --out and prints the markdown. `--dry --device cpu`
runs the same steps on tiny shapes (the `tiny` workload), so the script is known to work before a GPU is lent.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("prefect", "mlflow", "peft", "pytest", "vllm")


def environment(device: str) -> dict:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": device,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "cuda": torch.version.cuda, "installed": {name: importlib.util.find_spec(name) is not None
                                                      for name in OPTIONAL}}


def step(name: str, command: list[str], timeout_s: int) -> dict:
    """Runs one step in its own process; its output's tail, exit status and wall time."""
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        status, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        status, output = "timeout", f"{e.stdout or ''}{e.stderr or ''}"
        output = output.decode() if isinstance(output, bytes) else output
    result = {"step": name, "command": " ".join(command), "status": status,
              "wall_s": round(time.perf_counter() - started, 1), "output_tail": output[-4000:]}
    print(f"{name}: status {status}, {result['wall_s']} s", flush=True)
    return result


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# GPU check ({'dry run, ' if report['dry'] else ''}{env['gpu'] or env['device']})", "",
             f"torch {env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']}, python "
             f"{env['python']}; installed: {', '.join(k for k, v in env['installed'].items() if v) or 'none'}; "
             f"total {report['wall_s']:.0f} s", "", "| step | status | wall s |", "|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['wall_s']} |" for s in report["steps"]]
    for s in report["steps"]:
        lines += ["", f"## {s['step']}", "", f"`{s['command']}`", "", "```text", s["output_tail"].strip(), "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dry", action="store_true", help="tiny shapes, to check the script itself (e.g. on CPU)")
    parser.add_argument("--out", default=str(ROOT / "build" / "gpu-check"))
    args = parser.parse_args()
    python, workload = sys.executable, "tiny" if args.dry else "smol"
    out = Path(args.out)
    (out / "bench").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    steps = []
    if importlib.util.find_spec("pytest") is not None:
        steps.append(step("cuda tests", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest",
                                         "tests/test_cuda.py"], timeout_s=180))
    steps.append(step("bench: every algorithm, fp32 and bf16", [
        python, "-m", "bench.run", "--device", args.device, "--workloads", workload, "--steps", "2",
        "--out", str(out / "bench" / f"{workload}.json")], timeout_s=300))
    for precision in ("fp32", "bf16"):
        steps.append(step(f"generation vs generate, {precision}", [
            python, "-m", "bench.generation", "--device", args.device, "--workload", workload, "--precision",
            precision, "--repeats", "2"], timeout_s=120))
    report = {"dry": args.dry, "environment": environment(args.device), "steps": steps,
              "wall_s": time.perf_counter() - started}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(s["status"] == 0 for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
