"""`python -m rlhf_core.distributed_worker JOB.json`: one rank of a distributed job, started by torchrun (or, through
`run_job`, by Ray Train).

The task side (`tasks/distributed.py`) writes one typed job (`Job`: the same pydantic models at both ends) and runs
`torchrun --nproc_per_node N -m rlhf_core.distributed_worker JOB.json`. Four kinds. `train`: every rank runs the
training lifecycle of `rlhf_core.training` (the very call the one-process stage makes) on its share of each
mini-batch; rank 0 writes the new checkpoint and `result.json`. `score`: the online scoring stage's reference
log-probs and reward-model scores, `sequence_logps`: DPO's and KTO's reference pass, and `values`: PPO's old
log-probs and values; each rank scores its share of the rows (FSDP shards the weights) and rank 0 writes the
gathered values. A rank that fails writes `error-<rank>.json` so the task can re-raise the original error type (a
NaN loss stays a NonFiniteError).
"""

from __future__ import annotations

import json
import sys
import traceback
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Annotated, Literal, Union

import pandas as pd
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import save_file

from rlhf_core.allocator import keep_freed_memory
from rlhf_core.batch import collate
from rlhf_core.config import LoraConfig, RuntimeConfig
from rlhf_core.config.training import LogprobPass, TrainingSetup, UpdateArgs
from rlhf_core.distributed import init_process_group, map_rows_across_ranks, rank, wrap_for_training
from rlhf_core.io import write_atomically
from rlhf_core.logprobs import ResponseScorer, batched_response_logprobs
from rlhf_core.lora import adapter_disabled
from rlhf_core.models import load_lm
from rlhf_core.ppo import rollout_logprobs_and_values
from rlhf_core.reward_model import load_reward_model, reward_scores
from rlhf_core.sequence_logps import SEQUENCE_TABLES
from rlhf_core.training import train
from rlhf_core.value_head import load_actor_critic

RESULT_FILE = "result.json"
SCORES_FILE = "scores.safetensors"


class _Job(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    work_dir: str = Field("", description="the job's folder: rank 0's outputs, every failing rank's error report")
    runtime: RuntimeConfig
    trust_remote_code: bool = False


class TrainJob(_Job):
    kind: Literal["train"] = "train"
    checkpoint: str = Field(description="the checkpoint training starts from")
    table: str = Field(description="the Parquet table the update trains on")
    args: UpdateArgs
    lora: LoraConfig | None = None
    checkpoints_dir: str

    @property
    def setup(self) -> TrainingSetup:
        return TrainingSetup(runtime=self.runtime, trust_remote_code=self.trust_remote_code, lora=self.lora)


class ScoreJob(_Job):
    kind: Literal["score"] = "score"
    table: str = Field(description="Parquet rollouts: prompt_ids, response_ids, prompt, response")
    reference: str | None
    reference_adapter_disabled: bool = False
    reward_models: list[str]
    logprobs: LogprobPass
    max_length: int


class SequenceLogpsJob(_Job):
    kind: Literal["sequence_logps"] = "sequence_logps"
    algorithm: Literal["dpo", "kto"]
    reference: str
    reference_adapter_disabled: bool = False
    table: str
    micro_batch_size: int


class ValuesJob(_Job):
    kind: Literal["values"] = "values"
    policy: str
    critic: Literal["shared", "separate"]
    table: str
    logprobs: LogprobPass


Job = Annotated[Union[TrainJob, ScoreJob, SequenceLogpsJob, ValuesJob], Field(discriminator="kind")]


class JobFile(BaseModel):
    job: Job


def start_rank(runtime: RuntimeConfig) -> str:
    device = init_process_group(runtime.device)
    if runtime.num_threads:
        torch.set_num_threads(runtime.num_threads)
    return device


def run_train(job: TrainJob) -> None:
    device = start_rank(job.runtime)
    trained = train(Path(job.checkpoint), pd.read_parquet(job.table), job.args, job.setup, device,
                    Path(job.checkpoints_dir))
    if rank() == 0:
        result = {"path": str(trained.path), "sha256": trained.sha256, "history": trained.history}
        write_atomically(lambda tmp: tmp.write_text(json.dumps(result)), Path(job.work_dir) / RESULT_FILE)


def wrap_for_inference(module: torch.nn.Module, strategy: str, device: str) -> torch.nn.Module:
    """A no-grad pass needs no gradient synchronisation: under DDP each rank runs its full replica; FSDP shards
    the weights, for models that do not fit one device."""
    return wrap_for_training(module, strategy, device) if strategy == "fsdp" else module


def write_scores(job: _Job, scores: dict[str, torch.Tensor]) -> None:
    """Rank 0 writes a scoring job's gathered values (every rank holds them) for the task to read."""
    if rank() == 0:
        tensors = {k: v.detach().cpu().contiguous() for k, v in scores.items()}
        write_atomically(lambda tmp: save_file(tensors, str(tmp)), Path(job.work_dir) / SCORES_FILE)


@contextmanager
def reference_lm(path: str, adapter_off: bool, job: _Job, device: str):
    """(reference LM, tokenizer) for the block; adapter_off: a LoRA run's reference, the checkpoint's base
    weights (its adapter loaded, and disabled)."""
    lm, tokenizer = load_lm(path, job.runtime, device, job.trust_remote_code, with_adapter=adapter_off)
    with adapter_disabled(lm) if adapter_off else nullcontext():
        yield lm, tokenizer


def reference_logprobs(job: ScoreJob, device: str, df: pd.DataFrame) -> torch.Tensor:
    """[B, T] log-probs of the responses under the reference, T as `collate` pads them."""
    passes = job.logprobs
    with reference_lm(job.reference, job.reference_adapter_disabled, job, device) as (lm, tokenizer):
        model = wrap_for_inference(ResponseScorer(lm), job.runtime.distributed, device)
        batch = collate(df["prompt_ids"], df["response_ids"], tokenizer.pad_token_id, device=device)
        with torch.no_grad():
            return map_rows_across_ranks(lambda rows: batched_response_logprobs(
                model, rows, micro_batch_size=passes.micro_batch_size, temperature=passes.temperature,
                chunk_size=passes.chunk_size), batch)


def reward_model_scores(path: str, job: ScoreJob, device: str, df: pd.DataFrame) -> torch.Tensor:
    """[B] scores of the decoded (prompt, response) texts under a reward model."""
    model, tokenizer = load_reward_model(Path(path), device, job.runtime.dtype)
    model = wrap_for_inference(model, job.runtime.distributed, device)
    prompts, responses = df["prompt"].tolist(), df["response"].tolist()

    def score(rows: dict[str, torch.Tensor]) -> torch.Tensor:
        index = rows["index"].tolist()
        return reward_scores(model, tokenizer, [prompts[j] for j in index], [responses[j] for j in index],
                             batch_size=job.logprobs.micro_batch_size, max_length=job.max_length).to(device)

    rows = {"index": torch.arange(len(df), device=device), "response_mask": torch.ones(len(df), 1, device=device)}
    with torch.no_grad():
        return map_rows_across_ranks(score, rows)


def run_scoring(job: ScoreJob) -> None:
    """Reference log-probs and reward-model scores of a rollout table, each rank scoring its share of the rows;
    rank 0 writes them to SCORES_FILE: `ref_logprobs` [B, T] aligned with `collate`'s response columns,
    `reward.<i>` [B] for job.reward_models[i]."""
    device = start_rank(job.runtime)
    df = pd.read_parquet(job.table)
    scores = {f"reward.{i}": reward_model_scores(path, job, device, df) for i, path in enumerate(job.reward_models)}
    if job.reference:
        scores["ref_logprobs"] = reference_logprobs(job, device, df)
    write_scores(job, scores)


def run_sequence_logps(job: SequenceLogpsJob) -> None:
    """The offline flows' reference pass: summed log-probs of every sequence of a tokenized table (DPO's pairs,
    KTO's examples) under the reference, each rank scoring its share of the rows; rank 0 writes them to
    SCORES_FILE, one [B] tensor per name."""
    device = start_rank(job.runtime)
    table = SEQUENCE_TABLES[job.algorithm]
    names = table.names
    with reference_lm(job.reference, job.reference_adapter_disabled, job, device) as (lm, tokenizer):
        model = wrap_for_inference(ResponseScorer(lm), job.runtime.distributed, device)
        batch = table.batch(pd.read_parquet(job.table), tokenizer.pad_token_id, device)

        def logps(rows: dict[str, torch.Tensor]) -> torch.Tensor:  # [b, len(names)]
            out = table.logps(model, rows, micro_batch_size=job.micro_batch_size)
            return torch.stack([out[name] for name in names], dim=-1)

        with torch.no_grad():
            gathered = map_rows_across_ranks(logps, batch)
    write_scores(job, {name: gathered[:, i] for i, name in enumerate(names)})


def run_values(job: ValuesJob) -> None:
    """PPO's value stage: the behaviour policy's log-probs and the critic's values of a rollout table, each rank
    scoring its share of the rows; rank 0 writes `old_logprobs` and `old_values` [B, T] to SCORES_FILE."""
    device = start_rank(job.runtime)
    lm, tokenizer = load_lm(job.policy, job.runtime, device, job.trust_remote_code)
    model = load_actor_critic(lm, job.policy, job.critic, device, job.runtime.dtype, job.trust_remote_code)
    model = wrap_for_inference(model, job.runtime.distributed, device)
    df = pd.read_parquet(job.table)
    batch = collate(df["prompt_ids"], df["response_ids"], tokenizer.pad_token_id, device=device)
    passes = job.logprobs

    def outputs(rows: dict[str, torch.Tensor]) -> torch.Tensor:  # [b, T, 2]
        return torch.stack(rollout_logprobs_and_values(model, rows, micro_batch_size=passes.micro_batch_size,
                                                       temperature=passes.temperature,
                                                       chunk_size=passes.chunk_size), dim=-1)

    with torch.no_grad():
        gathered = map_rows_across_ranks(outputs, batch)
    write_scores(job, {"old_logprobs": gathered[..., 0], "old_values": gathered[..., 1]})


RUNS = {"train": run_train, "score": run_scoring, "sequence_logps": run_sequence_logps, "values": run_values}


def run_job(job_path: str) -> None:
    """This rank's part of the job in JOB_PATH; a failure is reported in the job's folder, then re-raised. Also
    the body of a Ray Train worker (tasks/ray_cluster.py), whose process group Ray sets up and tears down."""
    job = JobFile.model_validate_json(Path(job_path).read_text()).job
    keep_freed_memory()  # a training process: reuse each step's memory (rlhf_core/allocator.py)
    try:
        RUNS[job.kind](job)
    except BaseException as error:
        report = {"type": type(error).__name__, "message": str(error), "traceback": traceback.format_exc()}
        (Path(job.work_dir) / f"error-{rank()}.json").write_text(json.dumps(report))
        raise


def main(job_path: str) -> None:
    try:
        run_job(job_path)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
