"""DPO stages: tokenize (once per dataset and tokenizer), reference log-probs (once per dataset), one training
epoch, implicit rewards on held-out pairs.

The tokenize stage reads the canonical pairs Parquet of `load_preference_dataset` (pair_id, prompt, chosen,
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
from rlhf_core.config import LoraConfig, RuntimeConfig
from rlhf_core.models import load_tokenizer
from tasks.cache import STAGE_TASK_OPTIONS
from tasks.distributed import distributed_sequence_logps, distributed_update
from tasks.progress import StageProgress
from tasks.refs import ArtifactRef, CheckpointRef, UpdateResult, publish
from tasks.runtime import load_model, reference_model
from tasks.update import resume_training, save_update

@task(name="tokenize-pairs", **STAGE_TASK_OPTIONS)
def tokenize_pairs(model_ref: CheckpointRef, pairs_ref: ArtifactRef, max_length: int | None,
                   max_prompt_length: int) -> ArtifactRef:
    """The pairs with their token ids, each pair cut to `max_length` (`truncate_sequences`); adds
    `truncated` (the pair lost tokens)."""
    df = pairs_ref.read()
    tokenizer, _ = load_tokenizer(Path(model_ref.path))
    prompt_ids, chosen_ids, rejected_ids = dpo.tokenize_pairs(tokenizer, df["prompt"], df["chosen"], df["rejected"])
    truncated = [max_length is not None and len(p) + max(len(c), len(r)) > max_length
                 for p, c, r in zip(prompt_ids, chosen_ids, rejected_ids)]
    cut = [truncate_sequences(p, [c, r], max_length, max_prompt_length)
           for p, c, r in zip(prompt_ids, chosen_ids, rejected_ids)]
    return publish(df.assign(prompt_ids=[p for p, _ in cut], chosen_ids=[c for _, (c, _) in cut],
                             rejected_ids=[r for _, (_, r) in cut], truncated=truncated), "dpo-tokens")


@task(name="compute-reference-logprobs", **STAGE_TASK_OPTIONS)
def compute_reference_logprobs(model_ref: CheckpointRef, pairs_ref: ArtifactRef, micro_batch_size: int,
                               runtime: RuntimeConfig, trust_remote_code: bool = False) -> ArtifactRef:
    """The tokenized pairs with `ref_chosen_logps` and `ref_rejected_logps` (summed over each response, EOS
    included)."""
    df = pairs_ref.read()
    if runtime.num_processes > 1:
        logps = distributed_sequence_logps("dpo", model_ref, pairs_ref, runtime, trust_remote_code, micro_batch_size)
    else:
        with reference_model(model_ref, runtime, trust_remote_code) as (model, tokenizer):
            logps = dpo.batched_pair_logprobs(model, dpo.pair_batch(df, tokenizer.pad_token_id, runtime.device),
                                              micro_batch_size=micro_batch_size)
    return publish(df.assign(ref_chosen_logps=logps["chosen_logps"].cpu().numpy(),
                             ref_rejected_logps=logps["rejected_logps"].cpu().numpy()), "dpo-reference")


@task(name="train-dpo-epoch", **STAGE_TASK_OPTIONS)
def train_dpo_epoch(policy_ref: CheckpointRef, pairs_with_ref_ref: ArtifactRef, epoch: int, loss_type: str,
                    beta: float, label_smoothing: float, simpo_gamma: float, rpo_alpha: float | None,
                    batch_size: int, micro_batch_size: int, lr: float, max_grad_norm: float, seed: int,
                    runtime: RuntimeConfig, trust_remote_code: bool = False,
                    lora: LoraConfig | None = None) -> UpdateResult:
    """One shuffled pass over the pairs from `policy_ref` (its Adam state restored); returns the new checkpoint
    and one metrics row per optimizer step. With `lora` only the adapter trains. With runtime.num_processes > 1
    the epoch runs under torchrun (tasks.distributed)."""
    update_args = dict(batch_size=batch_size, micro_batch_size=micro_batch_size, max_grad_norm=max_grad_norm,
                       seed=seed + epoch, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
                       simpo_gamma=simpo_gamma, rpo_alpha=rpo_alpha)
    if runtime.num_processes > 1:
        return distributed_update("dpo", policy_ref, pairs_with_ref_ref, runtime, trust_remote_code,
                                  {**update_args, "lr": lr}, "dpo-metrics")
    df = pairs_with_ref_ref.read()
    model, tokenizer, optimizer = resume_training(policy_ref, runtime, trust_remote_code, lr, lora=lora)
    progress = StageProgress(total=-(-len(df) // batch_size), desc=f"dpo epoch {epoch}", unit="step")
    history = dpo.update_from_pairs(model, optimizer, df, tokenizer.pad_token_id, device=runtime.device,
                                    on_step=lambda metrics: progress.update(1), **update_args)
    progress.close()
    return save_update(model, tokenizer, optimizer, history, "dpo-metrics", keep=(runtime, trust_remote_code, True),
                       merged=lora is not None and lora.save == "merged")


@task(name="evaluate-dpo", **STAGE_TASK_OPTIONS)
def evaluate_dpo(policy_ref: CheckpointRef, eval_with_ref_ref: ArtifactRef, loss_type: str, beta: float,
                 micro_batch_size: int, runtime: RuntimeConfig, trust_remote_code: bool = False) -> ArtifactRef:
    """The held-out pairs with the policy's `chosen_logps`, `rejected_logps` and implicit `chosen_rewards`,
    `rejected_rewards`; accuracy = mean(chosen_rewards > rejected_rewards)."""
    df = eval_with_ref_ref.read()
    model, tokenizer = load_model(policy_ref, runtime, trust_remote_code)
    batch = dpo.pair_batch(df, tokenizer.pad_token_id, runtime.device)
    logps = dpo.batched_pair_logprobs(model, batch, micro_batch_size=micro_batch_size)
    zeros = torch.zeros_like(logps["chosen_logps"])  # simpo: no reference
    rewards = dpo.reward_metrics(*dpo.preference_logps(logps, loss_type), batch.get("ref_chosen_logps", zeros),
                                 batch.get("ref_rejected_logps", zeros), beta)
    return publish(df.assign(chosen_logps=logps["chosen_logps"].cpu().numpy(),
                             rejected_logps=logps["rejected_logps"].cpu().numpy(),
                             chosen_rewards=rewards["rewards/chosen"].cpu().numpy(),
                             rejected_rewards=rewards["rewards/rejected"].cpu().numpy()), "dpo-eval")
