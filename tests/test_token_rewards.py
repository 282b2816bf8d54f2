import math

import pytest
import torch

from rlhf_core.token_rewards import clip_scores, normalize_scores, penalize_missing_eos, token_level_rewards

# ---------------------------------------------------------------- token_level_rewards


def test_token_level_rewards_hand_values():
    scores = torch.tensor([1.0, -2.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, float("nan"), float("nan")]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    rewards = token_level_rewards(scores, kl, mask, kl_coef=0.5)
    expected = [
        [-0.5 * 0.1, -0.5 * 0.2, -0.5 * 0.3 + 1.0],  # score on the last (EOS) token
        [-0.5 * 0.4 - 2.0, 0.0, 0.0],  # one-token response: KL penalty and score on the same token
    ]
    torch.testing.assert_close(rewards, torch.tensor(expected))


def test_token_level_rewards_empty_row_is_all_zero():
    scores = torch.tensor([3.0, 1.0])
    mask = torch.tensor([[False, False], [True, False]])
    rewards = token_level_rewards(scores, torch.ones(2, 2), mask, kl_coef=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[0.0, 0.0], [-0.1 * 1.0 + 1.0, 0.0]]))


def _loop_token_rewards(scores, kl, mask, kl_coef):
    """Reference: plain Python lists; the score goes on the last index whose mask is True."""
    out = [[0.0] * len(row) for row in kl]
    for b, row in enumerate(mask):
        real = [t for t, m in enumerate(row) if m]
        for t in real:
            out[b][t] = -kl_coef * kl[b][t]
        if real:
            out[b][real[-1]] += scores[b]
    return out


@pytest.mark.parametrize("right_padded", [True, False])
def test_token_level_rewards_vectorised_matches_loop(right_padded):
    gen = torch.Generator().manual_seed(0)
    rows, cols = 8, 6
    scores = torch.randn(rows, generator=gen, dtype=torch.float64)
    kl = torch.rand(rows, cols, generator=gen, dtype=torch.float64)
    if right_padded:
        lengths = torch.randint(0, cols + 1, (rows,), generator=gen)
        lengths[0], lengths[1] = 0, cols
        mask = torch.arange(cols)[None, :] < lengths[:, None]
    else:  # arbitrary masks: the score still goes on the last True
        mask = torch.rand(rows, cols, generator=gen) < 0.5
    expected = _loop_token_rewards(scores.tolist(), kl.tolist(), mask.tolist(), 0.05)
    rewards = token_level_rewards(scores, torch.where(mask, kl, float("nan")), mask, kl_coef=0.05)
    torch.testing.assert_close(rewards, torch.tensor(expected, dtype=torch.float64))


def test_token_level_rewards_shape_mismatch_raises():
    with pytest.raises(AssertionError):
        token_level_rewards(torch.zeros(3), torch.zeros(2, 4), torch.ones(2, 4, dtype=torch.bool), 0.1)


# ---------------------------------------------------------------- score transforms


def test_penalize_missing_eos_hand_values():
    scores = torch.tensor([1.0, 2.0, -1.0])
    finished = torch.tensor([True, False, False])
    torch.testing.assert_close(penalize_missing_eos(scores, finished, 1.5), torch.tensor([1.0, 2.0 - 1.5, -1.0 - 1.5]))
    torch.testing.assert_close(penalize_missing_eos(scores, finished, 0.0), scores)
    with pytest.raises(ValueError):
        penalize_missing_eos(scores, finished, -1.0)


def test_clip_scores_hand_values():
    scores = torch.tensor([-5.0, 0.5, 3.0, 2.0])
    torch.testing.assert_close(clip_scores(scores, 2.0), torch.tensor([-2.0, 0.5, 2.0, 2.0]))
    assert clip_scores(scores, None) is scores
    with pytest.raises(ValueError):
        clip_scores(scores, -1.0)


def test_normalize_scores_hand_values():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0])  # mean 3; population variance (4 + 1 + 0 + 9) / 4 = 3.5
    expected = torch.tensor([-2.0, -1.0, 0.0, 3.0]) / math.sqrt(3.5 + 1e-8)
    torch.testing.assert_close(normalize_scores(scores), expected)


def test_normalize_scores_random_mean_0_std_1():
    scores = 4.0 + 3.0 * torch.randn(256)
    out = normalize_scores(scores)
    torch.testing.assert_close(out.mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.std(unbiased=False), torch.tensor(1.0))


def test_normalize_scores_constant_batch_is_exactly_zero():
    # 16 x 0.7: the float32 mean is off by an ulp, which sqrt(eps) = 1e-4 would blow up to ~1e-3
    assert (normalize_scores(torch.full((16,), 0.7)) == 0).all()
    assert (normalize_scores(torch.tensor([5.0])) == 0).all()
    assert normalize_scores(torch.zeros(0)).shape == (0,)
