"""`python -m bench.generation [--workload smol] [--precision fp32]`: the rollout stage's sampler against plain
transformers `generate` on the same batch (8 prompts x 4 samples, exactly 64 new tokens, temperature 1), side by
side in one process, and both against the decode step's compute bound (the matmul peak); plus the same sampler on
a bfloat16 copy of the weights (`generation.dtype: bfloat16`)."""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench.algorithms import autocast
from bench.peak import matmul_peak, synchronize
from bench.workloads import PAD_ID, WORKLOADS, body_params, causal_lm, token_rows
from rlhf_core.generation import pad_sequences, sample_responses

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def timed(fn, device: str, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workload", default="smol", choices=list(WORKLOADS))
    parser.add_argument("--precision", default="fp32", choices=list(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    w = WORKLOADS[args.workload]
    model = causal_lm(w, args.device)
    prompt_ids = [p for p in token_rows(w.prompts, w.prompt_len, w.model["vocab_size"], seed=1)
                  for _ in range(w.samples)]
    rows, new_tokens = len(prompt_ids), w.response_len
    input_ids, attention_mask = pad_sequences(prompt_ids, PAD_ID, "left", args.device)

    def ours():
        with autocast(args.device, args.precision):
            sample_responses(model, prompt_ids, eos_ids=[], pad_id=PAD_ID, max_new_tokens=new_tokens,
                             temperature=1.0, top_p=1.0, seeds=list(range(rows)))

    def transformers_generate():
        with torch.no_grad(), autocast(args.device, args.precision):
            model.generate(input_ids=input_ids, attention_mask=attention_mask.long(), do_sample=True,
                           temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           pad_token_id=PAD_ID, eos_token_id=None)

    rollout_model = causal_lm(w, args.device).to(torch.bfloat16)  # what generation.dtype: bfloat16 loads

    def ours_bf16_weights():
        sample_responses(rollout_model, prompt_ids, eos_ids=[], pad_id=PAD_ID, max_new_tokens=new_tokens,
                         temperature=1.0, top_p=1.0, seeds=list(range(rows)))

    seconds = {"rlhf_core.sample_responses": timed(ours, args.device, args.repeats),
               "transformers.generate": timed(transformers_generate, args.device, args.repeats),
               "rlhf_core.sample_responses, bf16 weights": timed(ours_bf16_weights, args.device, args.repeats)}
    peaks = {name: matmul_peak(dtype, args.device) for name, dtype in DTYPES.items()}
    head = model.get_output_embeddings().weight.numel()
    decode_flops = 2 * (body_params(model) + head) * rows * new_tokens  # weights only: the decode's bulk
    report = {"workload": args.workload, "precision": args.precision, "rows": rows, "new_tokens": new_tokens,
              "matmul_peak_flops_per_s": peaks}
    for name, s in seconds.items():
        peak = peaks["bf16" if "bf16" in name else args.precision]
        report[name] = {"seconds": s, "tokens_per_s": rows * new_tokens / s,
                        "fraction_of_matmul_peak_of_its_dtype": decode_flops / s / peak}
    report["speedup_vs_generate"] = {name: seconds["transformers.generate"] / s for name, s in seconds.items()}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
