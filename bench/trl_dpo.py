"""`python -m bench.trl_dpo [--precisions fp32 bf16] [--steps 3] [--out FILE]`: one DPO optimizer step of TRL's
`DPOTrainer` against ours, on the same model shape and batch, in one process, interleaved per precision.

The batch: 8 pairs of a 32-token prompt and two 64-token responses (EOS included) on the `smol` shape (random
weights, SmolLM2's tokenizer), micro-batches of 4 pairs, one AdamW step per 8 pairs, beta 0.1, sigmoid loss. A step
is the reference pass plus the update for both (TRL computes the reference log-probs in each step; the flows
compute them once per data set, so this counts ours as TRL does). Precisions: fp32 against fp32, and TRL's
`bf16=True` (autocast over fp32 weights, as the Hugging Face Trainer does) against ours at
`runtime.mixed_precision: bf16-master` and `bf16`. TRL 1.x turns gradient checkpointing on by default; it is
measured with it (what a user gets) and without (the same compute as ours). Each run is its own process.

TRL is not a dependency of this project. Install it beside it for this comparison only:
`.venv/bin/pip install --no-deps --target /tmp/trl trl==1.16.0`, then run with `PYTHONPATH=/tmp/trl`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from bench.algorithms import measure
from bench.peak import matmul_peak
from bench.workloads import PAD_ID, WORKLOADS, causal_lm, scratch_data_folder
from rlhf_core.allocator import keep_freed_memory

OURS = {"fp32": ["fp32"], "bf16": ["bf16-master", "bf16"]}


def pair_texts(tokenizer, workload) -> list[dict]:
    """Prompt / chosen / rejected texts of exactly the workload's lengths in SmolLM2's tokenizer (a repeated
    one-token word; TRL appends EOS to each response, so responses are one word shorter)."""
    word = {"prompt": " the", "chosen": " yes", "rejected": " no"}
    assert all(len(tokenizer.encode(w, add_special_tokens=False)) == 1 for w in word.values())
    lengths = {"prompt": workload.prompt_len, "chosen": workload.response_len - 1,
               "rejected": workload.response_len - 1}
    return [{k: word[k] * lengths[k] for k in word} for _ in range(workload.prompts)]


def trl_step_seconds(tokenizer, precision: str, steps: int, warmup: int, checkpointing: bool) -> float:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    w = WORKLOADS["smol"]
    times, started = [], []

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            started.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - started[-1])

    policy, reference = causal_lm(w, "cpu", seed=0).train(), causal_lm(w, "cpu", seed=0)
    config = DPOConfig(output_dir="/tmp/bench-trl-dpo", per_device_train_batch_size=w.micro_batch_size // 2,
                       gradient_accumulation_steps=2, max_steps=warmup + steps, learning_rate=1e-6,
                       lr_scheduler_type="constant", beta=0.1, loss_type=["sigmoid"], max_length=None,
                       bf16=precision == "bf16", gradient_checkpointing=checkpointing, use_cpu=True, report_to=[],
                       save_strategy="no", logging_steps=10**6,
                       disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=config, processing_class=tokenizer,
                         train_dataset=Dataset.from_list(pair_texts(tokenizer, w) * (warmup + steps)),
                         callbacks=[StepClock()])
    trainer.train()
    return statistics.median(times[warmup:])


def one(side: str, precision: str, steps: int, warmup: int, checkpointing: bool) -> dict:
    """One side's median step in this (fresh) process."""
    keep_freed_memory()  # as every stage's process does; TRL gets it too
    torch.manual_seed(0)
    if side == "ours":
        stages = measure("dpo", WORKLOADS["smol"], "cpu", precision, steps, warmup)["stages_s"]
        return {"side": "ours", "precision": precision, "step_s": stages["reference"] + stages["update"]}
    from transformers import AutoTokenizer

    with scratch_data_folder() as (_, tokenizer_dir):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.pad_token_id = PAD_ID  # as the workload's models: pad distinct from EOS
    return {"side": "trl", "precision": precision, "gradient_checkpointing": checkpointing,
            "step_s": trl_step_seconds(tokenizer, precision, steps, warmup, checkpointing)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=list(OURS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out")
    parser.add_argument("--one", nargs=3, metavar=("SIDE", "PRECISION", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        side, precision, checkpointing = args.one
        print(json.dumps(one(side, precision, args.steps, args.warmup, checkpointing == "1")))
        return
    import trl

    peaks = {p: matmul_peak(torch.float32 if p == "fp32" else torch.bfloat16) for p in args.precisions}
    # each run in its own process (as `bench.run`), interleaved: TRL with its default gradient checkpointing and
    # without, then ours
    runs = [(side, ours if side == "ours" else precision, checkpointing, precision)
            for precision in args.precisions
            for side, checkpointing in (("trl", True), ("trl", False), ("ours", False))
            for ours in (OURS[precision] if side == "ours" else [None])]
    results = []
    for side, precision, checkpointing, compared in runs:
        out = subprocess.run([sys.executable, "-m", "bench.trl_dpo", "--one", side, precision,
                              str(int(checkpointing)), "--steps", str(args.steps), "--warmup", str(args.warmup)],
                             capture_output=True, text=True, check=True)
        results.append({**json.loads(out.stdout.strip().splitlines()[-1]), "compared_as": compared})
        print(json.dumps(results[-1]), flush=True)
    for precision in args.precisions:
        trl_runs = {r["gradient_checkpointing"]: r["step_s"] for r in results
                    if r["side"] == "trl" and r["compared_as"] == precision}
        for r in results:
            if r["side"] == "ours" and r["compared_as"] == precision:
                r["speedup_vs_trl_default"], r["speedup_vs_trl_no_checkpointing"] = (
                    trl_runs[True] / r["step_s"], trl_runs[False] / r["step_s"])
                print(f"{precision:5} ours ({r['precision']}) {r['step_s']:6.2f} s: {r['speedup_vs_trl_default']:.2f}x "
                      f"TRL's default ({trl_runs[True]:.2f} s), {r['speedup_vs_trl_no_checkpointing']:.2f}x TRL "
                      f"without gradient checkpointing ({trl_runs[False]:.2f} s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"trl": trl.__version__, "torch": torch.__version__, "matmul_peak_flops_per_s": peaks,
                       "steps": args.steps, "warmup": args.warmup, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
