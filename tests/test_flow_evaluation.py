"""The registry lifecycle end to end on tiny models: a scheduled-style GRPO run from `@champion` (falling back to
the base model while there is none), evaluation against the champion, promotion only on a win, and the next
run continuing from the champion. Real Prefect engine, real MLflow store, real Parquet files."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from flow_helpers import mlflow_run_of
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from flows.evaluation import evaluate
from flows.grpo import grpo
from rlhf_core.config import (DataConfig, EvaluationConfig, GenerationConfig, GRPOConfig, ModelConfig, OptimConfig,
                              TrackingConfig)
from rlhf_core.io import sha256_dir
from tasks.models import resolve_model

pytestmark = pytest.mark.slow
NAME = "tiny-eval"


def nightly_grpo(base_model: str, seed: int) -> GRPOConfig:
    """What the nightly deployment runs, shrunk: continue from the champion. (The deployment's `seed: run-date`
    is replaced by fixed seeds here so that the outcome does not depend on the day; test_evaluation.py covers it.)"""
    return GRPOConfig(iterations=1, prompts_per_iteration=2, seed=seed,
                      model=ModelConfig(name_or_path=f"models:/{NAME}@champion", fallback=base_model),
                      generation=GenerationConfig(group_size=4, max_new_tokens=6, temperature=1.0),
                      rewards=[{"function": "response_length"}],  # varies per response: a real gradient
                      data=DataConfig(path="data/arithmetic_train.jsonl", extra_columns=[]),
                      kl={"coef": 0.05}, optim=OptimConfig(lr=1e-3, micro_batch_size=4),
                      tracking=TrackingConfig(experiment="nightly", registered_model=NAME))


def evaluation(base_model: str, **overrides) -> EvaluationConfig:
    return EvaluationConfig(**{
        "candidate": f"models:/{NAME}@newest", "reference": base_model, "num_prompts": 3,
        "data": DataConfig(path="data/arithmetic_eval.jsonl", extra_columns=[]),
        "rewards": [{"function": "response_length"}],
        "generation": GenerationConfig(group_size=2, max_new_tokens=6, temperature=1.0), **overrides})


def artifacts_of(flow_run_id) -> dict[str, object]:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in found if a.key}


def test_champion_lifecycle(prefect_harness, rlhf_home, tiny_model_dir, caplog):
    base = str(tiny_model_dir)

    # 1. No champion yet: the nightly run starts from the fallback
    first = grpo(nightly_grpo(base, seed=0), return_state=True)
    mlflow_run_of(first.state_details.flow_run_id)  # also points MLflow at this test's store
    assert f"models:/{NAME}@champion is not in the registry yet" in caplog.text
    client = mlflow.MlflowClient()
    v1 = client.get_model_version_by_alias(NAME, "newest")

    # 2. Evaluated against the reference (no champion) and, with any win rate above 0 accepted, promoted
    state = evaluate(evaluation(base, min_win_rate=0.0), return_state=True)
    result = state.result()
    assert result["baseline"] == base and result["promoted"] is True
    assert client.get_model_version_by_alias(NAME, "champion").version == v1.version
    eval_run = mlflow_run_of(state.state_details.flow_run_id)
    assert eval_run.data.metrics["promoted"] == 1.0 and eval_run.data.metrics["pairs"] == 6.0
    for key in ("win_rate", "candidate/reward_mean", "baseline/reward_mean", "candidate/kl_mean",
                "candidate/length_mean", "baseline/length_mean"):
        assert key in eval_run.data.metrics, key
    assert eval_run.data.metrics["baseline/kl_mean"] == pytest.approx(0.0, abs=1e-4)  # baseline is the reference
    assert eval_run.data.tags["decision"].startswith(f"promoted {NAME} v{v1.version}")
    logged = {a.path for a in client.list_artifacts(eval_run.info.run_id, "plots")}
    assert logged == {"plots/length_histogram.png", "plots/reward_histogram.png", "plots/training_curves.png"}
    png = mlflow.artifacts.download_artifacts(run_id=eval_run.info.run_id, artifact_path="plots/training_curves.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    table = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=eval_run.info.run_id,
                                                                artifact_path="summary.json")).read_text())
    assert [row[0] for row in table["data"]] == ["candidate", "baseline"]
    assert client.get_model_version(NAME, v1.version).tags["promoted_by_run"] == eval_run.info.run_id
    artifacts = artifacts_of(state.state_details.flow_run_id)
    assert {"mlflow-run", "run-summary", "evaluation"} <= set(artifacts)
    assert "promoted" in artifacts["evaluation"].data

    # 3. The same candidate again: it is the champion now, the comparison is with itself, nothing moves
    again = evaluate(evaluation(base, min_win_rate=0.0))
    assert again["baseline"] == f"models:/{NAME}@champion" and again["promoted"] is False
    assert "same weights" in again["decision"] and again["win_rate"] == 0.5

    # 4. The next night continues from the champion
    caplog.clear()
    second = grpo(nightly_grpo(base, seed=1), return_state=True)
    assert "not in the registry yet" not in caplog.text  # it found the champion
    v2 = client.get_model_version_by_alias(NAME, "newest")
    assert v2.version != v1.version
    champion_weights = sha256_dir(resolve_model.fn(f"models:/{NAME}/{v1.version}").path)
    second_run = mlflow_run_of(second.state_details.flow_run_id)
    assert second_run.data.params["model.name_or_path"] == f"models:/{NAME}@champion"
    assert champion_weights != sha256_dir(base)

    # 5. A candidate that does not clear the bar leaves the champion where it is
    kept = evaluate(evaluation(base, min_win_rate=0.99))
    assert kept["promoted"] is False and kept["decision"].startswith("not promoted: win rate")
    assert client.get_model_version_by_alias(NAME, "champion").version == v1.version

    # 6. One that does replaces it, and the old champion stays reachable
    promoted = evaluate(evaluation(base, min_win_rate=0.0, max_kl=1e6))
    assert promoted["promoted"] is True
    assert client.get_model_version_by_alias(NAME, "champion").version == v2.version
    assert client.get_model_version_by_alias(NAME, "previous-champion").version == v1.version
