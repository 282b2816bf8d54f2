"""The DPO flow: validate pairs and model, reference log-probs once, then per epoch train -> evaluate -> log ->
register.

Offline preference optimisation (rlhf_core/dpo.py): pairs are tokenized and cut to `max_length` once (a cached
stage, so every later stage sees the same tokens); the reference is the starting model, frozen; its summed
log-probs of every chosen and rejected response are one cached stage per dataset (skipped for simpo, which has
no reference). Each epoch is one cached task keyed on the previous checkpoint's content hash, so a run that
crashed resumes at the epoch that failed. Every epoch's checkpoint is registered (alias `newest`).
"""

from __future__ import annotations

import pandas as pd
from prefect import flow
from prefect.runtime import flow_run

from flows.heldout import HeldOutEvaluation
from flows.inputs import check_runtime, held_out_tags, lineage_tags
from flows.tracking import StageClock, log_offline_epoch, mlflow_run
from rlhf_core.config import DPOConfig
from rlhf_core.config.training import DPOUpdateArgs, TrainingSetup
from rlhf_core.preference_losses import PREFERENCE_LOSSES
from tasks.data import dataset_fingerprints, load_preference_dataset
from tasks.dpo import compute_reference_logprobs, evaluate_dpo, tokenize_pairs, train_dpo_epoch
from tasks.models import resolve_start_model
from tasks.runtime import reference_checkpoint
from tasks.train import prune_checkpoints


@flow(name="dpo", log_prints=True)
def dpo(config: DPOConfig = DPOConfig()) -> str:
    """Train a policy with DPO (or `config.loss_type`) on preference pairs; returns the final checkpoint's folder."""
    check_runtime(config.runtime)
    data = config.data
    fingerprints = dataset_fingerprints(data)
    pairs = load_preference_dataset(data, fingerprints, config.seed)
    policy = resolve_start_model(config.model)  # checked before any work: the data is valid, the model loads
    trust, runtime = config.model.trust_remote_code, config.runtime
    setup = TrainingSetup.of(config.model, runtime)
    train_pairs, eval_pairs = (tokenize_pairs(policy, split, config.max_length, config.max_prompt_length)
                               for split in (pairs.train, pairs.eval))
    if PREFERENCE_LOSSES[config.loss_type].needs_reference:  # the reference is the starting policy, frozen
        reference = reference_checkpoint(policy, policy, config.model.lora)
        train_pairs = compute_reference_logprobs(reference, train_pairs, config.optim.micro_batch_size, runtime, trust)
        eval_pairs = compute_reference_logprobs(reference, eval_pairs, config.optim.micro_batch_size, runtime, trust)
    checkpoints = []

    with mlflow_run(config.tracking.experiment, config, flow_run.id, flow_run.name,
                    held_out_tags(fingerprints, data),
                    lineage_tags(config.model, policy, [data.path, data.eval_path], fingerprints)) as tracker:
        heldout = HeldOutEvaluation.of_offline(config, policy)
        heldout.run(policy, 0, tracker)
        for epoch in range(config.optim.epochs):
            clock = StageClock()
            with clock("train"):
                update = train_dpo_epoch(policy, train_pairs, DPOUpdateArgs.from_config(config, epoch), setup)
            with clock("eval"):
                scores = evaluate_dpo(update.checkpoint, eval_pairs, config.loss_type, config.beta,
                                      config.optim.micro_batch_size, runtime, trust)
            policy = update.checkpoint
            metrics = log_offline_epoch(tracker, epoch, config.optim.epochs, update, scores, clock, config.tracking,
                                        summarize_held_out(scores.read()))
            checkpoints.append(policy)
            prune_checkpoints(checkpoints, keep=config.keep_checkpoints)
            print(f"epoch {epoch}: train loss {metrics['loss/train']:.4f}, held-out accuracy "
                  f"{metrics['eval/rewards/accuracies']:.3f}, margin {metrics['eval/rewards/margins']:.3f} "
                  f"({scores.rows} pairs), {sum(clock.values()):.1f} s")
            heldout.run(policy, epoch + 1, tracker)
    return policy.path


def summarize_held_out(pairs: pd.DataFrame) -> dict[str, float]:
    """Mean implicit rewards of an `evaluate_dpo` table, their margin, and the share of pairs ranked right."""
    margins = pairs["chosen_rewards"] - pairs["rejected_rewards"]
    return {"rewards/chosen": pairs["chosen_rewards"].mean(), "rewards/rejected": pairs["rejected_rewards"].mean(),
            "rewards/margins": margins.mean(), "rewards/accuracies": (margins > 0).mean()}
