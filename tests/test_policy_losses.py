import math

import pytest
import torch

from rlhf_core.policy_losses import (AGGREGATION_MODES, POLICY_LOSSES, aggregate, cispo_loss, gspo_token_loss,
                                     masked_mean, policy_metrics, ppo_clip_loss)

# ---------------------------------------------------------------- ppo_clip


def test_registry_keys():
    assert set(POLICY_LOSSES) == {"ppo_clip", "gspo", "cispo"}
    assert POLICY_LOSSES["ppo_clip"] is ppo_clip_loss
    assert POLICY_LOSSES["gspo"] is gspo_token_loss and POLICY_LOSSES["cispo"] is cispo_loss


def _run(fn, ratios, advantages, *args, mask=None, **kwargs):
    """Run a policy loss on rows of tokens with old_logprobs = 0, so ratio = exp(logprobs) -> (loss, info, grad)."""
    logprobs = torch.tensor([[math.log(r) for r in row] for row in ratios], requires_grad=True)
    mask = torch.ones(logprobs.shape, dtype=torch.bool) if mask is None else torch.tensor(mask)
    loss, info = fn(logprobs, torch.zeros_like(logprobs), torch.tensor(advantages), mask, *args, **kwargs)
    (grad,) = torch.autograd.grad(torch.where(mask, loss, 0.0).sum(), logprobs)
    return loss, info, grad


def _ppo(ratios, advantages, eps_low, eps_high, **kwargs):
    """ppo_clip_loss on one row of tokens."""
    return _run(ppo_clip_loss, [ratios], [advantages], eps_low, eps_high, **kwargs)


def test_ppo_clip_hand_values():
    # eps_low = 0.2, eps_high = 0.3: clip range [0.8, 1.3]
    ratios = [1.1, 1.5, 0.5, 1.5, 0.5]
    advantages = [2.0, 1.0, -1.0, -1.0, 1.0]
    loss, metrics, grad = _ppo(ratios, advantages, 0.2, 0.3)
    expected = [
        -2.0 * 1.1,  # inside the range: both terms equal
        max(-1.0 * 1.5, -1.0 * 1.3),  # A > 0, ratio above 1.3: clipped high
        max(1.0 * 0.5, 1.0 * 0.8),  # A < 0, ratio below 0.8: clipped low
        max(1.0 * 1.5, 1.0 * 1.3),  # A < 0, ratio above range: unclipped term is larger, not clipped
        max(-1.0 * 0.5, -1.0 * 0.8),  # A > 0, ratio below range: unclipped term is larger, not clipped
    ]
    torch.testing.assert_close(loss, torch.tensor([expected]))
    assert expected == [-2.2, -1.3, 0.8, 1.5, -0.5]
    assert metrics["clipped_low"].tolist() == [[False, False, True, False, False]]
    assert metrics["clipped_high"].tolist() == [[False, True, False, False, False]]
    torch.testing.assert_close(metrics["ratio"], torch.tensor([ratios]))
    assert not metrics["ratio"].requires_grad
    # d loss / d logprobs = -A * ratio where the unclipped term wins, 0 where the clip is active
    torch.testing.assert_close(grad, torch.tensor([[-2.0 * 1.1, 0.0, 0.0, 1.0 * 1.5, -1.0 * 0.5]]))


def test_ppo_clip_gradient_is_zero_exactly_where_clip_is_active():
    torch.manual_seed(0)
    logprobs = (0.5 * torch.randn(8, 16)).requires_grad_()
    advantages = torch.randn(8, 16)
    loss, metrics = ppo_clip_loss(logprobs, torch.zeros(8, 16), advantages, torch.ones(8, 16, dtype=torch.bool),
                                  0.2, 0.28)
    (grad,) = torch.autograd.grad(loss.sum(), logprobs)
    active = metrics["clipped_low"] | metrics["clipped_high"]
    assert active.any() and (~active).any()
    assert (grad[active] == 0).all()
    torch.testing.assert_close(grad[~active], (-advantages * metrics["ratio"])[~active])


def test_ppo_clip_asymmetric_eps():
    # ratio 1.25 with A = 1 and ratio 0.75 with A = -1
    ratios, advantages = [1.25, 0.75], [1.0, -1.0]
    loss, metrics, grad = _ppo(ratios, advantages, 0.2, 0.3)  # range [0.8, 1.3]: high side free, low side clipped
    torch.testing.assert_close(loss, torch.tensor([[-1.25, 0.8]]))
    torch.testing.assert_close(grad, torch.tensor([[-1.25, 0.0]]))
    assert metrics["clipped_low"].tolist() == [[False, True]]
    loss, metrics, grad = _ppo(ratios, advantages, 0.3, 0.2)  # range [0.7, 1.2]: the other way round
    torch.testing.assert_close(loss, torch.tensor([[-1.2, 0.75]]))
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.75]]))
    assert metrics["clipped_high"].tolist() == [[True, False]]


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_policy_loss_shape_mismatch_raises(name):
    ones = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(AssertionError):
        POLICY_LOSSES[name](torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), ones, 0.2, 0.2)
    with pytest.raises(AssertionError):
        POLICY_LOSSES[name](torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), ones[:, :2], 0.2, 0.2)


# ---------------------------------------------------------------- dual-clip PPO


def test_dual_clip_hand_values():
    # eps 0.2 / 0.2: range [0.8, 1.2]; c = 3: with A < 0 the loss is capped at -3 A
    ratios = [4.0, 2.0, 4.0, 0.5]
    advantages = [-1.0, -1.0, 1.0, -2.0]
    loss, info, grad = _ppo(ratios, advantages, 0.2, 0.2, dual_clip_c=3.0)
    expected = [
        min(max(1.0 * 4.0, 1.0 * 1.2), 3.0 * 1.0),  # A < 0, ratio 4 > c: the dual clip binds at 3
        min(max(1.0 * 2.0, 1.0 * 1.2), 3.0 * 1.0),  # A < 0, ratio 2 < c: plain PPO, 2
        max(-1.0 * 4.0, -1.0 * 1.2),  # A > 0: never dual-clipped; clipped high at -1.2
        min(max(2.0 * 0.5, 2.0 * 0.8), 3.0 * 2.0),  # A < 0, ratio below range: clipped low at 1.6
    ]
    assert expected == [3.0, 2.0, -1.2, 1.6]
    torch.testing.assert_close(loss, torch.tensor([expected]))
    assert info["dual_clipped"].tolist() == [[True, False, False, False]]
    assert info["clipped_high"].tolist() == [[False, False, True, False]]
    assert info["clipped_low"].tolist() == [[False, False, False, True]]
    # gradient -A r where nothing binds, 0 where any clip binds
    torch.testing.assert_close(grad, torch.tensor([[0.0, 1.0 * 2.0, 0.0, 0.0]]))
    # without dual_clip_c the first token's loss is the unbounded -A r = 4, with gradient 4
    loss, info, grad = _ppo(ratios, advantages, 0.2, 0.2)
    assert loss[0, 0].item() == pytest.approx(4.0) and grad[0, 0].item() == pytest.approx(4.0)
    assert "dual_clipped" not in info


def test_dual_clip_matches_a_loop_over_tokens():
    torch.manual_seed(0)
    logprobs, advantages = 1.5 * torch.randn(6, 7), torch.randn(6, 7)
    mask = torch.ones(6, 7, dtype=torch.bool)
    loss, info = ppo_clip_loss(logprobs, torch.zeros(6, 7), advantages, mask, 0.2, 0.28, dual_clip_c=3.0)
    for b in range(6):
        for t in range(7):
            r, a = math.exp(logprobs[b, t].item()), advantages[b, t].item()
            ppo = max(-a * r, -a * min(max(r, 0.8), 1.28))
            expected = min(ppo, -3.0 * a) if a < 0 else ppo
            assert loss[b, t].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
            assert bool(info["dual_clipped"][b, t]) == (a < 0 and ppo > -3.0 * a)
    assert info["dual_clipped"].any()


# ---------------------------------------------------------------- GSPO (GSPO-token)


def test_gspo_hand_values():
    # row 0: log-ratios [0.3, -0.1, 0.1] -> log s = 0.1; row 1: [0.0, 0.6] and a padding token -> log s = 0.3
    ratios = [[math.exp(0.3), math.exp(-0.1), math.exp(0.1)], [1.0, math.exp(0.6), math.exp(5.0)]]
    advantages = [[-2.0, -2.0, -2.0], [1.0, 1.0, 1.0]]
    mask = [[True, True, True], [True, True, False]]
    loss, info, grad = _run(gspo_token_loss, ratios, advantages, 0.2, 0.2, mask=mask)  # range [0.8, 1.2]
    s0, s1 = math.exp(0.1), math.exp(0.3)  # 1.105 inside the range, 1.350 above it
    torch.testing.assert_close(loss[0], torch.tensor([2.0 * s0] * 3))  # -A s, the same on every token
    torch.testing.assert_close(loss[1, :2], torch.tensor([-1.2, -1.2]))  # A > 0 and s > 1.2: clipped at 1.2 A
    # gradient s_i * (-A) per token (the stop-gradient trick), 0 on the clipped row
    torch.testing.assert_close(grad, torch.tensor([[2.0 * s0] * 3, [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(info["ratio"][:, 0], torch.tensor([s0, s1]))
    assert info["seq_clipped"].tolist() == [False, True]
    assert info["clipped_high"][1, :2].tolist() == [True, True] and not info["clipped_low"].any()


def test_gspo_tiny_clip_range_clips_a_small_sequence_drift():
    # GSPO's own range (3e-4, 4e-4): a mean log-ratio of 1e-3 per token is already outside it
    _, info, grad = _run(gspo_token_loss, [[math.exp(1e-3)] * 4], [[1.0] * 4], 3e-4, 4e-4)
    assert info["seq_clipped"].tolist() == [True] and (grad == 0).all()


def _sequence_level_gspo(logprobs, old_logprobs, advantages_per_seq, mask, eps_low, eps_high):
    """Independent formulation: GSPO's eq. 5 with s_i = exp(mean log-ratio) differentiated through the mean (no
    stop-gradient), the min/clip on sequences, the mean over sequences. -> []"""
    log_ratio = torch.where(mask, logprobs - old_logprobs, 0.0)
    seq_ratio = torch.exp(log_ratio.sum(-1) / mask.sum(-1))  # [B]
    seq_loss = torch.maximum(-advantages_per_seq * seq_ratio,
                             -advantages_per_seq * seq_ratio.clamp(1 - eps_low, 1 + eps_high))
    return seq_loss.mean()


def test_gspo_token_equals_gspo_sequence_objective_in_value_and_gradient():
    torch.manual_seed(0)
    logprobs = (-1.0 + 0.1 * torch.randn(6, 5)).requires_grad_()
    old_logprobs = logprobs.detach() + 0.05 * torch.randn(6, 5)
    mask = torch.arange(5)[None, :] < torch.tensor([5, 3, 1, 4, 2, 5])[:, None]
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
    loss, info = gspo_token_loss(logprobs, old_logprobs, advantages[:, None].expand(6, 5), mask, 0.02, 0.03)
    token_form = aggregate(loss, mask, "seq-mean-token-mean")
    sequence_form = _sequence_level_gspo(logprobs, old_logprobs, advantages, mask, 0.02, 0.03)
    assert info["seq_clipped"].any() and not info["seq_clipped"].all()  # both branches are exercised
    (token_grad,) = torch.autograd.grad(token_form, logprobs)
    (sequence_grad,) = torch.autograd.grad(sequence_form, logprobs)
    torch.testing.assert_close(token_form, sequence_form)
    torch.testing.assert_close(token_grad, sequence_grad)


def test_gspo_padding_does_not_change_the_sequence_ratio():
    torch.manual_seed(1)
    logprobs = torch.randn(3, 4, requires_grad=True)
    old, adv = torch.randn(3, 4), torch.randn(3, 4)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False], [True] * 4])
    loss, info = gspo_token_loss(logprobs, old, adv, mask, 0.2, 0.2)
    padded = torch.cat([logprobs, torch.full((3, 2), 7.0)], 1)
    padded_loss, padded_info = gspo_token_loss(padded, torch.cat([old, torch.full((3, 2), -7.0)], 1),
                                               torch.cat([adv, torch.ones(3, 2)], 1),
                                               torch.cat([mask, torch.zeros(3, 2, dtype=torch.bool)], 1), 0.2, 0.2)
    torch.testing.assert_close(torch.where(mask, padded_loss[:, :4], 0.0), torch.where(mask, loss, 0.0))
    torch.testing.assert_close(padded_info["ratio"][:, 0], info["ratio"][:, 0])


# ---------------------------------------------------------------- CISPO


def test_cispo_hand_values():
    # no lower bound (eps_low 1: the bound is 0), upper bound 1 + 0.28; log pi = log r (old = 0)
    ratios = [1.0, 1.5, 0.5, 3.0]
    advantages = [1.0, 1.0, -1.0, -1.0]
    loss, info, grad = _run(cispo_loss, [ratios], [advantages], 1.0, 0.28)
    weights = [1.0, 1.28, 0.5, 1.28]  # clip(r, 0, 1.28), detached
    expected = [-w * a * math.log(r) for w, a, r in zip(weights, advantages, ratios)]
    assert expected[0] == 0.0 and expected[2] == pytest.approx(0.5 * math.log(0.5))
    torch.testing.assert_close(loss, torch.tensor([expected]))
    # gradient -w A: capped, never zeroed (where PPO would give 0 on tokens 1 and 3)
    torch.testing.assert_close(grad, torch.tensor([[-1.0, -1.28, 0.5, 1.28]]))
    assert info["clipped_high"].tolist() == [[False, True, False, True]] and not info["clipped_low"].any()
    _, info, grad = _run(cispo_loss, [ratios], [advantages], 0.2, 0.28)  # with a lower bound 0.8
    torch.testing.assert_close(grad, torch.tensor([[-1.0, -1.28, 0.8, 1.28]]))
    assert info["clipped_low"].tolist() == [[False, False, True, False]]


def test_cispo_matches_a_loop_over_tokens():
    torch.manual_seed(2)
    logprobs = (-1.0 + 0.5 * torch.randn(4, 6)).requires_grad_()
    old, adv = -1.0 + 0.5 * torch.randn(4, 6), torch.randn(4, 6)
    loss, _ = cispo_loss(logprobs, old, adv, torch.ones(4, 6, dtype=torch.bool), 0.3, 0.2)
    (grad,) = torch.autograd.grad(loss.sum(), logprobs)
    for b in range(4):
        for t in range(6):
            lp, a = logprobs[b, t].item(), adv[b, t].item()
            w = min(max(math.exp(lp - old[b, t].item()), 0.7), 1.2)
            assert loss[b, t].item() == pytest.approx(-w * a * lp, rel=1e-5, abs=1e-6)
            assert grad[b, t].item() == pytest.approx(-w * a, rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------- every loss


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_on_policy_gradient_is_reinforce_for_every_loss(name):
    """old = sg[log pi]: every ratio is 1, nothing is clipped, and each loss's gradient is -A d log pi."""
    torch.manual_seed(3)
    logprobs, adv = (-1.0 + torch.randn(3, 4)).requires_grad_(), torch.randn(3, 4)
    loss, info = POLICY_LOSSES[name](logprobs, logprobs.detach(), adv, torch.ones(3, 4, dtype=torch.bool), 1e-3, 1e-3)
    (grad,) = torch.autograd.grad(loss.sum(), logprobs)
    torch.testing.assert_close(grad, -adv)
    assert not (info["clipped_low"] | info["clipped_high"]).any()


@pytest.mark.parametrize("name, kwargs", [("ppo_clip", {}), ("ppo_clip", {"dual_clip_c": 1.5}), ("gspo", {}),
                                          ("cispo", {})])
@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_policy_loss_micro_batches_add_up_with_global_normalisers(name, kwargs, mode):
    generator = torch.Generator().manual_seed(4)
    logprobs = (-1.0 + 0.3 * torch.randn(6, 5, generator=generator)).requires_grad_()
    old, adv = -1.0 + 0.3 * torch.randn(6, 5, generator=generator), torch.randn(6, 5, generator=generator)
    mask = torch.arange(5)[None, :] < torch.tensor([0, 5, 2, 4, 1, 3])[:, None]
    norms = dict(num_seqs=6, num_tokens=mask.sum().item(), norm_length=5)

    def reduced(rows):
        loss, _ = POLICY_LOSSES[name](logprobs[rows], old[rows], adv[rows], mask[rows], 0.05, 0.1, **kwargs)
        return aggregate(loss, mask[rows], mode, **norms)

    full = reduced(torch.arange(6))
    micro = sum(reduced(rows) for rows in torch.tensor([4, 0, 5, 2, 1, 3]).split([1, 2, 3]))
    (full_grad,) = torch.autograd.grad(full, logprobs)
    (micro_grad,) = torch.autograd.grad(micro, logprobs)
    assert full_grad.abs().sum() > 0
    torch.testing.assert_close(micro, full)
    torch.testing.assert_close(micro_grad, full_grad)


def test_policy_metrics_report_each_variants_share():
    mask = torch.tensor([[True, True], [True, False]])
    info = {"clipped_low": torch.tensor([[True, False], [False, False]]),
            "clipped_high": torch.zeros(2, 2, dtype=torch.bool),
            "dual_clipped": torch.tensor([[False, True], [True, True]]),
            "seq_clipped": torch.tensor([True, False])}
    logprobs = torch.tensor([[-1.0, -2.0], [-3.0, 0.0]])
    metrics = policy_metrics(logprobs, logprobs - 1.0, torch.ones(2, 2), info, mask, num_tokens=6.0, num_seqs=4.0)
    assert metrics["policy/clip_frac_low"].item() == pytest.approx(1 / 6)
    assert metrics["policy/dual_clip_frac"].item() == pytest.approx(2 / 6)  # the padding token does not count
    assert metrics["policy/seq_clip_frac"].item() == pytest.approx(1 / 4)
    assert metrics["policy/approx_kl"].item() == pytest.approx(0.5 * 3 / 6)
    plain = policy_metrics(logprobs, logprobs, torch.ones(2, 2), {k: info[k] for k in ("clipped_low", "clipped_high")},
                           mask, num_tokens=3.0, num_seqs=2.0)
    assert set(plain) == {"policy/entropy", "policy/clip_frac_low", "policy/clip_frac_high", "policy/approx_kl"}


# ---------------------------------------------------------------- aggregate

VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[True, True, False], [True, False, False]])


def test_aggregate_hand_values():
    torch.testing.assert_close(aggregate(VALUES, MASK, "token-mean"), torch.tensor((1 + 2 + 4) / 3))
    torch.testing.assert_close(aggregate(VALUES, MASK, "seq-mean-token-mean"), torch.tensor(((1 + 2) / 2 + 4 / 1) / 2))
    torch.testing.assert_close(aggregate(VALUES, MASK, "seq-mean-token-sum-norm"), torch.tensor((1 + 2 + 4) / (2 * 3)))
    torch.testing.assert_close(
        aggregate(VALUES, MASK, "seq-mean-token-sum-norm", norm_length=4), torch.tensor((1 + 2 + 4) / (2 * 4))
    )
    torch.testing.assert_close(aggregate(VALUES, MASK, "token-mean", num_tokens=7), torch.tensor((1 + 2 + 4) / 7))
    torch.testing.assert_close(aggregate(VALUES, MASK, "seq-mean-token-mean", num_seqs=4), torch.tensor(5.5 / 4))


def test_aggregate_empty_rows_and_masks_give_zero_not_nan():
    one_empty_row = torch.tensor([[True, True, False], [False, False, False]])
    torch.testing.assert_close(aggregate(VALUES, one_empty_row, "seq-mean-token-mean"), torch.tensor((1.5 + 0) / 2))
    empty = torch.zeros(2, 3, dtype=torch.bool)
    for mode in AGGREGATION_MODES:
        assert aggregate(VALUES, empty, mode).item() == 0.0


def _random_batch(seed: int, rows: int = 6, cols: int = 5):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, cols, generator=gen, requires_grad=True)
    lengths = torch.randint(0, cols + 1, (rows,), generator=gen)
    lengths[0], lengths[1] = 0, cols  # one empty and one full row
    mask = torch.arange(cols)[None, :] < lengths[:, None]  # ragged right-padded mask
    return values, mask


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
@pytest.mark.parametrize("split", [[2, 4], [1, 2, 3]])
def test_aggregate_micro_batch_sum_equals_full_batch(mode, split):
    values, mask = _random_batch(seed=0)
    full = aggregate(values, mask, mode)
    (full_grad,) = torch.autograd.grad(full, values)
    norms = dict(num_seqs=values.shape[0], num_tokens=mask.sum().item(), norm_length=values.shape[1])
    micro = sum(aggregate(v, m, mode, **norms) for v, m in zip(values.split(split), mask.split(split)))
    (micro_grad,) = torch.autograd.grad(micro, values)
    torch.testing.assert_close(micro, full)
    torch.testing.assert_close(micro_grad, full_grad)
    # without the full-batch normalisers each micro-batch divides by its own size, and the sum is off
    naive = sum(aggregate(v, m, mode) for v, m in zip(values.split(split), mask.split(split)))
    assert not torch.allclose(naive, full)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("fill", [1e30, float("nan"), float("inf")])
def test_aggregate_padding_invariance(mode, fill):
    values, mask = _random_batch(seed=1)
    norm = {"norm_length": 5} if mode == "seq-mean-token-sum-norm" else {}  # its default T grows with padding
    full = aggregate(values, mask, mode, **norm)
    (grad,) = torch.autograd.grad(full, values)
    padded_values = torch.cat([values, torch.full((6, 3), fill)], dim=1)  # 3 extra masked-out columns
    padded_mask = torch.cat([mask, torch.zeros(6, 3, dtype=torch.bool)], dim=1)
    padded = aggregate(padded_values, padded_mask, mode, **norm)
    (padded_grad,) = torch.autograd.grad(padded, values)
    torch.testing.assert_close(padded, full)
    torch.testing.assert_close(padded_grad, grad)


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_aggregate_nan_at_masked_positions_does_not_leak_into_gradient(mode):
    values = torch.tensor([[1.0, float("nan")], [float("inf"), 2.0]], requires_grad=True)
    mask = torch.tensor([[True, False], [False, True]])
    loss = aggregate(values, mask, mode)
    (grad,) = torch.autograd.grad(loss, values)
    assert torch.isfinite(loss)
    assert torch.isfinite(grad).all() and (grad[~mask] == 0).all()


def test_aggregate_unknown_mode_raises():
    with pytest.raises(ValueError, match="unknown aggregation mode 'seq-sum'"):
        aggregate(VALUES, MASK, "seq-sum")


def test_aggregate_requires_bool_mask_of_same_shape():
    with pytest.raises(AssertionError):
        aggregate(VALUES, MASK.float(), "token-mean")
    with pytest.raises(AssertionError):
        aggregate(VALUES, MASK[:, :2], "token-mean")


def test_masked_mean():
    torch.testing.assert_close(masked_mean(VALUES, MASK), torch.tensor((1 + 2 + 4) / 3))
    assert masked_mean(VALUES, torch.zeros(2, 3, dtype=torch.bool)).item() == 0.0
