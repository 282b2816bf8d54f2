"""The evaluation's math and its comparison stage, on hand-computed values."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from flows.inputs import resolve_run_seed
from rlhf_core.config import EvaluationConfig, GRPOConfig
from rlhf_core.evaluation import comparison_summary, paired_outcomes, promotion_decision, sequence_kl, win_rate
from rlhf_core.kl import kl_k1
from tasks.evaluation import compare_models, summarize_pairs
from tasks.refs import publish


def test_paired_outcomes_and_win_rate_by_hand():
    outcomes = paired_outcomes(np.array([1.0, 0.0, 0.5, 2.0]), np.array([0.0, 0.0, 0.7, 1.0]))
    assert outcomes.tolist() == [1, 0, -1, 1]
    assert win_rate(outcomes) == pytest.approx((2 + 0.5) / 4)
    assert win_rate(np.zeros(5, dtype=int)) == 0.5  # all ties: an identical model is exactly even
    with pytest.raises(ValueError, match="shape"):
        paired_outcomes(np.zeros(2), np.zeros(3))
    with pytest.raises(ValueError, match="no pairs"):
        win_rate(np.array([], dtype=int))


def test_sequence_kl_matches_summed_k1_over_a_padded_batch():
    logprobs = [[-1.0, -2.0], [-0.5], [-3.0, -1.0, -0.25]]
    ref = [[-1.5, -1.0], [-0.5], [-2.0, -2.0, -0.5]]
    # by hand: (0.5 - 1.0), 0, (-1.0 + 1.0 + 0.25)
    assert sequence_kl(logprobs, ref).tolist() == pytest.approx([-0.5, 0.0, 0.25])
    # the same through the registry's k1 on a padded [B, T] tensor and a mask
    width = max(map(len, logprobs))
    pad = lambda rows: torch.tensor([r + [0.0] * (width - len(r)) for r in rows])  # noqa: E731
    mask = torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in logprobs])
    assert sequence_kl(logprobs, ref) == pytest.approx((kl_k1(pad(logprobs), pad(ref)) * mask).sum(-1).numpy())
    with pytest.raises(ValueError):
        sequence_kl(logprobs, ref[:2])


def test_comparison_summary_by_hand():
    summary = comparison_summary(np.array([1.0, 0.0, 1.0]), np.array([0.0, 0.0, 2.0]), np.array([0.1, 0.2, 0.3]),
                                 np.array([0.0, 0.0, 0.0]), np.array([4, 5, 6]), np.array([1, 2, 3]))
    assert summary == pytest.approx({
        "pairs": 3, "win_rate": 0.5, "wins": 1, "losses": 1, "ties": 1, "candidate/reward_mean": 2 / 3,
        "baseline/reward_mean": 2 / 3, "candidate/kl_mean": 0.2, "baseline/kl_mean": 0.0,
        "candidate/length_mean": 5.0, "baseline/length_mean": 2.0})


@pytest.mark.parametrize("rate, kl, min_win_rate, max_kl, promote", [
    (0.5, 0.0, 0.5, None, False),   # a tie is not a win: the champion stays
    (0.51, 0.0, 0.5, None, True),
    (0.9, 3.0, 0.5, 2.0, False),    # wins, but drifted too far from the reference
    (0.9, 2.0, 0.5, 2.0, True),
    (0.6, 0.0, 0.7, None, False),
])
def test_promotion_decision(rate, kl, min_win_rate, max_kl, promote):
    decision, why = promotion_decision({"win_rate": rate, "candidate/kl_mean": kl}, min_win_rate, max_kl)
    assert decision is promote
    assert f"{rate:.3f}" in why


def scored_rows(rewards, sampling, ref, prompt_ids=(0, 0, 1)) -> pd.DataFrame:
    return pd.DataFrame({"prompt_id": list(prompt_ids), "sample_index": [0, 1, 0][:len(prompt_ids)],
                         "prompt": [f"p{i}" for i in prompt_ids], "response": [f"r{i}" for i in range(len(rewards))],
                         "rewards": rewards, "sampling_logprobs": sampling, "ref_logprobs": ref,
                         "response_length": [len(s) for s in sampling]})


def test_compare_models_pairs_rows_by_prompt_and_sample(rlhf_home):
    candidate = scored_rows([1.0, 0.0, 1.0], [[-1.0], [-1.0, -1.0], [-2.0]], [[-2.0], [-1.0, -1.5], [-2.0]])
    # the baseline's rows come in another order: pairing is by (prompt_id, sample_index), not position
    baseline = scored_rows([0.0, 1.0, 0.0], [[-1.0, -1.0, -1.0], [-1.0], [-1.0]], [[-1.0, -1.0, -1.0], [-1.0],
                                                                                    [-1.5]], prompt_ids=(1, 0, 0))
    baseline["sample_index"] = [0, 0, 1]
    pairs = compare_models.fn(publish(candidate, "scored"), publish(baseline, "scored")).read()
    assert pairs["prompt"].tolist() == ["p0", "p0", "p1"]
    assert pairs["candidate_reward"].tolist() == [1.0, 0.0, 1.0]
    assert pairs["baseline_reward"].tolist() == [1.0, 0.0, 0.0]
    assert pairs["outcome"].tolist() == [0, 0, 1]
    assert pairs["candidate_kl"].tolist() == pytest.approx([1.0, 0.5, 0.0])
    assert pairs["baseline_length"].tolist() == [1, 1, 3]
    summary = summarize_pairs(pairs)
    assert summary["win_rate"] == pytest.approx((1 + 0.5 * 2) / 3)
    assert summary["baseline/kl_mean"] == pytest.approx(0.5 / 3)

    fewer = baseline.iloc[:2]
    with pytest.raises(ValueError, match="different prompts"):
        compare_models.fn(publish(candidate, "scored"), publish(fewer, "scored"))


def test_evaluation_config_refuses_what_cannot_work():
    with pytest.raises(ValidationError, match="promote"):
        EvaluationConfig(candidate="/some/folder")
    with pytest.raises(ValidationError, match="baseline 'champion'"):
        EvaluationConfig(candidate="/some/folder", promote=False)
    assert EvaluationConfig(candidate="/some/folder", promote=False, baseline="reference").baseline == "reference"
    with pytest.raises(ValidationError, match="temperature"):
        EvaluationConfig(generation={"temperature": 0.0})
    with pytest.raises(ValidationError, match="min_win_rate"):
        EvaluationConfig(min_win_rate=1.0)  # nothing could ever win


def test_run_date_seed_is_the_scheduled_date():
    config = GRPOConfig(seed="run-date")
    resolved = resolve_run_seed(config, datetime(2026, 11, 24, 3, 0, tzinfo=timezone.utc))
    assert resolved.seed == 20261124 and config.seed == "run-date"
    assert resolve_run_seed(GRPOConfig(seed=7), datetime(2026, 11, 24, tzinfo=timezone.utc)).seed == 7
    with pytest.raises(ValidationError):
        GRPOConfig(seed="today")
