"""Preference data from judged samples: G responses per prompt, each with a judge's score, become pairs (for DPO
and reward models) and unpaired desirable/undesirable labels (for KTO).

The recipe of UltraFeedback / "RLAIF" (Lee et al. 2023) with a pluggable judge: sample G responses per prompt,
score each one, keep the comparisons the judge is sure about. Departures: a pair needs a score gap of at least
`min_gap` (a judge's tiny differences are noise); an unpaired label needs the score to sit `min_gap / 2` above
or below the prompt's mean score, so for G = 2 both rules keep exactly the same comparisons. A NaN score means
the judge abstained (a human's "skip"); empty responses and NaN scores are dropped before anything else.

Rows: `samples` has one row per response, columns prompt_id, prompt, sample_index, response, score.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import pandas as pd

from rlhf_core.registry import lookup, register

SAMPLE_COLUMNS = ["prompt_id", "prompt", "sample_index", "response", "score"]
PAIR_COLUMNS = ["prompt_id", "prompt", "chosen", "rejected", "chosen_score", "rejected_score", "chosen_index",
                "rejected_index", "judge"]
UNPAIRED_COLUMNS = ["prompt_id", "prompt", "sample_index", "completion", "label", "score", "judge"]
SKIP = "skip"
GAP_TOLERANCE = 1e-9  # 0.3 - 0.1 is 0.19999999999999998 in floats: min_gap=0.2 must still keep that pair

# A pairing proposes (chosen, rejected) positions within one prompt's usable responses: scores [G'] -> pairs.
PAIRINGS: dict[str, Callable[[np.ndarray], list[tuple[int, int]]]] = {}


@register(PAIRINGS, "best_worst")
def best_worst_pairs(scores: np.ndarray) -> list[tuple[int, int]]:
    """At most one pair: the highest against the lowest score. np.argmax/argmin return the first position, so ties
    go to the lowest sample_index (rows are sorted by it). scores: [G'] -> [(chosen, rejected)]"""
    best, worst = int(np.argmax(scores)), int(np.argmin(scores))
    return [(best, worst)] if best != worst else []


@register(PAIRINGS, "all")
def all_pairs(scores: np.ndarray) -> list[tuple[int, int]]:
    """Every two responses i < j, the higher score chosen: G'(G'-1)/2 candidates.
    scores: [G'] -> [(chosen, rejected)]"""
    return [(i, j) if scores[i] >= scores[j] else (j, i) for i, j in itertools.combinations(range(len(scores)), 2)]


def _check(samples: pd.DataFrame, min_gap: float) -> None:
    if missing := [c for c in SAMPLE_COLUMNS if c not in samples.columns]:
        raise ValueError(f"samples lack the columns {missing}; they have {list(samples.columns)}")
    if not min_gap > 0:  # with 0, equal scores would make a pair with an arbitrary winner
        raise ValueError(f"min_gap must be > 0, got {min_gap}")


def is_empty(responses: pd.Series) -> pd.Series:
    """True where a response is only whitespace: nothing for a judge (or a preference loss) to prefer."""
    return responses.str.strip().eq("")


def usable_samples(samples: pd.DataFrame) -> pd.DataFrame:
    """The rows a judgment can use: non-empty responses with a score (NaN: the judge abstained), sorted by
    (prompt_id, sample_index) so every output is in a deterministic order."""
    keep = ~is_empty(samples["response"]) & samples["score"].notna()
    return samples[keep].sort_values(["prompt_id", "sample_index"], kind="stable").reset_index(drop=True)


def exported_prompts(samples: pd.DataFrame) -> pd.Series | None:
    """The `prompt` to write per prompt_id when the prompts were conversations: every prompt as its messages (a
    Parquet column holds one type), so `rlhf dpo` or `rlhf kto` on the result renders the same turns as the
    policy saw; None when every prompt is a single user turn (the text is then the prompt)."""
    if "prompt_messages" not in samples:
        return None
    firsts = samples.groupby("prompt_id", sort=True)["prompt_messages"].first()
    messages = firsts.map(lambda turns: [{"role": m["role"], "content": m["content"]} for m in turns])
    single_turn = messages.map(lambda turns: len(turns) == 1 and turns[0]["role"] == "user")
    return None if single_turn.all() else messages


def with_exported_prompts(table: pd.DataFrame, samples: pd.DataFrame) -> pd.DataFrame:
    prompts = exported_prompts(samples)
    return table if prompts is None else table.assign(prompt=table["prompt_id"].map(prompts))


def make_pairs(samples: pd.DataFrame, pairing: str, min_gap: float, judge: str) -> pd.DataFrame:
    """(chosen, rejected) pairs from judged samples: the `pairing`'s candidates whose score gap is >= min_gap and
    whose texts differ (after stripping whitespace). Ordered by prompt_id, then the candidates' sample indices.
    samples: one row per response -> pairs with PAIR_COLUMNS."""
    _check(samples, min_gap)
    candidates = lookup(PAIRINGS, pairing, "pairing")
    rows = []
    for prompt_id, group in usable_samples(samples).groupby("prompt_id", sort=True):
        scores, texts = group["score"].to_numpy(np.float64), group["response"].tolist()
        indices, prompt = group["sample_index"].tolist(), group["prompt"].iloc[0]
        for c, r in candidates(scores):
            if scores[c] - scores[r] + GAP_TOLERANCE >= min_gap and texts[c].strip() != texts[r].strip():
                rows.append((prompt_id, prompt, texts[c], texts[r], scores[c], scores[r], indices[c], indices[r],
                             judge))
    pairs = pd.DataFrame(rows, columns=PAIR_COLUMNS).astype({"chosen_score": "float64", "rejected_score": "float64",
                                                             "chosen_index": "int64", "rejected_index": "int64"})
    return with_exported_prompts(pairs, samples)


def make_unpaired(samples: pd.DataFrame, min_gap: float, judge: str) -> pd.DataFrame:
    """Desirable (label True) and undesirable (False) responses: score >= mean + min_gap/2 or <= mean - min_gap/2,
    the mean taken over the prompt's usable responses; the rest are dropped. For G = 2 that is the pair rule
    (a - (a+b)/2 >= g/2 <=> a - b >= g). A text labelled both ways for one prompt (the judge contradicts itself)
    is dropped, as make_pairs drops identical texts. samples: one row per response -> rows with UNPAIRED_COLUMNS."""
    _check(samples, min_gap)
    usable = usable_samples(samples)
    offset = usable["score"] - usable.groupby("prompt_id")["score"].transform("mean")
    desirable, undesirable = offset >= min_gap / 2 - GAP_TOLERANCE, offset <= -min_gap / 2 + GAP_TOLERANCE
    labelled = usable[desirable | undesirable].assign(label=desirable[desirable | undesirable],
                                                      text=lambda df: df["response"].str.strip())
    contradicted = labelled.groupby(["prompt_id", "text"])["label"].transform("nunique") > 1
    out = labelled[~contradicted].rename(columns={"response": "completion"}).assign(judge=judge)
    unpaired = out[UNPAIRED_COLUMNS].astype({"label": bool, "score": "float64"}).reset_index(drop=True)
    return with_exported_prompts(unpaired, samples)


def choice_scores(choice: str, group_size: int) -> list[float]:
    """A human's pick among G numbered responses (1-based, as shown) -> G scores: 1.0 for the pick, 0.0 for the
    others; "skip" -> all NaN (the judge abstained, so the prompt gives no pair)."""
    if choice == SKIP:
        return [float("nan")] * group_size
    if not (choice.isdigit() and 1 <= int(choice) <= group_size):
        raise ValueError(f"choice {choice!r} is neither '{SKIP}' nor a response number 1..{group_size}")
    return [float(k == int(choice) - 1) for k in range(group_size)]


def preference_metrics(samples: pd.DataFrame, pairs: pd.DataFrame, unpaired: pd.DataFrame) -> dict[str, float]:
    """Counts and means of one preference dataset: samples (all judged responses), pairs, unpaired -> metrics."""
    return {
        "data/prompts": samples["prompt_id"].nunique(),
        "data/responses": len(samples),
        "data/empty_responses": int(is_empty(samples["response"]).sum()),
        "judge/abstained": int(samples["score"].isna().sum()),
        "judge/score_mean": float(samples["score"].mean()),  # NaN-skipping
        "pairs/count": len(pairs),
        "pairs/prompts": pairs["prompt_id"].nunique(),
        "pairs/gap_mean": float((pairs["chosen_score"] - pairs["rejected_score"]).mean()),  # NaN without pairs
        "unpaired/desirable": int(unpaired["label"].sum()),
        "unpaired/undesirable": int((~unpaired["label"]).sum()),
    }


def review_batches(samples: pd.DataFrame, batch_size: int) -> list[pd.DataFrame]:
    """The prompts a human is asked about, `batch_size` per batch, in prompt_id order: those with at least two
    non-empty responses (with fewer there is nothing to choose between). Each batch keeps all of its prompts'
    rows, sorted by (prompt_id, sample_index)."""
    rows = samples.sort_values(["prompt_id", "sample_index"], kind="stable")
    nonempty = (~is_empty(rows["response"])).groupby(rows["prompt_id"]).sum()
    asked = nonempty.index[nonempty >= 2]
    return [rows[rows["prompt_id"].isin(asked[start:start + batch_size])].reset_index(drop=True)
            for start in range(0, len(asked), batch_size)]
