"""Summed log-probs per sequence of the offline algorithms' tokenized tables (DPO's pairs, KTO's examples): what
their reference stage stores as `ref_<name>` columns, in one process or per rank under torchrun."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
from torch import Tensor

from rlhf_core import dpo, kto


@dataclass(frozen=True)
class SequenceTable:
    """batch(table, pad_id, device) -> the table's tensors; logps(model, batch, *, micro_batch_size) ->
    {name: [B]} for each of `names`."""

    batch: Callable[[pd.DataFrame, int, str], dict[str, Tensor]]
    logps: Callable[..., dict[str, Tensor]]
    names: tuple[str, ...]

    def reference_columns(self, logps: dict[str, Tensor]) -> dict[str, np.ndarray]:
        """The reference stage's columns: `ref_<name>` for each name, [B] each."""
        return {f"ref_{name}": logps[name].cpu().numpy() for name in self.names}


SEQUENCE_TABLES: dict[str, SequenceTable] = {
    "dpo": SequenceTable(dpo.pair_batch, dpo.batched_pair_logprobs, ("chosen_logps", "rejected_logps")),
    "kto": SequenceTable(kto.example_batch, kto.batched_example_logps, ("logps", "mismatched_logps")),
}
