"""Security defaults: loopback servers, no remote code unless asked, no unpickling, no secrets in what is logged."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import mlflow
import pytest

from flows import service
from flows.grpo import grpo
from rlhf_core.config import DPOConfig, EvaluationConfig, GRPOConfig, KTOConfig, PPOConfig, RewardModelConfig
from rlhf_core.models import load_causal_lm
from tasks.paths import use_tracking_uri

PROJECT = Path(__file__).resolve().parents[1]
SOURCES = [p for package in ("rlhf_core", "tasks", "flows", "bench") for p in (PROJECT / package).rglob("*.py")]


def test_servers_bind_to_loopback_unless_told_otherwise(monkeypatch, reliability):
    started = []
    monkeypatch.setattr(service, "up", lambda host, *args: started.append(host) or [])
    monkeypatch.setattr(service, "print", lambda *args, **kwargs: None, raising=False)
    with pytest.raises(IndexError):  # our stub returns no services; only the host it was given matters
        service.main(["up"])
    assert started == ["127.0.0.1"]
    reliability.record("security default", "`rlhf up` with no --host", "Prefect and MLflow bind to 127.0.0.1", "-")


@pytest.mark.parametrize("config", [GRPOConfig(), PPOConfig(), DPOConfig(), KTOConfig(), RewardModelConfig(),
                                    EvaluationConfig(candidate="models:/x@newest")], ids=lambda c: type(c).__name__)
def test_no_flow_runs_model_code_by_default(config):
    models = [value for value in config.model_dump().values() if isinstance(value, dict) and
              "trust_remote_code" in value] + ([config.model_dump()] if "trust_remote_code" in config.model_dump()
                                               else [])
    assert models and all(m["trust_remote_code"] is False for m in models)


def test_a_model_that_ships_code_is_refused_and_its_code_never_runs(tmp_path, tokenizer_dir, reliability):
    import shutil

    folder = tmp_path / "custom"
    shutil.copytree(tokenizer_dir, folder)
    marker = tmp_path / "code-ran"
    (folder / "config.json").write_text(json.dumps({
        "model_type": "custom-thing", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                                                   "AutoModelForCausalLM": "modeling_custom.CustomModel"}}))
    for module in ("configuration_custom", "modeling_custom"):
        (folder / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (folder / "model.safetensors").write_bytes((2).to_bytes(8, "little") + b"{}")  # a valid, empty safetensors
    with pytest.raises(Exception, match="trust_remote_code"):
        load_causal_lm(folder)
    assert not marker.exists()
    reliability.record("security default", "a model folder that ships Python code",
                       "refused unless model.trust_remote_code is set; its code never ran", "-")


def test_nothing_is_unpickled_anywhere_in_the_code(reliability):
    """Datasets, stage outputs, checkpoints and cache records are Parquet, safetensors and JSON: no pickle, no
    torch.load (which unpickles), no pickle-based serializer for Prefect results."""
    offenders = []
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                offenders += [f"{path.name}: imports {n}" for n in names if n and n.split(".")[0] in
                              ("pickle", "cloudpickle", "dill", "joblib", "shelve")]
            if isinstance(node, ast.Attribute) and node.attr == "load" and getattr(node.value, "id", "") == "torch":
                offenders.append(f"{path.name}:{node.lineno}: torch.load")
            if isinstance(node, ast.keyword) and node.arg == "result_serializer":
                if not (isinstance(node.value, ast.Constant) and node.value.value == "json"):
                    offenders.append(f"{path.name}:{node.lineno}: result_serializer other than json")
    assert offenders == []
    reliability.record("security default", "loading data, stage outputs, checkpoints and cache records",
                       "Parquet, safetensors and JSON only: nothing is unpickled (checked over the source)", "-")


SECRETS = {"HF_TOKEN": "hf_secretTOKENvalue123", "MLFLOW_TRACKING_PASSWORD": "mlflow-secret-pw-456",
           "AWS_SECRET_ACCESS_KEY": "aws-secret-key-789"}


@pytest.mark.slow
def test_secrets_in_the_environment_never_reach_params_tags_or_artifacts(prefect_harness, rlhf_home,
                                                                         tiny_model_dir, monkeypatch, reliability):
    from test_flow_grpo import tiny_config

    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    grpo(tiny_config(tiny_model_dir))
    use_tracking_uri()
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    logged = json.dumps([run.data.params, run.data.tags])
    files = [p for p in rlhf_home.rglob("*") if p.is_file() and p.suffix not in (".safetensors", ".db")]
    assert files and any("mlflow" in str(p) for p in files)
    for value in SECRETS.values():
        assert value not in logged
        for path in files:
            assert value.encode() not in path.read_bytes(), path
    reliability.record("security default", "tokens in environment variables (HF_TOKEN, MLFLOW_TRACKING_PASSWORD, "
                       "AWS_SECRET_ACCESS_KEY)", "absent from MLflow params, tags and every file the run wrote", "-")
