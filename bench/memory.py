"""`python -m bench.memory [--workload smol] [--steps 2] [--out FILE]`

Peak memory and step time of one GRPO iteration's model work (reference log-probs, then the update's optimizer
steps) under full fine-tuning and LoRA, each with and without gradient checkpointing. Each configuration runs in
its own process, so its peak RSS (`ru_maxrss`) is its own. The models and calls are the ones the flow's tasks
use:
- full: the policy trains every weight (AdamW state for all of them); the reference is a second, frozen copy,
  as the flow keeps the start checkpoint in memory beside the policy.
- lora: one model; LoraConfig's defaults (rank 16 on q/k/v/o); the reference is the policy with its adapter
  disabled (`rlhf_core.lora.adapter_disabled`), so no second copy.
Generation is left out (it is the same under every configuration, and `bench.run` measures it); the responses
are random token ids of the workload's length. The first step is a warm-up (it also allocates AdamW's state);
the median of the others is reported.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.run import machine
from bench.workloads import PAD_ID, WORKLOADS, causal_lm, token_rows
from rlhf_core.batch import collate
from rlhf_core.checkpoint import trainable_parameters
from rlhf_core.config import LoraConfig
from rlhf_core.grpo import grpo_update
from rlhf_core.logprobs import batched_response_logprobs
from rlhf_core.lora import adapter_disabled, add_lora
from rlhf_core.models import enable_gradient_checkpointing
from rlhf_core.training import adamw

CONFIGS = {"full": (False, False), "full+gc": (False, True), "lora": (True, False), "lora+gc": (True, True)}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_one(name: str, workload: str, steps: int) -> dict:
    use_lora, checkpointing = CONFIGS[name]
    w = WORKLOADS[workload]
    torch.manual_seed(0)
    policy = causal_lm(w, "cpu")
    if use_lora:
        lora = LoraConfig()
        add_lora(policy, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules)
        reference = None
    else:
        reference = causal_lm(w, "cpu")  # same seed: the start weights
        for param in reference.parameters():
            param.requires_grad_(False)
    if checkpointing:
        enable_gradient_checkpointing(policy)
    optimizer = adamw([{"params": trainable_parameters(policy)}], lr=1e-6)
    rows = w.prompts * w.samples
    batch = collate(token_rows(rows, w.prompt_len, policy.config.vocab_size, 1),
                    token_rows(rows, w.response_len, policy.config.vocab_size, 2), PAD_ID)
    rewards = torch.randn(rows, generator=torch.Generator().manual_seed(0))
    batch["advantages"] = rewards - rewards.view(w.prompts, w.samples).mean(1).repeat_interleave(w.samples)  # [P*G]
    loaded_mb = rss_mb()
    reference_s, update_s = [], []
    for _ in range(steps):
        start = time.perf_counter()
        if use_lora:
            with adapter_disabled(policy):
                ref = batched_response_logprobs(policy, batch, micro_batch_size=w.micro_batch_size)
        else:
            ref = batched_response_logprobs(reference, batch, micro_batch_size=w.micro_batch_size)
        batch["ref_logprobs"] = ref
        reference_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        grpo_update(policy, optimizer, batch, epochs=1, mini_batches=1, micro_batch_size=w.micro_batch_size,
                    max_grad_norm=1.0, seed=0, clip_eps_low=0.2, clip_eps_high=0.28, kl_coef=0.05,
                    kl_estimator="k3", aggregation="token-mean", norm_length=w.response_len, temperature=1.0,
                    chunk_size=1024)
        update_s.append(time.perf_counter() - start)
    timed = slice(1, None) if steps > 1 else slice(None)
    return {"config": name, "lora": use_lora, "gradient_checkpointing": checkpointing, "workload": workload,
            "trainable_params": sum(p.numel() for p in trainable_parameters(policy)),
            "total_params": sum(p.numel() for p in policy.parameters()) - sum(
                p.numel() for n, p in policy.named_parameters() if "lora_" in n),
            "rss_after_load_mb": loaded_mb, "peak_rss_mb": rss_mb(),
            "reference_s": statistics.median(reference_s[timed]), "update_s": statistics.median(update_s[timed]),
            "steps": steps}


def table(results: list[dict]) -> str:
    head = (f"{'config':8} {'trainable':>12} {'RSS loaded MB':>13} {'peak RSS MB':>11} {'reference s':>11} "
            f"{'update s':>9}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['config']:8} {r['trainable_params']:12,} {r['rss_after_load_mb']:13.0f} "
                     f"{r['peak_rss_mb']:11.0f} {r['reference_s']:11.2f} {r['update_s']:9.2f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="smol", choices=list(WORKLOADS))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=3, help="reference + update steps; the first is a warm-up")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.workload, args.steps)))
        return 0
    started, results = time.time(), []
    for name in args.configs:
        out = subprocess.run([sys.executable, "-m", "bench.memory", "--one", name, "--workload", args.workload,
                              "--steps", str(args.steps)], capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(table(results[-1:]).splitlines()[-1], flush=True)
    print("\n" + table(results))
    if args.out:
        report = {"machine": machine(), "workload": args.workload, "steps": args.steps,
                  "wall_s": time.time() - started, "results": results}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
