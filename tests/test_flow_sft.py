"""The SFT flow end to end on a tiny random-init Llama: conversations (multi-turn, a system turn) and
prompt/completion rows, the real Prefect engine, a real MLflow store; held-out loss and token accuracy per epoch,
a registered version per epoch with its lineage, a crash in epoch 1 resumed to the uninterrupted checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from flow_helpers import failing_call, metric_steps, mlflow_run_of, task_states

import rlhf_core.training
from flows.sft import sft
from rlhf_core.config import SFTConfig
from rlhf_core.io import sha256_dir

pytestmark = pytest.mark.slow


def write_conversations(path: Path) -> Path:
    """12 examples: multi-turn conversations with a system turn, and prompt/completion rows."""
    rows = []
    for a in range(1, 7):
        rows.append({"messages": [{"role": "system", "content": "You add numbers."},
                                  {"role": "user", "content": f"{a} + 1?"},
                                  {"role": "assistant", "content": f"{a + 1}"},
                                  {"role": "user", "content": f"And {a} + 2?"},
                                  {"role": "assistant", "content": f"It is {a + 2}."}]})
        rows.append({"prompt": f"Say {a} twice.", "completion": f"{a} {a}"})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def small_config(data_file: Path, model_dir: Path, optim: dict | None = None, **overrides) -> SFTConfig:
    """2 epochs of 4-example steps; `optim` overrides some of its settings."""
    values = dict(model={"name_or_path": str(model_dir)}, max_length=128, keep_checkpoints=1,
                  data={"path": str(data_file), "eval_path": None, "eval_fraction": 0.25},
                  optim={"epochs": 2, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-3, **(optim or {})},
                  tracking={"experiment": "sft-e2e", "registered_model": "tiny-sft"})
    return SFTConfig(**{**values, **overrides})


def test_sft_flow_end_to_end(prefect_harness, rlhf_home, tmp_path, tiny_model_dir):
    data_file = write_conversations(tmp_path / "sft.jsonl")
    state = sft(small_config(data_file, tiny_model_dir), return_state=True)
    final = state.result()
    run = mlflow_run_of(state.state_details.flow_run_id)

    tokens = [pd.read_parquet(p) for p in (rlhf_home / "artifacts" / "sft-tokens").glob("*.parquet")]
    assert sorted(len(df) for df in tokens) == [3, 9]
    for df in tokens:  # every example trains some tokens, the prompt part is never trained
        assert all(any(mask) and len(mask) == len(ids) for mask, ids in zip(df["loss_mask"], df["response_ids"]))

    assert run.info.status == "FINISHED"
    for key in ["loss/train", "eval/loss", "eval/token_accuracy", "eval/tokens", "policy/grad_norm"]:
        assert metric_steps(run.info.run_id, key) == [0, 1], key
    client = mlflow.MlflowClient()
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "eval/loss")]
    assert losses[1] < losses[0]  # lr 1e-3 on 9 examples: the held-out loss falls
    versions = client.search_model_versions("name = 'tiny-sft'")
    assert sorted(v.tags["iteration"] for v in versions) == ["0", "1"]
    newest = client.get_model_version_by_alias("tiny-sft", "newest")
    assert newest.tags["checkpoint_sha256"] == sha256_dir(final)
    assert newest.tags["lineage.start_model"] == str(tiny_model_dir)
    assert newest.tags["lineage.start_model_sha256"] == sha256_dir(tiny_model_dir)
    assert newest.tags["lineage.data"] == str(data_file)


def test_crash_in_epoch_1_then_rerun_resumes_and_matches_uninterrupted_run(prefect_harness, tmp_path, monkeypatch,
                                                                          tiny_model_dir):
    config = small_config(write_conversations(tmp_path / "sft.jsonl"), tiny_model_dir)
    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "uninterrupted"))
    uninterrupted = sha256_dir(sft(config))

    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "crashed"))
    with failing_call(rlhf_core.training, "save_trained", call=2):  # epoch 1 dies before its checkpoint is written
        crashed = sft(config, return_state=True)
    assert crashed.is_failed()
    resumed = sft(config, return_state=True)
    stages = task_states(resumed.state_details.flow_run_id)
    assert [s for name, s in stages if name == "train-sft-epoch"] == ["Cached", "Completed"]
    assert [s for name, s in stages if name == "tokenize-conversations"] == ["Cached", "Cached"]
    assert sha256_dir(resumed.result()) == uninterrupted
