"""`python -m bench.batching [--workload smol] [--steps 3]`: length-sorted micro-batches against micro-batches
in the mini-batch's random order, on a GRPO update over rows of unequal lengths (the fixed workloads' rows are all
equally long, so sorting cannot show there).

Rows: the workload's prompts x samples, a length per prompt drawn from [prompt_len / 4, prompt_len] and per
response from [response_len / 16, response_len] (seeded; 8-32 and 4-64 tokens on `smol`). Prints, as JSON, the
median seconds of an update either way and the token positions each computes (rows x padded width, summed over
micro-batches).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench.peak import synchronize
from bench.workloads import PAD_ID, WORKLOADS, causal_lm, token_rows
from rlhf_core.advantages import OUTCOME_ADVANTAGES
from rlhf_core.batch import collate, length_sorted
from rlhf_core.grpo import grpo_loss
from rlhf_core.logprobs import batched_response_logprobs
from rlhf_core.training import adamw
from rlhf_core.update import run_update

LOSS = dict(clip_eps_low=0.2, clip_eps_high=0.28, kl_coef=0.05, kl_estimator="k3", aggregation="token-mean",
            temperature=1.0, chunk_size=1024)


def ragged_batch(workload, device: str) -> dict[str, torch.Tensor]:
    rows = workload.prompts * workload.samples
    vocab = workload.model["vocab_size"]
    generator = torch.Generator().manual_seed(3)
    shortest_prompt, shortest_response = max(1, workload.prompt_len // 4), max(1, workload.response_len // 16)
    prompt_lens = torch.randint(shortest_prompt, workload.prompt_len + 1, (workload.prompts,), generator=generator)
    response_lens = torch.randint(shortest_response, workload.response_len + 1, (rows,), generator=generator)
    prompt_rows = token_rows(workload.prompts, workload.prompt_len, vocab, seed=1)
    response_rows = token_rows(rows, workload.response_len, vocab, seed=2)
    prompts = [row[:n] for row, n in zip(prompt_rows, prompt_lens.tolist())
               for _ in range(workload.samples)]  # a group's samples share its prompt
    responses = [row[:n] for row, n in zip(response_rows, response_lens.tolist())]
    batch = collate(prompts, responses, PAD_ID, device=device)
    group_ids = torch.arange(workload.prompts).repeat_interleave(workload.samples)
    batch["advantages"] = OUTCOME_ADVANTAGES["grpo"](torch.randn(rows, generator=generator), group_ids).to(device)
    return batch


def positions_computed(batch: dict[str, torch.Tensor], order: torch.Tensor, micro_batch_size: int) -> int:
    """Token positions the model runs over when `order` is cut into micro-batches (padding trimmed per
    micro-batch as `select_rows` does): rows x (longest prompt + longest response) per micro-batch."""
    prompt_lens, response_lens = batch["prompt_mask"].sum(1), batch["response_mask"].sum(1)
    return sum(len(rows) * int(prompt_lens[rows].max() + response_lens[rows].max())
               for rows in order.split(micro_batch_size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="smol", choices=list(WORKLOADS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    w = WORKLOADS[args.workload]
    policy = causal_lm(w, args.device).train()
    optimizer = adamw([{"params": list(policy.parameters())}], lr=1e-6)
    batch = ragged_batch(w, args.device)
    batch["ref_logprobs"] = batched_response_logprobs(causal_lm(w, args.device, seed=1), batch,
                                                      micro_batch_size=w.micro_batch_size)

    def update(sort_by_length: bool) -> float:
        synchronize(args.device)
        start = time.perf_counter()
        run_update(policy, optimizer, batch, lambda m, micro, norm: grpo_loss(
            m, micro, norm, norm_length=w.response_len, **LOSS), epochs=1, mini_batches=1,
            micro_batch_size=w.micro_batch_size, max_grad_norm=1.0, seed=0, sort_by_length=sort_by_length)
        synchronize(args.device)
        return time.perf_counter() - start

    seconds = {True: [], False: []}
    for step in range(args.steps + 1):  # alternate, so drift in the machine's speed hits both alike
        for sort in (True, False):
            elapsed = update(sort)
            if step > 0:  # the first of each is warm-up
                seconds[sort].append(elapsed)
    order = torch.randperm(len(batch["response_mask"]), generator=torch.Generator().manual_seed(0))
    order = order.to(args.device)
    report = {"workload": args.workload, "rows": len(order), "micro_batch_size": w.micro_batch_size,
              "real_tokens": int(batch["prompt_mask"].sum() + batch["response_mask"].sum()),
              "length_sorted": {"update_s": statistics.median(seconds[True]),
                                "positions": positions_computed(batch, length_sorted(batch, order),
                                                                w.micro_batch_size)},
              "random_order": {"update_s": statistics.median(seconds[False]),
                               "positions": positions_computed(batch, order, w.micro_batch_size)}}
    report["speedup"] = report["random_order"]["update_s"] / report["length_sorted"]["update_s"]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
