"""Held-out reward of one or more checkpoints: `python scripts/heldout_reward.py CKPT [CKPT ...]`.

Samples `--samples` responses per prompt of `--data` (default: the 40 held-out arithmetic prompts) with the demo's
sampling settings, scores them with a reward function, and prints the mean reward per checkpoint. The same seeds
are used for every checkpoint, so differences come from the weights.
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from rlhf_core.data import load_table
from rlhf_core.generation import chat_prompt_ids, sample_responses
from rlhf_core.models import DEFAULT_MODEL, eos_token_ids, load_causal_lm, resolve_model_path
from rlhf_core.rewards import compute_rewards

PROJECT = Path(__file__).resolve().parents[1]


def heldout_reward(path: Path, prompts: list[str], columns: dict, samples: int, args) -> float:
    model, tokenizer = load_causal_lm(path)
    model.eval()
    prompt_ids = [ids for ids in chat_prompt_ids(tokenizer, prompts) for _ in range(samples)]
    result = sample_responses(model, prompt_ids, eos_ids=eos_token_ids(model, tokenizer),
                              pad_id=tokenizer.pad_token_id, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_p=1.0, seeds=list(range(len(prompt_ids))))
    responses = tokenizer.batch_decode(result.response_ids, skip_special_tokens=True)
    repeated = {k: [v for v in values for _ in range(samples)] for k, values in columns.items()}
    total, _ = compute_rewards([(args.reward, 1.0)], [p for p in prompts for _ in range(samples)], responses, repeated)
    return float(np.mean(total))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help=f"model folders, or {DEFAULT_MODEL}")
    parser.add_argument("--data", default=str(PROJECT / "data" / "arithmetic_eval.jsonl"))
    parser.add_argument("--reward", default="arithmetic_answer")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.7)
    args = parser.parse_args()
    df = load_table(args.data, required={"prompt": str, "answer": object})
    torch.set_num_threads(2)
    for checkpoint in args.checkpoints:
        path = resolve_model_path(checkpoint, Path.home() / ".rlhf" / "models")
        reward = heldout_reward(path, df["prompt"].tolist(), {"answer": df["answer"].tolist()}, args.samples, args)
        print(f"{checkpoint}: held-out mean reward {reward:.3f} ({len(df)} prompts x {args.samples} samples)")


if __name__ == "__main__":
    main()
