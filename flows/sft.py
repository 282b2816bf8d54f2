"""The SFT flow: validate conversations and model, tokenize once, then per epoch train -> evaluate -> log ->
register.

Supervised fine-tuning is the chain's first stage (SFT -> reward model -> PPO): the next-token loss on the
assistant's tokens only (rlhf_core/sft.py). The examples are tokenized once (a cached stage, so training and
evaluation see the same tokens); each epoch is one cached task keyed on the previous checkpoint's content hash, so
a run that crashed resumes at the epoch that failed; every epoch's checkpoint is registered (alias `newest`) and
its held-out loss and token accuracy logged.
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from flows.heldout import HeldOutEvaluation
from flows.inputs import check_runtime, held_out_tags, lineage_tags
from flows.tracking import StageClock, log_offline_epoch, mlflow_run
from rlhf_core.config import SFTConfig
from rlhf_core.config.training import SFTUpdateArgs, TrainingSetup
from tasks.data import dataset_fingerprints, load_conversation_dataset
from tasks.models import resolve_start_model
from tasks.sft import evaluate_sft, held_out_metrics, tokenize_conversations, train_sft_epoch
from tasks.train import prune_checkpoints


@flow(name="sft", log_prints=True)
def sft(config: SFTConfig = SFTConfig()) -> str:
    """Fine-tune a policy on conversations; returns the final checkpoint's folder."""
    check_runtime(config.runtime)
    data = config.data
    fingerprints = dataset_fingerprints(data)
    examples = load_conversation_dataset(data, fingerprints, config.seed)
    policy = resolve_start_model(config.model)  # checked before any work: the data is valid, the model loads
    trust, runtime = config.model.trust_remote_code, config.runtime
    setup = TrainingSetup.of(config.model, runtime)
    train_examples, eval_examples = (tokenize_conversations(policy, split, config.max_length, data.system_prompt)
                                     for split in (examples.train, examples.eval))
    checkpoints = []

    with mlflow_run(config.tracking.experiment, config, flow_run.id, flow_run.name,
                    held_out_tags(fingerprints, data),
                    lineage_tags(config.model, policy, [data.path, data.eval_path], fingerprints)) as tracker:
        heldout = HeldOutEvaluation.of_offline(config, policy)
        heldout.run(policy, 0, tracker)
        for epoch in range(config.optim.epochs):
            clock = StageClock()
            with clock("train"):
                update = train_sft_epoch(policy, train_examples, SFTUpdateArgs.from_config(config, epoch), setup)
            with clock("eval"):
                scores = evaluate_sft(update.checkpoint, eval_examples, config.optim.micro_batch_size, runtime, trust)
            policy = update.checkpoint
            metrics = log_offline_epoch(tracker, epoch, config.optim.epochs, update, scores, clock, config.tracking,
                                        held_out_metrics(scores.read()))
            checkpoints.append(policy)
            prune_checkpoints(checkpoints, keep=config.keep_checkpoints)
            print(f"epoch {epoch}: train loss {metrics['loss/train']:.4f}, held-out loss {metrics['eval/loss']:.4f}, "
                  f"token accuracy {metrics['eval/token_accuracy']:.3f} ({scores.rows} conversations), "
                  f"{sum(clock.values()):.1f} s")
            heldout.run(policy, epoch + 1, tracker)
    return policy.path
