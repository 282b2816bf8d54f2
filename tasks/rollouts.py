"""The rollout stage: G sampled responses per prompt, with their token ids and sampling log-probs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task

from rlhf_core.config import GenerationConfig, RuntimeConfig
from rlhf_core.config.common import check_generation_backend
from rlhf_core.chat import chat_prompt_ids
from rlhf_core.generation import sample_responses
from rlhf_core.models import eos_token_ids, load_tokenizer
from rlhf_core.vllm_generation import checkpoint_eos_ids, sample_responses_vllm
from tasks.cache import STAGE_TASK_OPTIONS
from tasks.data import chat_prompts
from tasks.progress import StageProgress
from tasks.refs import ArtifactRef, CheckpointRef, publish
from tasks.runtime import load_model


def row_seed(seed: int, iteration: int, prompt_id: int, sample_index: int) -> int:
    """A seed per response that depends on nothing else, so re-batching or sharding changes no sample."""
    digest = hashlib.sha256(f"{seed}:{iteration}:{prompt_id}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@task(name="generate-rollouts", **STAGE_TASK_OPTIONS)
def generate_rollouts(policy: CheckpointRef, prompts: ArtifactRef, generation: GenerationConfig,
                      runtime: RuntimeConfig, system_prompt: str | None, seed: int,
                      iteration: int, trust_remote_code: bool = False) -> ArtifactRef:
    return publish(rollout_frame(policy, prompts, generation, runtime, system_prompt, seed, iteration,
                                 trust_remote_code), "rollouts")


def expand_prompts(df: pd.DataFrame, group_size: int) -> pd.DataFrame:
    """One row per response to sample: each prompt `group_size` times, with its group and sample index."""
    rows = df.loc[df.index.repeat(group_size)].reset_index(drop=True)
    rows.insert(0, "group_id", np.repeat(np.arange(len(df)), group_size))
    rows.insert(1, "sample_index", np.tile(np.arange(group_size), len(df)))
    return rows


def rollout_frame(policy: CheckpointRef, prompts: ArtifactRef, generation: GenerationConfig, runtime: RuntimeConfig,
                  system_prompt: str | None, seed: int, iteration: int, trust_remote_code: bool = False,
                  row_range: tuple[int, int] | None = None) -> pd.DataFrame:
    """The rollout table, or only its rows [start, stop) = row_range (a shard: group ids and seeds are those of
    the whole table, so a shard's rows equal the same rows of the unsharded table)."""
    df = prompts.read()
    if generation.dtype is not None:  # the sampler may run in a lower precision than training
        runtime = runtime.model_copy(update={"dtype": generation.dtype})
    vllm = generation.backend == "vllm"
    if vllm:  # the engine holds the weights (rlhf_core/vllm_generation.py): this process needs the tokenizer only
        check_generation_backend(generation, runtime)
        tokenizer = load_tokenizer(Path(policy.path))[0]
        eos_ids = checkpoint_eos_ids(policy.path, tokenizer, trust_remote_code)
    else:
        model, tokenizer = load_model(policy, runtime, trust_remote_code)
        eos_ids = eos_token_ids(model, tokenizer)
    rows = expand_prompts(df, generation.group_size)
    if row_range is not None:
        rows = rows.iloc[row_range[0]:row_range[1]].reset_index(drop=True)
    prompt_ids = chat_prompt_ids(tokenizer, chat_prompts(rows), system_prompt)
    seeds = [row_seed(seed, iteration, p, k) for p, k in zip(rows["prompt_id"], rows["sample_index"])]
    if vllm:  # one call: vLLM schedules its own batches (continuous batching)
        progress = StageProgress(total=1, desc="generate", unit="call")
        results = [sample_responses_vllm(
            policy.path, policy.sha256, prompt_ids, eos_ids=eos_ids, max_new_tokens=generation.max_new_tokens,
            temperature=generation.temperature, top_p=generation.top_p, seeds=seeds, dtype=runtime.dtype,
            gpu_memory_utilization=generation.vllm_gpu_memory_utilization, trust_remote_code=trust_remote_code)]
        progress.update(1)
    else:
        starts = range(0, len(rows), generation.batch_size)
        progress = StageProgress(total=len(starts) * generation.max_new_tokens, desc="generate", unit="token")
        results = [sample_responses(model, prompt_ids[start:start + generation.batch_size], eos_ids=eos_ids,
                                    pad_id=tokenizer.pad_token_id, max_new_tokens=generation.max_new_tokens,
                                    temperature=generation.temperature, top_p=generation.top_p,
                                    seeds=seeds[start:start + generation.batch_size],
                                    on_step=lambda: progress.update(1))
                   for start in starts]
    progress.close()
    rows = rows.assign(**{key: [value for result in results for value in getattr(result, key)]
                          for key in ("prompt_ids", "response_ids", "sampling_logprobs", "finished")})
    rows["response"] = tokenizer.batch_decode(rows["response_ids"].tolist(), skip_special_tokens=True)
    rows["response_length"] = rows["response_ids"].map(len)
    return rows
