"""The data folder: defaults, a fresh machine, and dataset path lookup."""

import os
import subprocess
import sys

from tasks.paths import PROJECT_ROOT, resolve_data_path


def test_importing_tasks_prepares_a_fresh_data_folder(tmp_path):
    """On a fresh machine neither the data folder nor Prefect's home exists; Prefect cannot create a nested
    home by itself, so importing the tasks package must."""
    home = tmp_path / "a" / "b" / "rlhf"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["RLHF_HOME"] = str(home)
    code = "import os, tasks; print(os.environ['PREFECT_HOME'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(home / "prefect")
    assert (home / "prefect").is_dir()


def test_relative_dataset_paths_fall_back_to_the_project_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_data_path("data/arithmetic_train.jsonl") == PROJECT_ROOT / "data" / "arithmetic_train.jsonl"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "arithmetic_train.jsonl").write_text("{}\n")
    assert resolve_data_path("data/arithmetic_train.jsonl") == tmp_path / "data" / "arithmetic_train.jsonl"
    assert resolve_data_path("missing.jsonl") == (tmp_path / "missing.jsonl")


def test_registry_lookups_never_create_mlflow_db_in_the_working_directory(rlhf_home, tmp_path, monkeypatch):
    import pytest

    from rlhf_core.models import ModelLoadError
    from tasks.models import download_registered_model

    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    with pytest.raises(ModelLoadError, match="models:/nope@newest"):
        download_registered_model("models:/nope@newest")
    assert list(workdir.iterdir()) == []
    assert (rlhf_home / "mlflow" / "mlflow.db").is_file()


def test_fallback_applies_only_when_the_registry_has_no_such_model(rlhf_home, tiny_model_dir, monkeypatch):
    import mlflow
    import pytest

    from rlhf_core.config import ModelConfig
    from rlhf_core.models import ModelLoadError
    from tasks.models import RegisteredModelMissing, registered_version, resolve_start_model
    from tasks.paths import use_tracking_uri

    use_tracking_uri()
    mlflow.MlflowClient().create_registered_model("no-champion-yet")
    for uri in ("models:/no-champion-yet@champion", "models:/no-champion-yet/3", "models:/nope@champion"):
        with pytest.raises(RegisteredModelMissing, match=uri):
            registered_version(uri)
    ref = resolve_start_model(ModelConfig(name_or_path="models:/no-champion-yet@champion",
                                          fallback=str(tiny_model_dir)))
    assert ref.path == str(tiny_model_dir)
    with pytest.raises(RegisteredModelMissing):
        resolve_start_model(ModelConfig(name_or_path="models:/no-champion-yet@champion"))

    # A registry that does not answer is not "no champion yet": no silent fall back to the base model
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with pytest.raises(ModelLoadError) as error:
        resolve_start_model(ModelConfig(name_or_path="models:/no-champion-yet@champion", fallback=str(tiny_model_dir)))
    assert not isinstance(error.value, RegisteredModelMissing) and "127.0.0.1:9" in str(error.value)
