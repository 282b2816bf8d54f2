"""Preference-data task bodies through `.fn()` (no engine) with real Parquet in a fresh data folder; the human
judge with `pause_flow_run` replaced by a scripted answer (the real pause is tested in test_flow_preference_data)."""

from __future__ import annotations

import pandas as pd
import pytest

import tasks.preference_data
from rlhf_core.config import RewardSpec, RuntimeConfig
from tasks.preference_data import (build_preference_data, export_preference_data, judge_by_human, judge_with_rewards,
                                   review_form)
from tasks.refs import publish
from tasks.scoring import RewardSources


@pytest.fixture
def rollouts(rlhf_home):
    """4 prompts x 3 responses; prompt 2 has a single non-empty response."""
    responses = [["one two three", "one", "one two"], ["a b", "a b c d", "a"], ["", "only this", "  "],
                 ["x", "y", "z"]]
    rows = [{"group_id": p, "sample_index": k, "prompt_id": p, "prompt": f"Review thing {p}.", "response": r}
            for p, texts in enumerate(responses) for k, r in enumerate(texts)]
    return publish(pd.DataFrame(rows), "rollouts")


def test_judge_with_rewards_adds_the_weighted_score_and_each_source(rollouts):
    rewards = [RewardSpec(function="response_length", weight=2.0), RewardSpec(function="answer_format")]
    sources = RewardSources(specs=rewards, fingerprints=["x", "y"], models=[None, None])
    judged = judge_with_rewards.fn(rollouts, sources, RuntimeConfig(), 8).read()
    assert judged["reward[response_length]"].tolist()[:3] == [-0.03, -0.01, -0.02]  # -words / 100
    assert judged["score"].tolist() == pytest.approx(2 * judged["reward[response_length]"]
                                                     + judged["reward[answer_format]"])


def test_build_and_export(rollouts, tmp_path, monkeypatch):
    sources = RewardSources(specs=[RewardSpec(function="response_length")], fingerprints=["x"], models=[None])
    judged = judge_with_rewards.fn(rollouts, sources, RuntimeConfig(), 8)
    data = build_preference_data.fn(judged, "best_worst", 0.015, "response_length")
    pairs = data.pairs.read()
    assert pairs[["chosen", "rejected"]].values.tolist() == [["one", "one two three"], ["a", "a b c d"]]
    assert data.unpaired.read()["label"].tolist() == [False, True, False, True]  # longest, shortest per prompt

    monkeypatch.chdir(tmp_path)
    folder = export_preference_data.fn(data, "exported/prefs")  # relative: to the current directory
    assert folder == str(tmp_path / "exported" / "prefs")
    assert pd.read_parquet(tmp_path / "exported" / "prefs" / "pairs.parquet").equals(pairs)
    default = export_preference_data.fn(data, None)
    assert sorted(p.name for p in (tasks.preference_data.rlhf_home() / "preference-data").iterdir()) == [
        default.rsplit("/", 1)[-1]]
    assert not list(tmp_path.rglob(".tmp-*"))


def test_review_form_shows_every_prompt_and_offers_only_nonempty_responses(rollouts):
    batch = rollouts.read().query("prompt_id == 2 or prompt_id == 0")
    form = review_form(batch.assign(response=batch["response"].replace("only this", "yes *this*")))
    schema = form.model_json_schema()
    assert schema["properties"]["prompt_1"]["enum"] == ["1", "2", "3", "skip"]
    assert schema["properties"]["prompt_2"]["enum"] == ["2", "skip"]  # 1 and 3 are empty
    assert "**Prompt 2.** Review thing 2." in form._description and "- **2** yes \\*this\\*" in form._description
    with pytest.raises(ValueError):
        form(prompt_1="2", prompt_2="1")


def test_human_answers_become_scores_and_are_never_asked_twice(rollouts, rlhf_home, monkeypatch):
    asked = []

    def answer(wait_for_input, timeout, poll_interval, key):  # stands in for the person in the UI
        asked.append((key, timeout, poll_interval, list(wait_for_input.model_fields)))
        return wait_for_input(prompt_1="2", prompt_2="skip") if len(asked) == 1 else wait_for_input(prompt_1="3")

    monkeypatch.setattr(tasks.preference_data, "pause_flow_run", answer)
    judged = judge_by_human(rollouts, batch_size=2, timeout_s=60, poll_interval_s=0.5).read()
    # batches: prompts (0, 1), then (3); prompt 2 is never shown (a single non-empty response)
    assert [(t, p, fields) for _, t, p, fields in asked] == [(60, 0.5, ["prompt_1", "prompt_2"]),
                                                             (60, 0.5, ["prompt_1"])]
    assert asked[0][0].startswith("judge-") and asked[0][0] != asked[1][0]
    scores = judged.set_index(["prompt_id", "sample_index"])["score"]
    assert scores[0].tolist() == [0.0, 1.0, 0.0] and scores[3].tolist() == [0.0, 0.0, 1.0]
    assert scores[[1, 2]].isna().all()  # skipped, not shown
    assert len(list((rlhf_home / "judgments").glob("*.parquet"))) == 2

    again = judge_by_human(rollouts, batch_size=2, timeout_s=60, poll_interval_s=0.5)
    assert len(asked) == 2  # every batch was answered before
    assert again.read().equals(judged)
