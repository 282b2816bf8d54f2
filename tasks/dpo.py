"""DPO stages: tokenize (once per dataset and tokenizer), reference log-probs (once per dataset), one training
epoch, implicit rewards on held-out pairs.

The tokenize stage reads the canonical pairs Parquet of `tasks.data.load_preference_dataset` (pair_id, prompt, chosen,
rejected) and adds the truncated token ids (`prompt_ids`, `chosen_ids`, `rejected_ids`), so the reference, the
training and the evaluation stages see exactly the same tokens. One task per epoch, keyed on the previous
checkpoint's content hash: a run that crashed in epoch k resumes there, and the reference stage is a cache hit for
every run on the same data.
"""

from __future__ import annotations

from pathlib import Path

import torch
from prefect import task

from rlhf_core import dpo
from rlhf_core.batch import truncate_sequences
from rlhf_core.config import RuntimeConfig
from rlhf_core.config.training import DPOUpdateArgs, TrainingSetup
from rlhf_core.models import load_tokenizer
from tasks.cache import STAGE_TASK_OPTIONS
from tasks.data import chat_prompts
from tasks.reference import with_reference_logps
from tasks.refs import ArtifactRef, CheckpointRef, UpdateResult, publish
from tasks.runtime import load_model
from tasks.train import train_stage


@task(name="tokenize-pairs", **STAGE_TASK_OPTIONS)
def tokenize_pairs(model: CheckpointRef, pairs: ArtifactRef, max_length: int | None,
                   max_prompt_length: int) -> ArtifactRef:
    """The pairs with their token ids, each pair cut to `max_length` (`truncate_sequences`); adds
    `truncated` (the pair lost tokens)."""
    df = pairs.read()
    tokenizer, _ = load_tokenizer(Path(model.path))
    prompt_ids, chosen_ids, rejected_ids = dpo.tokenize_pairs(tokenizer, chat_prompts(df), df["chosen"],
                                                              df["rejected"])
    truncated = [max_length is not None and len(p) + max(len(c), len(r)) > max_length
                 for p, c, r in zip(prompt_ids, chosen_ids, rejected_ids)]
    cut = [truncate_sequences(p, [c, r], max_length, max_prompt_length)
           for p, c, r in zip(prompt_ids, chosen_ids, rejected_ids)]
    return publish(df.assign(prompt_ids=[p for p, _ in cut], chosen_ids=[c for _, (c, _) in cut],
                             rejected_ids=[r for _, (_, r) in cut], truncated=truncated), "dpo-tokens")


@task(name="compute-reference-logprobs", **STAGE_TASK_OPTIONS)
def compute_reference_logprobs(reference: CheckpointRef, pairs: ArtifactRef, micro_batch_size: int,
                               runtime: RuntimeConfig, trust_remote_code: bool = False) -> ArtifactRef:
    """The tokenized pairs with `ref_chosen_logps` and `ref_rejected_logps`."""
    return publish(with_reference_logps("dpo", reference, pairs, micro_batch_size, runtime, trust_remote_code),
                   "dpo-reference")


@task(name="train-dpo-epoch", **STAGE_TASK_OPTIONS)
def train_dpo_epoch(policy: CheckpointRef, pairs: ArtifactRef, args: DPOUpdateArgs,
                    setup: TrainingSetup) -> UpdateResult:
    """One shuffled pass over the pairs from `policy` (its Adam state restored); returns the new checkpoint
    and one metrics row per optimizer step."""
    return train_stage(policy, pairs, args, setup, "dpo-metrics", f"dpo epoch {args.epoch}")


@task(name="evaluate-dpo", **STAGE_TASK_OPTIONS)
def evaluate_dpo(policy: CheckpointRef, held_out: ArtifactRef, loss_type: str, beta: float,
                 micro_batch_size: int, runtime: RuntimeConfig, trust_remote_code: bool = False) -> ArtifactRef:
    """The held-out pairs with the policy's `chosen_logps`, `rejected_logps` and implicit `chosen_rewards`,
    `rejected_rewards`; accuracy = mean(chosen_rewards > rejected_rewards)."""
    df = held_out.read()
    model, tokenizer = load_model(policy, runtime, trust_remote_code)
    batch = dpo.pair_batch(df, tokenizer.pad_token_id, runtime.device)
    logps = dpo.batched_pair_logprobs(model, batch, micro_batch_size=micro_batch_size)
    zeros = torch.zeros_like(logps["chosen_logps"])  # a reference-free loss: no reference columns
    rewards = dpo.reward_metrics(*dpo.preference_logps(logps, loss_type), batch.get("ref_chosen_logps", zeros),
                                 batch.get("ref_rejected_logps", zeros), beta)
    return publish(df.assign(chosen_logps=logps["chosen_logps"].cpu().numpy(),
                             rejected_logps=logps["rejected_logps"].cpu().numpy(),
                             chosen_rewards=rewards["rewards/chosen"].cpu().numpy(),
                             rejected_rewards=rewards["rewards/rejected"].cpu().numpy()), "dpo-eval")
