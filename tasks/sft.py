"""SFT stages: tokenize the conversations (once per dataset and tokenizer), one training epoch, held-out loss and
token accuracy.

The tokenize stage reads the canonical conversations Parquet of `tasks.data.load_conversation_dataset` and adds
each example's `prompt_ids`, `response_ids` and `loss_mask` (rlhf_core/sft.py), so training and evaluation see the
same tokens. One task per epoch, keyed on the previous checkpoint's content hash: a run that crashed in epoch k
resumes there.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from rlhf_core import sft
from rlhf_core.config import RuntimeConfig
from rlhf_core.conversation import as_messages
from rlhf_core.config.training import SFTUpdateArgs, TrainingSetup
from rlhf_core.data import DatasetError
from rlhf_core.errors import UserInputError
from rlhf_core.models import load_tokenizer
from tasks.cache import STAGE_TASK_OPTIONS
from tasks.refs import ArtifactRef, CheckpointRef, UpdateResult, publish
from tasks.runtime import load_model
from tasks.train import train_stage


@task(name="tokenize-conversations", **STAGE_TASK_OPTIONS)
def tokenize_conversations(model: CheckpointRef, examples: ArtifactRef, max_length: int | None,
                           system_prompt: str | None) -> ArtifactRef:
    """The examples with `prompt_ids`, `response_ids`, `loss_mask` and `truncated` (the end was cut)."""
    df = examples.read()
    tokenizer, _ = load_tokenizer(Path(model.path))
    rows = []
    for row, (messages, text) in enumerate(zip(df["messages"], df["text"])):
        try:
            rows.append(sft.example_tokens(tokenizer, as_messages(messages), text if isinstance(text, str) else None,
                                           system_prompt=system_prompt, max_length=max_length))
        except UserInputError as error:
            raise DatasetError(f"example {int(df['example_id'].iloc[row])}: {error}") from None
    columns = {name: [r[name] for r in rows] for name in ("prompt_ids", "response_ids", "loss_mask", "truncated")}
    return publish(df.assign(**columns), "sft-tokens")


@task(name="train-sft-epoch", **STAGE_TASK_OPTIONS)
def train_sft_epoch(policy: CheckpointRef, examples: ArtifactRef, args: SFTUpdateArgs,
                    setup: TrainingSetup) -> UpdateResult:
    """One shuffled pass over the examples from `policy` (its Adam state restored); returns the new checkpoint
    and one metrics row per optimizer step."""
    return train_stage(policy, examples, args, setup, "sft-metrics", f"sft epoch {args.epoch}")


@task(name="evaluate-sft", **STAGE_TASK_OPTIONS)
def evaluate_sft(policy: CheckpointRef, held_out: ArtifactRef, micro_batch_size: int, runtime: RuntimeConfig,
                 trust_remote_code: bool = False) -> ArtifactRef:
    """The held-out examples with the policy's summed `nll`, trained `tokens` and top-1 `correct` tokens."""
    df = held_out.read()
    model, tokenizer = load_model(policy, runtime, trust_remote_code)
    batch = sft.sft_batch(df["prompt_ids"].tolist(), df["response_ids"].tolist(), df["loss_mask"].tolist(),
                          tokenizer.pad_token_id, runtime.device)
    stats = sft.token_stats(model, batch, micro_batch_size=micro_batch_size)
    return publish(df.assign(**{name: value.cpu().numpy() for name, value in stats.items()}), "sft-eval")


def held_out_metrics(scores) -> dict[str, float]:
    """Per-token held-out NLL and top-1 accuracy of an `evaluate_sft` table (logged under `eval/`)."""
    tokens = float(scores["tokens"].sum())
    return {"loss": float(scores["nll"].sum()) / tokens, "token_accuracy": float(scores["correct"].sum()) / tokens,
            "tokens": tokens}
