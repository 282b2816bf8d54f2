"""LoRA runs of the GRPO, DPO, PPO, KTO and reward-model flows end to end on a tiny model (real Prefect, MLflow,
Parquet, checkpoints): the registered checkpoint has the configured format and loads from the registry, the base
weights are untouched, the trained weights changed (PPO: adapter and value head; reward model: adapter and score
head), and the reference is the base model (the policy with its adapter disabled)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import test_flow_dpo
import test_flow_kto
import torch
from flow_helpers import mlflow_run_of
from safetensors.torch import load_file
from test_flow_ppo import tiny_ppo_config
from test_flow_reward_model import small_config as reward_model_config

from flows.dpo import dpo
from flows.grpo import grpo
from flows.kto import kto
from flows.ppo import ppo
from flows.reward_model import reward_model
from rlhf_core import kto as kto_core
from rlhf_core.batch import collate, response_lists
from rlhf_core.config import (DataConfig, DPOConfig, GenerationConfig, GRPOConfig, KLConfig, LoraConfig, ModelConfig,
                              OptimConfig, PreferenceDataConfig, RewardSpec, RuntimeConfig, TrackingConfig)
from rlhf_core.io import sha256_dir, sha256_file
from rlhf_core.logprobs import batched_response_logprobs
from rlhf_core.lora import ADAPTER_CONFIG_FILE, ADAPTER_DIR, ADAPTER_WEIGHTS_FILE, adapter_disabled, has_adapter
from rlhf_core.models import load_causal_lm
from rlhf_core.reward_model import load_reward_model, reward_scores
from rlhf_core.value_head import VALUE_HEAD_FILE
from tasks.models import resolve_model

pytestmark = pytest.mark.slow
examples_file = test_flow_kto.examples_file  # the KTO tests' fixture: 24 labelled review completions


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
    return test_flow_dpo.write_review_pairs(tmp_path / "pairs.jsonl")


def test_dpo_lora_registers_merged_checkpoints(prefect_harness, rlhf_home, pairs_file, tiny_model_dir):
    base_hash = sha256_dir(tiny_model_dir)
    config = DPOConfig(
        model=ModelConfig(name_or_path=str(tiny_model_dir),
                          lora=LoraConfig(rank=4, alpha=8.0, target_modules="all-linear", save="merged")),
        optim={"epochs": 2, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-2}, keep_checkpoints=1,
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


def registered_files(name: str, version: str = "newest") -> tuple[Path, list[str]]:
    """(folder, file names) of a registered model version."""
    folder = Path(resolve_model(f"models:/{name}@{version}" if version == "newest" else f"models:/{name}/{version}")
                  .path)
    return folder, sorted(p.name for p in folder.iterdir() if p.is_file())


def lora_b_max(adapter_file: Path) -> float:
    """The largest |B| entry of an adapter: 0 for a fresh (untrained) one."""
    tensors = load_file(str(adapter_file))
    assert any("lora_B" in key for key in tensors)
    return max(float(t.abs().max()) for key, t in tensors.items() if "lora_B" in key)


def test_ppo_lora_registers_adapter_and_value_head(prefect_harness, rlhf_home, tiny_model_dir):
    base_hash = sha256_dir(tiny_model_dir)
    config = tiny_ppo_config(
        tiny_model_dir, reward_model_dir=None, rewards=[{"function": "response_length"}],  # no reward model
        model={"name_or_path": str(tiny_model_dir), "lora": {"rank": 4, "alpha": 8.0, "save": "adapter"}},
        optim={"lr": 1e-2, "micro_batch_size": 4, "epochs": 1, "mini_batches": 1},
        runtime={"gradient_checkpointing": True},
        tracking={"experiment": "lora-ppo-e2e", "registered_model": "tiny-lora-ppo"})
    state = ppo(config, return_state=True)
    final = Path(state.result())
    run = mlflow_run_of(state.state_details.flow_run_id)
    assert run.info.status == "FINISHED"

    # registry: adapter-only (naming the unchanged base) plus the value head; optimizer state stays local
    registered, files = registered_files("tiny-lora-ppo")
    assert files[:2] == [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE] and VALUE_HEAD_FILE in files
    assert "model.safetensors" not in files and "optimizer.safetensors" not in files
    assert (final / "optimizer.safetensors").is_file()
    assert sha256_file(registered / ADAPTER_WEIGHTS_FILE) == sha256_file(final / ADAPTER_WEIGHTS_FILE)
    assert json.loads((registered / ADAPTER_CONFIG_FILE).read_text())["base_model_name_or_path"] == str(
        tiny_model_dir)
    assert sha256_dir(tiny_model_dir) == base_hash
    assert sorted(v.tags["iteration"] for v in mlflow.MlflowClient().search_model_versions(
        "name = 'tiny-lora-ppo'")) == ["0", "1"]

    # both start at zero and trained: the adapter's B and the value head
    assert lora_b_max(registered / ADAPTER_WEIGHTS_FILE) > 1e-4
    assert max(float(t.abs().max()) for t in load_file(str(registered / VALUE_HEAD_FILE)).values()) > 1e-4

    # reference log-probs are the base model's in both iterations; the behaviour policy equals them only in
    # iteration 0 (fresh adapter, B = 0) and has moved away by iteration 1
    base, tokenizer = load_causal_lm(tiny_model_dir)
    policy, _ = load_causal_lm(registered)
    for iteration, moved in [(0, False), (1, True)]:
        table = pd.read_parquet(mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path=f"data/iter_{iteration:03d}/advantages.parquet"))
        base_logprobs = logprobs_of(base.eval(), table, tokenizer.pad_token_id)
        assert max_difference(table["ref_logprobs"].tolist(), base_logprobs) < 1e-5
        assert (max_difference(table["old_logprobs"].tolist(), table["ref_logprobs"].tolist()) > 1e-3) == moved
    assert max_difference(logprobs_of(policy.eval(), table, tokenizer.pad_token_id), base_logprobs) > 1e-3
    with adapter_disabled(policy):
        assert max_difference(logprobs_of(policy, table, tokenizer.pad_token_id), base_logprobs) < 1e-6


def example_logps(model, df: pd.DataFrame, pad_id: int) -> dict[str, list[float]]:
    logps = kto_core.batched_example_logps(model, kto_core.example_batch(df, pad_id, "cpu"), micro_batch_size=2)
    return {name: values.tolist() for name, values in logps.items()}


def test_kto_lora_registers_merged_checkpoints(prefect_harness, rlhf_home, examples_file, tiny_model_dir):
    base_hash = sha256_dir(tiny_model_dir)
    config = test_flow_kto.small_config(examples_file, tiny_model_dir, optim={"lr": 1e-2}, model=ModelConfig(
        name_or_path=str(tiny_model_dir), lora=LoraConfig(rank=4, alpha=8.0, save="merged")),
        tracking=TrackingConfig(experiment="lora-kto-e2e", registered_model="tiny-lora-kto"))
    state = kto(config, return_state=True)
    final = Path(state.result())
    run = mlflow_run_of(state.state_details.flow_run_id)
    assert run.info.status == "FINISHED"

    # local checkpoint: merged weights plus the adapter to continue from; the registry holds the plain model
    assert (final / "model.safetensors").is_file() and (final / ADAPTER_DIR / ADAPTER_CONFIG_FILE).is_file()
    registered, files = registered_files("tiny-lora-kto")
    assert "model.safetensors" in files and ADAPTER_CONFIG_FILE not in files and "optimizer.safetensors" not in files
    assert not (registered / ADAPTER_DIR).exists()
    assert sha256_dir(tiny_model_dir) == base_hash
    assert sorted(v.tags["iteration"] for v in mlflow.MlflowClient().search_model_versions(
        "name = 'tiny-lora-kto'")) == ["0", "1"]

    # the reference log-probs (train and held-out examples) are the base model's
    base, tokenizer = load_causal_lm(tiny_model_dir)
    references = sorted((rlhf_home / "artifacts" / "kto-reference").glob("*.parquet"))
    assert len(references) == 2
    for path in references:
        table = pd.read_parquet(path)
        expected = example_logps(base.eval(), table, tokenizer.pad_token_id)
        assert table["ref_logps"].to_numpy() == pytest.approx(expected["logps"], abs=1e-5)
        assert table["ref_mismatched_logps"].to_numpy() == pytest.approx(expected["mismatched_logps"], abs=1e-5)

    # the registered merged model is the policy the last epoch evaluated, and it moved away from the reference
    scores = pd.read_parquet(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                                 artifact_path="data/epoch_001/eval.parquet"))
    merged, _ = load_causal_lm(registered)
    assert not has_adapter(merged)
    assert scores["logps"].to_numpy() == pytest.approx(
        example_logps(merged.eval(), scores, tokenizer.pad_token_id)["logps"], abs=1e-4)
    assert float((scores["logps"] - scores["ref_logps"]).abs().max()) > 1e-2


def test_reward_model_lora_registers_adapter_with_score_head(prefect_harness, rlhf_home, pairs_file, tiny_model_dir):
    base_hash = sha256_dir(tiny_model_dir)
    config = reward_model_config(
        pairs_file, optim={"lr": 1e-2}, runtime=RuntimeConfig(gradient_checkpointing=True),
        model=ModelConfig(name_or_path=str(tiny_model_dir), lora=LoraConfig(rank=4, alpha=8.0, save="adapter")),
        tracking=TrackingConfig(experiment="lora-rm-e2e", registered_model="tiny-lora-rm"))
    state = reward_model(config, return_state=True)
    final = Path(state.result())
    run = mlflow_run_of(state.state_details.flow_run_id)
    assert run.info.status == "FINISHED"

    # registry: adapter-only, the score head saved with it (modules_to_save), naming the unchanged base
    registered, files = registered_files("tiny-lora-rm")
    assert files[:2] == [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE]
    assert "model.safetensors" not in files and "optimizer.safetensors" not in files
    assert sha256_file(registered / ADAPTER_WEIGHTS_FILE) == sha256_file(final / ADAPTER_WEIGHTS_FILE)
    adapter_config = json.loads((registered / ADAPTER_CONFIG_FILE).read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_model_dir)
    assert adapter_config["modules_to_save"] == ["score"]
    assert sha256_dir(tiny_model_dir) == base_hash

    # each epoch changed the score head (the flow draws the new head after torch.manual_seed(config.seed)) and the
    # adapter (B = 0 at the start)
    epochs = [load_file(str(registered_files("tiny-lora-rm", v)[0] / ADAPTER_WEIGHTS_FILE)) for v in ("1", "2")]
    assert set(epochs[0]) == set(epochs[1])
    torch.manual_seed(0)
    heads = [load_reward_model(tiny_model_dir)[0].score.weight.detach()] + [
        tensors["base_model.model.score.weight"] for tensors in epochs]
    assert all(float((after - before).abs().max()) > 1e-4 for before, after in itertools.pairwise(heads))
    assert lora_b_max(registered_files("tiny-lora-rm", "1")[0] / ADAPTER_WEIGHTS_FILE) > 1e-4
    assert max(float((epochs[1][k] - epochs[0][k]).abs().max()) for k in epochs[0] if "lora_B" in k) > 1e-4

    # the registered model scores the held-out pairs as the last eval stage did; a base loaded with another seed
    # has another random score head, so only the saved head can reproduce them
    scores = pd.read_parquet(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                                 artifact_path="data/epoch_001/eval.parquet"))
    torch.manual_seed(123)
    model, tokenizer = load_reward_model(registered)
    rescored = reward_scores(model, tokenizer, scores["prompt"].tolist() * 2,
                             scores["chosen"].tolist() + scores["rejected"].tolist(), batch_size=4, max_length=256)
    expected = torch.tensor(scores[["chosen_rewards", "rejected_rewards"]].to_numpy().T.reshape(-1))
    torch.testing.assert_close(rescored, expected.float(), atol=1e-5, rtol=1e-5)
