"""NaN or inf in the loss or the gradients during a GRPO run: the run stops with an error naming what was not
finite and where, before the optimizer step; the last good checkpoint stays intact and registered, and nothing
after it is written or registered. (NaN or inf rewards: tests/test_bad_input.py.)"""

from __future__ import annotations

import mlflow
import pytest
import torch
from flow_helpers import metric_steps
from test_crash_resume import crash_config

import rlhf_core.grpo
import rlhf_core.training
from flows.grpo import grpo
from rlhf_core.io import sha256_dir
from tasks.paths import use_tracking_uri

pytestmark = pytest.mark.slow


def nan_loss(loss, model):
    return loss * float("nan")


def nan_gradient(loss, model):
    weights = next(model.parameters())
    zero = weights.sum() - weights.sum().detach()  # 0, with a gradient path to the weights
    return loss + torch.sqrt(zero.clamp(min=0))  # sqrt(0) = 0, but its gradient is inf, times 0: NaN


@pytest.mark.parametrize("fault, corrupt, message", [
    ("NaN loss", nan_loss, r"loss \(epoch 0, mini-batch 0, micro-batch 0\) is not finite"),
    ("NaN gradient", nan_gradient, r"gradient norm \(epoch 0, mini-batch 0\) is not finite"),
])
def test_non_finite_update_stops_the_run_and_keeps_the_last_good_checkpoint(prefect_harness, rlhf_home,
                                                                            tiny_model_dir, monkeypatch, reliability,
                                                                            fault, corrupt, message):
    real_loss, calls = rlhf_core.grpo.grpo_loss, []

    def loss_going_bad_in_iteration_1(model, micro, norm, **kwargs):
        calls.append(1)
        loss, metrics = real_loss(model, micro, norm, **kwargs)
        per_update = 2  # 8 responses: 2 mini-batches of 4, each one micro-batch
        return (corrupt(loss, model) if len(calls) > per_update else loss), metrics

    monkeypatch.setattr(rlhf_core.grpo, "grpo_loss", loss_going_bad_in_iteration_1)
    assert_stops_and_keeps_iteration_0(tiny_model_dir, rlhf_home, message)
    reliability.record("numerical fault", f"{fault} in iteration 1's update",
                       "clear error naming it, before the optimizer step; iteration 0's checkpoint intact and "
                       "registered, nothing after it")


def test_weights_made_non_finite_by_the_optimizer_stop_the_run(prefect_harness, rlhf_home, tiny_model_dir,
                                                               monkeypatch, reliability):
    """Iteration 1's optimizer overflows the weights (an infinite weight decay, which the config refuses, put in
    behind its back): the step is named, nothing of iteration 1 is written or registered."""
    real_start, calls = rlhf_core.training.start_training, []

    def weight_decay_going_bad_in_iteration_1(*args, **kwargs):
        state = real_start(*args, **kwargs)
        calls.append(1)
        if len(calls) > 1:  # iteration 1's update, continued in memory or loaded from disk
            for group in state.optimizer.param_groups:
                group["weight_decay"] = float("inf")
        return state

    monkeypatch.setattr(rlhf_core.training, "start_training", weight_decay_going_bad_in_iteration_1)
    assert_stops_and_keeps_iteration_0(tiny_model_dir, rlhf_home,
                                       r"weights are not finite after the optimizer step \(epoch 0, mini-batch 0\)")
    reliability.record("numerical fault", "an optimizer step that overflows the weights in iteration 1 (finite loss "
                       "and gradient)", "the run fails naming the step; iteration 0's checkpoint intact and "
                       "registered, nothing after it")


def assert_stops_and_keeps_iteration_0(tiny_model_dir, rlhf_home, message: str) -> None:
    state = grpo(crash_config(tiny_model_dir), return_state=True)
    assert state.is_failed()
    with pytest.raises(FloatingPointError, match=message):
        state.result()

    checkpoints = list((rlhf_home / "checkpoints").iterdir())
    assert len(checkpoints) == 1 and sha256_dir(checkpoints[0]).startswith(checkpoints[0].name)  # intact
    use_tracking_uri()
    client = mlflow.MlflowClient()
    versions = client.search_model_versions("name = 'crash-policy'")
    assert [str(v.version) for v in versions] == ["1"] and versions[0].tags["iteration"] == "0"
    assert str(client.get_model_version_by_alias("crash-policy", "newest").version) == "1"
    run = client.get_run(versions[0].run_id)
    assert run.info.status == "FAILED" and metric_steps(run.info.run_id, "reward/mean") == [0]
