"""`python -m bench.data_loading [--sizes 10000,100000,1000000] [--out FILE]`: wall time and peak RSS of loading
and validating a prompt file, by the columnar reader (the default) and by the row-by-row reader (the baseline).

The files are JSONL prompts like the shipped arithmetic set ({"prompt": "What is 417 + 82? ...", "answer": 499},
~86 bytes a row), written to a temporary folder. Two stages are measured:
- `load_table`: rlhf_core.data.load_table with a str prompt and an answer column, `duplicates: drop` (the checks
  and the repeated-row search; the frame of the file's own columns);
- `read_prompts`: tasks.data.read_prompts, what the flows and `rlhf <flow>`'s pre-flight check call: the same plus
  the canonical columns (`prompt` text and `prompt_messages`, a list with one dict per row).
Each (size, stage, reader) runs in its own process, so its peak RSS (`ru_maxrss`) is its own; `RSS before` is the
process after its imports (tasks.data imports Prefect), so peak - before is what loading the file took.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("load_table", "read_prompts")
READERS = ("columnar", "rows")


def rss_mb(field: str = "VmHWM") -> float:
    """This process's peak (VmHWM) or current (VmRSS) resident memory. Not ru_maxrss: Linux carries that across
    fork and exec, so a child would report its parent's peak."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) / 1024  # kB


def write_prompts(path: Path, rows: int) -> Path:
    rng = random.Random(0)
    with path.open("w") as f:
        for i in range(rows):
            a, b = rng.randrange(1000), rng.randrange(1000)
            f.write(json.dumps({"prompt": f"What is {a} + {b}? Reply with just the number. (#{i})",
                                "answer": a + b}) + "\n")
    return path


def run_one(path: str, stage: str, reader: str) -> dict:
    columnar = reader == "columnar"
    if stage == "load_table":
        from rlhf_core.data import load_table

        def load():
            return load_table(path, {"prompt": str, "answer": object}, duplicates="drop", columnar=columnar)
    else:
        import functools

        import tasks.data
        from rlhf_core.config import DataConfig
        from rlhf_core.data import load_table

        tasks.data.load_table = functools.partial(load_table, columnar=columnar)  # the reader under test

        def load():
            return tasks.data.read_prompts(DataConfig(path=path))
    before = rss_mb("VmRSS")
    start = time.perf_counter()
    rows = len(load())
    return {"stage": stage, "reader": reader, "rows": rows, "seconds": time.perf_counter() - start,
            "rss_before_mb": before, "peak_rss_mb": rss_mb()}


def table(results: list[dict]) -> str:
    head = (f"{'rows':>9} {'stage':12} {'reader':9} {'seconds':>8} {'RSS before MB':>13} {'peak RSS MB':>11} "
            f"{'peak - before':>13}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['rows']:9,} {r['stage']:12} {r['reader']:9} {r['seconds']:8.2f} {r['rss_before_mb']:13.0f} "
                     f"{r['peak_rss_mb']:11.0f} {r['peak_rss_mb'] - r['rss_before_mb']:13.0f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000", help="rows per prompt file, comma-separated")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # path stage reader: one measurement
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one)))
        return 0
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for size in map(int, args.sizes.split(",")):
            path = write_prompts(Path(folder) / f"prompts-{size}.jsonl", size)
            for stage in args.stages:
                for reader in READERS:
                    out = subprocess.run([sys.executable, "-m", "bench.data_loading", "--one", str(path), stage,
                                          reader], capture_output=True, text=True, check=True)
                    results.append({**json.loads(out.stdout.strip().splitlines()[-1]), "file_mb":
                                    path.stat().st_size / 2**20})
                    print(table(results[-1:]).splitlines()[-1], flush=True)
    print("\n" + table(results))
    if args.out:
        from bench.run import machine  # imports torch: only after the measurements (children inherit no RSS)

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"machine": machine(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
