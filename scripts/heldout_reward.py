"""Held-out evaluation of checkpoints: `python scripts/heldout_reward.py CKPT [CKPT ...] [options]`.

Samples `--samples` responses per prompt of `--data` with the same seeds for every checkpoint, scores them with a
reward function (`--reward`) or a reward model (`--reward-model`, a folder or a models:/ URI), and prints per
checkpoint the mean reward, the judge's win rate against the first checkpoint (the reference: response k of a
prompt against the reference's response k; a tie counts one half) and the KL to the reference: the mean over
responses of the summed per-token log-ratio log pi(y_t) - log ref(y_t) on the candidate's own samples (k1).
Defaults: the 40 held-out arithmetic prompts and `arithmetic_answer`, as for the GRPO demo.
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from rlhf_core.batch import collate
from rlhf_core.data import load_table
from rlhf_core.chat import chat_prompt_ids
from rlhf_core.generation import sample_responses
from rlhf_core.logprobs import batched_response_logprobs
from rlhf_core.models import DEFAULT_MODEL, eos_token_ids, load_causal_lm, resolve_model_path
from rlhf_core.rewards import compute_rewards
from tasks.paths import models_dir

PROJECT = Path(__file__).resolve().parents[1]


def sample(path: Path, prompts: list[str], samples: int, args):
    model, tokenizer = load_causal_lm(path)
    prompt_ids = [ids for ids in chat_prompt_ids(tokenizer, prompts) for _ in range(samples)]
    result = sample_responses(model.eval(), prompt_ids, eos_ids=eos_token_ids(model, tokenizer),
                              pad_id=tokenizer.pad_token_id, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_p=1.0, seeds=list(range(len(prompt_ids))))
    batch = collate(result.prompt_ids, result.response_ids, tokenizer.pad_token_id)
    return model, batch, tokenizer.batch_decode(result.response_ids, skip_special_tokens=True)


def summed_logprobs(model, batch) -> torch.Tensor:
    return batched_response_logprobs(model, batch, micro_batch_size=16, temperature=1.0).sum(-1)


def score(prompts: list[str], responses: list[str], columns: dict, args) -> np.ndarray:
    if args.reward_model:
        from rlhf_core.reward_model import load_reward_model, reward_scores
        from tasks.models import resolve_model

        model, tokenizer = load_reward_model(Path(resolve_model.fn(args.reward_model).path))
        return reward_scores(model, tokenizer, prompts, responses, batch_size=16, max_length=512).numpy()
    total, _ = compute_rewards([(args.reward, 1.0)], prompts, responses, columns)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help=f"model folders, or {DEFAULT_MODEL}; the first is the reference")
    parser.add_argument("--data", default=str(PROJECT / "data" / "arithmetic_eval.jsonl"))
    parser.add_argument("--columns", nargs="*", default=["answer"], help="dataset columns passed to --reward")
    parser.add_argument("--reward", default="arithmetic_answer")
    parser.add_argument("--reward-model", help="score with this reward model instead of --reward")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.7)
    args = parser.parse_args()
    columns = [] if args.reward_model else args.columns
    df = load_table(args.data, required={"prompt": str, **{c: object for c in columns}})
    prompts = [p for p in df["prompt"] for _ in range(args.samples)]
    repeated = {c: [v for v in df[c] for _ in range(args.samples)] for c in columns}
    torch.set_num_threads(2)
    paths = [resolve_model_path(c, models_dir()) for c in args.checkpoints]
    reference, _ = load_causal_lm(paths[0])
    reference_rewards = None
    for name, path in zip(args.checkpoints, paths):
        model, batch, responses = sample(path, list(df["prompt"]), args.samples, args)
        kl = (summed_logprobs(model, batch) - summed_logprobs(reference.eval(), batch)).mean()
        rewards = score(prompts, responses, repeated, args)
        reference_rewards = rewards if reference_rewards is None else reference_rewards
        print(f"{name}: held-out mean reward {np.mean(rewards):.3f}, {win_rate(rewards, reference_rewards)}, "
              f"KL to {args.checkpoints[0]} {float(kl):.2f} nats/response, mean length "
              f"{float(batch['response_mask'].sum(-1).float().mean()):.1f} tokens "
              f"({len(df)} prompts x {args.samples} samples)")


def win_rate(rewards: np.ndarray, reference_rewards: np.ndarray) -> str:
    """Wins, losses and ties against the reference's response to the same prompt and seed."""
    wins, losses = int((rewards > reference_rewards).sum()), int((rewards < reference_rewards).sum())
    ties = len(rewards) - wins - losses
    return f"win rate {(wins + 0.5 * ties) / len(rewards):.3f} ({wins} wins, {losses} losses, {ties} ties)"


if __name__ == "__main__":
    main()
