"""The reward-model flow end to end: the real Prefect engine (a temporary server), a real MLflow SQLite store, real
Parquet files and checkpoints; the default MiniLM backbone, then a tiny Llama for the crash-and-resume test."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from flow_helpers import failing_call, metric_steps, mlflow_run_of, task_states

import rlhf_core.training
import tasks.reward_model
from flows.reward_model import reward_model
from rlhf_core.config import PreferenceDataConfig, RewardModelConfig, TrackingConfig
from rlhf_core.io import sha256_dir
from rlhf_core.reward_model import load_reward_model, reward_scores

pytestmark = pytest.mark.slow
STAGES = ["load-preference-dataset", "train-reward-model-epoch", "evaluate-reward-model"]
PLACES = ["hotel", "diner", "museum", "phone", "novel", "theme park"]
GOOD = ["was wonderful, I loved every minute", "is excellent and the staff were kind",
        "was a delight, highly recommended", "is superb value and great fun"]
BAD = ["was awful and dirty", "is terrible, the staff were rude", "was a boring waste of money",
       "is broken and disappointing"]


def write_graded_pairs(path: Path) -> Path:
    """24 review pairs: the chosen response is the positive one."""
    rows = [{"prompt": f"Write a one-sentence review of the {place}.", "chosen": f"The {place} {GOOD[i % 4]}.",
             "rejected": f"The {place} {BAD[(i + 1) % 4]}."} for i in range(4) for place in PLACES]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    return write_graded_pairs(tmp_path / "pairs.jsonl")


def small_config(pairs_file, optim: dict | None = None, **overrides) -> RewardModelConfig:
    """2 epochs of 8-pair steps; `optim` overrides some of its settings."""
    values = dict(optim={"epochs": 2, "batch_size": 8, **(optim or {})}, seed=0,
                  data=PreferenceDataConfig(path=str(pairs_file), eval_path=None, eval_fraction=0.25),
                  tracking=TrackingConfig(experiment="rm-e2e", registered_model="tiny-rm"))
    return RewardModelConfig(**{**values, **overrides})


def test_reward_model_flow_end_to_end(prefect_harness, rlhf_home, pairs_file, tiny_model_dir):
    state = reward_model(small_config(pairs_file, keep_checkpoints=1), return_state=True)  # default backbone: MiniLM
    final_checkpoint = state.result()
    run = mlflow_run_of(state.state_details.flow_run_id)
    client = mlflow.MlflowClient()

    # Parquet: the validated pairs (train 18, eval 6), per-epoch step metrics and eval scores; nothing half-written
    for stage, count in [("preferences", 2), ("reward-model-metrics", 2), ("reward-model-eval", 2)]:
        assert len(list((rlhf_home / "artifacts" / stage).glob("*.parquet"))) == count, stage
    assert not list(rlhf_home.rglob(".tmp-*"))
    assert [p.name for p in (rlhf_home / "checkpoints").iterdir()] == [Path(final_checkpoint).name]  # pruned

    # MLflow: params, one point per epoch, the eval Parquet, a registered version per epoch
    assert run.info.status == "FINISHED" and run.data.params["optim.lr"] == "0.0003"
    for key in ["loss/train", "loss/eval", "reward_model/train_accuracy", "reward_model/eval_accuracy",
                "reward_model/eval_margin", "reward_model/grad_norm", "time/train_s", "time/eval_s",
                "time/tracking_s"]:
        assert metric_steps(run.info.run_id, key) == [0, 1], key
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="data/epoch_001/eval.parquet")
    scores = pd.read_parquet(local)
    assert len(scores) == 6 and {"prompt", "chosen", "rejected", "chosen_rewards", "rejected_rewards"} <= set(scores)
    accuracy = client.get_metric_history(run.info.run_id, "reward_model/eval_accuracy")[-1].value
    assert accuracy == pytest.approx((scores["chosen_rewards"] > scores["rejected_rewards"]).mean())

    versions = client.search_model_versions("name = 'tiny-rm'")
    assert sorted(v.tags["iteration"] for v in versions) == ["0", "1"]
    newest = client.get_model_version_by_alias("tiny-rm", "newest")
    assert newest.tags["iteration"] == "1" and newest.tags["checkpoint_sha256"] == sha256_dir(final_checkpoint)

    # The registered model scores texts as the eval stage did: a scoring stage can use models:/tiny-rm@newest
    registered = tasks.reward_model.resolve_reward_backbone.fn("models:/tiny-rm@newest")
    assert not (Path(registered.path) / "optimizer.safetensors").exists()
    model, tokenizer = load_reward_model(Path(registered.path))
    rescored = reward_scores(model, tokenizer, scores["prompt"].tolist(), scores["chosen"].tolist(), batch_size=4,
                             max_length=256)
    torch.testing.assert_close(rescored, torch.tensor(scores["chosen_rewards"].to_numpy()), atol=1e-5, rtol=1e-5)

    # ... and it does, by alias, combined with a reward function: one GRPO iteration on the tiny policy
    from flows.grpo import grpo
    from rlhf_core.config import GRPOConfig

    policy_run = grpo(GRPOConfig.model_validate({
        "iterations": 1, "prompts_per_iteration": 2, "model": {"name_or_path": str(tiny_model_dir)},
        "generation": {"group_size": 2, "max_new_tokens": 6, "temperature": 1.0},
        "rewards": [{"model": "models:/tiny-rm@newest", "weight": 2.0}, {"function": "response_length"}],
        "tracking": {"experiment": "rm-as-reward", "registered_model": "tiny-policy-rm"}}), return_state=True)
    policy_run.result()
    scored = pd.read_parquet(mlflow.artifacts.download_artifacts(
        run_id=mlflow_run_of(policy_run.state_details.flow_run_id).info.run_id,
        artifact_path="data/iter_000/scored.parquet"))
    by_model = reward_scores(model, tokenizer, scored["prompt"].tolist(), scored["response"].tolist(), batch_size=4,
                             max_length=512).numpy()
    assert scored["reward[models:/tiny-rm@newest]"].to_numpy() == pytest.approx(by_model, abs=1e-5)
    assert scored["rewards"].to_numpy() == pytest.approx(2.0 * by_model + scored["reward[response_length]"], abs=1e-5)


def test_crash_in_epoch_1_then_rerun_resumes_and_matches_uninterrupted_run(prefect_harness, tmp_path, monkeypatch,
                                                                          pairs_file, tiny_model_dir):
    config = small_config(pairs_file, model={"name_or_path": str(tiny_model_dir)}, optim={"lr": 1e-3})
    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "uninterrupted"))
    uninterrupted = sha256_dir(reward_model(config))

    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "crashed"))
    with failing_call(rlhf_core.training, "save_trained", call=2):  # epoch 1 dies after training, before its checkpoint
        crashed = reward_model(config, return_state=True)
    assert crashed.is_failed()
    assert mlflow_run_of(crashed.state_details.flow_run_id).info.status == "FAILED"
    assert len(list((tmp_path / "crashed" / "checkpoints").iterdir())) == 1  # epoch 0's; no partial one

    resumed = reward_model(config, return_state=True)
    states = [s for s in task_states(resumed.state_details.flow_run_id) if s[0] in STAGES]
    assert states == [(stage, "Cached") for stage in STAGES] + [(stage, "Completed") for stage in STAGES[1:]]
    assert sha256_dir(resumed.result()) == uninterrupted
