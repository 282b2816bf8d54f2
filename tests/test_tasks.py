"""Task bodies through `.fn()` (no engine): real Parquet files in a fresh data folder, the tiny model."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from rlhf_core.config import DataConfig, GenerationConfig, KLConfig, LossConfig, OptimConfig, RewardSpec, RuntimeConfig
from rlhf_core.config.training import GRPOUpdateArgs, LogprobPass, TrainingSetup
from rlhf_core.data import DatasetError
from tasks.advantages import compute_advantages
from tasks.data import epoch_order, load_prompt_dataset, sample_prompts
from tasks.grpo import update_policy
from tasks.models import resolve_model
from tasks.refs import ArtifactRef, CheckpointRef, publish
from tasks.rollouts import generate_rollouts, row_seed
from tasks.scoring import RewardSources, reward_column, score_rollouts
from tasks.train import prune_checkpoints


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def dataset(rlhf_home, tmp_path) -> ArtifactRef:
    rows = [{"question": f"Calculate {a} + 1.", "answer": a + 1} for a in range(10)]
    config = DataConfig(path=str(write_jsonl(tmp_path / "prompts.jsonl", rows)), prompt_column="question")
    return load_prompt_dataset.fn(config, "unused-hash")


def test_load_prompt_dataset_maps_columns_and_numbers_rows(dataset):
    df = dataset.read()
    assert list(df.columns) == ["prompt_id", "prompt", "prompt_messages", "answer"]
    assert df["prompt_id"].tolist() == list(range(10))
    assert df.loc[3, "prompt"] == "Calculate 3 + 1." and df.loc[3, "answer"] == 4
    assert dataset.rows == 10 and dataset.path.endswith(f"{dataset.sha256[:16]}.parquet")


def test_load_prompt_dataset_names_file_line_and_field(rlhf_home, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "answer": 1}, {"prompt": "", "answer": 2}])
    with pytest.raises(DatasetError, match=r"bad\.jsonl line 2: field 'prompt'"):
        load_prompt_dataset.fn(DataConfig(path=str(path)), "x")
    assert not (rlhf_home / "artifacts").exists()  # nothing half-written


def test_epoch_order_covers_each_epoch_once_and_is_seeded():
    first_epoch = epoch_order(10, 10, 0, seed=3)
    assert sorted(first_epoch) == list(range(10))
    # iteration 2 of 4 prompts spans the end of epoch 0 and the start of epoch 1
    spanning = epoch_order(10, 4, 8, seed=3)
    assert spanning[:2].tolist() == first_epoch[8:].tolist()
    assert spanning[2:].tolist() == epoch_order(10, 2, 10, seed=3).tolist()
    assert not np.array_equal(epoch_order(10, 10, 0, seed=4), first_epoch)


def test_sample_prompts_is_deterministic_per_iteration(dataset):
    a = sample_prompts.fn(dataset, 4, iteration=1, seed=0)
    b = sample_prompts.fn(dataset, 4, iteration=1, seed=0)
    c = sample_prompts.fn(dataset, 4, iteration=0, seed=0)
    assert a == b  # same content -> same content-addressed file
    assert set(a.read()["prompt_id"]).isdisjoint(c.read()["prompt_id"])  # positions 0-7: one epoch, no repeats


def test_row_seed_depends_on_every_part():
    seeds = {row_seed(0, 0, 0, 0), row_seed(1, 0, 0, 0), row_seed(0, 1, 0, 0), row_seed(0, 0, 1, 0),
             row_seed(0, 0, 0, 1)}
    assert len(seeds) == 5 and all(0 <= s < 2**63 for s in seeds)


@pytest.fixture
def rollouts(dataset, tiny_model_dir) -> ArtifactRef:
    prompts = sample_prompts.fn(dataset, 3, iteration=0, seed=0)
    policy = resolve_model.fn(str(tiny_model_dir))
    generation = GenerationConfig(group_size=4, max_new_tokens=6, temperature=1.0)
    return generate_rollouts.fn(policy, prompts, generation, RuntimeConfig(), None, seed=0, iteration=0)


def test_generate_rollouts_writes_groups_with_ids_and_logprobs(rollouts):
    df = rollouts.read()
    assert len(df) == 12
    assert df["group_id"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert df["sample_index"].tolist() == [0, 1, 2, 3] * 3
    for _, row in df.iterrows():
        assert 1 <= len(row["response_ids"]) <= 6
        assert len(row["sampling_logprobs"]) == len(row["response_ids"]) == row["response_length"]
        assert all(lp <= 0 for lp in row["sampling_logprobs"])
        assert row["finished"] == (row["response_ids"][-1] == 2)  # EOS (<|im_end|>) ends finished rows


def test_score_rollouts_adds_weighted_rewards_and_reference_logprobs(rollouts, tiny_model_dir):
    df = rollouts.read()
    df.loc[0, "response"] = f"{df.loc[0, 'answer']}"  # make row 0 correct
    rollouts = publish(df, "rollouts")
    specs = [RewardSpec(function="arithmetic_answer", weight=2.0), RewardSpec(function="response_length", weight=1.0)]
    reference = resolve_model.fn(str(tiny_model_dir))
    sources = RewardSources(specs=specs, fingerprints=["fp1", "fp2"], models=[None, None], extra_columns=["answer"])
    scored = score_rollouts.fn(rollouts, sources, reference, LogprobPass(temperature=1.0, micro_batch_size=4,
                                                                          chunk_size=64), RuntimeConfig())
    out = scored.read()
    correct, length = out[reward_column("arithmetic_answer")], out[reward_column("response_length")]
    assert correct[0] == 1.0
    np.testing.assert_allclose(out["rewards"], 2.0 * correct + length)
    # the reference is the policy itself, so its log-probs equal the sampling log-probs
    for ref, sampled in zip(out["ref_logprobs"], out["sampling_logprobs"]):
        np.testing.assert_allclose(ref, sampled, atol=1e-4)


def test_compute_advantages_normalises_within_groups(rlhf_home):
    df = pd.DataFrame({"group_id": [0, 0, 0, 0, 1, 1], "rewards": [1.0, 0.0, 0.0, 0.0, 2.0, 2.0]})
    out = compute_advantages.fn(publish(df, "scored"), "grpo").read()
    # group 0: mean 0.25, unbiased std 0.5; group 1: all equal -> 0
    np.testing.assert_allclose(out["advantages"], [1.5, -0.5, -0.5, -0.5, 0.0, 0.0], atol=1e-5)
    dr = compute_advantages.fn(publish(df, "scored"), "dr_grpo").read()
    np.testing.assert_allclose(dr["advantages"], [0.75, -0.25, -0.25, -0.25, 0.0, 0.0])


def test_update_policy_writes_a_new_checkpoint_and_metrics(rollouts, tiny_model_dir, rlhf_home):
    df = rollouts.read().assign(advantages=np.linspace(-1, 1, 12), rewards=0.0)
    policy = resolve_model.fn(str(tiny_model_dir))
    args = GRPOUpdateArgs(loss=LossConfig(), kl=KLConfig(), optim=OptimConfig(lr=1e-3, micro_batch_size=5,
                                                                              mini_batches=2),
                          temperature=1.0, max_new_tokens=6, seed=0)
    result = update_policy.fn(policy, publish(df, "advantages"), args, TrainingSetup(runtime=RuntimeConfig()))
    assert result.checkpoint.sha256 != policy.sha256
    assert result.checkpoint.path.startswith(str(rlhf_home / "checkpoints"))
    metrics = result.metrics.read()
    assert len(metrics) == 2  # two mini-batches -> two optimizer steps
    assert {"loss/policy", "policy/entropy", "policy/grad_norm", "policy/clip_frac_low"} <= set(metrics.columns)
    again = resolve_model.fn(result.checkpoint.path)
    assert again.sha256 == result.checkpoint.sha256  # the ref's hash is the folder's content hash


def test_prune_checkpoints_keeps_the_newest_and_never_touches_other_folders(rlhf_home, tmp_path):
    user_model = tmp_path / "my-model"
    produced = [CheckpointRef(path=str(user_model), sha256="u")]
    for name in ["a", "b", "c"]:
        (rlhf_home / "checkpoints" / name).mkdir(parents=True)
        produced.append(CheckpointRef(path=str(rlhf_home / "checkpoints" / name), sha256=name))
    user_model.mkdir()
    prune_checkpoints(produced, keep=2)
    assert sorted(p.name for p in (rlhf_home / "checkpoints").iterdir()) == ["b", "c"]
    assert user_model.is_dir()


def test_model_cache_shares_readers_and_hands_trainers_their_own_copy(tiny_model_dir):
    from tasks.runtime import MODELS, load_actor_critic, load_model

    ref = resolve_model.fn(str(tiny_model_dir))
    runtime = RuntimeConfig()
    reader, _ = load_model(ref, runtime)
    assert load_model(ref, runtime)[0] is reader  # the second stage reads no file
    trainer, _ = load_model(ref, runtime, for_training=True)
    assert trainer is reader and not MODELS.entries  # taken out: nothing cached can drift from its checkpoint
    with torch.no_grad():
        trainer.get_input_embeddings().weight.add_(1.0)
    fresh, _ = load_model(ref, runtime)
    assert fresh is not trainer  # the next reader gets the checkpoint's weights again
    assert not torch.equal(fresh.get_input_embeddings().weight, trainer.get_input_embeddings().weight)
    actor_critic, _ = load_actor_critic(ref, runtime, critic="separate")
    assert actor_critic.critic is not actor_critic.policy


def test_consecutive_updates_reuse_the_model_and_optimizer_in_memory(rollouts, tiny_model_dir, rlhf_home):
    from tasks.runtime import MODELS

    sources = RewardSources(specs=[RewardSpec(function="response_length")], fingerprints=[None], models=[None])
    scored = score_rollouts.fn(rollouts, sources, None, LogprobPass(temperature=1.0, micro_batch_size=4,
                                                                     chunk_size=1024), RuntimeConfig())
    batch = compute_advantages.fn(scored, "grpo")
    policy = resolve_model.fn(str(tiny_model_dir))
    setup = TrainingSetup(runtime=RuntimeConfig())

    def args(seed: int) -> GRPOUpdateArgs:
        return GRPOUpdateArgs(loss=LossConfig(), kl=KLConfig(), optim=OptimConfig(lr=1e-3, micro_batch_size=4),
                              temperature=1.0, max_new_tokens=6, seed=seed)

    first = update_policy.fn(policy, batch, args(0), setup)
    (key,) = MODELS.entries
    assert key[0] == first.checkpoint.sha256 and MODELS.entries[key][2] is not None  # model + optimizer kept
    in_memory = update_policy.fn(first.checkpoint, batch, args(1), setup)
    MODELS.entries.clear()
    from_disk = update_policy.fn(first.checkpoint, batch, args(1), setup)
    assert in_memory.checkpoint.sha256 == from_disk.checkpoint.sha256  # bit for bit the same training
