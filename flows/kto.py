"""The KTO flow: validate the unpaired examples and the model, tokenize them and fix their mismatched pairs, reference
log-probs once, then per epoch train -> evaluate -> log -> register.

KTO (rlhf_core/kto.py) learns from single completions labelled desirable or undesirable. The reference is the
starting model, frozen; its summed log-probs of every completion and of every mismatched (prompt, another
prompt's completion) sequence are one cached stage per dataset. Each epoch is one cached task keyed on the
previous checkpoint's content hash, so a run that crashed resumes at the epoch that failed. Every epoch's
checkpoint is registered (alias `newest`).
"""

from __future__ import annotations

import pandas as pd
import torch
from prefect import flow
from prefect.runtime import flow_run

from flows.heldout import HeldOutEvaluation
from flows.inputs import check_runtime, held_out_tags, lineage_tags
from flows.tracking import StageClock, log_offline_epoch, mlflow_run
from rlhf_core.config import KTOConfig
from rlhf_core.config.training import KTOUpdateArgs, TrainingSetup
from rlhf_core.kto import held_out_metrics
from tasks.data import dataset_fingerprints, load_unpaired_dataset
from tasks.kto import compute_kto_reference_logprobs, evaluate_kto, tokenize_unpaired, train_kto_epoch
from tasks.models import resolve_start_model
from tasks.runtime import reference_checkpoint
from tasks.train import prune_checkpoints


@flow(name="kto", log_prints=True)
def kto(config: KTOConfig = KTOConfig()) -> str:
    """Train a policy with KTO on unpaired labelled completions; returns the final checkpoint's folder."""
    check_runtime(config.runtime)
    data = config.data
    fingerprints = dataset_fingerprints(data)
    examples = load_unpaired_dataset(data, fingerprints, config.seed)
    policy = resolve_start_model(config.model)  # checked before any work: the data is valid, the model loads
    trust, runtime = config.model.trust_remote_code, config.runtime
    setup = TrainingSetup.of(config.model, runtime)
    tokens = [tokenize_unpaired(policy, split, config.max_length, config.max_prompt_length, config.seed)
              for split in (examples.train, examples.eval)]  # also fixes each row's mismatched completion
    reference = reference_checkpoint(policy, policy, config.model.lora)  # the starting policy, frozen
    train_examples, eval_examples = (compute_kto_reference_logprobs(reference, split, config.optim.micro_batch_size,
                                                                    runtime, trust) for split in tokens)
    checkpoints = []

    with mlflow_run(config.tracking.experiment, config, flow_run.id, flow_run.name,
                    held_out_tags(fingerprints, data),
                    lineage_tags(config.model, policy, [data.path, data.eval_path], fingerprints)) as tracker:
        heldout = HeldOutEvaluation.of_offline(config, policy)
        heldout.run(policy, 0, tracker)
        for epoch in range(config.optim.epochs):
            clock = StageClock()
            with clock("train"):
                update = train_kto_epoch(policy, train_examples, KTOUpdateArgs.from_config(config, epoch), setup)
            with clock("eval"):
                scores = evaluate_kto(update.checkpoint, eval_examples, config.beta, config.optim.micro_batch_size,
                                      runtime, trust)
            policy = update.checkpoint
            metrics = log_offline_epoch(tracker, epoch, config.optim.epochs, update, scores, clock, config.tracking,
                                        summarize_held_out(scores.read()))
            checkpoints.append(policy)
            prune_checkpoints(checkpoints, keep=config.keep_checkpoints)
            print(f"epoch {epoch}: train loss {metrics['loss/train']:.4f}, held-out accuracy "
                  f"{metrics['eval/rewards/accuracies']:.3f}, margin {metrics['eval/rewards/margins']:.3f}, KL "
                  f"{metrics['eval/kl']:.3f} ({scores.rows} examples), {sum(clock.values()):.1f} s")
            heldout.run(policy, epoch + 1, tracker)
    return policy.path


def summarize_held_out(scores: pd.DataFrame) -> dict[str, float]:
    """`kto.held_out_metrics` of an `evaluate_kto` table; rows with the same prompt text are one prompt."""
    def column(name: str, dtype=torch.float32) -> torch.Tensor:
        return torch.as_tensor(scores[name].to_numpy(copy=True), dtype=dtype)

    return held_out_metrics(column("rewards"), column("label", torch.bool),
                            torch.as_tensor(pd.factorize(scores["prompt"])[0]), column("mismatched_logps"),
                            column("ref_mismatched_logps"))
