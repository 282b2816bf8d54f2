"""The PPO flow end to end on tiny models (policy, and a reward model of the policy's own architecture) through
the real Prefect engine and a real MLflow SQLite store; then crash in a late stage, rerun, resume."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import pytest
from flow_helpers import failing_call, metric_steps, mlflow_run_of, task_states
from transformers import AutoModelForSequenceClassification

import rlhf_core.ppo
from flows.ppo import ppo
from rlhf_core.config import PPOConfig
from rlhf_core.io import sha256_dir
from rlhf_core.models import load_tokenizer
from tiny_models import tiny_llama_config
from rlhf_core.value_head import VALUE_HEAD_FILE

pytestmark = pytest.mark.slow
STAGES = ["sample-prompts", "generate-rollouts", "compute-values", "score-rollouts", "compute-gae",
          "update-actor-critic"]


@pytest.fixture(scope="module")
def tiny_reward_model_dir(tokenizer_dir, tmp_path_factory) -> Path:
    tokenizer, _ = load_tokenizer(tokenizer_dir)
    config = tiny_llama_config(len(tokenizer), pad_token_id=tokenizer.pad_token_id, num_labels=1)
    folder = tmp_path_factory.mktemp("reward-model")
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_ppo_config(policy_dir, reward_model_dir, **overrides) -> PPOConfig:
    values = {
        "iterations": 2, "prompts_per_iteration": 2, "keep_checkpoints": 1,
        "model": {"name_or_path": str(policy_dir)},
        "data": {"path": "data/arithmetic_train.jsonl", "extra_columns": ["answer"]},
        "generation": {"group_size": 2, "max_new_tokens": 8, "temperature": 1.0},
        "rewards": [{"function": "arithmetic_answer"}, {"model": str(reward_model_dir), "weight": 0.5}],
        "kl": {"coef": 0.05, "target": 1.0, "horizon": 100},
        "scores": {"missing_eos_penalty": 1.0},
        "optim": {"lr": 1e-3, "micro_batch_size": 3, "epochs": 2, "mini_batches": 2},
        "tracking": {"experiment": "e2e-ppo", "registered_model": "tiny-ppo"},
    }
    return PPOConfig.model_validate({**values, **overrides})


def test_ppo_flow_end_to_end(prefect_harness, rlhf_home, tiny_model_dir, tiny_reward_model_dir):
    state = ppo(tiny_ppo_config(tiny_model_dir, tiny_reward_model_dir), return_state=True)
    final_checkpoint = Path(state.result())
    assert (final_checkpoint / VALUE_HEAD_FILE).is_file()

    assert len(list((rlhf_home / "artifacts" / "gae").glob("*.parquet"))) == 2
    run = mlflow_run_of(state.state_details.flow_run_id)
    batch = pd.read_parquet(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="data/iter_000/advantages.parquet"))
    assert {"old_logprobs", "old_values", "ref_logprobs", "advantages", "returns", "score", "kl_sum",
            f"reward[{tiny_reward_model_dir}]", "reward[arithmetic_answer]"} <= set(batch.columns)
    assert all(len(a) == n for a, n in zip(batch["advantages"], batch["response_length"]))
    assert float(batch["kl_sum"].abs().max()) < 1e-5  # iteration 0: the policy is the reference

    assert run.info.status == "FINISHED" and run.data.params["value.vf_coef"] == "0.1"
    for key in ["ppo/score_mean", "ppo/non_score_reward", "kl/mean", "kl/coef", "policy/approx_kl",
                "policy/clip_frac_low", "policy/clip_frac_high", "loss/policy", "loss/value", "value/clip_frac",
                "value/explained_variance", "policy/entropy", "ppo/advantages_mean", "ppo/advantages_std",
                "ppo/returns_mean", "ppo/returns_std", "response/length_mean", "time/values_s"]:
        assert metric_steps(run.info.run_id, key) == [0, 1], key
    coefs = [m.value for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "kl/coef")]
    assert coefs[1] < coefs[0] == 0.05  # KL 0 < target: the adaptive controller lowers beta
    versions = mlflow.MlflowClient().search_model_versions("name = 'tiny-ppo'")
    assert sorted(v.tags["iteration"] for v in versions) == ["0", "1"]


def test_ppo_crash_in_update_then_rerun_resumes_and_matches(prefect_harness, tmp_path, monkeypatch, tiny_model_dir,
                                                           tiny_reward_model_dir):
    config = tiny_ppo_config(tiny_model_dir, tiny_reward_model_dir, value={"critic": "separate"})
    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "uninterrupted"))
    uninterrupted = sha256_dir(ppo(config))

    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "crashed"))
    with failing_call(rlhf_core.ppo, "update_from_rollouts", call=2):
        assert ppo(config, return_state=True).is_failed()

    resumed = ppo(config, return_state=True)
    states = [s for s in task_states(resumed.state_details.flow_run_id) if s[0] in STAGES]
    assert states == [(stage, "Cached") for stage in STAGES] + [(stage, "Cached") for stage in STAGES[:-1]] + [
        ("update-actor-critic", "Completed")]
    assert sha256_dir(resumed.result()) == uninterrupted
    assert (Path(resumed.result()) / "critic" / "model.safetensors").is_file()  # the separate critic was saved
