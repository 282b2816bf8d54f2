"""KTO stages: validate the unpaired examples, tokenize them and fix their mismatched pairs (once per dataset and
tokenizer), reference log-probs (once per dataset), one training epoch, implicit rewards on held-out examples.

Canonical examples (`tasks.data.load_unpaired_dataset`): example_id, prompt, completion, label (bool, True = desirable).
Without an eval file, whole prompts are held out, each with all its rows: the held-out accuracy compares
completions of one prompt, and a prompt seen in training would leak into it. One task per epoch, keyed on the
previous checkpoint's content hash: a run that crashed in epoch k resumes there.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from rlhf_core import kto
from rlhf_core.config import RuntimeConfig
from rlhf_core.config.training import KTOUpdateArgs, TrainingSetup
from rlhf_core.models import load_tokenizer
from rlhf_core.preference_losses import implicit_rewards
from tasks.cache import STAGE_TASK_OPTIONS
from tasks.data import chat_prompts
from tasks.reference import with_reference_logps
from tasks.refs import ArtifactRef, CheckpointRef, UpdateResult, publish
from tasks.runtime import load_model
from tasks.train import train_stage


@task(name="tokenize-unpaired", **STAGE_TASK_OPTIONS)
def tokenize_unpaired(model: CheckpointRef, examples: ArtifactRef, max_length: int | None,
                      max_prompt_length: int, seed: int) -> ArtifactRef:
    """The examples with `prompt_ids`, `completion_ids` (cut to `max_length`), `mismatched_row` (a row of this
    table), `mismatched_ids` and `truncated` (`kto.tokenize_examples`)."""
    df = examples.read()
    tokenizer, _ = load_tokenizer(Path(model.path))
    return publish(df.assign(**kto.tokenize_examples(tokenizer, chat_prompts(df), df["completion"].tolist(),
                                                     max_length=max_length, max_prompt_length=max_prompt_length,
                                                     seed=seed, prompt_keys=df["prompt"].tolist())), "kto-tokens")


@task(name="compute-kto-reference-logprobs", **STAGE_TASK_OPTIONS)
def compute_kto_reference_logprobs(reference: CheckpointRef, examples: ArtifactRef, micro_batch_size: int,
                                   runtime: RuntimeConfig, trust_remote_code: bool = False) -> ArtifactRef:
    """The tokenized examples with `ref_logps` and `ref_mismatched_logps`."""
    return publish(with_reference_logps("kto", reference, examples, micro_batch_size, runtime, trust_remote_code),
                   "kto-reference")


@task(name="train-kto-epoch", **STAGE_TASK_OPTIONS)
def train_kto_epoch(policy: CheckpointRef, examples: ArtifactRef, args: KTOUpdateArgs,
                    setup: TrainingSetup) -> UpdateResult:
    """One shuffled pass over the examples from `policy` (its Adam state restored); returns the new checkpoint
    and one metrics row per optimizer step."""
    return train_stage(policy, examples, args, setup, "kto-metrics", f"kto epoch {args.epoch}")


@task(name="evaluate-kto", **STAGE_TASK_OPTIONS)
def evaluate_kto(policy: CheckpointRef, held_out: ArtifactRef, beta: float, micro_batch_size: int,
                 runtime: RuntimeConfig, trust_remote_code: bool = False) -> ArtifactRef:
    """The held-out examples with the policy's `logps`, `mismatched_logps` and implicit `rewards`
    beta * (logps - ref_logps); `kto.held_out_metrics` summarises them."""
    df = held_out.read()
    model, tokenizer = load_model(policy, runtime, trust_remote_code)
    batch = kto.example_batch(df, tokenizer.pad_token_id, runtime.device)
    logps = kto.batched_example_logps(model, batch, micro_batch_size=micro_batch_size)
    rewards = implicit_rewards(logps["logps"], batch["ref_logps"], beta)
    return publish(df.assign(logps=logps["logps"].cpu().numpy(), mismatched_logps=logps["mismatched_logps"].cpu()
                             .numpy(), rewards=rewards.cpu().numpy()), "kto-eval")
