"""Preference-data stages: judge the rollouts with rewards (a cached task) or with a person (pauses of the flow run),
build pairs and unpaired labels (a cached task), copy them to where the user wants them.

The human judge runs at flow level, not in a task: `pause_flow_run` pauses the flow run itself. Each batch of
prompts is one pause whose form (a `RunInput` built for the batch) asks for the best response to each prompt.
Every answered batch is written at once under `$RLHF_HOME/judgments/<sha256 of what was shown>.parquet`, so a
run that crashes or times out, rerun, asks only the batches nobody has answered yet.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pydantic
from prefect import task
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput

from rlhf_core.config import RuntimeConfig
from rlhf_core.io import copy_file, write_atomically
from rlhf_core.preference_data import SKIP, choice_scores, is_empty, make_pairs, make_unpaired, review_batches
from tasks.cache import STAGE_TASK_OPTIONS
from tasks.paths import rlhf_home
from tasks.refs import ArtifactRef, publish
from tasks.scoring import RewardSources, with_rewards

FORM_HEADER = ("### Which response is best?\n"
               f"For each prompt pick the number of the best response, or `{SKIP}` when none is clearly better.\n")
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]<>#|~])")


@task(name="judge-with-rewards", **STAGE_TASK_OPTIONS)
def judge_with_rewards(rollouts: ArtifactRef, sources: RewardSources, runtime: RuntimeConfig,
                       batch_size: int) -> ArtifactRef:
    """Adds `score` (the weighted sum of the rewards) and one `reward[<source>]` column per source."""
    return publish(with_rewards(rollouts.read(), "score", sources, runtime, batch_size), "judged")


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
                                                                   description=" ".join(prompt.split())[:200]))
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


def ask_human(batch: pd.DataFrame, timeout_s: int, poll_interval_s: float, key: str) -> pd.DataFrame:
    """Pauses the flow run until the form is answered; returns the batch's prompt, sample_index, response, and
    the answer as `choice` and `score` (choice_scores: 1.0 chosen, 0.0 others, NaN for all on "skip")."""
    answer = pause_flow_run(wait_for_input=review_form(batch), timeout=timeout_s, poll_interval=poll_interval_s,
                            key=key).model_dump()
    groups = [group for _, group in batch.groupby("prompt_id", sort=True)]
    choices = [answer[f"prompt_{n}"] for n in range(1, len(groups) + 1)]
    scores = [s for group, c in zip(groups, choices) for s in choice_scores(c, len(group))]
    return batch[["prompt", "sample_index", "response"]].assign(
        choice=np.repeat(choices, [len(g) for g in groups]), score=scores)


def judge_by_human(rollouts: ArtifactRef, batch_size: int, timeout_s: int, poll_interval_s: float) -> ArtifactRef:
    """Adds `score` from a person's answers, one pause per batch of `batch_size` prompts; prompts with fewer than
    two non-empty responses are not shown and score NaN. Must be called from the flow, not a task."""
    samples = rollouts.read()
    batches = review_batches(samples, batch_size)
    scores = {}  # (prompt_id, sample_index) -> score
    for number, batch in enumerate(batches, start=1):
        path = judgment_path(batch)
        if path.is_file():
            print(f"human judge: batch {number}/{len(batches)} was answered before ({path.name[:16]}): reused")
        else:
            print(f"human judge: waiting for batch {number}/{len(batches)}: open this flow run in the Prefect UI "
                  "and click Resume to answer")
            answers = ask_human(batch, timeout_s, poll_interval_s, key=f"judge-{path.stem[:16]}")
            write_atomically(partial(answers.to_parquet, index=False), path)
        # same content, same row order: the saved scores line up with the batch's rows
        scores.update(zip(zip(batch["prompt_id"], batch["sample_index"]), pd.read_parquet(path)["score"]))
    rows = zip(samples["prompt_id"], samples["sample_index"])
    return publish(samples.assign(score=[scores.get(row, np.nan) for row in rows]), "judged")
