"""`python -m rlhf_core.distributed_worker SPEC.json`: one rank of a distributed job, started by torchrun.

Four jobs. `update`: the update task writes SPEC.json (the policy checkpoint, the scored Parquet batch, the
flow's configs) and runs `torchrun --nproc_per_node N -m rlhf_core.distributed_worker SPEC.json`. Every rank loads
the checkpoint, wraps it for DDP or FSDP, restores the optimizer state and runs the algorithm's update on its share
of each mini-batch; rank 0 writes the new checkpoint (same layout as one process writes) and `result.json`. The
algorithms are in `rlhf_core.distributed_updates`. `score`: the online scoring stage's reference log-probs and
reward-model scores, `sequence_logps`: DPO's and KTO's reference pass, and `values`: PPO's old log-probs and
values; each rank scores its share of the rows (FSDP shards the weights) and rank 0 writes the gathered values.
A rank that fails writes `error-<rank>.json` so the task can re-raise the original error type (a NaN loss stays a
NonFiniteError).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from rlhf_core import config as configs
from rlhf_core import dpo, kto
from rlhf_core.batch import collate
from rlhf_core.checkpoint import OPTIMIZER_FILE, restore_optimizer
from rlhf_core.distributed import (full_state, init_process_group, is_sharded, load_full_optimizer_state,
                                   map_rows_across_ranks, rank, wrap_for_training)
from rlhf_core.distributed_updates import UPDATES, load_actor_critic, load_lm
from rlhf_core.io import write_atomically, write_dir
from rlhf_core.logprobs import ResponseScorer, batched_response_logprobs
from rlhf_core.ppo import rollout_logprobs_and_values
from rlhf_core.reward_model import load_reward_model, reward_scores

RESULT_FILE = "result.json"
SCORES_FILE = "scores.safetensors"


def encode_args(args: dict) -> dict:
    """Update arguments -> JSON: config models are stored with their class name (rlhf_core.config)."""
    return {k: {"config": type(v).__name__, "value": v.model_dump()} if hasattr(v, "model_dump") else {"value": v}
            for k, v in args.items()}


def decode_args(encoded: dict) -> dict:
    return {k: getattr(configs, v["config"])(**v["value"]) if "config" in v else v["value"]
            for k, v in encoded.items()}


def restore_optimizer_state(model, optimizer, checkpoint: Path) -> None:
    """Adam's moments from the checkpoint, whichever number of processes wrote it."""
    if not is_sharded(model):
        restore_optimizer(optimizer, checkpoint)
    elif (checkpoint / OPTIMIZER_FILE).is_file():
        load_full_optimizer_state(model, optimizer, load_file(str(checkpoint / OPTIMIZER_FILE)))


def start_rank(spec: dict) -> tuple[configs.RuntimeConfig, str]:
    runtime = configs.RuntimeConfig(**spec["runtime"])
    device = init_process_group(runtime.device)
    if runtime.num_threads:
        torch.set_num_threads(runtime.num_threads)
    return runtime, device


def run_update(spec: dict) -> None:
    runtime, device = start_rank(spec)
    args = decode_args(spec["update_args"])
    algorithm = UPDATES[spec["algorithm"]]
    module, tokenizer = algorithm.load(Path(spec["policy"]), runtime, device, spec["trust_remote_code"], args)
    model = wrap_for_training(module, runtime.distributed, device)
    optimizer = algorithm.optimizer(model, args)
    restore_optimizer_state(model, optimizer, Path(spec["policy"]))
    table = pd.read_parquet(spec["batch"])
    history = algorithm.update(model, optimizer, table, tokenizer, device=device, **args)
    start = time.perf_counter()
    weights, optimizer_state = full_state(model, optimizer)  # collective under FSDP: every rank takes part
    if rank() == 0:
        def write(tmp: Path) -> None:
            algorithm.save(weights, module, tmp)
            tokenizer.save_pretrained(tmp)
            save_file(optimizer_state, str(tmp / OPTIMIZER_FILE))

        path, digest = write_dir(write, spec["checkpoints_dir"])
        history = [{**row, "time/checkpoint_s": time.perf_counter() - start} for row in history]
        result = {"path": str(path), "sha256": digest, "history": history}
        write_atomically(lambda tmp: tmp.write_text(json.dumps(result)), Path(spec["work_dir"]) / RESULT_FILE)


def wrap_for_inference(module: torch.nn.Module, strategy: str, device: str) -> torch.nn.Module:
    """A no-grad pass needs no gradient synchronisation: under DDP each rank runs its full replica; FSDP shards
    the weights, for models that do not fit one device."""
    return wrap_for_training(module, strategy, device) if strategy == "fsdp" else module


def write_scores(spec: dict, scores: dict[str, torch.Tensor]) -> None:
    """Rank 0 writes a scoring job's gathered values (every rank holds them) for the task to read."""
    if rank() == 0:
        tensors = {k: v.detach().cpu().contiguous() for k, v in scores.items()}
        write_atomically(lambda tmp: save_file(tensors, str(tmp)), Path(spec["work_dir"]) / SCORES_FILE)


def reference_logprobs(spec: dict, runtime: configs.RuntimeConfig, device: str, df: pd.DataFrame) -> torch.Tensor:
    """[B, T] log-probs of the responses under the reference, T as `collate` pads them."""
    lm, tokenizer = load_lm(spec["reference"], runtime, device, spec["trust_remote_code"])
    model = wrap_for_inference(ResponseScorer(lm), runtime.distributed, device)
    batch = collate(df["prompt_ids"], df["response_ids"], tokenizer.pad_token_id, device=device)
    with torch.no_grad():
        return map_rows_across_ranks(lambda rows: batched_response_logprobs(
            model, rows, micro_batch_size=spec["micro_batch_size"], temperature=spec["temperature"],
            chunk_size=spec["chunk_size"]), batch)


def reward_model_scores(path: str, spec: dict, runtime: configs.RuntimeConfig, device: str,
                        df: pd.DataFrame) -> torch.Tensor:
    """[B] scores of the decoded (prompt, response) texts under a reward model."""
    model, tokenizer = load_reward_model(Path(path), device, runtime.dtype)
    model = wrap_for_inference(model, runtime.distributed, device)
    prompts, responses = df["prompt"].tolist(), df["response"].tolist()

    def score(rows: dict[str, torch.Tensor]) -> torch.Tensor:
        index = rows["index"].tolist()
        return reward_scores(model, tokenizer, [prompts[j] for j in index], [responses[j] for j in index],
                             batch_size=spec["micro_batch_size"], max_length=spec["max_length"]).to(device)

    rows = {"index": torch.arange(len(df), device=device), "response_mask": torch.ones(len(df), 1, device=device)}
    with torch.no_grad():
        return map_rows_across_ranks(score, rows)


def run_scoring(spec: dict) -> None:
    """Reference log-probs and reward-model scores of a rollout table (spec["batch"]), each rank scoring its share
    of the rows; rank 0 writes them to SCORES_FILE: `ref_logprobs` [B, T] aligned with `collate`'s response
    columns, `reward.<i>` [B] for spec["reward_models"][i]."""
    runtime, device = start_rank(spec)
    torch.manual_seed(0)  # a reward backbone without a score head gets the same new head on every rank
    df = pd.read_parquet(spec["batch"])
    scores = {f"reward.{i}": reward_model_scores(path, spec, runtime, device, df)
              for i, path in enumerate(spec["reward_models"])}
    if spec["reference"]:
        scores["ref_logprobs"] = reference_logprobs(spec, runtime, device, df)
    write_scores(spec, scores)


# algorithm -> (tokenized table -> batch, (model, batch, *, micro_batch_size) -> {name: [B]}, the names returned)
SEQUENCE_LOGPS = {
    "dpo": (dpo.pair_batch, dpo.batched_pair_logprobs, ("chosen_logps", "rejected_logps")),
    "kto": (kto.example_batch, kto.batched_example_logps, ("logps", "mismatched_logps")),
}


def run_sequence_logps(spec: dict) -> None:
    """The offline flows' reference pass: summed log-probs of every sequence of a tokenized table (DPO's pairs,
    KTO's examples) under the reference, each rank scoring its share of the rows; rank 0 writes them to
    SCORES_FILE, one [B] tensor per name."""
    runtime, device = start_rank(spec)
    lm, tokenizer = load_lm(spec["reference"], runtime, device, spec["trust_remote_code"])
    model = wrap_for_inference(ResponseScorer(lm), runtime.distributed, device)
    make_batch, logps_of, names = SEQUENCE_LOGPS[spec["algorithm"]]
    batch = make_batch(pd.read_parquet(spec["batch"]), tokenizer.pad_token_id, device)

    def logps(rows: dict[str, torch.Tensor]) -> torch.Tensor:  # [b, len(names)]
        out = logps_of(model, rows, micro_batch_size=spec["micro_batch_size"])
        return torch.stack([out[name] for name in names], dim=-1)

    with torch.no_grad():
        gathered = map_rows_across_ranks(logps, batch)
    write_scores(spec, {name: gathered[:, i] for i, name in enumerate(names)})


def run_values(spec: dict) -> None:
    """PPO's value stage: the behaviour policy's log-probs and the critic's values of a rollout table, each rank
    scoring its share of the rows; rank 0 writes `old_logprobs` and `old_values` [B, T] to SCORES_FILE."""
    runtime, device = start_rank(spec)
    model, tokenizer = load_actor_critic(Path(spec["policy"]), runtime, device, spec["trust_remote_code"], {})
    model = wrap_for_inference(model, runtime.distributed, device)
    df = pd.read_parquet(spec["batch"])
    batch = collate(df["prompt_ids"], df["response_ids"], tokenizer.pad_token_id, device=device)

    def outputs(rows: dict[str, torch.Tensor]) -> torch.Tensor:  # [b, T, 2]
        return torch.stack(rollout_logprobs_and_values(model, rows, micro_batch_size=spec["micro_batch_size"],
                                                       temperature=spec["temperature"],
                                                       chunk_size=spec["chunk_size"]), dim=-1)

    with torch.no_grad():
        gathered = map_rows_across_ranks(outputs, batch)
    write_scores(spec, {"old_logprobs": gathered[..., 0], "old_values": gathered[..., 1]})


JOBS = {"update": run_update, "score": run_scoring, "sequence_logps": run_sequence_logps, "values": run_values}


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    try:
        JOBS[spec["job"]](spec)
    except BaseException as error:
        report = {"type": type(error).__name__, "message": str(error), "traceback": traceback.format_exc()}
        (Path(spec["work_dir"]) / f"error-{rank()}.json").write_text(json.dumps(report))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
