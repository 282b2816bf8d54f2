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


def test_the_pairwise_preference_is_both_orders_averaged(tiny_model):
    from rlhf_core.judge import pairwise_preference

    model, tokenizer = tiny_model
    template = "Better for {prompt}? A: {a} B: {b}. Answer A or B."
    first, second = ["4", "41", "hi"], ["5", "42", "hello"]
    prefers = pairwise_preference(model, tokenizer, template, PROMPTS[:3], first, second, ["A", "B"], batch_size=1)
    a, b = answer_token_ids(tokenizer, ["A", "B"])
    for row in range(3):  # by hand from the two renderings
        shown = [prompt_ids(tokenizer, template.format(prompt=PROMPTS[row], a=x, b=y))
                 for x, y in ((first[row], second[row]), (second[row], first[row]))]
        p_first_as_a, p_second_as_a = (float(p) for p in yes_probability(model, shown, [a, b],
                                                                         tokenizer.pad_token_id, batch_size=1))
        assert float(prefers[row]) == pytest.approx((p_first_as_a + 1 - p_second_as_a) / 2, rel=1e-12)
    swapped = pairwise_preference(model, tokenizer, template, PROMPTS[:3], second, first, ["A", "B"], batch_size=1)
    assert (prefers + swapped).tolist() == pytest.approx([1.0] * 3, abs=1e-12)  # asking the other way round
    same = pairwise_preference(model, tokenizer, template, PROMPTS[:3], first, first, ["A", "B"], batch_size=1)
    assert same.tolist() == pytest.approx([0.5] * 3, abs=1e-12)  # no position bias left on identical responses


@pytest.mark.slow
def test_the_evaluation_decides_pairs_by_a_pairwise_judge(prefect_harness, rlhf_home, tmp_path, tiny_model_dir,
                                                          tokenizer_dir):
    from test_flow_evaluation import evaluation
    from tiny_models import save_tiny_model

    from flows.evaluation import evaluate
    from rlhf_core.config import PairwiseJudgeConfig

    other = save_tiny_model(tmp_path / "other", tokenizer_dir, seed=1)
    config = evaluation(str(tiny_model_dir), candidate=str(other), baseline=str(tiny_model_dir), promote=False,
                        pairwise_judge=PairwiseJudgeConfig(model=str(tiny_model_dir), margin=0.001))
    summary = evaluate(config)
    tables = [pd.read_parquet(p) for p in (rlhf_home / "artifacts" / "comparisons").glob("*.parquet")]
    (pairs,) = [df for df in tables if "judge_preference" in df]  # beside the rewards' comparison
    expected = [1 if p > 0.501 else -1 if p < 0.499 else 0 for p in pairs["judge_preference"]]
    assert pairs["outcome"].tolist() == expected
    outcomes = pairs["outcome"].to_numpy()
    assert summary["win_rate"] == pytest.approx(((outcomes == 1).sum() + 0.5 * (outcomes == 0).sum()) / len(pairs))


def test_round_robin_scores_by_hand():
    from rlhf_core.judge import round_robin_scores

    prefers = torch.tensor([[0.5, 0.9, 0.6], [0.1, 0.5, 0.2], [0.4, 0.8, 0.5]], dtype=torch.float64)
    assert round_robin_scores(prefers).tolist() == pytest.approx([0.75, 0.15, 0.6])
    assert float(round_robin_scores(prefers).sum()) == pytest.approx(3 / 2)  # every verdict shared by two
    assert round_robin_scores(torch.ones(1, 1, dtype=torch.float64)).tolist() == [0.5]


@pytest.mark.slow
def test_the_preference_data_flow_with_a_pairwise_judge(prefect_harness, rlhf_home, tmp_path, tiny_model_dir):
    from test_flow_preference_data import only_parquet, small_config

    from flows.preference_data import preference_data
    from rlhf_core.config import GenerationConfig, JudgeConfig, PairwiseJudgeConfig
    from rlhf_core.judge import pairwise_preference, round_robin_scores
    from rlhf_core.models import load_causal_lm

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "Name a colour, please ({i})."}}\n' for i in range(4)))
    judge = PairwiseJudgeConfig(model=str(tiny_model_dir))
    one_at_a_time = GenerationConfig(group_size=4, max_new_tokens=12, temperature=1.0, batch_size=1)  # as below
    folder = preference_data(small_config(prompts, tiny_model_dir, judge=JudgeConfig(kind="pairwise", pairwise=judge),
                                          min_gap=1e-9, generation=one_at_a_time))  # a random judge: ~0.5
    judged = only_parquet(rlhf_home / "artifacts" / "judged")
    assert judged.groupby("prompt_id")["score"].sum().tolist() == pytest.approx([4 / 2] * 4)  # G/2 per prompt
    # prompt 0 by hand: the judge on its 6 pairs, both orders, then each response's mean preference
    group = judged[judged["prompt_id"] == judged["prompt_id"].iloc[0]]
    model, tokenizer = load_causal_lm(tiny_model_dir)
    texts = group["response"].tolist()
    matrix = torch.full((4, 4), 0.5, dtype=torch.float64)
    for i in range(4):
        for j in range(4):
            if i != j:
                matrix[i, j] = pairwise_preference(model.eval(), tokenizer, judge.template, [group["prompt"].iloc[0]],
                                                   [texts[i]], [texts[j]], judge.answers)[0]
    by_hand = round_robin_scores(matrix).numpy()
    assert group["score"].to_numpy() == pytest.approx(by_hand, rel=1e-12)
    assert (pd.read_parquet(f"{folder}/pairs.parquet")["judge"] == f"pairwise:{tiny_model_dir}").all()
