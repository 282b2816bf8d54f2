"""The user's MLFLOW_TRACKING_URI is kept for the whole process. It used to be dropped: the first
`use_tracking_uri()` marked the user's URI as one we had set ourselves, so the second call fell back to the local
SQLite file, and every run that started from a registry model logged to the worker's disk instead of the server."""

from __future__ import annotations

import mlflow
import pytest
from test_flow_reward_model import small_config, write_graded_pairs
from test_service import free_port
from test_service_failures import start_mlflow_server

from flows import service
from flows.reward_model import reward_model
from rlhf_core.config import ModelConfig
from tasks.models import RegisteredModelMissing, registered_version, resolve_start_model
from tasks.paths import tracking_uri, use_tracking_uri

pytestmark = pytest.mark.slow


def test_every_entry_point_keeps_the_users_tracking_server(prefect_harness, rlhf_home, tmp_path, tiny_model_dir,
                                                           monkeypatch, reliability):
    server_home = tmp_path / "server"  # the server's store, apart from the local fallback in RLHF_HOME
    for folder in (rlhf_home / "service", server_home / "mlflow" / "artifacts"):
        folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = start_mlflow_server(server_home, port)
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    try:
        assert use_tracking_uri() == url and use_tracking_uri() == url and tracking_uri() == url
        for _ in range(2):  # a registry lookup, twice (the nightly run's `models:/...@champion` with a fallback)
            with pytest.raises(RegisteredModelMissing, match=url):
                registered_version("models:/nothing-yet@champion")
            start = resolve_start_model(ModelConfig(name_or_path="models:/nothing-yet@champion",
                                                    fallback=str(tiny_model_dir)))
            assert start.path == str(tiny_model_dir)
        # then a whole flow, which resolves the URI again for its run and its registered versions
        pairs_file = write_graded_pairs(tmp_path / "pairs.jsonl")
        reward_model(small_config(pairs_file, model={"name_or_path": str(tiny_model_dir)}, optim={"epochs": 1},
                                  tracking={"experiment": "on-the-server", "registered_model": "server-rm"}))
        client = mlflow.MlflowClient(tracking_uri=url, registry_uri=url)
        runs = client.search_runs([client.get_experiment_by_name("on-the-server").experiment_id])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        assert [v.version for v in client.search_model_versions("name = 'server-rm'")] == ["1"]
        assert not (rlhf_home / "mlflow" / "mlflow.db").exists()  # nothing fell back to the local store
    finally:
        service.stop(server)
    reliability.record("service failure", "MLFLOW_TRACKING_URI resolved many times in one process (registry "
                       "lookups, then a flow)", "every lookup, run and model version goes to the user's server")
