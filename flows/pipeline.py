"""The whole chain as one flow: SFT -> preference data -> reward model -> RL (PPO, GRPO or DPO) -> evaluation.

    sft_policy   <- sft(base model, conversations)                    # registered: <sft>/<v>
    pairs        <- preference_data(sft_policy, prompts, judge)        # Parquet folder
    reward_model <- reward_model(backbone, pairs)                      # registered (not for DPO)
    policy       <- ppo | grpo (sft_policy, reward_model) | dpo (sft_policy, pairs)
    summary      <- evaluate(policy vs champion, else sft_policy)      # may move the champion alias

Each stage is its own flow, called as a Prefect subflow (its own flow run and cached tasks: a rerun after a crash
in any stage replays the finished ones from the cache) with its own MLflow run nested under the pipeline's
(`tracking.PARENT_RUN`). Stages hand each other registry versions (`models:/<name>/<version>`), so every
registered version's `lineage.start_model` tag names the exact version it started from, back to the base model,
and its `lineage.data` tags the data files with their content hashes.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from flows.dpo import dpo
from flows.evaluation import evaluate
from flows.grpo import grpo
from flows.inputs import check_runtime
from flows.ppo import ppo
from flows.preference_data import preference_data
from flows.reward_model import reward_model
from flows.sft import sft
from flows.tracking import PARENT_RUN, mlflow_run, registered_uri
from rlhf_core.config import RewardSpec
from rlhf_core.config.pipeline import PipelineConfig


def starting_from(stage, model_uri: str):
    """`stage` (a flow's config) with its model replaced by `model_uri` (LoRA and other model settings kept)."""
    return stage.model_copy(update={"model": stage.model.model_copy(update={"name_or_path": model_uri})})


def with_pairs(stage, pairs_file: str):
    """`stage` trained on the pipeline's pairs, `eval_fraction` of them held out."""
    return stage.model_copy(update={"data": stage.data.model_copy(update={"path": pairs_file, "eval_path": None})})


def rewarded_by(stage, reward_model_uri: str):
    """`stage` rewarded by the trained reward model, plus the reward functions it lists."""
    functions = [spec for spec in stage.rewards if spec.function]
    return stage.model_copy(update={"rewards": [RewardSpec(model=reward_model_uri), *functions]})


@flow(name="pipeline", log_prints=True)
def pipeline(config: PipelineConfig = PipelineConfig()) -> dict:
    """SFT -> preference data -> reward model -> RL -> evaluation; returns the evaluation's summary."""
    for stage in (config.sft, config.preference_data, config.reward_model, getattr(config, config.algorithm)):
        check_runtime(stage.runtime)
    with mlflow_run(config.tracking.experiment, config, flow_run.id, flow_run.name) as tracker:
        nested = PARENT_RUN.set(tracker.run_id)
        try:
            sft_policy = registered_uri(config.sft.tracking.registered_model, sft(config.sft))
            print(f"SFT: {sft_policy}")
            pairs = str(Path(preference_data(starting_from(config.preference_data, sft_policy))) / "pairs.parquet")
            print(f"preference data: {pairs}")
            rl = getattr(config, config.algorithm)
            if config.algorithm == "dpo":
                stage = with_pairs(starting_from(rl, sft_policy), pairs)
            else:
                scorer = registered_uri(config.reward_model.tracking.registered_model,
                                        reward_model(with_pairs(config.reward_model, pairs)))
                print(f"reward model: {scorer}")
                stage = rewarded_by(starting_from(rl, sft_policy), scorer)
            run = {"ppo": ppo, "grpo": grpo, "dpo": dpo}[config.algorithm]
            policy = registered_uri(rl.tracking.registered_model, run(stage))
            print(f"{config.algorithm}: {policy}")
            summary = evaluate(config.evaluation.model_copy(update={"candidate": policy, "reference": sft_policy}))
        finally:
            PARENT_RUN.reset(nested)
        tracker.client.set_tag(tracker.run_id, "decision", summary["decision"])
    return summary
