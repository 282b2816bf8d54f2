"""Every training flow with runtime.num_processes=2 through the real Prefect engine, MLflow store and Parquet
files: its update (or epoch) task launches torchrun itself, and the trained model equals the one-process run's.
The update-level comparisons, with tighter tolerances, are in test_distributed.py."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest
from flow_helpers import mlflow_run_of
from safetensors.torch import load_file
from test_distributed import assert_checkpoint_matches, max_difference, value_head, weights
from transformers import AutoModelForSequenceClassification

from rlhf_core.config import KLConfig, RuntimeConfig
from rlhf_core.models import load_tokenizer
from tiny_models import tiny_llama_config
from tasks.refs import CheckpointRef

pytestmark = pytest.mark.slow
OTHER_SPLIT = "1 process, other micro-batches"  # the self-reference whose difference sets each bound


def data_folder(tmp_path, processes: int, micro_batch_size: int):
    """The data folder (RLHF_HOME) of one run of `with_one_and_two_processes`."""
    return tmp_path / f"home-{processes}-{micro_batch_size}"


def with_one_and_two_processes(run_flow, make_config, micro_batch_sizes: tuple[int, int], strategy: str, tmp_path,
                               monkeypatch, check_run=lambda run: None,
                               launch: dict | None = None) -> tuple[dict, dict]:
    """Run a flow with runtime.num_processes 1 and 2 (micro-batches of micro_batch_sizes[0]), and with 1 process
    and micro-batches of micro_batch_sizes[1] as the reference's difference from itself; each in its own data
    folder (and MLflow store: `check_run` reads a run while its store is the current one). `launch`: runtime
    settings of the 2-process run (e.g. the Ray launcher).
    `make_config(runtime, micro_batch_size)` -> the flow's config.
    -> ({1, 2, OTHER_SPLIT: final checkpoint}, {1, 2, OTHER_SPLIT: the run's MLflow run})"""
    finals, runs = {}, {}
    for key, processes, micro_batch_size in [(1, 1, micro_batch_sizes[0]), (2, 2, micro_batch_sizes[0]),
                                             (OTHER_SPLIT, 1, micro_batch_sizes[1])]:
        monkeypatch.setenv("RLHF_HOME", str(data_folder(tmp_path, processes, micro_batch_size)))
        runtime = RuntimeConfig(num_processes=processes, distributed=strategy, num_threads=1,
                                **((launch or {}) if processes == 2 else {}))
        state = run_flow(make_config(runtime, micro_batch_size), return_state=True)
        finals[key] = CheckpointRef(path=state.result(), sha256="-")
        runs[key] = mlflow_run_of(state.state_details.flow_run_id)
        assert runs[key].info.status == "FINISHED"
        assert runs[key].data.params["runtime.num_processes"] == str(processes)
        check_run(runs[key])
    return finals, runs


def assert_two_processes_match_one(finals: dict, start: CheckpointRef, what: str, head: bool = False) -> float:
    """-> the largest bound checked (a share of the update)"""
    return assert_checkpoint_matches(finals[2], finals[1], finals[OTHER_SPLIT], start, what, head)


def test_grpo_flow_with_two_processes_matches_one(prefect_harness, tiny_model_dir, tmp_path, monkeypatch):
    """FSDP; the scoring stage's reference pass runs under torchrun too. The second iteration samples from the
    2-process policy the same tokens as from the 1-process one."""
    from test_flow_grpo import tiny_config

    from flows.grpo import grpo

    def logged_both_iterations(run) -> None:
        history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "policy/grad_norm")
        assert [m.step for m in history] == [0, 1]

    finals, _ = with_one_and_two_processes(grpo, lambda runtime, micro_batch_size: tiny_config(
        tiny_model_dir, kl=KLConfig(coef=0.05), rewards=[{"function": "response_length"}], runtime=runtime,
        optim={"lr": 1e-3, "micro_batch_size": micro_batch_size}), (4, 1), "fsdp", tmp_path, monkeypatch,
        check_run=logged_both_iterations)
    assert max_difference(weights(finals[1]), load_file(f"{tiny_model_dir}/model.safetensors")) > 1e-3
    assert_two_processes_match_one(finals, CheckpointRef(path=str(tiny_model_dir), sha256="-"), "GRPO flow")
    # iteration 0 sampled from the same start model: the same file, content-addressed; iteration 1's files differ
    # in the float sampling log-probs only
    folders = [data_folder(tmp_path, n, micro_batch_size=4) / "artifacts" / "rollouts" for n in (1, 2)]
    names = [{p.name for p in folder.glob("*.parquet")} for folder in folders]
    (shared,) = names[0] & names[1]
    (one,), (two,) = names[0] - {shared}, names[1] - {shared}
    one, two = pd.read_parquet(folders[0] / one), pd.read_parquet(folders[1] / two)
    assert one["response_ids"].map(list).tolist() == two["response_ids"].map(list).tolist()
    assert (one["sampling_logprobs"].explode().astype(float) - two["sampling_logprobs"].explode().astype(float)
            ).abs().max() < 1e-3


def test_ppo_flow_with_two_processes_matches_one(prefect_harness, tiny_model_dir, tmp_path, monkeypatch,
                                                 tokenizer_dir):
    """DDP; a reward function and a reward model, adaptive KL. The checkpoint carries the value head, and policy
    and head equal the one-process run's."""
    from test_flow_ppo import tiny_ppo_config

    from flows.ppo import ppo

    tokenizer, _ = load_tokenizer(tokenizer_dir)
    reward_dir = tmp_path / "reward-model"
    AutoModelForSequenceClassification.from_config(tiny_llama_config(
        len(tokenizer), pad_token_id=tokenizer.pad_token_id, num_labels=1)).save_pretrained(reward_dir)
    tokenizer.save_pretrained(reward_dir)
    finals, _ = with_one_and_two_processes(ppo, lambda runtime, micro_batch_size: tiny_ppo_config(
        tiny_model_dir, reward_dir, runtime=runtime, optim={"lr": 1e-3, "micro_batch_size": micro_batch_size,
                                                            "epochs": 2, "mini_batches": 2}),
        (3, 1), "ddp", tmp_path, monkeypatch)
    assert_two_processes_match_one(finals, CheckpointRef(path=str(tiny_model_dir), sha256="-"), "PPO flow",
                                   head=True)
    assert float(value_head(finals[2])["weight"].abs().max()) > 1e-3


@pytest.mark.parametrize("algorithm, strategy", [("dpo", "fsdp"), ("kto", "ddp"), ("sft", "ddp")])
def test_offline_flow_with_two_processes_matches_one(algorithm, strategy, prefect_harness, tiny_model_dir, tmp_path,
                                                     monkeypatch):
    """DPO on 9 training pairs (3 mini-batches of 3), KTO on 18 training examples (mini-batches of 4 or 3), SFT on
    9 conversations (mini-batches of 4, 4, 1): uneven over 2 ranks; the same trained policy and held-out score as
    one process."""
    import test_flow_dpo
    import test_flow_kto
    import test_flow_sft

    from flows.dpo import dpo
    from flows.kto import kto
    from flows.sft import sft

    run_flow, module, data = {"dpo": (dpo, test_flow_dpo, test_flow_dpo.write_review_pairs(tmp_path / "pairs.jsonl")),
                              "kto": (kto, test_flow_kto, test_flow_kto.write_review_examples(
                                  tmp_path / "unpaired.jsonl")),
                              "sft": (sft, test_flow_sft, test_flow_sft.write_conversations(
                                  tmp_path / "sft.jsonl"))}[algorithm]
    finals, runs = with_one_and_two_processes(run_flow, lambda runtime, micro_batch_size: module.small_config(
        data, tiny_model_dir, runtime=runtime, optim={"micro_batch_size": micro_batch_size}), (2, 1), strategy,
        tmp_path, monkeypatch)
    assert max_difference(weights(finals[1]), load_file(f"{tiny_model_dir}/model.safetensors")) > 1e-3
    assert_two_processes_match_one(finals, CheckpointRef(path=str(tiny_model_dir), sha256="-"),
                                   f"{algorithm} flow")
    held_out = "eval/token_accuracy" if algorithm == "sft" else "eval/rewards/accuracies"
    assert runs[1].data.metrics[held_out] == runs[2].data.metrics[held_out]


def test_reward_model_flow_with_two_processes_matches_one(prefect_harness, tmp_path, monkeypatch):
    """The built-in MiniLM (a BERT encoder: FSDP shards its BertLayer blocks): the trained classifier and its
    held-out accuracy equal the one-process flow's."""
    from test_flow_reward_model import small_config, write_graded_pairs

    from flows.reward_model import reward_model
    from rlhf_core.reward_model import minilm_path

    pairs_file = write_graded_pairs(tmp_path / "pairs.jsonl")
    finals, runs = with_one_and_two_processes(reward_model, lambda runtime, micro_batch_size: small_config(
        pairs_file, runtime=runtime, optim={"micro_batch_size": micro_batch_size}), (16, 4), "fsdp", tmp_path,
        monkeypatch)
    backbone = CheckpointRef(path=str(minilm_path()), sha256="-")
    assert_two_processes_match_one(finals, backbone, "reward-model flow")
    assert runs[1].data.metrics["reward_model/eval_accuracy"] == runs[2].data.metrics["reward_model/eval_accuracy"]
