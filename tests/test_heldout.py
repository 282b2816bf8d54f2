"""Evaluation during training: pass@k and maj@k by hand and against a second formulation, and the GRPO flow logging
them at steps 0 (the start model), every `heldout.every` iterations and the last."""

from __future__ import annotations

import sys
from math import comb

import mlflow
import numpy as np
import pandas as pd
import pytest

from rlhf_core.evaluation import answer_of, sample_metrics


def test_pass_and_majority_by_hand():
    # prompt 0: answers 5, 5, 7 (7 correct): pass yes, majority 5 wrong
    # prompt 1: answers 3, 4 tie -> the earliest, 3, correct
    # prompt 2: nothing correct
    rewards = np.array([0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    groups = np.array([0, 0, 0, 1, 1, 2])
    answers = ["5", "5", "7", "3", "4", "x"]
    got = sample_metrics(rewards, groups, answers, threshold=1.0)
    assert got == {"heldout/reward_mean": 2 / 6, "heldout/pass_at_k": 2 / 3, "heldout/maj_at_k": 1 / 3}


def test_the_metrics_match_the_definitions_written_another_way():
    rng = np.random.default_rng(0)
    for _ in range(30):
        k, prompts = int(rng.integers(1, 6)), int(rng.integers(1, 6))
        groups = np.repeat(np.arange(prompts), k)
        answers = [str(a) for a in rng.integers(0, 3, size=len(groups))]
        rewards = np.array([float(a == "1") for a in answers])  # answer "1" is the right one
        got = sample_metrics(rewards, groups, answers, threshold=0.5)
        table = pd.DataFrame({"g": groups, "a": answers, "r": rewards})
        # pass@k as Chen et al.'s unbiased estimator with n = k: 1 - C(n - c, k) / C(n, k)
        chen = np.mean([1 - comb(k - int(c), k) / comb(k, k) for c in table.groupby("g")["r"].sum()])
        # maj@k: the mode by first appearance among the most frequent
        def majority(group):
            counts = group["a"].value_counts(sort=False)
            top = [a for a in group["a"] if counts[a] == counts.max()][0]
            return float(top == "1")
        assert got["heldout/pass_at_k"] == pytest.approx(chen)
        assert got["heldout/maj_at_k"] == pytest.approx(table.groupby("g")[["a"]].apply(majority).mean())
        assert got["heldout/reward_mean"] == pytest.approx(rewards.mean())


def test_answers_are_final_numbers_or_folded_text():
    assert [answer_of(r) for r in ["7 + 5 = 12", "twelve\n  is it", "1,200", "12.0"]] == ["12", "twelve is it",
                                                                                      "1200", "12"]


@pytest.mark.slow
def test_grpo_logs_heldout_metrics_at_the_start_every_k_iterations_and_the_end(prefect_harness, rlhf_home, tmp_path,
                                                                                tiny_model_dir):
    from flow_helpers import mlflow_run_of
    from test_flow_grpo import tiny_config

    from flows.grpo import grpo
    from flows.heldout import HELDOUT_ITERATION
    from flows.inputs import resolve_prompts, resolve_rewards
    from rlhf_core.config import DataConfig, HeldOutConfig, RewardSpec
    from rlhf_core.config.training import LogprobPass
    from tasks.data import sample_prompts
    from tasks.models import resolve_model
    from tasks.rollouts import generate_rollouts
    from tasks.scoring import score_rollouts

    (tmp_path / "parity_rewards.py").write_text(
        "import zlib\n\ndef parity(prompts, responses, **columns):\n"
        "    return [float(zlib.crc32(r.encode()) % 2) for r in responses]\n")
    sys.path.insert(0, str(tmp_path))
    try:
        heldout = HeldOutConfig(every=2, data=DataConfig(path="data/arithmetic_eval.jsonl"), num_prompts=3, samples=3)
        config = tiny_config(tiny_model_dir, iterations=3, rewards=[RewardSpec(function="parity_rewards:parity")],
                             heldout=heldout)
        state = grpo(config, return_state=True)
        assert state.is_completed()
        client = mlflow.MlflowClient()
        run = mlflow_run_of(state.state_details.flow_run_id)
        history = {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
                   for key in ("heldout/reward_mean", "heldout/pass_at_k", "heldout/maj_at_k")}
        assert all(sorted(steps) == [0, 2, 3] for steps in history.values())  # start, every 2, the last

        # step 0, recomputed outside the flow from the start model with the same prompts and seeds
        prompts = sample_prompts.fn(resolve_prompts(heldout.data), 3, 0, config.seed)
        rollouts = generate_rollouts.fn(resolve_model(str(tiny_model_dir)), prompts,
                                        config.generation.model_copy(update={"group_size": 3}), config.runtime, None,
                                        config.seed, HELDOUT_ITERATION)
        scored = score_rollouts.fn(rollouts, resolve_rewards(config.rewards, []), None,
                                   LogprobPass.from_config(config), config.runtime).read()
        expected = sample_metrics(scored["rewards"].to_numpy(), scored["group_id"].to_numpy(),
                                  [answer_of(r) for r in scored["response"]], 1.0)
        assert {key: steps[0] for key, steps in history.items()} == expected
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("parity_rewards", None)


@pytest.mark.slow
def test_dpo_logs_heldout_metrics_per_epoch(prefect_harness, rlhf_home, tmp_path, tiny_model_dir):
    from flow_helpers import mlflow_run_of
    from test_flow_dpo import small_config, write_review_pairs

    from flows.dpo import dpo
    from rlhf_core.config import DataConfig, GenerationConfig, HeldOutConfig, RewardSpec

    heldout = HeldOutConfig(every=1, data=DataConfig(path="data/review_prompts_eval.jsonl", extra_columns=[]),
                            num_prompts=3, samples=2, rewards=[RewardSpec(function="response_length")],
                            generation=GenerationConfig(max_new_tokens=6, temperature=1.0), pass_threshold=-0.02)
    config = small_config(write_review_pairs(tmp_path / "pairs.jsonl"), tiny_model_dir, heldout=heldout)
    state = dpo(config, return_state=True)
    assert state.is_completed()
    history = mlflow.MlflowClient().get_metric_history(mlflow_run_of(state.state_details.flow_run_id).info.run_id,
                                                         "heldout/reward_mean")
    assert sorted(m.step for m in history) == list(range(config.optim.epochs + 1))  # the start, every epoch
    assert all(-0.07 <= m.value <= 0 for m in history)  # response_length: -words / 100, 6 tokens at most


def test_offline_flows_need_a_heldout_judge():
    from rlhf_core.config import DPOConfig, SFTConfig

    with pytest.raises(ValueError, match="heldout.rewards: SFT, DPO and KTO have no rewards of their own"):
        SFTConfig(heldout={"every": 1, "rewards": None})
    assert DPOConfig(heldout={"every": 1}).heldout.rewards[0].function == "vader_sentiment"
