"""prefect.yaml deploys against a real Prefect server, and the server validates parameters with the config's
pydantic schema (the same model the CLI and MLflow use)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL

PROJECT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def prefect_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    return subprocess.run([sys.executable, "-m", "prefect", *args], cwd=PROJECT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_prefect_yaml_deploys_grpo_with_a_validated_form(prefect_harness, reliability):
    assert prefect_cli("work-pool", "create", "local-process", "--type", "process").returncode == 0
    result = prefect_cli("--no-prompt", "deploy", "--all")
    assert result.returncode == 0, result.stdout + result.stderr

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("grpo/grpo")
        schema = deployment.parameter_openapi_schema
        assert deployment.parameters["config"]["optim"]["lr"] == 2.0e-5
        assert deployment.concurrency_limit == 1 or deployment.global_concurrency_limit is not None
        definitions = schema["definitions"]
        assert definitions["OptimConfig"]["properties"]["lr"]["exclusiveMinimum"] == 0.0
        assert definitions["KLConfig"]["properties"]["estimator"]["enum"] == ["k1", "k2", "k3"]
        with pytest.raises(Exception, match="(?i)validation"):
            client.create_flow_run_from_deployment(deployment.id, parameters={"config": {"optim": {"lr": -1}}})
        reliability.record("bad input", "a config value out of range from the Prefect UI (optim.lr = -1)",
                           "refused by the server's form validation; no flow run created")
        ppo = client.read_deployment_by_name("ppo/ppo")
        assert ppo.parameter_openapi_schema["definitions"]["ValueConfig"]["properties"]["critic"]["enum"] == [
            "shared", "separate"]
        assert client.read_deployment_by_name("reward-model/reward-model").parameters["config"]["optim"]["epochs"] == 2
        human = client.read_deployment_by_name("preference-data/preference-data-human")
        assert human.parameters["config"]["judge"]["kind"] == "human"
        assert human.parameter_openapi_schema["definitions"]["JudgeConfig"]["properties"]["kind"]["enum"] == [
            "reward", "human", "pairwise"]
        kto = client.read_deployment_by_name("kto/kto")
        with pytest.raises(Exception, match="(?i)validation"):
            client.create_flow_run_from_deployment(kto.id, parameters={"config": {"desirable_weight": 0}})
        nightly = client.read_deployment_by_name("grpo/grpo-nightly")
        assert nightly.parameters["config"]["seed"] == "run-date"
        assert nightly.parameters["config"]["model"]["name_or_path"] == "models:/grpo-policy@champion"
        assert [s.active for s in nightly.schedules] == [False]  # created paused
        with pytest.raises(Exception, match="(?i)validation"):
            client.create_flow_run_from_deployment(nightly.id, parameters={"config": {"seed": "yesterday"}})
        evaluate = client.read_deployment_by_name("evaluate/evaluate")
        assert evaluate.parameters["config"]["baseline"] == "champion"
        with pytest.raises(Exception, match="(?i)validation"):
            client.create_flow_run_from_deployment(evaluate.id, parameters={"config": {"min_win_rate": 1.5}})
        with pytest.raises(Exception, match="(?i)validation"):  # a reward item with neither source: refused by
            client.create_flow_run_from_deployment(evaluate.id, parameters={"config": {  # the form, not 7 s later
                "rewards": [{"function": None, "model": None, "weight": 1.0}]}})
        deployed = {d.name for d in client.read_deployments()}
        assert deployed == {"sft", "grpo", "grpo-nightly", "evaluate", "reward-model", "ppo", "dpo",
                            "preference-data", "preference-data-human", "kto", "pipeline"}
        for listed in client.read_deployments():  # Quick run starts at once: the description says what it costs
            assert re.match(r"Takes (~[\d.]+(-[\d.]+)? min|your time)", listed.description), listed.name
