"""KTO stages: validate the unpaired examples, tokenize them and fix their mismatched pairs (once per dataset and
tokenizer), reference log-probs (once per dataset), one training epoch, implicit rewards on held-out examples.

Canonical examples (`load_unpaired_dataset`): example_id, prompt, completion, label (bool, True = desirable).
Without an eval file, whole prompts are held out, each with all its rows: the held-out accuracy compares
completions of one prompt, and a prompt seen in training would leak into it. One task per epoch, keyed on the
previous checkpoint's content hash: a run that crashed in epoch k resumes there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task

from rlhf_core import kto
from rlhf_core.config import LoraConfig, RuntimeConfig, UnpairedDataConfig
from rlhf_core.data import DatasetError, load_table
from rlhf_core.models import load_tokenizer
from rlhf_core.preference_losses import implicit_rewards
from tasks.cache import STAGE_TASK_OPTIONS
from tasks.distributed import distributed_sequence_logps, distributed_update
from tasks.paths import resolve_data_path
from tasks.progress import StageProgress
from tasks.refs import ArtifactRef, CheckpointRef, UpdateResult, publish
from tasks.reward_model import PreferenceSplits
from tasks.runtime import load_model, reference_model
from tasks.update import resume_training, save_update



def _read_examples(data: UnpairedDataConfig, path: str) -> pd.DataFrame:
    required = {"prompt": str, "completion": str, "label": bool}  # bool only: see UnpairedDataConfig
    columns = {"prompt": data.prompt_column, "completion": data.completion_column, "label": data.label_column}
    df = load_table(resolve_data_path(path), required=required, columns=columns)
    return df.assign(example_id=np.arange(len(df), dtype=np.int64))[["example_id", *required]]


def _check_split(df: pd.DataFrame, source: str, needs_both_labels: bool) -> None:
    """KTO needs 2 distinct prompts to build mismatched pairs, and both labels to learn from."""
    if df["prompt"].nunique() < 2:
        raise DatasetError(f"{source}: {df['prompt'].nunique()} distinct prompt(s) in {len(df)} rows; the KL "
                           "reference point pairs a prompt with another prompt's completion, so at least 2 are "
                           "needed")
    if needs_both_labels and df["label"].nunique() < 2:
        raise DatasetError(f"{source}: every row's label is {bool(df['label'].iloc[0])}; KTO needs both desirable "
                           "(true) and undesirable (false) examples to train on")


def hold_out_prompts(df: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, held out): a seeded `fraction` of the distinct prompts (at least 2), each with all its rows."""
    prompts = df["prompt"].unique()
    count = max(2, round(fraction * len(prompts)))
    held_out = set(prompts[np.random.default_rng(seed).permutation(len(prompts))[:count]])
    mask = df["prompt"].isin(held_out).to_numpy()
    return df[~mask].reset_index(drop=True), df[mask].reset_index(drop=True)


@task(name="load-unpaired-dataset", **STAGE_TASK_OPTIONS)
def load_unpaired_dataset(data: UnpairedDataConfig, dataset_sha256s: list[str], seed: int) -> PreferenceSplits:
    """Validated examples; without `eval_path`, a seeded `eval_fraction` of the prompts is held out.
    `dataset_sha256s` are the files' content hashes: they key the cache, so an edited file is re-read."""
    train = _read_examples(data, data.path)
    if data.eval_path is not None:
        held_out, train_source, eval_source = _read_examples(data, data.eval_path), data.path, data.eval_path
    else:
        train, held_out = hold_out_prompts(train, data.eval_fraction, seed)
        train_source = f"{data.path} (after holding out eval_fraction={data.eval_fraction} of its prompts)"
        eval_source = f"{data.path} (its held-out prompts)"
    _check_split(train, train_source, needs_both_labels=True)
    _check_split(held_out, eval_source, needs_both_labels=False)  # one label: accuracy is NaN, the rest holds
    return PreferenceSplits(train=publish(train, "unpaired"), eval=publish(held_out, "unpaired"))


@task(name="tokenize-unpaired", **STAGE_TASK_OPTIONS)
def tokenize_unpaired(model_ref: CheckpointRef, examples_ref: ArtifactRef, max_length: int | None,
                      max_prompt_length: int, seed: int) -> ArtifactRef:
    """The examples with `prompt_ids`, `completion_ids` (cut to `max_length`), `mismatched_row` (a row of this
    table), `mismatched_ids` and `truncated` (`kto.tokenize_examples`)."""
    df = examples_ref.read()
    tokenizer, _ = load_tokenizer(Path(model_ref.path))
    return publish(df.assign(**kto.tokenize_examples(tokenizer, df["prompt"].tolist(), df["completion"].tolist(),
                                                     max_length=max_length, max_prompt_length=max_prompt_length,
                                                     seed=seed)), "kto-tokens")


@task(name="compute-kto-reference-logprobs", **STAGE_TASK_OPTIONS)
def compute_kto_reference_logprobs(model_ref: CheckpointRef, examples_ref: ArtifactRef, micro_batch_size: int,
                                   runtime: RuntimeConfig, trust_remote_code: bool = False) -> ArtifactRef:
    """The tokenized examples with `ref_logps` and `ref_mismatched_logps` (summed over each completion, EOS
    included)."""
    df = examples_ref.read()
    if runtime.num_processes > 1:
        logps = distributed_sequence_logps("kto", model_ref, examples_ref, runtime, trust_remote_code,
                                           micro_batch_size)
    else:
        with reference_model(model_ref, runtime, trust_remote_code) as (model, tokenizer):
            logps = kto.batched_example_logps(model, kto.example_batch(df, tokenizer.pad_token_id, runtime.device),
                                              micro_batch_size=micro_batch_size)
    return publish(df.assign(ref_logps=logps["logps"].cpu().numpy(),
                             ref_mismatched_logps=logps["mismatched_logps"].cpu().numpy()), "kto-reference")


@task(name="train-kto-epoch", **STAGE_TASK_OPTIONS)
def train_kto_epoch(policy_ref: CheckpointRef, examples_with_ref_ref: ArtifactRef, epoch: int, beta: float,
                    desirable_weight: float, undesirable_weight: float, batch_size: int, micro_batch_size: int,
                    lr: float, max_grad_norm: float, seed: int, runtime: RuntimeConfig,
                    trust_remote_code: bool = False, lora: LoraConfig | None = None) -> UpdateResult:
    """One shuffled pass over the examples from `policy_ref` (its Adam state restored); returns the new checkpoint
    and one metrics row per optimizer step. With `lora` only the adapter trains. With runtime.num_processes > 1
    the epoch runs under torchrun (tasks.distributed)."""
    update_args = dict(batch_size=batch_size, micro_batch_size=micro_batch_size, max_grad_norm=max_grad_norm,
                       seed=seed + epoch, beta=beta, desirable_weight=desirable_weight,
                       undesirable_weight=undesirable_weight)
    if runtime.num_processes > 1:
        return distributed_update("kto", policy_ref, examples_with_ref_ref, runtime, trust_remote_code,
                                  {**update_args, "lr": lr}, "kto-metrics")
    df = examples_with_ref_ref.read()
    model, tokenizer, optimizer = resume_training(policy_ref, runtime, trust_remote_code, lr, lora=lora)
    progress = StageProgress(total=-(-len(df) // batch_size), desc=f"kto epoch {epoch}", unit="step")
    history = kto.update_from_examples(model, optimizer, df, tokenizer.pad_token_id, device=runtime.device,
                                       on_step=lambda metrics: progress.update(1), **update_args)
    progress.close()
    return save_update(model, tokenizer, optimizer, history, "kto-metrics", keep=(runtime, trust_remote_code, True),
                       merged=lora is not None and lora.save == "merged")


@task(name="evaluate-kto", **STAGE_TASK_OPTIONS)
def evaluate_kto(policy_ref: CheckpointRef, eval_with_ref_ref: ArtifactRef, beta: float, micro_batch_size: int,
                 runtime: RuntimeConfig, trust_remote_code: bool = False) -> ArtifactRef:
    """The held-out examples with the policy's `logps`, `mismatched_logps` and implicit `rewards`
    beta * (logps - ref_logps); `kto.held_out_metrics` summarises them."""
    df = eval_with_ref_ref.read()
    model, tokenizer = load_model(policy_ref, runtime, trust_remote_code)
    batch = kto.example_batch(df, tokenizer.pad_token_id, runtime.device)
    logps = kto.batched_example_logps(model, batch, micro_batch_size=micro_batch_size)
    rewards = implicit_rewards(logps["logps"], batch["ref_logps"], beta)
    return publish(df.assign(logps=logps["logps"].cpu().numpy(), mismatched_logps=logps["mismatched_logps"].cpu()
                             .numpy(), rewards=rewards.cpu().numpy()), "kto-eval")
