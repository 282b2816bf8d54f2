"""MLflow glue: one MLflow run per Prefect flow run, metrics batched per iteration, checkpoints registered.

Each logging call to a SQLite store is one fsync'd transaction (~20 ms), so metrics go out as one `log_batch`
per iteration. Model versions are keyed by the checkpoint's content hash: a run resumed after a crash replays
its cached iterations without registering the same weights twice.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import urllib.parse
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Iterator

import mlflow
import pandas as pd
from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric, Param
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from pydantic import BaseModel

from flows.metrics_catalog import unknown_metrics
from rlhf_core.checkpoint import OPTIMIZER_FILE
from rlhf_core.faults import kill_point
from rlhf_core.io import copy_file, sha256_dir
from rlhf_core.metrics import rollout_metrics
from tasks.paths import rlhf_home, tracking_uri, use_tracking_uri


class StageClock(dict):
    """Wall seconds per stage of one iteration: `with clock("generation"): ...`."""

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        yield
        self[stage] = self.get(stage, 0.0) + time.perf_counter() - start


MAX_PARAMS_PER_CALL = 100  # MLflow's limit per log_batch
MAX_PARAM_LENGTH = 6000


def flatten(values: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> dotted keys: {"optim": {"lr": 1e-5}} -> {"optim.lr": "1e-05"}."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, type(None))) else str(value)
    return flat


# MLflow 3's UI reads this experiment tag to tell model training ("custom_model_development": Runs, Models) from
# GenAI work ("genai_development": Traces, Evaluations). MLflow 3.17's own UI lets its per-browser "GenAI | Model
# training" switch (or `?workflowType=machine_learning` in the URL) decide instead (docs/operations.md).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def ensure_experiment(name: str) -> str:
    """The experiment's id, created (or, made before, tagged) as a model-training experiment."""
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        for key, value in EXPERIMENT_KIND.items():
            if experiment.tags.get(key) is None:  # one the user tagged otherwise is left alone
                mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:"):  # keep artifacts beside the database, not in ./mlruns
        location = (rlhf_home() / "mlflow" / "artifacts" / name).as_uri()
    return mlflow.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)


# The MLflow run of the flow that calls this one as a subflow (`rlhf pipeline`): a run created while it is set is
# nested under it (MLflow's mlflow.parentRunId tag), so the chain's stages show as one tree.
PARENT_RUN: ContextVar[str | None] = ContextVar("PARENT_RUN", default=None)


class Tracker:
    def __init__(self, run_id: str, lineage: dict[str, str] | None = None):
        self.run_id = run_id
        self.client = mlflow.MlflowClient()
        self.lineage = lineage or {}  # tags of every model version this run registers: what it started from

    def log_params(self, config: BaseModel) -> None:
        params = [Param(k, v[:MAX_PARAM_LENGTH]) for k, v in flatten(config.model_dump(mode="json")).items()]
        for start in range(0, len(params), MAX_PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=params[start:start + MAX_PARAMS_PER_CALL])
        self.log_json(config.model_dump(mode="json"), "config.json")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """The one place metrics are logged. With RLHF_CHECK_METRIC_NAMES=1 (every test run), a key that
        flows/metrics_catalog.py does not document is an error instead of a silently undocumented metric."""
        if os.environ.get("RLHF_CHECK_METRIC_NAMES") == "1" and (unknown := unknown_metrics(metrics)):
            raise ValueError(f"metric keys {unknown} are not in flows/metrics_catalog.py: add each with a "
                             "description (then run `python scripts/docs_reference.py`)")
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_json(self, value, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, value, artifact_file)

    def log_files(self, paths: dict[str, str], artifact_path: str) -> None:
        """Log small files under readable names: {name in MLflow: local path or fsspec URI}."""
        with tempfile.TemporaryDirectory() as tmp:
            for name, path in paths.items():
                copy_file(path, Path(tmp) / name)  # a local file or an fsspec URI
            self.client.log_artifacts(self.run_id, tmp, artifact_path)

    def log_table(self, df: pd.DataFrame, artifact_file: str) -> None:
        self.client.log_table(self.run_id, data=df, artifact_file=artifact_file)

    def register_checkpoint(self, checkpoint_dir: str, checkpoint_sha256: str, model_name: str, iteration: int,
                            alias: str = "newest") -> str:
        """Log the checkpoint's model files (not the optimizer state) and register them; returns the version."""
        version = self._version_with_hash(model_name, checkpoint_sha256)
        if version is None and not Path(checkpoint_dir).is_dir():
            # Pruned after it was registered in another store; the registry that has it is the record.
            print(f"checkpoint {checkpoint_dir} was pruned locally and is not in this registry: not registered")
            return ""
        if version is None:
            artifact_path = f"checkpoints/iter_{iteration:03d}"
            # training state (optimizer, a separate critic) stays local; the registry holds the policy
            files = [f for f in sorted(Path(checkpoint_dir).iterdir()) if f.is_file() and f.name != OPTIMIZER_FILE]
            self.store_files(files, artifact_path)
            run = self.client.get_run(self.run_id)
            self._ensure_registered_model(model_name)
            version = self.client.create_model_version(
                model_name, source=f"{run.info.artifact_uri}/{artifact_path}", run_id=self.run_id,
                tags={"iteration": str(iteration), "checkpoint_sha256": checkpoint_sha256, **self.lineage}).version
        self.client.set_registered_model_alias(model_name, alias, version)
        self._link_version(model_name, str(version), iteration, checkpoint_sha256)
        return str(version)

    def _link_version(self, name: str, version: str, iteration: int, checkpoint_sha256: str) -> None:
        """What MLflow records when it registers a model logged in a run, less the model's files: a logged model
        of this run (an output at step `iteration`) whose `mlflow.modelVersions` tag names the version. The run
        page lists the versions whose run_id is the run and those its logged models name, so a version an earlier
        run registered (the same checkpoint, replayed from the cache) is listed on this run too. Once per run."""
        experiment_id, label = self.client.get_run(self.run_id).info.experiment_id, f"{name}-v{version}"
        if self.client.search_logged_models([experiment_id], f"source_run_id = '{self.run_id}' AND name = '{label}'"):
            return  # a resumed run registering its checkpoint again
        model = self.client.create_logged_model(experiment_id, name=label, source_run_id=self.run_id,
                                                tags={"iteration": str(iteration),
                                                      "checkpoint_sha256": checkpoint_sha256},
                                                model_type="checkpoint")
        self.client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, step=iteration)])
        self.client.set_logged_model_tags(model.model_id, {
            MLFLOW_MODEL_VERSIONS: json.dumps([{"name": name, "version": version}])})
        self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)

    def store_files(self, files: list[Path], artifact_path: str) -> None:
        """Files into the run's artifacts. In a local artifact store they are hard-linked when the filesystem
        allows: checkpoint files are written once and never modified (atomic rename), so the link is as safe as
        a copy, survives the checkpoint's pruning, and costs nothing where a copy of the weights took ~1 s per
        iteration. A tracking server gets them uploaded."""
        root = self.client.get_run(self.run_id).info.artifact_uri
        if not root.startswith("file:"):
            for file in files:
                self.client.log_artifact(self.run_id, str(file), artifact_path)
            return
        dest = Path(urllib.parse.unquote(urllib.parse.urlparse(root).path)) / artifact_path  # file:///a%20b -> /a b
        dest.mkdir(parents=True, exist_ok=True)
        for file in files:
            target = dest / file.name
            target.unlink(missing_ok=True)  # a resumed run registers the same checkpoint again
            try:
                os.link(file, target)
            except OSError:  # another filesystem, or links not allowed
                shutil.copyfile(file, target)

    def _ensure_registered_model(self, name: str) -> None:
        try:
            self.client.get_registered_model(name)
        except mlflow.exceptions.MlflowException:
            self.client.create_registered_model(name)

    def _version_with_hash(self, name: str, sha256: str) -> str | None:
        found = self.client.search_model_versions(f"name = '{name}' and tags.checkpoint_sha256 = '{sha256}'")
        return str(found[0].version) if found else None


@contextmanager
def mlflow_run(experiment: str, config: BaseModel, flow_run_id: str | None, run_name: str | None,
               tags: dict[str, str] | None = None, lineage: dict[str, str] | None = None) -> Iterator[Tracker]:
    """The MLflow run of this Prefect flow run: created on the first attempt (with `tags`, the lineage and, inside
    a pipeline, its parent run), resumed on a Prefect retry. Every model version it registers carries `lineage`.
    An exception inside marks the run FAILED."""
    use_tracking_uri()
    experiment_id = ensure_experiment(experiment)
    flow_run_id = flow_run_id or "local"
    existing = mlflow.search_runs([experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'",
                                  max_results=1, output_format="list") if flow_run_id != "local" else []
    client = mlflow.MlflowClient()
    if existing:
        run_id = existing[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        parent = {"mlflow.parentRunId": PARENT_RUN.get()} if PARENT_RUN.get() else {}
        run = client.create_run(experiment_id, run_name=run_name,
                                tags={"prefect.flow_run_id": flow_run_id, **parent, **(tags or {}), **(lineage or {})})
        run_id = run.info.run_id
    tracker = Tracker(run_id, lineage)
    if not existing:
        tracker.log_params(config)
    if flow_run_id != "local":
        create_link_artifact(key="mlflow-run", link=mlflow_run_url(experiment_id, run_id),
                             link_text=f"MLflow run {run_id}", description="this flow run's MLflow run")
    try:
        yield tracker
    except BaseException as error:
        try:
            client.set_terminated(run_id, status="FAILED")
        except Exception as unreachable:  # the failure may be the tracking server itself: keep the first error
            print(f"could not mark MLflow run {run_id} FAILED ({unreachable}); the run failed with: {error!r}")
        raise
    client.set_terminated(run_id, status="FINISHED")
    if flow_run_id != "local":
        create_markdown_artifact(key="run-summary", markdown=run_summary(client.get_run(run_id)),
                                 description="final metrics and registered checkpoints")


def mlflow_run_url(experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI for a tracking server; for a local SQLite store, its `file://` artifact
    folder (open the UI with `mlflow ui --backend-store-uri <the store>`)."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        # the query sits inside the hash route, where MLflow's router reads it: the run opens in "Model training"
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    return mlflow.MlflowClient().get_run(run_id).info.artifact_uri


def run_summary(run) -> str:
    """A markdown summary of a finished MLflow run: status, its last value of every metric, its model versions."""
    metrics = "\n".join(f"| `{key}` | {value:.4g} |" for key, value in sorted(run.data.metrics.items())
                        if not key.startswith("time/"))
    versions = mlflow.MlflowClient().search_model_versions(f"run_id = '{run.info.run_id}'")
    registered = "\n".join(f"- `models:/{v.name}/{v.version}` (iteration {v.tags.get('iteration', '?')})"
                            for v in sorted(versions, key=lambda v: int(v.version))) or "- none"
    return (f"## MLflow run `{run.info.run_id}`: {run.info.status}\n\n| metric (last value) | |\n|---|---|\n"
            f"{metrics}\n\n**Registered checkpoints**\n{registered}\n")


def registers(step: int, steps: int, every: int) -> bool:
    """Whether step (0-based) of `steps` registers its checkpoint: every `every`-th (1: all), and always the last;
    every = 0: the last only."""
    return step == steps - 1 or (every > 0 and (step + 1) % every == 0)


def log_epoch_outputs(tracker: Tracker, epoch: int, epochs: int, update, scores, tracking) -> None:
    """What an offline flow's epoch leaves in MLflow besides metrics: its held-out scores and per-step training
    metrics as Parquet (when tracking.log_rollouts) and its checkpoint as a registered model version (when
    tracking.register_every says so)."""
    if tracking.log_rollouts:
        tracker.log_files({"eval.parquet": scores.path, "train_metrics.parquet": update.metrics.path},
                          f"data/epoch_{epoch:03d}")
    if registers(epoch, epochs, tracking.register_every):
        tracker.register_checkpoint(update.checkpoint.path, update.checkpoint.sha256, tracking.registered_model,
                                    epoch)


def log_offline_epoch(tracker: Tracker, epoch: int, epochs: int, update, scores, stage_seconds: dict[str, float],
                      tracking, eval_metrics: dict[str, float]) -> dict[str, float]:
    """Everything an offline flow's epoch leaves in MLflow: `log_epoch_outputs`, then one batch of metrics
    (returned): the mean of each training metric over the epoch's steps (NaN steps skipped), `eval_metrics` under
    `eval/`, the stage times and the time this logging took."""
    start = time.perf_counter()
    log_epoch_outputs(tracker, epoch, epochs, update, scores, tracking)
    metrics = {
        **update.metrics.read().mean().to_dict(),
        **{f"eval/{key}": value for key, value in eval_metrics.items()},
        **{f"time/{stage}_s": seconds for stage, seconds in stage_seconds.items()},
        "time/tracking_s": time.perf_counter() - start,
    }
    tracker.log_metrics(metrics, step=epoch)
    return metrics


def log_online_iteration(tracker: Tracker, iteration: int, iterations: int, stage_refs: dict, update,
                         stage_seconds: dict[str, float], tracking, extra_metrics: dict | None = None) -> None:
    """Everything one online iteration leaves in MLflow: Parquet files, samples, the checkpoint (when
    tracking.register_every says so), then one batch of metrics that includes the time this logging took."""
    start = time.perf_counter()
    batch = stage_refs["advantages"].read()
    folder = f"iter_{iteration:03d}"
    if tracking.log_rollouts:
        tracker.log_files({f"{stage}.parquet": table.path for stage, table in stage_refs.items()}
                          | {"update_metrics.parquet": update.metrics.path}, f"data/{folder}")
    sample_columns = ["group_id", "prompt", "response", "rewards", "advantages"]
    tracker.log_table(batch[sample_columns].head(16), f"samples/{folder}.json")
    if registers(iteration, iterations, tracking.register_every):
        tracker.register_checkpoint(update.checkpoint.path, update.checkpoint.sha256, tracking.registered_model,
                                    iteration)
    kill_point("mlflow-log")
    stage_seconds = {**stage_seconds, "tracking": time.perf_counter() - start}
    metrics = {
        **rollout_metrics(batch["rewards"].to_numpy(), batch["group_id"].to_numpy(),
                          batch["response_length"].to_numpy(), batch["finished"].to_numpy()),
        **update.metrics.read().mean().to_dict(),
        "perf/generated_tokens_per_s": float(batch["response_length"].sum()) / max(stage_seconds["generation"], 1e-9),
        **{f"time/{stage}_s": seconds for stage, seconds in stage_seconds.items()},
        **(extra_metrics or {}),
    }
    tracker.log_metrics(metrics, step=iteration)


def registered_uri(model_name: str, checkpoint: str) -> str:
    """`models:/<name>/<version>` of the version registered for the checkpoint folder (found by its content
    hash): how a chain of flows hands a model to the next stage, so each version's lineage names the exact
    version it started from."""
    use_tracking_uri()
    sha256 = sha256_dir(checkpoint)
    found = mlflow.MlflowClient().search_model_versions(f"name = '{model_name}' and tags.checkpoint_sha256 = "
                                                        f"'{sha256}'")
    if not found:
        raise LookupError(f"no version of {model_name!r} holds the checkpoint {checkpoint} (sha256 {sha256[:16]})")
    return f"models:/{model_name}/{found[0].version}"
