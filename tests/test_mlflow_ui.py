"""What MLflow's UI shows of this project's runs: experiments tagged as model training, every registered checkpoint
listed on the run that registered it or replayed it (a real SQLite store, no Prefect), plots whose labels fit."""

from __future__ import annotations

import json

import mlflow
import pandas as pd
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from matplotlib.backends.backend_agg import FigureCanvasAgg

from flows.evaluation_report import length_histogram, reward_histogram, training_curves
from flows.tracking import Tracker, ensure_experiment
from tasks.paths import use_tracking_uri


def versions_listed_on(client: mlflow.MlflowClient, run) -> set[tuple[str, str]]:
    """What the MLflow run page lists under "Registered models": the versions whose run_id is the run, and the
    versions named by the `mlflow.modelVersions` tag of the run's logged models."""
    by_run_id = {(v.name, str(v.version)) for v in client.search_model_versions(f"run_id = '{run.info.run_id}'")}
    logged = client.search_logged_models([run.info.experiment_id], f"source_run_id = '{run.info.run_id}'")
    by_model = {(v["name"], v["version"]) for m in logged for v in json.loads(m.tags[MLFLOW_MODEL_VERSIONS])}
    return by_run_id | by_model


def test_experiments_are_model_training_ones(rlhf_home):
    use_tracking_uri()
    client = mlflow.MlflowClient()
    created = ensure_experiment("fresh")
    assert client.get_experiment(created).tags["mlflow.experimentKind"] == "custom_model_development"
    older = client.create_experiment("made-before")  # by an earlier version of this project
    assert ensure_experiment("made-before") == older
    assert client.get_experiment(older).tags["mlflow.experimentKind"] == "custom_model_development"
    client.set_experiment_tag(older, "mlflow.experimentKind", "genai_development")  # the user's choice stays
    ensure_experiment("made-before")
    assert client.get_experiment(older).tags["mlflow.experimentKind"] == "genai_development"


def test_a_checkpoint_is_listed_on_the_run_that_registered_it_and_on_a_rerun(rlhf_home, tmp_path):
    use_tracking_uri()
    client = mlflow.MlflowClient()
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    experiment = ensure_experiment("links")
    first, rerun = (client.create_run(experiment) for _ in range(2))

    version = Tracker(first.info.run_id).register_checkpoint(str(checkpoint), "a" * 64, "policy", iteration=0)
    assert versions_listed_on(client, first) == {("policy", version)}
    # The same weights from a rerun (cache hits): no second version, but the rerun's page lists it too
    assert Tracker(rerun.info.run_id).register_checkpoint(str(checkpoint), "a" * 64, "policy", 0) == version
    assert len(client.search_model_versions("name = 'policy'")) == 1
    assert versions_listed_on(client, rerun) == {("policy", version)}
    (output,) = client.get_run(rerun.info.run_id).outputs.model_outputs
    assert output.step == 0
    # Resumed, the rerun registers it again: still one logged model per (run, version)
    Tracker(rerun.info.run_id).register_checkpoint(str(checkpoint), "a" * 64, "policy", 0)
    assert len(client.search_logged_models([experiment], f"source_run_id = '{rerun.info.run_id}'")) == 1


def test_every_plot_keeps_its_labels_inside_the_image():
    comparison = pd.DataFrame({"candidate_length": [3, 9], "baseline_length": [4, 5],
                               "candidate_reward": [0.5, 1.0], "baseline_reward": [0.0, 0.25]})
    dpo = {"eval/rewards/margins": [(0, 0.1), (1, 0.13)]}  # one panel: its label was cut at the left edge
    grpo = {"reward/mean": [(i, 0.3 + 0.03 * i) for i in range(12)], "kl/mean": [(i, 0.0123 * i) for i in range(12)]}
    for figure in (length_histogram(comparison), reward_histogram(comparison), training_curves(dpo),
                   training_curves(grpo)):
        renderer = FigureCanvasAgg(figure).get_renderer()
        figure.draw(renderer)  # what MLflow's log_figure saves (savefig, no bbox_inches)
        width, height = figure.bbox.width, figure.bbox.height
        drawn = figure.get_tightbbox(renderer)  # everything drawn, tick labels included (inches)
        assert drawn.x0 >= 0 and drawn.y0 >= 0 and drawn.x1 <= figure.get_figwidth()
        assert drawn.y1 <= figure.get_figheight()
        for axes in figure.axes:
            for label in (axes.xaxis.label, axes.yaxis.label, axes.title):
                box = label.get_window_extent(renderer)
                assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height, label.get_text()
