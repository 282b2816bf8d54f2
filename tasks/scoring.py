"""The scoring stage: rewards from reward functions and, when the loss needs them, reference log-probs."""

from __future__ import annotations

from prefect import task

from rlhf_core.batch import collate, response_lists
from rlhf_core.config import RewardSpec, RuntimeConfig
from rlhf_core.logprobs import batched_response_logprobs
from rlhf_core.rewards import compute_rewards
from tasks.cache import STAGE_TASK_OPTIONS
from tasks.refs import ArtifactRef, CheckpointRef, publish
from tasks.runtime import load_model


def reward_column(function: str) -> str:
    return f"reward[{function}]"


@task(name="score-rollouts", **STAGE_TASK_OPTIONS)
def score_rollouts(rollouts: ArtifactRef, rewards: list[RewardSpec], reward_fingerprints: list[str],
                   extra_columns: list[str], reference: CheckpointRef | None, runtime: RuntimeConfig,
                   temperature: float, micro_batch_size: int, chunk_size: int,
                   trust_remote_code: bool = False) -> ArtifactRef:
    """Adds `rewards` (the weighted sum), one `reward[<function>]` column per function and, given a reference
    model, `ref_logprobs`. `reward_fingerprints` hash the functions' source code so edits invalidate the cache."""
    df = rollouts.read()
    columns = {c: df[c].tolist() for c in extra_columns}
    total, per_function = compute_rewards([(r.function, r.weight) for r in rewards], df["prompt"].tolist(),
                                          df["response"].tolist(), columns)
    df = df.assign(rewards=total, **{reward_column(name): values for name, values in per_function.items()})
    if reference is not None:
        model, tokenizer = load_model(reference, runtime, trust_remote_code)
        batch = collate(df["prompt_ids"], df["response_ids"], tokenizer.pad_token_id, device=runtime.device)
        ref_logprobs = batched_response_logprobs(model, batch, micro_batch_size=micro_batch_size,
                                                 temperature=temperature, chunk_size=chunk_size)
        df["ref_logprobs"] = response_lists(ref_logprobs, batch["response_mask"])
    return publish(df, "scored")
