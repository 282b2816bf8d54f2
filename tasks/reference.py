"""The offline flows' reference stage (DPO's pairs, KTO's examples): each sequence's summed log-probs under the
frozen reference, computed once per dataset and cached, in this process or under torchrun."""

from __future__ import annotations

import pandas as pd

from rlhf_core.config import RuntimeConfig
from rlhf_core.sequence_logps import SEQUENCE_TABLES
from tasks.distributed import distributed_sequence_logps
from tasks.refs import ArtifactRef, CheckpointRef
from tasks.runtime import reference_model


def with_reference_logps(algorithm: str, reference: CheckpointRef, tokens: ArtifactRef, micro_batch_size: int,
                         runtime: RuntimeConfig, trust_remote_code: bool) -> pd.DataFrame:
    """The tokenized table with `ref_<name>` columns (`rlhf_core.sequence_logps`), summed over each response, EOS
    included."""
    df, table = tokens.read(), SEQUENCE_TABLES[algorithm]
    if runtime.num_processes > 1:
        logps = distributed_sequence_logps(algorithm, reference, tokens, runtime, trust_remote_code, micro_batch_size)
    else:
        with reference_model(reference, runtime, trust_remote_code) as (model, tokenizer):
            logps = table.logps(model, table.batch(df, tokenizer.pad_token_id, runtime.device),
                                micro_batch_size=micro_batch_size)
    return df.assign(**table.reference_columns(logps))
