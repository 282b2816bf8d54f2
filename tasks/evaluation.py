"""The evaluation's comparison stage: the candidate's and the baseline's scored responses, paired row by row."""

from __future__ import annotations

import numpy as np
import pandas as pd
from prefect import task

from rlhf_core.config import PairwiseJudgeConfig, RuntimeConfig
from rlhf_core.evaluation import comparison_summary, paired_outcomes, sequence_kl
from rlhf_core.judge import pairwise_preference
from tasks.cache import STAGE_TASK_OPTIONS
from tasks.refs import ArtifactRef, CheckpointRef, publish
from tasks.runtime import load_model

PAIR_KEY = ["prompt_id", "sample_index"]


def side(df: pd.DataFrame, name: str) -> pd.DataFrame:
    """One model's scored rollouts -> its columns of the comparison, prefixed with `name`."""
    return pd.DataFrame({
        **{key: df[key] for key in PAIR_KEY},
        f"{name}_response": df["response"],
        f"{name}_reward": df["rewards"].astype(float),
        f"{name}_kl": sequence_kl(df["sampling_logprobs"].tolist(), df["ref_logprobs"].tolist()),
        f"{name}_length": df["response_length"],
    })


@task(name="compare-models", **STAGE_TASK_OPTIONS)
def compare_models(candidate_scored: ArtifactRef, baseline_scored: ArtifactRef) -> ArtifactRef:
    """One row per (prompt, sample): prompt, both responses, rewards, KL to the reference and lengths, and
    `outcome` (+1 the candidate wins, -1 it loses, 0 a tie)."""
    candidate, baseline = candidate_scored.read(), baseline_scored.read()
    pairs = (candidate[PAIR_KEY + ["prompt"]]
             .merge(side(candidate, "candidate"), on=PAIR_KEY, validate="one_to_one")
             .merge(side(baseline, "baseline"), on=PAIR_KEY, validate="one_to_one"))
    if len(pairs) != len(candidate) or len(pairs) != len(baseline):
        raise ValueError(f"candidate ({len(candidate)} rows) and baseline ({len(baseline)} rows) answered different "
                         "prompts: both must be sampled from the same prompts file and group size")
    pairs["outcome"] = paired_outcomes(pairs["candidate_reward"].to_numpy(), pairs["baseline_reward"].to_numpy())
    return publish(pairs, "comparisons")


@task(name="judge-pairs", **STAGE_TASK_OPTIONS)
def judge_pairs(comparison: ArtifactRef, judge: CheckpointRef, config: PairwiseJudgeConfig, runtime: RuntimeConfig,
                batch_size: int) -> ArtifactRef:
    """The comparison with `judge_preference` (the judge's preference for the candidate's response, both orders
    averaged) and `outcome` decided by it: +1 above 0.5 + margin, -1 below 0.5 - margin, else a tie."""
    pairs = comparison.read()
    model, tokenizer = load_model(judge, runtime)
    preference = pairwise_preference(model, tokenizer, config.template, pairs["prompt"].tolist(),
                                     pairs["candidate_response"].tolist(), pairs["baseline_response"].tolist(),
                                     config.answers, batch_size).numpy()
    outcome = np.where(preference > 0.5 + config.margin, 1, np.where(preference < 0.5 - config.margin, -1, 0))
    return publish(pairs.assign(judge_preference=preference, outcome=outcome.astype(np.int64)), "comparisons")


def summarize_pairs(pairs: pd.DataFrame) -> dict[str, float]:
    """`compare_models`' rows -> the evaluation's metrics (win rate from `outcome`, reward, KL and length means)."""
    return comparison_summary(pairs["candidate_reward"].to_numpy(), pairs["baseline_reward"].to_numpy(),
                              pairs["candidate_kl"].to_numpy(), pairs["baseline_kl"].to_numpy(),
                              pairs["candidate_length"].to_numpy(), pairs["baseline_length"].to_numpy(),
                              pairs["outcome"].to_numpy())
