"""`python -m bench.generation [--workload smol] [--precision fp32] [--ragged]`: the rollout stage's sampler against
plain transformers `generate` on the same batch (8 prompts x 4 samples, exactly 64 new tokens, temperature 1), side
by side in one process, and both against the decode step's compute bound (the matmul peak); plus the same sampler
on a bfloat16 copy of the weights (`generation.dtype: bfloat16`).

`--ragged`: real batches stop early. A random-init model never picks one EOS token, so the first k token ids all
count as EOS, k chosen so that a row of the near-uniform random model stops within the 64 tokens with probability
1/2; tokens/s then counts the tokens each row really generated (EOS included), which the report gives too."""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench.algorithms import autocast
from bench.peak import matmul_peak, synchronize
from bench.workloads import PAD_ID, WORKLOADS, body_params, causal_lm, token_rows
from rlhf_core.allocator import keep_freed_memory
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


def ragged_eos_ids(vocab_size: int, new_tokens: int) -> list[int]:
    """The first k token ids (PAD left out), k such that a near-uniform next-token distribution hits one of
    them within `new_tokens` steps with probability 1/2: k/V = 1 - 2^(-1/new_tokens)."""
    k = max(1, round(vocab_size * (1 - 0.5 ** (1 / new_tokens))))
    return [i for i in range(k + 1) if i != PAD_ID][:k]


def generated_tokens(responses: torch.Tensor, eos_ids: list[int]) -> int:
    """Tokens `generate` really produced: each row up to its first EOS, included (all of them without EOS).
    responses: [B, T] the new tokens, padded after EOS"""
    if not eos_ids:
        return responses.numel()
    is_eos = torch.isin(responses, torch.tensor(eos_ids, device=responses.device))
    first = torch.where(is_eos.any(-1), is_eos.float().argmax(-1) + 1, torch.full_like(is_eos[:, 0], responses.shape[1],
                                                                                      dtype=torch.long))
    return int(first.sum())


def main() -> None:
    keep_freed_memory()  # as every stage's process does (tasks/runtime.apply_runtime)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workload", default="smol", choices=list(WORKLOADS))
    parser.add_argument("--precision", default="fp32", choices=list(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ragged", action="store_true", help="rows stop at EOS, about half before the end")
    args = parser.parse_args()
    w = WORKLOADS[args.workload]
    model = causal_lm(w, args.device)
    prompt_ids = [p for p in token_rows(w.prompts, w.prompt_len, w.model["vocab_size"], seed=1)
                  for _ in range(w.samples)]
    rows, new_tokens = len(prompt_ids), w.response_len
    input_ids, attention_mask = pad_sequences(prompt_ids, PAD_ID, "left", args.device)
    eos_ids = ragged_eos_ids(w.model["vocab_size"], new_tokens) if args.ragged else []
    generated = {}  # name -> tokens generated per call (EOS included)

    def ours():
        with autocast(args.device, args.precision):
            out = sample_responses(model, prompt_ids, eos_ids=eos_ids, pad_id=PAD_ID, max_new_tokens=new_tokens,
                                   temperature=1.0, top_p=1.0, seeds=list(range(rows)))
        generated["rlhf_core.sample_responses"] = sum(map(len, out.response_ids))

    def transformers_generate():
        with torch.no_grad(), autocast(args.device, args.precision):
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask.long(), do_sample=True,
                                 temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new_tokens,
                                 min_new_tokens=1 if eos_ids else new_tokens, pad_token_id=PAD_ID,
                                 eos_token_id=eos_ids or None)
        generated["transformers.generate"] = generated_tokens(out[:, input_ids.shape[1]:], eos_ids)

    rollout_model = causal_lm(w, args.device).to(torch.bfloat16)  # what generation.dtype: bfloat16 loads

    def ours_bf16_weights():
        out = sample_responses(rollout_model, prompt_ids, eos_ids=eos_ids, pad_id=PAD_ID,
                               max_new_tokens=new_tokens, temperature=1.0, top_p=1.0, seeds=list(range(rows)))
        generated["rlhf_core.sample_responses, bf16 weights"] = sum(map(len, out.response_ids))

    seconds = {"rlhf_core.sample_responses": timed(ours, args.device, args.repeats),
               "transformers.generate": timed(transformers_generate, args.device, args.repeats),
               "rlhf_core.sample_responses, bf16 weights": timed(ours_bf16_weights, args.device, args.repeats)}
    peaks = {name: matmul_peak(dtype, args.device) for name, dtype in DTYPES.items()}
    head = model.get_output_embeddings().weight.numel()
    decode_flops = 2 * (body_params(model) + head) * rows * new_tokens  # weights only: the decode's bulk
    report = {"workload": args.workload, "precision": args.precision, "rows": rows, "new_tokens": new_tokens,
              "ragged": args.ragged, "eos_ids": len(eos_ids), "matmul_peak_flops_per_s": peaks}
    for name, s in seconds.items():
        peak = peaks["bf16" if "bf16" in name else args.precision]
        report[name] = {"seconds": s, "generated_tokens": generated[name], "tokens_per_s": generated[name] / s,
                        "fraction_of_matmul_peak_of_its_dtype": decode_flops / s / peak}
    # per generated token: with --ragged the two samplers' random rows stop at different steps
    report["speedup_vs_generate"] = {name: report[name]["tokens_per_s"] / report["transformers.generate"][
        "tokens_per_s"] for name in seconds}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
