"""The LLM judge (rlhf_core/judge.py): its score by hand from the model's own logits, batched (left-padded) against
one prompt at a time within a measured bound, its config checks, and a GRPO run rewarded by it."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from tolerance import assert_close_to_reference, float32_floor

from rlhf_core.chat import prompt_ids
from rlhf_core.config import RewardSpec
from rlhf_core.errors import UserInputError
from rlhf_core.judge import answer_token_ids, judge_prompts, yes_probability

TEMPLATE = "Is this right? {prompt} -> {response}. Answer Yes or No."
PROMPTS = ["2 + 2", "What is 7 * 6?", "Say hi", "A much longer request that pads the others in its batch: 1 + 1"]
RESPONSES = ["4", "42", "hello there", "3"]


def test_the_score_is_the_renormalised_probability_of_the_first_answer(tiny_model):
    model, tokenizer = tiny_model
    yes, no = answer_token_ids(tokenizer, ["Yes", "No"])
    ids = judge_prompts(tokenizer, TEMPLATE, PROMPTS, RESPONSES)
    assert ids[0] == prompt_ids(tokenizer, "Is this right? 2 + 2 -> 4. Answer Yes or No.")
    one_at_a_time = yes_probability(model, ids, [yes, no], tokenizer.pad_token_id, batch_size=1)
    for row, prompt in enumerate(ids):  # by hand: exp(l_yes) / (exp(l_yes) + exp(l_no)) at the next token
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].double()
        by_hand = 1 / (1 + torch.exp(logits[no] - logits[yes]))
        assert float(one_at_a_time[row]) == pytest.approx(float(by_hand), rel=1e-12)
    # left-padded batches of 4 and of 3 against one at a time, within 10x the two batchings' own difference
    batched = yes_probability(model, ids, [yes, no], tokenizer.pad_token_id, batch_size=4)
    other = yes_probability(model, ids, [yes, no], tokenizer.pad_token_id, batch_size=3)
    assert_close_to_reference(float((batched - one_at_a_time).abs().max()), float((batched - other).abs().max()),
                              "judge: batch of 4 vs one at a time", floor=float32_floor(1.0, ulps=64))
    assert ((batched > 0) & (batched < 1)).all()


def test_judge_settings_are_checked(tiny_model):
    _, tokenizer = tiny_model
    with pytest.raises(UserInputError, match="a token of its own"):
        answer_token_ids(tokenizer, ["Yes", "Yes"])
    with pytest.raises(ValueError, match="judge_template: only {prompt} and {response}"):
        RewardSpec(judge="some/model", judge_template="{prompt} {answer}")
    with pytest.raises(ValueError, match="exactly one of `function`, `model` or `judge`"):
        RewardSpec(judge="some/model", function="answer_format")
    assert RewardSpec(judge="some/model", judge_template="{{literal}} {prompt} {response}").name == "some/model"


@pytest.mark.slow
def test_grpo_rewarded_by_a_judge(prefect_harness, rlhf_home, tiny_model_dir):
    import mlflow
    from flow_helpers import mlflow_run_of
    from test_flow_grpo import tiny_config

    from flows.grpo import grpo

    config = tiny_config(tiny_model_dir, iterations=1, rewards=[RewardSpec(judge=str(tiny_model_dir),
                                                                           judge_template=TEMPLATE)])
    state = grpo(config, return_state=True)
    assert state.is_completed()
    folder = mlflow.artifacts.download_artifacts(run_id=mlflow_run_of(state.state_details.flow_run_id).info.run_id,
                                                 artifact_path="data/iter_000")
    scored = pd.read_parquet(f"{folder}/scored.parquet")
    judged = scored[f"reward[{tiny_model_dir}]"]
    assert ((judged > 0) & (judged < 1)).all() and (scored["rewards"] == judged).all()
    assert judged.nunique() > 1  # a score per response, not one constant
