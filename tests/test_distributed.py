"""The update under torch.distributed: 2 CPU processes under torchrun (gloo), DDP and FSDP, give the weights and
optimizer state of one process on the same batch; the helpers' row bookkeeping checked by hand."""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from tolerance import (FACTOR, assert_bound_is_meaningful, assert_close_to_reference, float32_floor, norm_of,
                       norm_of_difference, relative_difference, relative_update_difference)

from rlhf_core.checkpoint import OPTIMIZER_FILE
from rlhf_core.config import (KLConfig, LoraConfig, LossConfig, OfflineOptimConfig, OptimConfig, RuntimeConfig,
                              ValueConfig)
from rlhf_core.config.training import (DPOUpdateArgs, GRPOUpdateArgs, KTOUpdateArgs, LogprobPass, PPOUpdateArgs,
                                       RewardModelUpdateArgs, TrainingSetup, UpdateArgs)
from rlhf_core.distributed import decoder_layers
from rlhf_core.lora import ADAPTER_WEIGHTS_FILE, adapter_folder
from rlhf_core.training import train
from rlhf_core.update import NonFiniteError
from rlhf_core.value_head import CRITIC_DIR, VALUE_HEAD_FILE
from tasks.distributed import torchrun_command
from tasks.refs import ArtifactRef, CheckpointRef
from tasks.train import train_stage

pytestmark = pytest.mark.slow

ROWS = 16
# 2 epochs x 2 mini-batches = 4 steps; a mini-batch of 8 rows is 4 per rank, cut into micro-batches of 3 and 1:
# gradient accumulation, the skipped sync of the first micro-batch and the old-log-prob pass are all exercised
OPTIM = OptimConfig(lr=1e-3, epochs=2, mini_batches=2, micro_batch_size=3)
GRPO_ARGS = GRPOUpdateArgs(loss=LossConfig(), kl=KLConfig(coef=0.05), optim=OPTIM, temperature=1.0,
                           max_new_tokens=8, seed=3)
PPO_ARGS = PPOUpdateArgs(loss=LossConfig(), value=ValueConfig(vf_coef=0.5, head_lr=1e-2), optim=OPTIM,
                         temperature=1.0, max_new_tokens=8, seed=3)
# the offline epochs: 4 rows per step, one per micro-batch
EPOCH_OPTIM = OfflineOptimConfig(lr=1e-3, batch_size=4, micro_batch_size=1, max_grad_norm=1.0)


def with_micro_batches(args: UpdateArgs, size: int) -> UpdateArgs:
    """The self-reference: the same update with another micro-batch split (another float32 summation order)."""
    return args.model_copy(update={"optim": args.optim.model_copy(update={"micro_batch_size": size})})


def rollouts(vocab_size: int, seed: int = 0) -> pd.DataFrame:
    """A scored rollout table: ragged prompts and responses, advantages and reference log-probs."""
    rng = random.Random(seed)
    rows = []
    for _ in range(ROWS):
        prompt = [rng.randrange(3, vocab_size) for _ in range(rng.randint(2, 6))]
        response = [rng.randrange(3, vocab_size) for _ in range(rng.randint(1, 8))]
        per_token = {name: [rng.uniform(low, high) for _ in response] for name, low, high in [
            ("ref_logprobs", -12.0, -9.0), ("old_logprobs", -12.0, -9.0), ("old_values", -0.5, 0.5),
            ("token_advantages", -1.5, 1.5), ("returns", -1.0, 1.0)]}
        rows.append({"prompt_ids": prompt, "response_ids": response, "advantages": rng.uniform(-1.5, 1.5),
                     **per_token})
    return pd.DataFrame(rows)


def one_process(start: CheckpointRef, df: pd.DataFrame, args: UpdateArgs, root,
                lora: LoraConfig | None = None) -> CheckpointRef:
    """The training stage in this process, read from and written to disk (no model kept in memory)."""
    trained = train(Path(start.path), df, args, TrainingSetup(runtime=RuntimeConfig(), lora=lora), "cpu", root)
    return CheckpointRef(path=str(trained.path), sha256=trained.sha256)


def weights(ref: CheckpointRef) -> dict[str, torch.Tensor]:
    """The checkpoint's trained weights: the full (or merged) model, else its LoRA adapter."""
    full = Path(ref.path) / "model.safetensors"
    return load_file(full if full.is_file() else adapter_folder(ref.path) / ADAPTER_WEIGHTS_FILE)


def critic_weights(ref: CheckpointRef) -> dict[str, torch.Tensor]:
    return load_file(Path(ref.path) / CRITIC_DIR / "model.safetensors")


def value_head(ref: CheckpointRef) -> dict[str, torch.Tensor]:
    return load_file(f"{ref.path}/{VALUE_HEAD_FILE}")


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def adam_moments(ref: CheckpointRef) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(f"{ref.path}/{OPTIMIZER_FILE}").items() if not k.endswith(".step")}


def start_of(name: str, trained: torch.Tensor, start: dict[str, torch.Tensor]) -> torch.Tensor:
    """A trained tensor's value before training: the start's tensor of that name, or of that name less the task
    model's prefix (a BERT backbone's `embeddings.*` is its classifier's `bert.embeddings.*`), or zeros for a new
    head."""
    unprefixed = name.split(".", 1)[-1]
    return start.get(name, start.get(unprefixed, torch.zeros_like(trained)))


def update_share_check(name: str, read, single: CheckpointRef, start: CheckpointRef):
    """(name, difference of a checkpoint from `single` as a share of the update from `start`, its float32 floor)
    for the weights `read` returns; a tensor the start lacks (a new score head, a fresh adapter) counts from
    zero."""
    trained, start_weights = read(single), weights(start)
    initial = {k: start_of(k, v, start_weights) for k, v in trained.items()}
    return (f"{name}, share of the update", lambda ref: relative_update_difference(read(ref), trained, initial),
            float32_floor(1.0, ulps=1) * norm_of(trained) / norm_of_difference(trained, initial))


def assert_checkpoint_matches(multi: CheckpointRef, single: CheckpointRef, other: CheckpointRef,
                              start: CheckpointRef, what: str, head: bool = False, critic: bool = False) -> float:
    """A 2-process checkpoint equals the 1-process one within FACTOR x the 1-process run's own difference under
    another micro-batch split (`other`): the weights (and a separate critic's, which starts as a copy of the
    policy) as a share of the update, the value head if any, and Adam's moments.
    -> the largest bound"""
    checks = [update_share_check("weights", weights, single, start),
              ("Adam moments, relative", lambda ref: relative_difference(adam_moments(ref), adam_moments(single)),
               float32_floor(1.0))]
    if head:
        checks.append(("value head, relative", lambda ref: relative_difference(value_head(ref), value_head(single)),
                       float32_floor(1.0)))
    if critic:
        checks.append(update_share_check("critic", critic_weights, single, start))
    bounds = []
    for name, difference_from_single, floor in checks:
        label = f"{what}, {name}"
        bound = assert_close_to_reference(difference_from_single(multi), difference_from_single(other), label,
                                          floor=floor)
        assert_bound_is_meaningful(bound, 1.0, label)  # a rank's share counted twice moves it by ~1/2
        bounds.append(bound)
    return max(bounds)


def assert_chains_match(singles, others, multis, start: CheckpointRef, what: str, head: bool = False,
                        critic: bool = False) -> str:
    """`assert_checkpoint_matches` update by update. -> the bounds in words, for the test's record"""
    bound = max(assert_checkpoint_matches(multi, single, other, start, f"{what}, update {step}", head, critic)
                for step, (single, other, multi) in enumerate(zip(singles, others, multis), start=1))
    return f"{FACTOR:g}x one process's own micro-batch-split difference (here {bound:.2g} of the update)"


@pytest.fixture
def policy_and_batch(tiny_model_dir, rlhf_home, tmp_path):
    from rlhf_core.io import sha256_dir

    df = rollouts(vocab_size=49152)
    path = tmp_path / "batch.parquet"
    df.to_parquet(path)
    policy = CheckpointRef(path=str(tiny_model_dir), sha256=sha256_dir(tiny_model_dir))
    return policy, ArtifactRef(path=str(path), sha256="-", rows=len(df)), df


def two_process_setup(strategy: str, lora: LoraConfig | None = None) -> TrainingSetup:
    return TrainingSetup(runtime=RuntimeConfig(num_processes=2, distributed=strategy, num_threads=1), lora=lora)


def chained_updates(args: UpdateArgs, other_split: UpdateArgs, policy, batch, df, strategy: str, root,
                    lora: LoraConfig | None = None):
    """Two updates in a row, each from the previous checkpoint: in one process, in one process with another
    micro-batch split (the self-reference) and through the train stage under torchrun with 2 ranks.
    -> ([one-process checkpoints], [other-split checkpoints], [2-process checkpoints], the last 2-process result)"""
    def chain(run_one) -> list[CheckpointRef]:
        first = run_one(policy)
        return [first, run_one(first)]

    singles = chain(lambda start: one_process(start, df, args, root, lora))
    others = chain(lambda start: one_process(start, df, other_split, root, lora))
    setup = two_process_setup(strategy, lora)
    multi_1 = train_stage(policy, batch, args, setup, "update-metrics", "update").checkpoint
    result = train_stage(multi_1, batch, args, setup, "update-metrics", "update")
    return singles, others, [multi_1, result.checkpoint], result


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_over_two_chained_updates(strategy, policy_and_batch, tmp_path, reliability):
    """Two updates in a row (the second resumes Adam's state from the first's checkpoint): 2 ranks give the
    weights and Adam moments of 1 process, and a checkpoint a 2-rank run wrote resumes in either."""
    policy, batch, df = policy_and_batch
    singles, others, multis, result = chained_updates(GRPO_ARGS, with_micro_batches(GRPO_ARGS, 1), policy, batch,
                                                      df, strategy, tmp_path / "single")
    assert max_difference(weights(singles[-1]), weights(policy)) > 1e-3  # the update moved the weights
    within = assert_chains_match(singles, others, multis, policy, f"GRPO {strategy}")
    assert float(load_file(f"{multis[-1].path}/{OPTIMIZER_FILE}")["0.step"]) == 8.0  # the second continued the count
    # the metrics are global: the summed per-micro-batch losses of both ranks, one row per optimizer step
    metrics = result.metrics.read()
    assert len(metrics) == 4 and metrics["policy/grad_norm"].gt(0).all()
    reliability.record("2 CPU processes (torchrun, gloo)", f"GRPO update, {strategy.upper()}, 2 chained updates",
                       f"weights and Adam state equal one process within {within}", "n/a")


def test_the_bound_catches_one_ranks_rows_counted_twice(policy_and_batch, tmp_path):
    """The mutation check of the tests above: an update whose loss counts half the rows twice (as a rank whose
    share was added twice would) lies far outside the bound that one process's own split difference gives."""
    policy, _, df = policy_and_batch
    doubled = df.assign(advantages=[a * (2 if i % 2 else 1) for i, a in enumerate(df["advantages"])])
    single = one_process(policy, df, GRPO_ARGS, tmp_path / "single")
    other = one_process(policy, df, with_micro_batches(GRPO_ARGS, 1), tmp_path / "other")
    wrong = one_process(policy, doubled, GRPO_ARGS, tmp_path / "wrong")
    start = weights(policy)
    self_difference = relative_update_difference(weights(other), weights(single), start)
    mistake = relative_update_difference(weights(wrong), weights(single), start)
    with pytest.raises(AssertionError, match="difference .* > bound .* self-difference"):
        assert_close_to_reference(mistake, self_difference, "rows counted twice")
    assert mistake > 100 * FACTOR * self_difference


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_ppo_two_processes_match_one_over_two_chained_updates(strategy, policy_and_batch, tmp_path, reliability):
    """PPO's actor-critic (shared backbone + value head at its own learning rate) under torchrun: the policy
    weights, the value head and Adam's state equal one process's after two chained updates."""
    policy, _, df = policy_and_batch
    df = df.drop(columns="advantages").rename(columns={"token_advantages": "advantages"})
    path = tmp_path / "ppo-batch.parquet"
    df.to_parquet(path)
    batch = ArtifactRef(path=str(path), sha256="-", rows=len(df))
    singles, others, multis, result = chained_updates(PPO_ARGS, with_micro_batches(PPO_ARGS, 1), policy, batch, df,
                                                      strategy, tmp_path / "single")
    assert max_difference(weights(singles[-1]), weights(policy)) > 1e-3
    assert float(value_head(singles[-1])["weight"].abs().max()) > 1e-3  # the zero-initialised head trained
    within = assert_chains_match(singles, others, multis, policy, f"PPO {strategy}", head=True)
    metrics = result.metrics.read()
    assert len(metrics) == 4 and metrics["loss/value"].gt(0).all()
    reliability.record("2 CPU processes (torchrun, gloo)", f"PPO update, {strategy.upper()}, 2 chained updates",
                       f"policy, value head and Adam state equal one process within {within}", "n/a")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_ppo_separate_critic_two_processes_match_one(strategy, policy_and_batch, tmp_path, reliability):
    """PPO with value.critic: separate (a second backbone, copied from the policy on first use, plus the value
    head) under torchrun: policy, critic, value head and Adam's state equal one process's after two updates."""
    policy, _, df = policy_and_batch
    df = df.drop(columns="advantages").rename(columns={"token_advantages": "advantages"})
    path = tmp_path / "ppo-batch.parquet"
    df.to_parquet(path)
    batch = ArtifactRef(path=str(path), sha256="-", rows=len(df))
    args = PPO_ARGS.model_copy(update={"value": PPO_ARGS.value.model_copy(update={"critic": "separate"})})
    singles, others, multis, _ = chained_updates(args, with_micro_batches(args, 1), policy, batch, df, strategy,
                                                 tmp_path / "single")
    assert max_difference(critic_weights(singles[-1]), weights(policy)) > 1e-3  # the critic trained
    assert max_difference(critic_weights(singles[-1]), weights(singles[-1])) > 1e-3  # apart from the policy
    within = assert_chains_match(singles, others, multis, policy, f"PPO separate critic {strategy}", head=True,
                                 critic=True)
    reliability.record("2 CPU processes (torchrun, gloo)", f"PPO update, separate critic, {strategy.upper()}",
                       f"policy, critic, value head and Adam state equal one process within {within}", "n/a")


# 13 pairs in mini-batches of 4 -> 4 mini-batches of 4, 3, 3, 3 pairs; micro-batches of 1: rank 1 holds one
# pair of a 3-pair mini-batch and runs one padding pass while rank 0 runs its second pair
DPO_ARGS = DPOUpdateArgs(epoch=0, optim=EPOCH_OPTIM, seed=5,
                         loss_type="sigmoid", beta=0.1, label_smoothing=0.0, simpo_gamma=0.5, rpo_alpha=None)


def assert_counts_of_pairs(accuracies: pd.Series) -> None:
    """Per-step accuracies summed over the ranks are shares of each mini-batch's pairs (4, 3, 3, 3 of 13): the
    padding passes added nothing."""
    sizes = [4, 3, 3, 3]
    counts = accuracies.to_numpy() * sizes
    assert len(accuracies) == 4 and abs(counts - counts.round()).max() < 1e-6
    assert (counts.round() >= 0).all() and (counts.round() <= sizes).all()


def pairs(vocab_size: int, num_pairs: int = 13, seed: int = 0) -> pd.DataFrame:
    rng = random.Random(seed)

    def ids(low: int, high: int) -> list[int]:
        return [rng.randrange(3, vocab_size) for _ in range(rng.randint(low, high))]

    return pd.DataFrame([{"prompt_ids": ids(2, 6), "chosen_ids": ids(1, 8), "rejected_ids": ids(1, 8),
                          "ref_chosen_logps": rng.uniform(-60, -20), "ref_rejected_logps": rng.uniform(-60, -20)}
                         for _ in range(num_pairs)])


KTO_ARGS = KTOUpdateArgs(epoch=0, optim=EPOCH_OPTIM, seed=5, beta=0.1,
                         desirable_weight=1.0, undesirable_weight=1.33)


def examples(vocab_size: int, num_examples: int = 13) -> pd.DataFrame:
    """Tokenized KTO examples; the mismatched reference log-probs are far below the policy's, so the reference
    point z0 (the mean log-ratio, clamped at 0) is positive and every row of it counts."""
    rng = random.Random(1)

    def ids(low: int, high: int) -> list[int]:
        return [rng.randrange(3, vocab_size) for _ in range(rng.randint(low, high))]

    return pd.DataFrame([{"prompt_ids": ids(2, 6), "completion_ids": ids(1, 8), "mismatched_ids": ids(1, 8),
                          "label": rng.random() < 0.5, "ref_logps": rng.uniform(-60, -20),
                          "ref_mismatched_logps": rng.uniform(-300, -200)} for _ in range(num_examples)])


def kto_reference_point_was_positive(metrics: pd.DataFrame) -> None:
    assert (metrics["kl"] > 0).all()  # z0 > 0 in every step: the padded reference-point passes mattered


# algorithm -> (tokenized table, update args, a check of the 2-process metrics)
OFFLINE = {
    "dpo": (pairs, DPO_ARGS, lambda metrics: assert_counts_of_pairs(metrics["rewards/accuracies"])),
    "kto": (examples, KTO_ARGS, kto_reference_point_was_positive),
}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("algorithm", ["dpo", "kto"])
def test_offline_epochs_with_uneven_mini_batches_match_one_process(algorithm, strategy, policy_and_batch, tmp_path,
                                                                   reliability):
    """DPO's and KTO's epochs under torchrun, 13 rows in mini-batches of 4, 3, 3, 3: a rank with fewer rows runs
    padding passes (KTO's reference-point passes too); two chained epochs give one process's weights and Adam."""
    policy, _, _ = policy_and_batch
    table, args, check_metrics = OFFLINE[algorithm]
    df = table(vocab_size=49152)
    path = tmp_path / f"{algorithm}.parquet"
    df.to_parquet(path)
    batch = ArtifactRef(path=str(path), sha256="-", rows=len(df))
    singles, others, multis, result = chained_updates(args, with_micro_batches(args, 4), policy, batch, df,
                                                      strategy, tmp_path / "single")
    assert max_difference(weights(singles[-1]), weights(policy)) > 1e-3
    within = assert_chains_match(singles, others, multis, policy, f"{algorithm} {strategy}")
    assert float(load_file(f"{multis[-1].path}/{OPTIMIZER_FILE}")["0.step"]) == 8.0
    check_metrics(result.metrics.read())
    reliability.record("2 CPU processes (torchrun, gloo)",
                       f"{algorithm.upper()} epoch, {strategy.upper()}, uneven mini-batches",
                       f"weights and Adam state equal one process within {within}", "n/a")


LORA = LoraConfig(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"])


@pytest.mark.parametrize("algorithm, save, strategy", [("grpo", "adapter", "ddp"), ("grpo", "adapter", "fsdp"),
                                                       ("dpo", "merged", "ddp"), ("dpo", "merged", "fsdp")])
def test_lora_two_processes_match_one(algorithm, save, strategy, policy_and_batch, tmp_path, reliability):
    """LoRA under torchrun: a fresh adapter (drawn from the update's seed, so the same in every process) trained
    for two chained updates, the second continuing the saved adapter, gives one process's adapter-only or merged
    weights and Adam state."""
    policy, batch, df = policy_and_batch
    if algorithm == "dpo":
        df = pairs(vocab_size=49152)
        path = tmp_path / "pairs.parquet"
        df.to_parquet(path)
        batch = ArtifactRef(path=str(path), sha256="-", rows=len(df))
    args, other_split = {"grpo": (GRPO_ARGS, with_micro_batches(GRPO_ARGS, 1)),
                         "dpo": (DPO_ARGS, with_micro_batches(DPO_ARGS, 4))}[algorithm]
    lora = LORA.model_copy(update={"save": save})
    singles, others, multis, _ = chained_updates(args, other_split, policy, batch, df, strategy,
                                                 tmp_path / "single", lora)
    for checkpoint in singles + multis:
        assert (adapter_folder(checkpoint.path) / ADAPTER_WEIGHTS_FILE).is_file()
        assert (Path(checkpoint.path) / "model.safetensors").is_file() == (save == "merged")
    assert max_difference(weights(singles[-1]), weights(singles[0])) > 1e-5  # the second update moved them
    within = assert_chains_match(singles, others, multis, policy, f"{algorithm} LoRA {save} {strategy}")
    reliability.record("2 CPU processes (torchrun, gloo)",
                       f"{algorithm.upper()} with LoRA ({save}), {strategy.upper()}, 2 chained updates",
                       f"{'merged weights' if save == 'merged' else 'adapter'} and Adam state equal one process "
                       f"within {within}", "n/a")


RM_ARGS = RewardModelUpdateArgs(epoch=0, optim=EPOCH_OPTIM, seed=5,
                                max_length=32, center_coef=0.01)


def text_pairs(num_pairs: int = 13) -> pd.DataFrame:
    rng = random.Random(0)
    words = ["good", "bad", "fine", "awful", "great", "slow", "kind", "rude", "warm", "cold"]
    return pd.DataFrame([{"prompt": f"Review place {i}.", "chosen": " ".join(rng.choices(words, k=rng.randint(1, 6))),
                          "rejected": " ".join(rng.choices(words, k=rng.randint(1, 6)))} for i in range(num_pairs)])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_reward_model_epochs_match_one_process(strategy, policy_and_batch, tmp_path, reliability):
    """The reward model's epochs under torchrun, from a causal LM backbone (a new, seeded score head on every
    rank): two chained epochs of uneven mini-batches give the classifier and Adam state of one process."""
    backbone, _, _ = policy_and_batch
    df = text_pairs()
    path = tmp_path / "text-pairs.parquet"
    df.to_parquet(path)
    batch = ArtifactRef(path=str(path), sha256="-", rows=len(df))
    singles, others, multis, result = chained_updates(RM_ARGS, with_micro_batches(RM_ARGS, 4), backbone, batch, df,
                                                      strategy, tmp_path / "single")
    assert "score.weight" in weights(singles[0]) and "score.weight" not in weights(backbone)
    assert max_difference(weights(singles[-1]), weights(singles[0])) > 1e-3
    within = assert_chains_match(singles, others, multis, backbone, f"reward model {strategy}")
    assert_counts_of_pairs(result.metrics.read()["reward_model/accuracy"])
    reliability.record("2 CPU processes (torchrun, gloo)", f"reward model epoch, {strategy.upper()}",
                       f"weights and Adam state equal one process within {within}", "n/a")


def test_nan_in_one_rank_stops_with_the_original_error(policy_and_batch):
    policy, batch, df = policy_and_batch
    bad = df.copy()
    bad.loc[1, "advantages"] = float("nan")  # row 1: rank 1's share
    path = batch.path.replace("batch.parquet", "bad.parquet")
    bad.to_parquet(path)
    with pytest.raises(NonFiniteError, match="rank 1 failed.*loss"):
        train_stage(policy, ArtifactRef(path=path, sha256="-", rows=ROWS), GRPO_ARGS, two_process_setup("ddp"),
                    "update-metrics", "update")


def test_decoder_layers_are_the_no_split_modules(tiny_model):
    model, _ = tiny_model
    layers = decoder_layers(model)
    assert layers == list(model.model.layers) and len(layers) == 2


def test_torchrun_command_uses_a_free_local_port(tmp_path):
    command = torchrun_command(4, tmp_path / "job.json")
    assert "--standalone" in command and "--nproc_per_node=4" in command
    assert command[-2:] == ["rlhf_core.distributed_worker", str(tmp_path / "job.json")]


def test_configs_refuse_only_what_cannot_split_evenly():
    from pydantic import ValidationError

    from rlhf_core.config import DPOConfig, GRPOConfig, KTOConfig, PPOConfig, RewardModelConfig

    GRPOConfig(runtime={"num_processes": 2}, prompts_per_iteration=4, generation={"group_size": 2},
               optim={"mini_batches": 2})  # 8 rows = 2 mini-batches x 2 ranks x 2 rows
    with pytest.raises(ValidationError, match="9 responses per update .* do not split evenly"):
        GRPOConfig(runtime={"num_processes": 2}, prompts_per_iteration=3, generation={"group_size": 3})
    PPOConfig(runtime={"num_processes": 2}, prompts_per_iteration=4, generation={"group_size": 2},
              optim={"mini_batches": 2})
    PPOConfig(runtime={"num_processes": 2}, prompts_per_iteration=4, generation={"group_size": 2},
              value={"critic": "separate"})
    PPOConfig(runtime={"num_processes": 2}, prompts_per_iteration=3, generation={"group_size": 3})  # padding passes
    DPOConfig(runtime={"num_processes": 2})
    for config in (RewardModelConfig, KTOConfig):
        config(runtime={"num_processes": 2})


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_scoring_passes_under_torchrun_match_one_process(strategy, tiny_model_dir, tokenizer_dir, rlhf_home,
                                                         tmp_path, reliability):
    """The scoring stage with 2 processes: reference log-probs and a reward model's scores computed by the ranks
    (7 rows: uneven, the last row repeated for rank 1 and dropped) equal one process's."""
    from transformers import AutoModelForSequenceClassification

    from rlhf_core.config import RewardSpec
    from rlhf_core.io import sha256_dir
    from rlhf_core.models import load_tokenizer
    from tiny_models import tiny_llama_config
    from tasks.scoring import RewardSources, scored_frame

    tokenizer, _ = load_tokenizer(tokenizer_dir)
    torch.manual_seed(1)
    reward_dir = tmp_path / "reward-model"
    AutoModelForSequenceClassification.from_config(tiny_llama_config(
        len(tokenizer), pad_token_id=tokenizer.pad_token_id, num_labels=1)).save_pretrained(reward_dir)
    tokenizer.save_pretrained(reward_dir)
    df = rollouts(vocab_size=len(tokenizer)).head(7)[["prompt_ids", "response_ids"]]
    df = df.assign(prompt=tokenizer.batch_decode(df["prompt_ids"].tolist()),
                   response=tokenizer.batch_decode(df["response_ids"].tolist()))
    rewards = [RewardSpec(function="response_length"), RewardSpec(model=str(reward_dir), weight=0.5)]
    refs = [None, CheckpointRef(path=str(reward_dir), sha256=sha256_dir(reward_dir))]
    reference = CheckpointRef(path=str(tiny_model_dir), sha256=sha256_dir(tiny_model_dir))

    sources = RewardSources(specs=rewards, fingerprints=[None, None], models=refs)

    def score(runtime: RuntimeConfig, micro_batch_size: int = 2) -> pd.DataFrame:
        logprobs = LogprobPass(temperature=0.7, micro_batch_size=micro_batch_size, chunk_size=1024)
        return scored_frame(df.copy(), sources, reference, logprobs, runtime)

    one, other_split = score(RuntimeConfig()), score(RuntimeConfig(), micro_batch_size=3)  # other padding
    two = score(RuntimeConfig(num_processes=2, distributed=strategy, num_threads=1))
    assert list(two.columns) == list(one.columns)
    assert two["ref_logprobs"].map(len).tolist() == one["response_ids"].map(len).tolist()
    column = f"reward[{reward_dir}]"
    assert one[column].abs().max() > 1e-3
    for name in (column, "rewards", "ref_logprobs"):
        assert_columns_match(two, one, other_split, name, f"scoring {strategy}")
    reliability.record("2 CPU processes (torchrun, gloo)", f"scoring passes, {strategy.upper()}, 7 rows",
                       f"reference log-probs and reward-model scores equal one process within {FACTOR:g}x its own "
                       "micro-batch-split difference", "n/a")


def column_values(df: pd.DataFrame, column: str) -> torch.Tensor:
    """A float column, or a column of per-token lists flattened, as one float64 tensor."""
    values = df[column].explode() if df[column].map(lambda v: hasattr(v, "__len__")).any() else df[column]
    return torch.tensor(values.astype(float).to_numpy())


def assert_columns_match(two: pd.DataFrame, one: pd.DataFrame, other_split: pd.DataFrame, column: str,
                         what: str) -> None:
    """A no-grad pass's column with 2 processes equals one process's within FACTOR x one process's difference
    from itself with another micro-batch split (floor: a few float32 ulps of the largest value)."""
    reference = column_values(one, column)
    assert len(column_values(two, column)) == len(reference)
    difference = float((column_values(two, column) - reference).abs().max())
    self_difference = float((column_values(other_split, column) - reference).abs().max())
    bound = assert_close_to_reference(difference, self_difference, f"{what}, {column}",
                                      floor=float32_floor(reference))
    assert_bound_is_meaningful(bound, float(reference.abs().max()), f"{what}, {column}")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("algorithm", ["dpo", "kto"])
def test_offline_reference_pass_under_torchrun_matches_one_process(algorithm, strategy, tiny_model_dir, rlhf_home,
                                                                   tmp_path):
    """DPO's and KTO's reference stage with 2 processes: 13 rows (uneven: the last repeated for rank 1 and
    dropped) give one process's summed log-probs per sequence."""
    import tasks.dpo
    import tasks.kto
    from rlhf_core.io import sha256_dir

    stage, table, columns = {
        "dpo": (tasks.dpo.compute_reference_logprobs, pairs, ["ref_chosen_logps", "ref_rejected_logps"]),
        "kto": (tasks.kto.compute_kto_reference_logprobs, examples, ["ref_logps", "ref_mismatched_logps"])}[algorithm]
    df = table(vocab_size=49152).drop(columns=columns)
    path = tmp_path / "tokens.parquet"
    df.to_parquet(path)
    tokens = ArtifactRef(path=str(path), sha256="-", rows=len(df))
    reference = CheckpointRef(path=str(tiny_model_dir), sha256=sha256_dir(tiny_model_dir))
    one = stage.fn(reference, tokens, 2, RuntimeConfig()).read()
    other_split = stage.fn(reference, tokens, 3, RuntimeConfig()).read()
    two = stage.fn(reference, tokens, 2, RuntimeConfig(num_processes=2, distributed=strategy, num_threads=1)).read()
    assert list(two.columns) == list(one.columns) and len(two) == 13
    for column in columns:
        assert one[column].lt(-5).all()
        assert_columns_match(two, one, other_split, column, f"{algorithm} reference {strategy}")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_ppo_value_pass_under_torchrun_matches_one_process(strategy, policy_and_batch, tmp_path):
    """PPO's compute-values stage with 2 processes (7 rows: uneven) on a checkpoint with a trained value head:
    the old log-probs and values of one process."""
    from tasks.ppo import compute_values

    policy, _, df = policy_and_batch
    trained = one_process(policy, df.drop(columns="advantages").rename(columns={"token_advantages": "advantages"}),
                          PPO_ARGS, tmp_path / "single")  # a non-zero value head
    path = tmp_path / "rollouts.parquet"
    df.head(7)[["prompt_ids", "response_ids"]].to_parquet(path)
    rollouts = ArtifactRef(path=str(path), sha256="-", rows=7)

    def values(runtime: RuntimeConfig, micro_batch_size: int = 2) -> pd.DataFrame:
        logprobs = LogprobPass(temperature=0.7, micro_batch_size=micro_batch_size, chunk_size=1024)
        return compute_values.fn(trained, rollouts, "shared", logprobs, runtime, False).read()

    one, other_split = values(RuntimeConfig()), values(RuntimeConfig(), micro_batch_size=3)
    two = values(RuntimeConfig(num_processes=2, distributed=strategy, num_threads=1))
    assert list(two.columns) == list(one.columns)
    for column in ("old_logprobs", "old_values"):
        assert len(column_values(one, column)) == df.head(7)["response_ids"].map(len).sum()
        assert_columns_match(two, one, other_split, column, f"PPO values {strategy}")
    assert one["old_values"].explode().astype(float).abs().max() > 1e-3
