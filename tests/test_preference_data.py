"""Pairs and unpaired labels from judged samples, written out by hand on tiny tables; cross-checks against plain
loops; and the preference-data config's validation messages."""

from __future__ import annotations

import itertools
import math
from typing import get_args

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from rlhf_core.config import JudgeConfig, PreferenceDatasetConfig, RewardSpec
from rlhf_core.preference_data import (PAIR_COLUMNS, PAIRINGS, UNPAIRED_COLUMNS, choice_scores, make_pairs,
                                       make_unpaired, preference_metrics, review_batches)

NAN = float("nan")


def samples(scores_by_prompt: dict[int, list[float]], texts: dict[int, list[str]] | None = None) -> pd.DataFrame:
    """One row per response: prompt p's k-th response is "p<p>-r<k>" unless `texts` says otherwise."""
    rows = [(p, f"prompt {p}", k, (texts or {}).get(p, [f"p{p}-r{j}" for j in range(len(s))])[k], score)
            for p, s in scores_by_prompt.items() for k, score in enumerate(s)]
    return pd.DataFrame(rows, columns=["prompt_id", "prompt", "sample_index", "response", "score"])


def pair_tuples(pairs: pd.DataFrame) -> list[tuple]:
    return list(zip(pairs["prompt_id"], pairs["chosen_index"], pairs["rejected_index"]))


# ---------------------------------------------------------------- pairs


def test_best_worst_takes_highest_against_lowest_and_breaks_ties_by_lowest_sample_index():
    df = samples({0: [0.5, 0.9, 0.1, 0.9], 1: [0.1, 0.8, 0.1]})
    pairs = make_pairs(df, "best_worst", min_gap=0.2, judge="j")
    assert list(pairs.columns) == PAIR_COLUMNS
    assert pair_tuples(pairs) == [(0, 1, 2), (1, 1, 0)]  # 0.9 at 1 and 3 -> 1; 0.1 at 0 and 2 -> 0
    assert pairs.loc[0, ["chosen", "rejected", "chosen_score", "rejected_score", "judge", "prompt"]].tolist() == [
        "p0-r1", "p0-r2", 0.9, 0.1, "j", "prompt 0"]


def test_a_pair_needs_the_gap_up_to_float_rounding():
    df = samples({0: [0.3, 0.1], 1: [0.5, 0.35], 2: [0.7, 0.7]})  # gaps: 0.2 (as 0.19999999999999998), 0.15, 0
    assert pair_tuples(make_pairs(df, "best_worst", min_gap=0.2, judge="j")) == [(0, 0, 1)]
    assert pair_tuples(make_pairs(df, "all", min_gap=0.2, judge="j")) == [(0, 0, 1)]
    assert pair_tuples(make_pairs(df, "all", min_gap=0.1, judge="j")) == [(0, 0, 1), (1, 0, 1)]  # equal: never


def test_nan_scores_and_empty_responses_are_dropped_before_pairing():
    df = samples({0: [NAN, 0.9, 0.1, 1.0]}, texts={0: ["a", "b", "c", "  \n"]})  # 1.0 is empty, NaN abstained
    assert pair_tuples(make_pairs(df, "best_worst", min_gap=0.2, judge="j")) == [(0, 1, 2)]
    skipped = samples({0: [NAN, NAN, NAN]})  # a human's "skip"
    assert make_pairs(skipped, "all", min_gap=0.2, judge="human").empty
    assert make_unpaired(skipped, min_gap=0.2, judge="human").empty


def test_identical_texts_make_no_pair():
    df = samples({0: [1.0, 0.0, 0.5]}, texts={0: ["same", " same ", "other"]})
    assert make_pairs(df, "best_worst", min_gap=0.2, judge="j").empty  # its only candidate is (0, 1)
    assert pair_tuples(make_pairs(df, "all", min_gap=0.2, judge="j")) == [(0, 0, 2), (0, 2, 1)]


def test_all_pairs_match_a_plain_loop_over_combinations():
    rng = np.random.default_rng(0)
    scores = {p: rng.choice([0.0, 0.1, 0.25, 0.5, 0.8, 1.0, NAN], size=5).tolist() for p in range(30)}
    texts = {p: rng.choice(["x", "y", "z", "w", "", "v"], size=5).tolist() for p in range(30)}
    df = samples(scores, texts)
    expected = []
    for p in range(30):
        for i, j in itertools.combinations(range(5), 2):
            (a, b), (ta, tb) = (scores[p][i], scores[p][j]), (texts[p][i], texts[p][j])
            if math.isnan(a) or math.isnan(b) or not ta or not tb or ta == tb or abs(a - b) < 0.25 - 1e-9:
                continue
            expected.append((p, i, j) if a > b else (p, j, i))
    assert pair_tuples(make_pairs(df, "all", min_gap=0.25, judge="j")) == expected
    assert len(expected) > 20  # the sample exercises the rule


def test_pairing_and_min_gap_are_checked():
    df = samples({0: [1.0, 0.0]})
    with pytest.raises(ValueError, match=r"unknown pairing 'best'; choose one of \['all', 'best_worst'\]"):
        make_pairs(df, "best", min_gap=0.2, judge="j")
    with pytest.raises(ValueError, match="min_gap must be > 0, got 0"):
        make_unpaired(df, min_gap=0, judge="j")
    with pytest.raises(ValueError, match=r"samples lack the columns \['score'\]"):
        make_pairs(df.drop(columns="score"), "all", min_gap=0.2, judge="j")


# ---------------------------------------------------------------- unpaired


def test_unpaired_labels_are_relative_to_the_prompt_mean():
    # prompt 0: mean 2.0 / 4 = 0.5; min_gap 0.2 -> desirable >= 0.6, undesirable <= 0.4
    # prompt 1: mean 0.5 over its usable responses only (the NaN and the empty one are dropped first)
    df = samples({0: [0.9, 0.5, 0.45, 0.15], 1: [0.2, NAN, 0.8, 5.0]}, texts={1: ["a", "b", "c", ""]})
    unpaired = make_unpaired(df, min_gap=0.2, judge="j")
    assert list(unpaired.columns) == UNPAIRED_COLUMNS
    assert list(zip(unpaired["prompt_id"], unpaired["sample_index"], unpaired["label"])) == [
        (0, 0, True), (0, 3, False), (1, 0, False), (1, 2, True)]
    assert unpaired["completion"].tolist() == ["p0-r0", "p0-r3", "a", "c"]
    assert unpaired["label"].dtype == bool and unpaired["score"].tolist() == [0.9, 0.15, 0.2, 0.8]


def test_a_text_labelled_both_ways_is_dropped():
    df = samples({0: [1.0, 0.0, 1.0, 0.0]}, texts={0: ["same", "same", "good", "bad"]})  # mean 0.5
    assert make_unpaired(df, min_gap=0.2, judge="j")["completion"].tolist() == ["good", "bad"]


def test_for_two_responses_the_unpaired_rule_is_the_pair_rule():
    rng = np.random.default_rng(1)
    df = samples({p: rng.uniform(-1, 1, size=2).round(2).tolist() for p in range(200)},
                 texts={p: ["same", "same"] for p in range(0, 200, 17)})
    for min_gap in (0.1, 0.3, 0.7):
        pairs = make_pairs(df, "best_worst", min_gap=min_gap, judge="j")
        unpaired = make_unpaired(df, min_gap=min_gap, judge="j")
        for label, column in ((True, "chosen_index"), (False, "rejected_index")):
            labelled = unpaired[unpaired["label"] == label]
            assert set(zip(pairs["prompt_id"], pairs[column])) == set(zip(labelled["prompt_id"],
                                                                          labelled["sample_index"]))
        assert 0 < len(pairs) < 200 and pair_tuples(pairs) == pair_tuples(make_pairs(df, "all", min_gap, "j"))


# ---------------------------------------------------------------- the human judge's pieces


def test_choice_scores():
    assert choice_scores("2", 4) == [0.0, 1.0, 0.0, 0.0]
    assert all(math.isnan(s) for s in choice_scores("skip", 3))
    for bad in ("0", "5", "two"):
        with pytest.raises(ValueError, match=f"choice '{bad}' is neither 'skip' nor a response number 1..4"):
            choice_scores(bad, 4)


def test_review_batches_skip_prompts_with_fewer_than_two_nonempty_responses():
    df = samples({p: [0.0, 0.0] for p in range(5)}, texts={1: ["", "x"], 3: [" ", ""]}).iloc[::-1]
    batches = review_batches(df, batch_size=2)
    assert [b["prompt_id"].tolist() for b in batches] == [[0, 0, 2, 2], [4, 4]]
    assert batches[0]["sample_index"].tolist() == [0, 1, 0, 1]
    assert review_batches(df.iloc[:0], batch_size=2) == []


def test_preference_metrics():
    df = samples({0: [1.0, 0.0, 0.0], 1: [NAN, NAN, NAN]}, texts={0: ["a", "b", ""]})
    pairs, unpaired = make_pairs(df, "all", 0.2, "human"), make_unpaired(df, 0.2, "human")
    assert preference_metrics(df, pairs, unpaired) == {
        "data/prompts": 2, "data/responses": 6, "data/empty_responses": 1, "judge/abstained": 3,
        "judge/score_mean": pytest.approx(1 / 3), "pairs/count": 1, "pairs/prompts": 1, "pairs/gap_mean": 1.0,
        "unpaired/desirable": 1, "unpaired/undesirable": 1}  # prompt 0: mean 0.5 over "a" and "b"


# ---------------------------------------------------------------- config


def test_pairing_literal_equals_registry_keys():
    assert set(get_args(PreferenceDatasetConfig.model_fields["pairing"].annotation)) == set(PAIRINGS)


@pytest.mark.parametrize("model", [PreferenceDatasetConfig, JudgeConfig])
def test_every_field_has_a_description(model):
    assert [name for name, field in model.model_fields.items() if not field.description] == []


@pytest.mark.parametrize("values, message", [
    ({"generation": {"group_size": 1}}, "generation.group_size=1: a judge needs at least 2 responses per prompt"),
    ({"generation": {"temperature": 0}}, "generation.temperature=0 is greedy decoding"),
    ({"judge": {"kind": "human", "rewards": [{"function": "response_length"}]}},
     "judge.rewards is not used by the human judge"),
    ({"judge": {"kind": "human"}, "min_gap": 0.6}, r"min_gap=0.6 is above 2 / generation.group_size = 0.5"),
    ({"judge": {"rewards": [{"function": "vader_sentiment"}, {"function": "vader_sentiment", "weight": 2}]}},
     "judge.rewards: a source is listed twice"),
    ({"judge": {"rewards": []}}, "judge.rewards"),
    ({"min_gap": 0}, "min_gap"),
    ({"pairing": "best"}, "pairing"),
    ({"judge": {"human_batchsize": 4}}, "judge.human_batchsize"),  # a typo is an error
])
def test_impossible_configs_are_rejected_with_a_message(values, message):
    with pytest.raises(ValidationError, match=message):
        PreferenceDatasetConfig(**values)


def test_valid_configs_and_judge_names():
    human = PreferenceDatasetConfig(judge={"kind": "human"}, min_gap=0.5)  # G = 4: 2/G = 0.5 is the limit
    assert human.judge.name == "human"
    assert PreferenceDatasetConfig.model_validate(human.model_dump()) == human  # round trip (CLI, Prefect form)
    assert PreferenceDatasetConfig().judge.name == "vader_sentiment"
    mixed = JudgeConfig(rewards=[RewardSpec(function="vader_sentiment", weight=0.5),
                                 RewardSpec(function="response_length")])
    assert mixed.name == "0.5*vader_sentiment+1*response_length"
