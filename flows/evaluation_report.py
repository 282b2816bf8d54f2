"""What an evaluation leaves behind: metrics, a table, PNG plots and the sample pairs in MLflow, a markdown
artifact in Prefect, and, for a winning candidate, the champion alias in the registry."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # no pyplot: no GUI backend, safe in worker processes

# Every figure uses matplotlib's constrained layout: MLflow saves it as drawn, and a long y label ("reward/mean")
# was cut at the left edge of training_curves.png without it.

from flows.tracking import Tracker

# The first of these the candidate's training run logged is plotted (online flows, then the offline ones).
REWARD_CURVES = ["reward/mean", "ppo/score_mean", "eval/rewards/margins"]  # GRPO, PPO, DPO and KTO
KL_CURVES = ["kl/mean", "eval/kl", "kl"]


def summary_table(summary: dict[str, float], models: dict[str, str]) -> pd.DataFrame:
    """One row per side: the model it ran and its reward mean, KL to the reference and mean length; the win
    rate on the candidate's row."""
    return pd.DataFrame([{
        "side": name, "model": models[name],
        "reward_mean": summary[f"{name}/reward_mean"], "kl_mean": summary[f"{name}/kl_mean"],
        "length_mean": summary[f"{name}/length_mean"],
        "win_rate": summary["win_rate"] if name == "candidate" else 1.0 - summary["win_rate"],
    } for name in ("candidate", "baseline")])


def length_histogram(comparison: pd.DataFrame) -> Figure:
    figure = Figure(figsize=(6, 4), dpi=100, layout="constrained")
    axes = figure.subplots()
    lengths = comparison[["candidate_length", "baseline_length"]].to_numpy()
    bins = np.arange(0, lengths.max() + 2) if lengths.max() < 64 else 32
    for name in ("candidate", "baseline"):
        axes.hist(comparison[f"{name}_length"], bins=bins, alpha=0.6, label=name)
    axes.set(xlabel="response length (tokens)", ylabel="responses", title="Response length")
    axes.legend()
    return figure


def reward_histogram(comparison: pd.DataFrame) -> Figure:
    figure = Figure(figsize=(6, 4), dpi=100, layout="constrained")
    axes = figure.subplots()
    for name in ("candidate", "baseline"):
        axes.hist(comparison[f"{name}_reward"], bins=20, alpha=0.6, label=name)
    axes.set(xlabel="reward (judge)", ylabel="responses", title="Held-out reward")
    axes.legend()
    return figure


def training_curves(histories: dict[str, list[tuple[int, float]]]) -> Figure:
    """histories: {metric key: [(step, value)]} -> one panel per key."""
    figure = Figure(figsize=(5 * len(histories), 4), dpi=100, layout="constrained")
    for axes, (key, points) in zip(np.atleast_1d(figure.subplots(1, len(histories))), histories.items()):
        steps, values = zip(*sorted(points))
        axes.plot(steps, values, marker="o")
        axes.set(xlabel="step (iteration or epoch)", ylabel=key, title=f"candidate's training: {key}")
    return figure


def candidate_histories(tracker: Tracker, run_id: str | None) -> dict[str, list[tuple[int, float]]]:
    """The candidate's training-run reward and KL curves (the first of REWARD_CURVES / KL_CURVES it logged)."""
    if not run_id:
        return {}
    logged = tracker.client.get_run(run_id).data.metrics
    histories = {}
    for candidates in (REWARD_CURVES, KL_CURVES):
        key = next((k for k in candidates if k in logged), None)
        if key:
            histories[key] = [(m.step, m.value) for m in tracker.client.get_metric_history(run_id, key)]
    return histories


def log_evaluation(tracker: Tracker, comparison: pd.DataFrame, comparison_path: str, summary: dict[str, float],
                   models: dict[str, str], training_run_id: str | None, log_rollouts: bool) -> pd.DataFrame:
    """Metrics, the summary table, the plots and the paired samples of one evaluation; returns the table."""
    table = summary_table(summary, models)
    tracker.log_metrics(summary, step=0)
    tracker.log_table(table, "summary.json")
    tracker.log_table(comparison.head(32), "samples.json")
    if log_rollouts:
        tracker.log_files({"comparison.parquet": comparison_path}, "data")
    figures = {"length_histogram.png": length_histogram(comparison),
               "reward_histogram.png": reward_histogram(comparison)}
    histories = candidate_histories(tracker, training_run_id)
    if histories:
        figures["training_curves.png"] = training_curves(histories)
    for name, figure in figures.items():
        tracker.client.log_figure(tracker.run_id, figure, f"plots/{name}")
    return table


def move_champion(tracker: Tracker, name: str, version: str, alias: str, summary: dict[str, float]) -> str | None:
    """Points `alias` at the candidate's version and `previous-<alias>` at the one it replaces (the way back);
    returns the replaced version, if any."""
    client = tracker.client
    previous = client.get_registered_model(name).aliases.get(alias)
    if previous is not None and str(previous) != str(version):
        client.set_registered_model_alias(name, f"previous-{alias}", str(previous))
    client.set_registered_model_alias(name, alias, str(version))
    for key, value in {"promoted_by_run": tracker.run_id, "promoted_win_rate": f"{summary['win_rate']:.4f}"}.items():
        client.set_model_version_tag(name, str(version), key, value)
    return None if previous is None else str(previous)


def evaluation_markdown(table: pd.DataFrame, summary: dict[str, float], decision: str) -> str:
    rows = "\n".join(f"| {r.side} | `{r.model}` | {r.reward_mean:.4g} | {r.win_rate:.3f} | {r.kl_mean:.4g} | "
                     f"{r.length_mean:.1f} |" for r in table.itertuples())
    return (f"## Evaluation: {decision}\n\n| side | model | reward mean | win rate | KL to reference | length |\n"
            f"|---|---|---|---|---|---|\n{rows}\n\n{int(summary['wins'])} wins, {int(summary['losses'])} losses, "
            f"{int(summary['ties'])} ties over {int(summary['pairs'])} paired responses.\n")
