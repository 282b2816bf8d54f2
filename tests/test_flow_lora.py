"""LoRA runs of the GRPO and DPO flows end to end on a tiny model (real Prefect, MLflow, Parquet, checkpoints):
the registered checkpoint has the configured format and loads from the registry, the base weights are untouched,
the policy changed, and the reference is the base model (the policy with its adapter disabled)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch

from flow_helpers import mlflow_run_of
from flows.dpo import dpo
from flows.grpo import grpo
from rlhf_core.batch import collate, response_lists
from rlhf_core.config import (DataConfig, DPOConfig, GenerationConfig, GRPOConfig, KLConfig, LoraConfig, ModelConfig,
                               OptimConfig, PreferenceDataConfig, RewardSpec, RuntimeConfig, TrackingConfig)
from rlhf_core.io import sha256_dir, sha256_file
from rlhf_core.logprobs import batched_response_logprobs
from rlhf_core.lora import ADAPTER_DIR, adapter_disabled, has_adapter
from rlhf_core.models import load_causal_lm
from tasks.models import resolve_model

pytestmark = pytest.mark.slow
PLACES = ["hotel", "diner", "museum", "phone", "novel", "theme park"]


def logprobs_of(model, df: pd.DataFrame, pad_id: int) -> list[list[float]]:
    batch = collate(df["prompt_ids"], df["response_ids"], pad_id)
    return response_lists(batched_response_logprobs(model, batch, micro_batch_size=8), batch["response_mask"])


def max_difference(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))


def test_grpo_lora_registers_adapter_only_checkpoints(prefect_harness, rlhf_home, tiny_model_dir):
    base_hash = sha256_dir(tiny_model_dir)
    config = GRPOConfig(
        iterations=2, prompts_per_iteration=2, seed=0, model=ModelConfig(
            name_or_path=str(tiny_model_dir), lora=LoraConfig(rank=4, alpha=8.0, save="adapter")),
        data=DataConfig(path="data/arithmetic_train.jsonl"),
        rewards=[RewardSpec(function="response_length")],  # varies within a group: non-zero advantages
        generation=GenerationConfig(group_size=4, max_new_tokens=8, temperature=1.0),
        kl=KLConfig(coef=0.05), optim=OptimConfig(lr=1e-2, micro_batch_size=4),
        runtime=RuntimeConfig(gradient_checkpointing=True),
        tracking=TrackingConfig(experiment="lora-e2e", registered_model="tiny-lora-grpo"))
    state = grpo(config, return_state=True)
    final = Path(state.result())
    assert mlflow_run_of(state.state_details.flow_run_id).info.status == "FINISHED"

    # the checkpoint and its registered copy are adapter-only and name the (unchanged) base
    registered = resolve_model("models:/tiny-lora-grpo@newest")
    adapter_file = "adapter_model.safetensors"
    assert sha256_file(Path(registered.path) / adapter_file) == sha256_file(final / adapter_file)
    for folder in (final, Path(registered.path)):
        assert (folder / adapter_file).is_file() and not (folder / "model.safetensors").exists()
        assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
            tiny_model_dir)
    assert not (Path(registered.path) / "optimizer.safetensors").exists()  # training state stays local
    assert (final / "optimizer.safetensors").is_file()
    assert sha256_dir(tiny_model_dir) == base_hash

    # the policy changed; the reference log-probs of iteration 1 are the base model's (adapter disabled)
    policy, tokenizer = load_causal_lm(Path(registered.path))
    base, _ = load_causal_lm(tiny_model_dir)
    scored = sorted((rlhf_home / "artifacts" / "scored").glob("*.parquet"), key=lambda p: p.stat().st_mtime)
    second = pd.read_parquet(scored[-1])
    base_logprobs = logprobs_of(base.eval(), second, tokenizer.pad_token_id)
    assert max_difference(second["ref_logprobs"].tolist(), base_logprobs) < 1e-5
    assert max_difference(logprobs_of(policy.eval(), second, tokenizer.pad_token_id), base_logprobs) > 1e-3
    with adapter_disabled(policy):
        assert max_difference(logprobs_of(policy, second, tokenizer.pad_token_id), base_logprobs) < 1e-6


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    rows = [{"prompt": f"Write a one-sentence review of the {place}.", "chosen": f"The {place} {good}.",
             "rejected": f"The {place} {bad}."}
            for good, bad in [("was wonderful", "was awful"), ("is excellent", "is terrible")] for place in PLACES]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_dpo_lora_registers_merged_checkpoints(prefect_harness, rlhf_home, pairs_file, tiny_model_dir):
    base_hash = sha256_dir(tiny_model_dir)
    config = DPOConfig(
        model=ModelConfig(name_or_path=str(tiny_model_dir),
                          lora=LoraConfig(rank=4, alpha=8.0, target_modules="all-linear", save="merged")),
        epochs=2, batch_size=4, micro_batch_size=2, lr=1e-2, keep_checkpoints=1,
        data=PreferenceDataConfig(path=str(pairs_file), eval_path=None, eval_fraction=0.25),
        tracking=TrackingConfig(experiment="lora-dpo-e2e", registered_model="tiny-lora-dpo"))
    state = dpo(config, return_state=True)
    final = Path(state.result())
    run = mlflow_run_of(state.state_details.flow_run_id)
    assert run.info.status == "FINISHED"

    # local checkpoint: merged weights plus the adapter to continue from; the registry holds the plain model
    assert (final / "model.safetensors").is_file() and (final / ADAPTER_DIR / "adapter_config.json").is_file()
    registered = resolve_model("models:/tiny-lora-dpo@newest")
    assert sorted(p.name for p in Path(registered.path).iterdir() if "safetensors" in p.name) == ["model.safetensors"]
    assert not (Path(registered.path) / "adapter_config.json").exists()
    assert sha256_dir(tiny_model_dir) == base_hash
    versions = mlflow.MlflowClient().search_model_versions("name = 'tiny-lora-dpo'")
    assert sorted(v.tags["iteration"] for v in versions) == ["0", "1"]

    # the merged model is the trained policy: it differs from the base, and epoch 1 continued the same adapter
    # (base + adapter from the local checkpoint computes the registered merged weights)
    merged, tokenizer = load_causal_lm(Path(registered.path))
    continued, _ = load_causal_lm(final, with_adapter=True)
    base, _ = load_causal_lm(tiny_model_dir)
    assert has_adapter(continued) and not has_adapter(merged)
    ids = tokenizer(["The hotel was wonderful."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        merged_logits, adapter_logits, base_logits = (m.eval()(ids).logits for m in (merged, continued, base))
    assert (merged_logits - base_logits).abs().max() > 1e-3
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-4, rtol=0)
    # held-out metrics were computed against the reference (the base): finite implicit rewards
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "eval/rewards/margins")
    assert [m.step for m in history] == [0, 1] and all(abs(m.value) < 1e3 for m in history)
