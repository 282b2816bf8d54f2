"""Ray past one machine, on a real two-node Ray cluster started on this machine (`ray start --head`, then a second
`ray start --address` with its own raylet and 1 CPU each, so a 2-worker job has to span both nodes):
runtime.launcher: ray trains GRPO and DPO on 2 Ray Train workers with the one-process result (the tolerances of
test_flow_distributed.py); a worker killed mid-update fails the stage with no checkpoint and the rerun completes
from the cache; runtime.task_runner: ray runs generation and scoring shards on actors that keep their model
across iterations and load each new checkpoint in place, with the thread runner's tables byte for byte."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from flow_helpers import task_states
from safetensors.torch import load_file
from test_distributed import max_difference, weights
from test_flow_distributed import assert_two_processes_match_one, with_one_and_two_processes
from test_flow_grpo import tiny_config
from tolerance import FACTOR

from rlhf_core.config import KLConfig, RuntimeConfig
from rlhf_core.config.training import TrainingSetup
from rlhf_core.models import ModelLoadError, load_weights_in_place
from tasks.distributed import DistributedUpdateError
from tasks.refs import CheckpointRef

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(*args: str, env: dict | None = None) -> None:
    command = [str(Path(sys.executable).parent / "ray"), *args]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"


@pytest.fixture(scope="module")
def two_nodes():
    """The address of a Ray cluster of two nodes on this machine, 1 CPU each; stopped after the module. Ray's token
    authentication (on by default for `ray start`) is off: this process imported Ray before the fixture could give
    it the token, and Ray reads its auth settings once (docs/cluster.md has the token for real clusters)."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "RLHF_HOME"}  # each job's env sets it
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    node = ["--num-cpus", "1", "--num-gpus", "0", "--object-store-memory", str(200 * 2**20)]
    ray_cli("start", "--head", "--port", str(port), "--include-dashboard", "false", *node, env=env)
    try:
        ray_cli("start", "--address", f"127.0.0.1:{port}", *node, env=env)
        yield f"127.0.0.1:{port}"
    finally:
        ray_cli("stop", "--force", env=env)


def alive_nodes(address: str) -> list[dict]:
    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        return [node for node in ray.nodes() if node["Alive"]]
    finally:
        ray.shutdown()


def test_the_cluster_has_two_nodes_of_one_cpu(two_nodes):
    """The premise of the tests below: a job of 2 one-CPU workers cannot fit on one node."""
    nodes = alive_nodes(two_nodes)
    assert len(nodes) == 2 and [node["Resources"]["CPU"] for node in nodes] == [1.0, 1.0]


def test_grpo_on_two_ray_workers_across_two_nodes_matches_one_process(prefect_harness, two_nodes, tiny_model_dir,
                                                                      tmp_path, monkeypatch, reliability):
    """The update and the scoring stage's reference pass as Ray Train jobs (DDP over gloo between the two nodes)."""
    from flows.grpo import grpo

    finals, runs = with_one_and_two_processes(grpo, lambda runtime, micro_batch_size: tiny_config(
        tiny_model_dir, kl=KLConfig(coef=0.05), rewards=[{"function": "response_length"}], runtime=runtime,
        optim={"lr": 1e-3, "micro_batch_size": micro_batch_size}), (4, 1), "ddp", tmp_path, monkeypatch,
        launch={"launcher": "ray", "ray_address": two_nodes})
    assert runs[2].data.params["runtime.launcher"] == "ray"
    assert max_difference(weights(finals[1]), load_file(f"{tiny_model_dir}/model.safetensors")) > 1e-3
    bound = assert_two_processes_match_one(finals, CheckpointRef(path=str(tiny_model_dir), sha256="-"), "GRPO on Ray")
    reliability.record("2 Ray Train workers on 2 Ray nodes (gloo)", "GRPO flow, DDP, update and reference pass",
                       f"weights and Adam state equal one process within {FACTOR:g}x its own micro-batch-split "
                       f"difference (here {bound:.2g} of the update)", "n/a")


def test_dpo_on_two_ray_workers_across_two_nodes_matches_one_process(prefect_harness, two_nodes, tiny_model_dir,
                                                                     tmp_path, monkeypatch, reliability):
    """FSDP over two nodes; 9 training pairs, uneven over the 2 workers."""
    import test_flow_dpo

    from flows.dpo import dpo

    pairs = test_flow_dpo.write_review_pairs(tmp_path / "pairs.jsonl")
    finals, runs = with_one_and_two_processes(dpo, lambda runtime, micro_batch_size: test_flow_dpo.small_config(
        pairs, tiny_model_dir, runtime=runtime, optim={"micro_batch_size": micro_batch_size}), (2, 1), "fsdp",
        tmp_path, monkeypatch, launch={"launcher": "ray", "ray_address": two_nodes})
    bound = assert_two_processes_match_one(finals, CheckpointRef(path=str(tiny_model_dir), sha256="-"), "DPO on Ray")
    reliability.record("2 Ray Train workers on 2 Ray nodes (gloo)", "DPO flow, FSDP, 9 pairs uneven over 2 workers",
                       f"weights and Adam state equal one process within {FACTOR:g}x its own micro-batch-split "
                       f"difference (here {bound:.2g} of the update)", "n/a")
    assert runs[1].data.metrics["eval/rewards/accuracies"] == runs[2].data.metrics["eval/rewards/accuracies"]


def test_a_worker_killed_mid_update_fails_the_stage_without_a_checkpoint_and_the_rerun_completes(
        prefect_harness, two_nodes, rlhf_home, tiny_model_dir, monkeypatch, reliability):
    """Rank 1 SIGKILLs itself after the first of the update's 2 optimizer steps (RLHF_KILL_AT reaches the Ray
    workers through the job's runtime environment, as it reaches torchrun's ranks by inheritance)."""
    from flows.grpo import grpo

    config = tiny_config(tiny_model_dir, iterations=1, rewards=[{"function": "response_length"}],
                         optim={"lr": 1e-3, "micro_batch_size": 1, "mini_batches": 2},
                         runtime=RuntimeConfig(num_processes=2, launcher="ray", ray_address=two_nodes, num_threads=1))
    monkeypatch.setenv("RLHF_KILL_AT", "optimizer-step:rank1")
    with pytest.raises(DistributedUpdateError) as failure:
        grpo(config)
    headline = str(failure.value).splitlines()[0]
    assert headline.startswith("a Ray Train worker died without an error of its own") and "rank 0 failed" in headline
    checkpoints = rlhf_home / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())  # no checkpoint, not even a partial one
    assert not any((rlhf_home / "tmp").iterdir())  # the job's folder is gone

    monkeypatch.delenv("RLHF_KILL_AT")
    state = grpo(config, return_state=True)
    assert Path(state.result()).is_dir()
    states = dict(task_states(state.state_details.flow_run_id))
    assert states["generate-rollouts"] == "Cached" and states["score-rollouts"] == "Cached"
    assert states["update-policy"] == "Completed"
    reliability.record("SIGKILL of Ray Train worker rank 1 after its first optimizer step (2 nodes)",
                       "GRPO update stage, runtime.launcher: ray",
                       "the stage fails naming the dead worker first; no checkpoint, no job folder left; the rerun "
                       "takes generation and scoring from the cache and completes the update", "the update's work")


def test_rollout_shards_on_ray_actors_keep_their_model_and_equal_the_thread_runner(
        prefect_harness, two_nodes, tiny_model_dir, tmp_path, monkeypatch, caplog):
    """3 iterations with shards = 2: on the thread runner, and on two Ray actors (one per node). Every rollout and
    scored table is the same file (content-addressed names); each actor loaded the start model and iteration 1's
    policy from disk and copied iteration 2's into the module it generated with (the start model is also the
    reference it scores with, so iteration 1's policy gets a module of its own)."""
    from flows.grpo import grpo

    tables = {}
    for runner in ("thread", "ray"):
        monkeypatch.setenv("RLHF_HOME", str(tmp_path / runner))
        runtime = RuntimeConfig(task_runner=runner, shards=2, ray_address=two_nodes if runner == "ray" else None)
        grpo(tiny_config(tiny_model_dir, iterations=3, kl=KLConfig(coef=0.05), runtime=runtime,
                         generation={"group_size": 4, "max_new_tokens": 8, "temperature": 1.0, "batch_size": 4}))
        tables[runner] = {stage: sorted(p.name for p in (tmp_path / runner / "artifacts" / stage).glob("*.parquet"))
                          for stage in ("rollouts", "scored")}
    assert tables["ray"] == tables["thread"] and len(tables["ray"]["rollouts"]) == 3
    stats = [line for line in caplog.messages if line.startswith("ray shard actors:")]  # the flow's log
    assert stats == ["ray shard actors: 2 actors, models loaded from disk [2, 2], reloaded in place [1, 1]"]


def test_without_an_address_a_local_instance_trains_as_torchrun_does_and_stops(tiny_model_dir, rlhf_home, tmp_path):
    """launcher: ray with no ray_address: the stage starts a local Ray instance and stops it when done. Both
    launchers run the same 2 gloo ranks on this machine, so the weights come out identical, not just close."""
    from test_distributed import GRPO_ARGS, rollouts

    from rlhf_core.io import sha256_dir
    from tasks.refs import ArtifactRef
    from tasks.train import train_stage

    table = rollouts(vocab_size=49152)
    table.to_parquet(tmp_path / "batch.parquet")
    batch = ArtifactRef(path=str(tmp_path / "batch.parquet"), sha256="-", rows=len(table))
    policy = CheckpointRef(path=str(tiny_model_dir), sha256=sha256_dir(tiny_model_dir))
    trained = {}
    for launcher in ("torchrun", "ray"):
        runtime = RuntimeConfig(num_processes=2, num_threads=1, launcher=launcher)
        trained[launcher] = train_stage(policy, batch, GRPO_ARGS, TrainingSetup(runtime=runtime), "update-metrics",
                                        "update").checkpoint
    assert not ray.is_initialized()  # stopped with the stage
    assert max_difference(weights(trained["ray"]), weights(policy)) > 1e-3
    assert max_difference(weights(trained["ray"]), weights(trained["torchrun"])) == 0.0


def test_an_address_where_no_cluster_answers_fails_before_any_work(prefect_harness, rlhf_home, tiny_model_dir):
    """Ray itself would retry the address for minutes; the preflight check names the field at once."""
    from flows.grpo import grpo
    from tasks.ray_cluster import RaySetupError

    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    config = tiny_config(tiny_model_dir, runtime=RuntimeConfig(num_processes=2, launcher="ray", ray_address=address))
    with pytest.raises(RaySetupError, match=f"runtime.ray_address '{address}': no Ray cluster answers there"):
        grpo(config)
    assert not (rlhf_home / "artifacts").exists()


def test_weights_load_in_place_into_a_built_model(tiny_model_dir, tmp_path):
    """A model of another checkpoint becomes equal to that checkpoint, tied embeddings included; a checkpoint of
    another shape is refused before any weight is copied."""
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for parameter in other.parameters():
        parameter.data.add_(0.5)
    other.save_pretrained(tmp_path / "other")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    load_weights_in_place(target, tmp_path / "other")
    assert max_difference(target.state_dict(), other.state_dict()) == 0.0
    assert max_difference(target.state_dict(), before) > 0.4

    wrong = tmp_path / "wrong"
    shutil.copytree(tmp_path / "other", wrong)
    state = load_file(str(wrong / "model.safetensors"))
    state["model.extra.weight"] = state.pop(next(iter(state)))
    from safetensors.torch import save_file

    save_file(state, str(wrong / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="do not fit the model in memory"):
        load_weights_in_place(target, wrong)
    assert max_difference(target.state_dict(), other.state_dict()) == 0.0  # nothing was copied
    pd.testing.assert_index_equal(pd.Index(sorted(target.state_dict())), pd.Index(sorted(before)))
