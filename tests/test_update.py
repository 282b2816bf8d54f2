"""The shared update loop: step counts, micro-batch splitting, seeded shuffling, global normalisers, gradient
clipping, and the non-finite guard that stops before `optimizer.step()`."""

import math

import pytest
import torch
import torch.distributed as dist

from rlhf_core.grpo import grpo_update
from rlhf_core.models import load_causal_lm
from rlhf_core.update import (NonFiniteError, Normalizers, check_state_finite, forward_passes, global_sum,
                              micro_batches, run_update, world_size)

B = 10
LENGTHS = [3, 1, 4, 1, 5, 2, 6, 2, 5, 3]  # response tokens per row


def toy_batch():
    """B rows of a 1-feature regression with the keys run_update needs: prompt_mask [B, 1], response_mask [B, 6].
    Per-row data are 1-D ([B]) so select_rows never trims them."""
    x = torch.linspace(-1.0, 1.0, B)
    response_mask = torch.arange(6)[None, :] < torch.tensor(LENGTHS)[:, None]  # [B, 6]
    return {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.bool),
            "response_ids": torch.zeros(B, 6, dtype=torch.long), "response_mask": response_mask,
            "x": x, "y": 3.0 * x + 1.0, "row": torch.arange(B, dtype=torch.float32), "advantages": torch.ones(B)}


def linear_model(w=0.5, b=-0.5):
    model = torch.nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(w)
        model.bias.fill_(b)
    return model


class RecordingLoss:
    """Sum of squared errors / num_seqs (so micro-batches add up); records every call."""

    def __init__(self):
        self.calls = []  # (rows, normalizers)

    def __call__(self, model, micro, norm: Normalizers):
        self.calls.append((micro["row"].long().tolist(), norm))
        pred = model(micro["x"][:, None]).squeeze(-1)  # [b]
        loss = ((pred - micro["y"]) ** 2).sum() / norm.num_seqs
        return loss, {"loss/mse": loss.detach(), "rows": torch.tensor(float(len(micro["x"])))}


def run(loss_fn, model=None, optimizer=None, batch=None, **overrides):
    model = model or linear_model()
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.1)
    settings = dict(epochs=1, mini_batches=1, micro_batch_size=B, max_grad_norm=1e9, seed=0)
    history = run_update(model, optimizer, toy_batch() if batch is None else batch, loss_fn,
                         **{**settings, **overrides})
    return model, history


# ---------------------------------------------------------------- steps, splitting, shuffling


def test_steps_micro_batches_and_normalizers():
    loss_fn = RecordingLoss()
    _, history = run(loss_fn, epochs=3, mini_batches=2, micro_batch_size=2)
    assert len(history) == 3 * 2  # one optimizer step per (epoch, mini-batch)
    assert len(loss_fn.calls) == 3 * 2 * 3  # a mini-batch of 5 rows -> micro-batches of 2, 2, 1
    assert [len(rows) for rows, _ in loss_fn.calls[:3]] == [2, 2, 1]
    response_mask = toy_batch()["response_mask"]
    for step in range(6):
        calls = loss_fn.calls[3 * step: 3 * step + 3]
        rows = [r for rs, _ in calls for r in rs]
        # every micro-batch of a mini-batch gets the same, whole-mini-batch normalisers
        assert all(norm == calls[0][1] for _, norm in calls)
        assert calls[0][1] == Normalizers(num_seqs=5.0, num_tokens=float(response_mask[rows].sum()))
        assert history[step]["rows"] == 5.0  # metrics are summed over micro-batches
        assert set(history[step]) == {"loss/mse", "rows", "policy/grad_norm"}
    for epoch in range(3):  # each epoch is a permutation of all rows
        rows = [r for rs, _ in loss_fn.calls[6 * epoch: 6 * epoch + 6] for r in rs]
        assert sorted(rows) == list(range(B))
    epoch_orders = [[r for rs, _ in loss_fn.calls[6 * e: 6 * e + 6] for r in rs] for e in range(3)]
    assert epoch_orders[0] != epoch_orders[1]  # reshuffled every epoch


def test_uneven_mini_batches():
    loss_fn = RecordingLoss()
    _, history = run(loss_fn, mini_batches=3, micro_batch_size=100)
    assert len(history) == 3
    assert [norm.num_seqs for _, norm in loss_fn.calls] == [4.0, 3.0, 3.0]  # tensor_split: 10 = 4 + 3 + 3


def test_mini_batch_stats_are_computed_once_per_mini_batch_and_shared_by_its_micro_batches():
    seen_by_stats, seen_by_loss = [], []

    def stats(model, mini):
        seen_by_stats.append(sorted(mini["row"].long().tolist()))
        return {"mini_mean_x": mini["x"].mean()}

    def loss_fn(model, micro, norm):
        seen_by_loss.append((sorted(micro["row"].long().tolist()), float(micro["mini_mean_x"])))
        return RecordingLoss()(model, micro, norm)

    run(loss_fn, mini_batches=2, micro_batch_size=2, mini_batch_stats=stats)
    assert len(seen_by_stats) == 2 and len(seen_by_loss) == 6  # 2 mini-batches of 5 rows -> 3 micro-batches each
    x = toy_batch()["x"]
    for index, mini_rows in enumerate(seen_by_stats):
        expected = float(x[mini_rows].mean())  # the whole mini-batch's mean, not a micro-batch's
        micro = seen_by_loss[3 * index: 3 * index + 3]
        assert sorted(r for rows, _ in micro for r in rows) == mini_rows
        assert all(value == pytest.approx(expected) for _, value in micro)


def test_micro_batches_helper():
    assert [t.tolist() for t in micro_batches(torch.arange(5), 2, passes=3)] == [[0, 1], [2, 3], [4]]


def test_ranks_with_fewer_rows_run_padding_passes():
    """7 rows over 2 ranks in micro-batches of 2: rank 0 holds 4 rows (2 passes), rank 1 holds 3 rows (2 passes);
    with micro-batches of 3, rank 0 needs 2 passes and rank 1 one pass plus one padding pass; 1 row over 2 ranks
    leaves rank 1 nothing but a padding pass."""
    assert forward_passes(7, 2, num_ranks=2) == 2 and forward_passes(7, 3, num_ranks=2) == 2
    assert forward_passes(7, 3, num_ranks=1) == 3 and forward_passes(1, 4, num_ranks=2) == 1
    rank_1_rows = torch.arange(7)[1::2]
    assert [t.tolist() for t in micro_batches(rank_1_rows, 2, passes=2)] == [[1, 3], [5]]
    padded = micro_batches(rank_1_rows, 3, passes=2)
    assert padded[0].tolist() == [1, 3, 5] and padded[1] is None
    assert micro_batches(torch.arange(0), 4, passes=1) == [None]


def test_shuffling_is_deterministic_for_a_seed():
    def order(seed):
        loss_fn = RecordingLoss()
        model, _ = run(loss_fn, epochs=2, mini_batches=2, micro_batch_size=3, seed=seed)
        return [rows for rows, _ in loss_fn.calls], model.weight.item()

    rows_a, weight_a = order(seed=0)
    rows_b, weight_b = order(seed=0)
    rows_c, _ = order(seed=1)
    assert rows_a == rows_b and weight_a == weight_b
    assert rows_a != rows_c
    assert rows_a[0] != [0, 1, 2]  # actually shuffled, not the identity order


def test_micro_batches_hold_similar_lengths_and_the_step_does_not_change():
    sorted_loss, unsorted_loss = RecordingLoss(), RecordingLoss()
    sorted_model, _ = run(sorted_loss, mini_batches=2, micro_batch_size=2)
    unsorted_model, _ = run(unsorted_loss, mini_batches=2, micro_batch_size=2, sort_by_length=False)
    for mini in range(2):
        calls = sorted_loss.calls[3 * mini: 3 * mini + 3]
        lengths = [LENGTHS[r] for rows, _ in calls for r in rows]
        assert lengths == sorted(lengths)  # micro-batches cut from the mini-batch sorted by length
        unsorted_rows = [r for rows, _ in unsorted_loss.calls[3 * mini: 3 * mini + 3] for r in rows]
        assert sorted(r for rows, _ in calls for r in rows) == sorted(unsorted_rows)  # the same mini-batch
    assert [r for rows, _ in unsorted_loss.calls for r in rows] != [r for rows, _ in sorted_loss.calls for r in rows]
    assert sorted_model.weight.item() == pytest.approx(unsorted_model.weight.item(), abs=1e-7)
    assert sorted_model.bias.item() == pytest.approx(unsorted_model.bias.item(), abs=1e-7)


# ---------------------------------------------------------------- accumulation and clipping


def test_accumulated_step_equals_full_batch_step_by_hand():
    w, b, lr = 0.5, -0.5, 0.1
    batch = toy_batch()
    x, y = batch["x"].double(), batch["y"].double()
    # loss = sum (w x + b - y)^2 / B: dL/dw = 2/B sum(err * x), dL/db = 2/B sum(err)
    err = w * x + b - y
    expected_w = w - lr * 2 / B * (err * x).sum().item()
    expected_b = b - lr * 2 / B * err.sum().item()
    for micro_batch_size in (1, 3, B):
        model, history = run(RecordingLoss(), micro_batch_size=micro_batch_size)
        assert model.weight.item() == pytest.approx(expected_w, abs=1e-6)
        assert model.bias.item() == pytest.approx(expected_b, abs=1e-6)
        assert history[0]["loss/mse"] == pytest.approx((err**2).mean().item(), rel=1e-6)
        grad_norm = math.hypot(2 / B * (err * x).sum().item(), 2 / B * err.sum().item())
        assert history[0]["policy/grad_norm"] == pytest.approx(grad_norm, rel=1e-5)


def test_gradient_is_clipped_to_max_grad_norm():
    model, history = run(RecordingLoss(), max_grad_norm=0.5)
    step = math.hypot(model.weight.item() - 0.5, model.bias.item() + 0.5)
    assert history[0]["policy/grad_norm"] > 0.5  # the pre-clip norm is reported
    assert step == pytest.approx(0.1 * 0.5, rel=1e-5)  # SGD lr 0.1 times the clipped norm


def test_frozen_parameters_are_left_alone():
    model = linear_model()
    model.bias.requires_grad_(False)
    run(RecordingLoss(), model=model)
    assert model.bias.item() == -0.5 and model.weight.item() != 0.5


# ---------------------------------------------------------------- non-finite values stop before the step


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_unchanged(model, before):
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_nan_advantage_raises_before_the_step():
    batch = toy_batch()
    batch["advantages"][3] = float("nan")
    model = linear_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    before = snapshot(model)

    def loss_fn(m, micro, norm):
        return -(micro["advantages"] * m(micro["x"][:, None]).squeeze(-1)).sum() / norm.num_seqs, {}

    with pytest.raises(NonFiniteError, match=r"loss \(epoch 0, mini-batch 0, micro-batch \d\)"):
        run(loss_fn, model=model, optimizer=optimizer, batch=batch, micro_batch_size=4)
    assert_unchanged(model, before)
    assert len(optimizer.state) == 0  # optimizer.step() never ran
    assert issubclass(NonFiniteError, FloatingPointError)


def test_inf_loss_in_a_later_step_names_it_and_stops_there():
    model = linear_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    recording = RecordingLoss()

    def loss_fn(m, micro, norm):
        loss, metrics = recording(m, micro, norm)
        return (loss + math.inf if len(recording.calls) == 3 else loss), metrics  # 3rd call: epoch 1, mini 0

    with pytest.raises(NonFiniteError, match=r"epoch 1, mini-batch 0") as info:
        run(loss_fn, model=model, optimizer=optimizer, epochs=2, mini_batches=2, micro_batch_size=B)
    assert "inf" in str(info.value)
    assert int(optimizer.state[model.weight]["step"]) == 2
    # the same first two steps without the failure give exactly these weights: the third step never ran
    reference = linear_model()
    run(RecordingLoss(), model=reference, optimizer=torch.optim.Adam(reference.parameters(), lr=0.1),
        epochs=1, mini_batches=2, micro_batch_size=B)
    assert torch.equal(model.weight, reference.weight) and torch.equal(model.bias, reference.bias)


def test_inf_gradient_raises_before_the_step():
    model = linear_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    before = snapshot(model)

    def loss_fn(m, micro, norm):
        # sqrt(s - s.detach()) is 0 (finite) but its gradient 1 / (2 sqrt(0)) is inf
        s = m.weight.sum()
        return torch.sqrt(s - s.detach()), {}

    with pytest.raises(NonFiniteError, match=r"gradient norm \(epoch 0, mini-batch 0\)"):
        run(loss_fn, model=model, optimizer=optimizer)
    assert_unchanged(model, before)
    assert len(optimizer.state) == 0


def test_weights_made_infinite_by_the_optimizer_stop_the_update_after_that_step(reliability):
    """A finite loss and gradient, but an optimizer whose settings overflow the weights (an infinite weight decay:
    w <- w - lr * wd * w): the step that did it is named, and no later step runs."""
    model = linear_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=float("inf"))
    with pytest.raises(NonFiniteError, match=r"weights are not finite after the optimizer step \(epoch 0, "
                                             r"mini-batch 0\) although the loss and the gradient were"):
        run(RecordingLoss(), model=model, optimizer=optimizer, mini_batches=2)
    assert len(optimizer.state) == 2 and all(s["step"] == 1 for s in optimizer.state.values())  # one step only
    reliability.record("numerical fault", "an optimizer step that makes the weights inf/NaN (finite loss and "
                       "gradient)", "the update stops after that step naming it; no checkpoint is written")


def test_a_state_with_nan_or_inf_is_never_saved():
    check_state_finite({"w": torch.ones(3), "step": torch.tensor(4)}, "weight")
    # finite values whose squares overflow the fused norm pass; so do other dtypes and empty tensors
    check_state_finite({"big": torch.full((4,), 3e38), "half": torch.ones(2, dtype=torch.bfloat16),
                        "empty": torch.ones(0)}, "weight")
    with pytest.raises(NonFiniteError, match="'b'"):
        check_state_finite({"a": torch.ones(2), "b": torch.tensor([3e38, float("inf")], dtype=torch.bfloat16)}, "w")
    for bad in (float("nan"), float("inf")):
        with pytest.raises(NonFiniteError, match="optimizer state '0.exp_avg_sq' holds NaN or inf"):
            check_state_finite({"0.exp_avg": torch.ones(2), "0.exp_avg_sq": torch.tensor([1.0, bad])},
                               "optimizer state")


def test_nan_advantage_in_grpo_update_leaves_the_model_untouched(tiny_model_dir):
    from rlhf_core.batch import collate

    model, tokenizer = load_causal_lm(tiny_model_dir)
    prompts = [tokenizer(t)["input_ids"] for t in ["1 + 1 =", "Name a colour:"]]
    responses = [tokenizer(t)["input_ids"] for t in [" 2", " blue, or maybe red"]]
    batch = collate(prompts, responses, tokenizer.pad_token_id, per_seq={"advantages": [1.0, float("nan")]})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = snapshot(model)
    with pytest.raises(NonFiniteError, match=r"epoch 0, mini-batch 0"):
        grpo_update(model, optimizer, batch, epochs=1, mini_batches=1, micro_batch_size=2, max_grad_norm=1.0, seed=0,
                    clip_eps_low=0.2, clip_eps_high=0.28, kl_coef=0.0, kl_estimator="k3", aggregation="token-mean",
                    norm_length=8, temperature=1.0, chunk_size=64)
    assert_unchanged(model, before)
    assert len(optimizer.state) == 0


# ---------------------------------------------------------------- single process


def test_world_size_and_global_sum_without_distributed():
    assert not (dist.is_available() and dist.is_initialized())
    assert world_size() == 1
    assert global_sum(3, "cpu") == 3.0 and isinstance(global_sum(3, "cpu"), float)
    assert global_sum(torch.tensor(2.5), "cpu") == 2.5
