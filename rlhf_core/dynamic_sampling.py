"""DAPO's dynamic sampling (Yu et al. 2025, "DAPO", section 3.2, eq. 11: keep only groups with
0 < |{correct}| < G): under a group baseline a group whose rewards are all equal has advantage 0 for every
response, so it adds no policy gradient yet dilutes the token-mean loss. Each online iteration generates rounds of
fresh prompts until `num_groups` informative groups are found, then trains on those.

Departures from the paper and from verl (`recipe/dapo`, `filter_groups`): verl compares the standard deviation of a
chosen metric to 0 and raises once `max_num_gen_batches` rounds are spent; here rewards are compared exactly
(max == min) and a batch still short after the last round is filled with the earliest zero-variance groups, so the
update's batch size never changes (those groups see only the KL and entropy terms, as without dynamic sampling).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import torch

from rlhf_core.advantages import is_constant_group


def round_seed(seed: int, iteration: int, sampling_round: int) -> int:
    """The seed of one sampling round: the run's seed for round 0 (so a run without dynamic sampling is unchanged),
    else a 63-bit number drawn from (seed, iteration, round) alone, which picks the round's prompts and samples."""
    if sampling_round == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:{iteration}:round-{sampling_round}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def informative(rewards: np.ndarray, group_ids: np.ndarray) -> np.ndarray:
    """Per row, whether its group's rewards are not all equal (the advantages' own test, exact min == max).
    rewards, group_ids: [B] -> [B] bool."""
    return ~is_constant_group(torch.as_tensor(rewards), torch.as_tensor(group_ids)).numpy()


def fill_batch(rounds: list[pd.DataFrame], num_groups: int) -> pd.DataFrame:
    """The iteration's batch from the scored tables of its sampling rounds (each with `group_id` and `rewards`):
    the first `num_groups` informative groups in round order, then, if short, the earliest zero-variance ones.
    The rows of those groups (each group's rows in their order), `group_id` and `prompt_id` renumbered
    0..num_groups-1 in batch order, the round's own ids kept as `sampling_round` and `round_group_id`."""
    tagged = pd.concat([df.assign(sampling_round=r, round_group_id=df["group_id"]) for r, df in enumerate(rounds)],
                       ignore_index=True)
    group_keys = tagged.groupby(["sampling_round", "round_group_id"], sort=False).ngroup().to_numpy()
    useful = informative(tagged["rewards"].to_numpy(), group_keys)
    groups = pd.DataFrame({"key": group_keys, "useful": useful}).drop_duplicates("key")
    chosen = pd.concat([groups[groups["useful"]], groups[~groups["useful"]]])["key"].head(num_groups).tolist()
    position = pd.Series(range(len(chosen)), index=chosen).reindex(group_keys).to_numpy()
    kept = ~np.isnan(position)
    batch = tagged[kept].assign(group_id=position[kept].astype(np.int64)).sort_values("group_id", kind="stable")
    return batch.assign(prompt_id=batch["group_id"]).reset_index(drop=True)
