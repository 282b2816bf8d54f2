"""Preference-data stages: judge the rollouts with rewards (a cached task) or with a person (pauses of the flow run),
build pairs and unpaired labels (a cached task), copy them to where the user wants them.

The human judge runs at flow level, not in a task: it stops the flow run itself, once per batch of prompts, with a
form (a `RunInput` built for the batch) that asks for the best response to each prompt. A deployment's run is
*suspended* (`suspend_flow_run`): its process exits, the deployment's concurrency slot is released, and the
answer reschedules the run, which replays its cached stages and goes on from the first unanswered batch. The
server fails it after `human_timeout_s`. A run started without a deployment (`rlhf preference-data`) is *paused*
in place (`pause_flow_run`, the same form, polled every `poll_interval_s`): there is no lease to lose there.
Why not a pause under a deployment: Prefect's server releases the deployment's concurrency lease when the run
goes Running -> Paused, while the engine keeps renewing it (every 225 s) and cancels the run when the renewal
fails: the run crashed ~4 minutes into the wait (docs/operations.md).

Every answered batch is written at once under `$RLHF_HOME/judgments/<sha256 of what was shown>.parquet`, so a
rerun asks only the batches nobody has answered yet. A Retry of the same flow run also finds the answers Prefect
stored on the run (under the pause's key, `judge-<hash>`), and asks again, under the same key, a form an earlier
attempt showed but nobody answered (its stored form is deleted first: Prefect refuses a second input of one key
with 409 Conflict).
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import partial
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import pandas as pd
import pydantic
import torch
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext
from prefect.flow_runs import pause_flow_run, suspend_flow_run
from prefect.input import RunInput, delete_flow_run_input, keyset_from_base_key, read_flow_run_input
from prefect.utilities.urls import url_for

from rlhf_core.config import PairwiseJudgeConfig, RuntimeConfig
from rlhf_core.io import copy_file, write_atomically
from rlhf_core.judge import pairwise_preference, round_robin_scores
from rlhf_core.preference_data import SKIP, choice_scores, is_empty, make_pairs, make_unpaired, review_batches
from tasks.cache import STAGE_TASK_OPTIONS
from tasks.paths import rlhf_home
from tasks.refs import ArtifactRef, CheckpointRef, publish
from tasks.runtime import load_model
from tasks.scoring import RewardSources, with_rewards

FORM_HEADER = ("### Which response is best?\n"
               f"For each prompt pick the number of the best response, or `{SKIP}` when none is clearly better.\n")
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]<>#|~])")


@task(name="judge-with-rewards", **STAGE_TASK_OPTIONS)
def judge_with_rewards(rollouts: ArtifactRef, sources: RewardSources, runtime: RuntimeConfig,
                       batch_size: int) -> ArtifactRef:
    """Adds `score` (the weighted sum of the rewards) and one `reward[<source>]` column per source."""
    return publish(with_rewards(rollouts.read(), "score", sources, runtime, batch_size), "judged")


@task(name="judge-pairwise", **STAGE_TASK_OPTIONS)
def judge_pairwise(rollouts: ArtifactRef, judge: CheckpointRef, config: PairwiseJudgeConfig, runtime: RuntimeConfig,
                   batch_size: int) -> ArtifactRef:
    """Adds `score`: each response's mean preference over the other responses to its prompt, the LLM judge asked
    about every two of them in both orders (rlhf_core/judge.py: pairwise_preference, round_robin_scores)."""
    df = rollouts.read()
    model, tokenizer = load_model(judge, runtime)
    groups = [np.flatnonzero(df["prompt_id"].to_numpy() == p) for p in df["prompt_id"].unique()]
    pairs = [(rows[i], rows[j]) for rows in groups for i in range(len(rows)) for j in range(i + 1, len(rows))]
    first, second = (np.array([pair[k] for pair in pairs], dtype=np.int64) for k in (0, 1))
    prefers = pairwise_preference(model, tokenizer, config.template, df["prompt"].iloc[first].tolist(),
                                  df["response"].iloc[first].tolist(), df["response"].iloc[second].tolist(),
                                  config.answers, batch_size) if pairs else torch.zeros(0, dtype=torch.float64)
    verdicts = dict(zip(zip(first.tolist(), second.tolist()), prefers.tolist()))
    scores = np.zeros(len(df))
    for rows in groups:
        matrix = torch.tensor([[verdicts.get((a, b), 1 - verdicts.get((b, a), 0.5)) for b in rows] for a in rows],
                              dtype=torch.float64)
        scores[rows] = round_robin_scores(matrix).numpy()
    return publish(df.assign(score=scores), "judged")


class PreferenceRefs(pydantic.BaseModel):
    pairs: ArtifactRef  # rlhf_core.preference_data.PAIR_COLUMNS
    unpaired: ArtifactRef  # rlhf_core.preference_data.UNPAIRED_COLUMNS


@task(name="build-preference-data", **STAGE_TASK_OPTIONS)
def build_preference_data(judged: ArtifactRef, pairing: str, min_gap: float, judge: str) -> PreferenceRefs:
    samples = judged.read()
    return PreferenceRefs(pairs=publish(make_pairs(samples, pairing, min_gap, judge), "preference-pairs"),
                          unpaired=publish(make_unpaired(samples, min_gap, judge), "preference-unpaired"))


@task(name="export-preference-data")  # not cached: the folder may have been emptied since the last run
def export_preference_data(data: PreferenceRefs, output_dir: str | None) -> str:
    """Copies pairs.parquet and unpaired.parquet (each atomically) into `output_dir` (relative: to the current
    directory) or, without one, into `$RLHF_HOME/preference-data/<hash of both files>`; returns the folder."""
    digest = hashlib.sha256(f"{data.pairs.sha256}:{data.unpaired.sha256}".encode()).hexdigest()[:16]
    folder = Path(output_dir).expanduser().resolve() if output_dir else rlhf_home() / "preference-data" / digest
    for name, table in (("pairs.parquet", data.pairs), ("unpaired.parquet", data.unpaired)):
        write_atomically(partial(copy_file, table.path), folder / name)
    return str(folder)


# ---------------------------------------------------------------- the human judge (flow level)


def _markdown_line(text: str) -> str:
    """One line of literal text in markdown: newlines folded, markup characters escaped."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(text.split()))


def review_form(batch: pd.DataFrame) -> type[RunInput]:
    """The form of one pause: a field `prompt_<n>` per prompt of the batch (n = 1, 2, ...), a choice among the
    numbers of its non-empty responses (sample_index + 1) and "skip"; the description shows every prompt with its
    numbered responses. batch: rows of review_batches -> a RunInput subclass."""
    fields, lines = {}, [FORM_HEADER]
    for n, (_, group) in enumerate(batch.groupby("prompt_id", sort=True), start=1):
        prompt = group["prompt"].iloc[0]
        shown = group["sample_index"][~is_empty(group["response"])]
        choices = tuple(str(k + 1) for k in shown) + (SKIP,)
        fields[f"prompt_{n}"] = (Literal[choices], pydantic.Field(title=f"Prompt {n}",
                                                                   description=_markdown_line(prompt[:200])))
        lines.append(f"**Prompt {n}.** {_markdown_line(prompt)}\n")
        # explicit numbers, not a markdown list: a list would renumber around an empty response
        lines += [f"- **{k + 1}** " + (_markdown_line(r) if r.strip() else "_(empty response: not selectable)_")
                  for k, r in zip(group["sample_index"], group["response"])]
        lines.append("")
    form = pydantic.create_model("PreferenceJudgment", __base__=RunInput, **fields)
    return form.with_initial_data(description="\n".join(lines))


def judgment_path(batch: pd.DataFrame) -> Path:
    """Where a batch's answers are kept: named by the sha256 of what the human is shown (prompts and numbered
    responses), so a later run that shows the same batch reuses the answers."""
    shown = json.dumps([batch["prompt"].tolist(), batch["sample_index"].tolist(), batch["response"].tolist()])
    return rlhf_home() / "judgments" / f"{hashlib.sha256(shown.encode()).hexdigest()}.parquet"


def wait_for_answer(form: type[RunInput], key: str, timeout_s: int, poll_interval_s: float,
                    announce: Callable[[], None]) -> RunInput:
    """The answer to `form` under the pause key `key`: the one stored on this flow run by an earlier attempt (a
    resumed suspension, a Retry), else, after `announce()`, a new suspension (a deployment's top-level run:
    raises Pause, the process exits, the answer reschedules the run) or a pause in place (any other run)."""
    context = FlowRunContext.get()
    if context is None:  # no run to stop: Prefect's pause says so
        return pause_flow_run(wait_for_input=form, timeout=timeout_s, poll_interval=poll_interval_s, key=key)
    run = context.flow_run
    suspend = run.deployment_id is not None and run.parent_task_run_id is None  # Prefect suspends nothing else
    keyset = keyset_from_base_key(f"{'suspended' if suspend else 'paused'}-{key}")  # the keys Prefect derives
    if read_flow_run_input(keyset["response"], run.id) is not None:
        return form.load(keyset, run.id)
    for stale in (keyset["schema"], keyset["description"]):  # shown by a crashed attempt, never answered
        if read_flow_run_input(stale, run.id) is not None:
            delete_flow_run_input(stale, run.id)
    announce()
    if suspend:
        return suspend_flow_run(wait_for_input=form, timeout=timeout_s, key=key)
    return pause_flow_run(wait_for_input=form, timeout=timeout_s, poll_interval=poll_interval_s, key=key)


def announce(number: int, batches: int, timeout_s: int) -> None:
    """Says, in the run's log and as a markdown artifact on the run, that a person must answer, and where."""
    context = FlowRunContext.get()
    run = context.flow_run if context else None
    link = url_for("flow-run", obj_id=run.id) if run else None  # PREFECT_UI_URL, else the API's URL less /api
    where = f"[flow run {run.name}]({link})" if link else "this flow run in the Prefect UI"
    print(f"human judge: batch {number}/{batches} is waiting for you: open {link or where}, click Resume and "
          "answer the form")
    if run is None:
        return
    create_markdown_artifact(key="human-judge", description="this run waits for a person", markdown=(
        f"## The human judge is waiting for you (batch {number} of {batches})\n\n"
        f"1. Open {where}.\n2. Click **Resume** on the run's page: the form lists each prompt with its numbered "
        f"responses.\n3. Pick the best response per prompt (`{SKIP}` when none is clearly better) and submit.\n\n"
        f"The run fails if nobody answers within {timeout_s / 3600:.3g} h (`judge.human_timeout_s`). Answers are "
        f"saved per batch in `{rlhf_home() / 'judgments'}`: a rerun or a Retry asks only the batches left."))


def ask_human(batch: pd.DataFrame, timeout_s: int, poll_interval_s: float, key: str,
              announce: Callable[[], None] = lambda: None) -> pd.DataFrame:
    """Waits for the batch's form to be answered (wait_for_answer); returns the batch's prompt, sample_index,
    response, and the answer as `choice` and `score` (choice_scores: 1.0 chosen, 0.0 others, NaN for all on
    "skip")."""
    answer = wait_for_answer(review_form(batch), key, timeout_s, poll_interval_s, announce).model_dump()
    groups = [group for _, group in batch.groupby("prompt_id", sort=True)]
    choices = [answer[f"prompt_{n}"] for n in range(1, len(groups) + 1)]
    scores = [s for group, c in zip(groups, choices) for s in choice_scores(c, len(group))]
    return batch[["prompt", "sample_index", "response"]].assign(
        choice=np.repeat(choices, [len(g) for g in groups]), score=scores)


def judge_by_human(rollouts: ArtifactRef, batch_size: int, timeout_s: int, poll_interval_s: float) -> ArtifactRef:
    """Adds `score` from a person's answers, one form per batch of `batch_size` prompts; prompts with fewer than
    two non-empty responses are not shown and score NaN. Must be called from the flow, not a task."""
    samples = rollouts.read()
    batches = review_batches(samples, batch_size)
    scores = {}  # (prompt_id, sample_index) -> score
    for number, batch in enumerate(batches, start=1):
        path = judgment_path(batch)
        if path.is_file():
            print(f"human judge: batch {number}/{len(batches)} was answered before ({path.name[:16]}): reused")
        else:
            answers = ask_human(batch, timeout_s, poll_interval_s, key=f"judge-{path.stem[:16]}",
                                announce=partial(announce, number, len(batches), timeout_s))
            write_atomically(partial(answers.to_parquet, index=False), path)
        # same content, same row order: the saved scores line up with the batch's rows
        scores.update(zip(zip(batch["prompt_id"], batch["sample_index"]), pd.read_parquet(path)["score"]))
    rows = zip(samples["prompt_id"], samples["sample_index"])
    return publish(samples.assign(score=[scores.get(row, np.nan) for row in rows]), "judged")
