"""KTO core: mismatched pairs avoid a row's own prompt and follow the seed, the loss by hand, z0 against a plain
loop, micro-batching leaves loss, metrics and gradient unchanged, policy == reference gives weight / 2 per row, and
a few steps on a tiny model separate desirable from undesirable completions."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_core.batch import collate, select_rows
from rlhf_core.kto import (batched_example_logps, collate_examples, held_out_metrics, kto_batch_loss, kto_update,
                           mismatched_rows, preference_accuracy, reference_point_stats, sequence_logps,
                           tokenize_examples)
from rlhf_core.logprobs import response_logprobs
from rlhf_core.models import load_causal_lm
from rlhf_core.update import Normalizers

PROMPTS = ["Review the hotel.", "Say something about the weather today, please.", "Review the hotel.", "Hi"]
COMPLETIONS = ["Lovely.", "It is sunny and warm, a perfect day for a long walk.", "Dirty and loud.", "Go away"]
DESIRABLE = [True, True, False, False]
LOSS_KWARGS = dict(beta=0.1, desirable_weight=2.0, undesirable_weight=1.0)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def make_batch(tokenizer, prompts=PROMPTS, completions=COMPLETIONS, desirable=DESIRABLE, max_length=None, seed=0,
               **per_example):
    tokens = tokenize_examples(tokenizer, prompts, completions, max_length=max_length, max_prompt_length=8,
                               seed=seed)
    return collate_examples(tokens["prompt_ids"], tokens["completion_ids"], tokens["mismatched_ids"], desirable,
                            tokenizer.pad_token_id, per_example=per_example or None)


def with_reference(model, batch, log_ratios, mismatched_log_ratios):
    """The batch with reference log-probs set so that the policy's log-ratios are exactly the given numbers."""
    logps = batched_example_logps(model, batch, micro_batch_size=len(log_ratios))
    return {**batch, "ref_logps": logps["logps"] - torch.tensor(log_ratios),
            "ref_mismatched_logps": logps["mismatched_logps"] - torch.tensor(mismatched_log_ratios)}


# ---------------------------------------------------------------- data preparation


def test_mismatched_rows_never_pair_a_row_with_its_own_prompt_and_follow_the_seed():
    prompts = ["a"] * 7 + ["b"] * 2 + ["c"]  # skewed: most rows share one prompt
    for seed in range(20):
        rows = mismatched_rows(prompts, seed)
        assert all(prompts[j] != prompts[i] for i, j in enumerate(rows))
    assert mismatched_rows(prompts, 3) == mismatched_rows(prompts, 3)
    assert len({tuple(mismatched_rows(prompts, seed)) for seed in range(5)}) > 1
    # two prompts, one row each: they can only borrow from each other
    assert mismatched_rows(["x", "y"], 0) == [1, 0]
    with pytest.raises(ValueError, match="at least 2 distinct prompts"):
        mismatched_rows(["same"] * 3, 0)


def test_mismatched_row_is_the_next_other_prompt_in_the_seeded_permutation():
    prompts = ["a", "a", "b", "c", "b", "a"]
    order = torch.randperm(6, generator=torch.Generator().manual_seed(1)).tolist()
    expected = [0] * 6
    for position, row in enumerate(order):  # the plain walk the O(n) sweep must reproduce
        step = 1
        while prompts[order[(position + step) % 6]] == prompts[row]:
            step += 1
        expected[row] = order[(position + step) % 6]
    assert mismatched_rows(prompts, 1) == expected


def test_completion_is_plain_text_plus_eos_and_mismatched_is_the_borrowed_completion(tiny_model):
    _, tokenizer = tiny_model
    tokens = tokenize_examples(tokenizer, PROMPTS, COMPLETIONS, max_length=None, max_prompt_length=8, seed=0)
    eos = tokenizer.eos_token_id
    assert tokens["completion_ids"][0] == tokenizer("Lovely.", add_special_tokens=False)["input_ids"] + [eos]
    assert tokenizer.decode(tokens["prompt_ids"][0]).rstrip().endswith("assistant")  # chat template
    for i, j in enumerate(tokens["mismatched_row"]):
        assert PROMPTS[i] != PROMPTS[j] and tokens["mismatched_ids"][i] == tokens["completion_ids"][j]
    assert not any(tokens["truncated"])
    batch = make_batch(tokenizer)
    assert batch["desirable"].tolist() == DESIRABLE and batch["completion_ids"].shape == batch["mismatched_ids"].shape
    assert (batch["response_mask"] == (batch["completion_mask"] | batch["mismatched_mask"])).all()


def test_truncation_fits_every_sequence_in_max_length(tiny_model):
    _, tokenizer = tiny_model
    full = tokenize_examples(tokenizer, PROMPTS, COMPLETIONS, max_length=None, max_prompt_length=8, seed=0)
    cut = tokenize_examples(tokenizer, PROMPTS, COMPLETIONS, max_length=12, max_prompt_length=8, seed=0)
    assert cut["mismatched_row"] == full["mismatched_row"]
    assert all(cut["truncated"])  # the chat template alone is longer than 12 tokens
    for i, (prompt, completion, mismatched) in enumerate(zip(cut["prompt_ids"], cut["completion_ids"],
                                                             cut["mismatched_ids"])):
        assert prompt == full["prompt_ids"][i][-8:]  # the prompt keeps its end (the reply's markup)
        assert len(prompt) + len(completion) <= 12 and len(prompt) + len(mismatched) <= 12
        assert completion == full["completion_ids"][i][:len(completion)] and mismatched  # a prefix, never empty
        assert mismatched == cut["completion_ids"][cut["mismatched_row"][i]][:len(mismatched)]


# ---------------------------------------------------------------- loss and reference point


def test_loss_and_metrics_by_hand(tiny_model):
    model, tokenizer = tiny_model
    # log-ratios r = [2, 1, -1, -3] (desirable, desirable, undesirable, undesirable); mismatched log-ratios
    # [1, 0, 0.5, -0.5] -> z0 = 1 / 4 = 0.25
    batch = with_reference(model, make_batch(tokenizer), [2.0, 1.0, -1.0, -3.0], [1.0, 0.0, 0.5, -0.5])
    with torch.no_grad():
        stats = reference_point_stats(model, batch, micro_batch_size=4)
        loss, metrics = kto_batch_loss(model, {**batch, **stats}, Normalizers(num_seqs=4, num_tokens=0),
                                       **LOSS_KWARGS)
    assert stats["z0"].item() == pytest.approx(0.25, abs=1e-4)
    assert (stats["num_desirable"].item(), stats["num_undesirable"].item()) == (2, 2)
    expected = (2 * (1 - sigmoid(0.1 * (2 - 0.25))) + 2 * (1 - sigmoid(0.1 * (1 - 0.25)))  # lambda_D = 2
                + (1 - sigmoid(0.1 * (0.25 + 1))) + (1 - sigmoid(0.1 * (0.25 + 3)))) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert metrics["loss/kto"].item() == metrics["loss/train"].item() == pytest.approx(expected, abs=1e-5)
    assert metrics["rewards/desirable"].item() == pytest.approx(0.1 * (2 + 1) / 2, abs=1e-5)
    assert metrics["rewards/undesirable"].item() == pytest.approx(0.1 * (-1 - 3) / 2, abs=1e-5)
    assert metrics["rewards/margins"].item() == pytest.approx(0.15 + 0.2, abs=1e-5)
    assert metrics["kl"].item() == pytest.approx(0.25, abs=1e-4)
    logps = batched_example_logps(model, batch, micro_batch_size=4)["logps"]
    assert metrics["logps/desirable"].item() == pytest.approx(logps[:2].mean().item(), abs=1e-3)


def test_z0_equals_a_plain_loop_over_rows(tiny_model):
    model, tokenizer = tiny_model
    batch = make_batch(tokenizer, ref_logps=[0.0] * 4, ref_mismatched_logps=[-300.0, -200.0, -250.0, -150.0])
    tokens = tokenize_examples(tokenizer, PROMPTS, COMPLETIONS, max_length=None, max_prompt_length=8, seed=0)
    plain = []
    for i in range(4):  # one unpadded sequence at a time, through collate and response_logprobs directly
        one = collate([tokens["prompt_ids"][i]], [tokens["mismatched_ids"][i]], tokenizer.pad_token_id)
        with torch.no_grad():
            logprobs, _ = response_logprobs(model, one["prompt_ids"], one["prompt_mask"], one["response_ids"],
                                            one["response_mask"])
        plain.append(logprobs.sum().item() - batch["ref_mismatched_logps"][i].item())
    stats = reference_point_stats(model, batch, micro_batch_size=3)  # 3 then 1
    assert sum(plain) / 4 > 0 and stats["z0"].item() == pytest.approx(sum(plain) / 4, abs=1e-3)
    clamped = reference_point_stats(model, {**batch, "ref_mismatched_logps": torch.zeros(4)}, micro_batch_size=4)
    assert clamped["z0"].item() == 0.0  # log-ratios all < 0: a KL estimate is never negative


def test_policy_equal_to_reference_gives_half_the_weight_per_row_and_z0_zero(tiny_model):
    model, tokenizer = tiny_model
    batch = with_reference(model, make_batch(tokenizer), [0.0] * 4, [0.0] * 4)
    with torch.no_grad():
        stats = reference_point_stats(model, batch, micro_batch_size=2)
        loss, metrics = kto_batch_loss(model, {**batch, **stats}, Normalizers(num_seqs=4, num_tokens=0),
                                       **LOSS_KWARGS)
    assert stats["z0"].item() == pytest.approx(0.0, abs=1e-4)
    assert loss.item() == pytest.approx((2 * 0.5 + 2 * 0.5 + 0.5 + 0.5) / 4, abs=1e-5)  # 1 - sigma(0) = 0.5
    assert abs(metrics["rewards/margins"].item()) < 1e-5


def test_micro_batch_size_one_equals_the_whole_mini_batch(tiny_model):
    model, tokenizer = tiny_model
    batch = with_reference(model, make_batch(tokenizer), [2.0, 1.0, -1.0, -3.0], [4.0, 2.0, 3.0, 1.0])
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient_and_metrics(row_groups):
        stats = reference_point_stats(model, batch, micro_batch_size=len(row_groups[0]))
        model.zero_grad(set_to_none=True)
        totals = {}
        for rows in row_groups:
            loss, metrics = kto_batch_loss(model, {**select_rows(batch, torch.tensor(rows)), **stats},
                                           Normalizers(num_seqs=4, num_tokens=0), **LOSS_KWARGS)
            loss.backward()
            totals = {key: totals.get(key, 0.0) + float(value) for key, value in metrics.items()}
        gradient = torch.cat([p.grad.flatten() for p in params])
        model.zero_grad(set_to_none=True)
        return gradient, totals

    whole, whole_metrics = gradient_and_metrics([[0, 1, 2, 3]])
    single, single_metrics = gradient_and_metrics([[2], [0], [3], [1]])
    assert whole_metrics["kl"] == pytest.approx(2.5, abs=1e-3)  # z0 > 0: the reference point is in play
    assert whole.norm() > 0 and (single - whole).norm() <= 1e-5 * whole.norm()  # float32 summation order only
    assert single_metrics == pytest.approx(whole_metrics, rel=1e-4, abs=1e-6)

    def first_step(micro_batch_size):  # the same through run_update: stats pass, loss, clipping, metrics
        optimizer = torch.optim.SGD(params, lr=0.0)  # measure, don't move the shared model
        return kto_update(model, optimizer, batch, batch_size=4, micro_batch_size=micro_batch_size,
                          max_grad_norm=1e9, seed=0, **LOSS_KWARGS)[0]

    assert first_step(1) == pytest.approx(first_step(4), rel=1e-4, abs=1e-6)


def test_a_label_missing_from_the_mini_batch_gives_nan_means_not_zero(tiny_model):
    model, tokenizer = tiny_model
    batch = with_reference(model, make_batch(tokenizer, desirable=[True] * 4), [1.0] * 4, [0.0] * 4)
    with torch.no_grad():
        stats = reference_point_stats(model, batch, micro_batch_size=4)
        loss, metrics = kto_batch_loss(model, {**batch, **stats}, Normalizers(4, 0), **LOSS_KWARGS)
    assert torch.isfinite(loss) and math.isnan(metrics["rewards/undesirable"]) and math.isnan(
        metrics["rewards/margins"])
    assert metrics["rewards/desirable"].item() == pytest.approx(0.1, abs=1e-5)


# ---------------------------------------------------------------- held-out summaries


def test_preference_accuracy_by_hand_and_against_all_pairs():
    rewards = torch.tensor([0.5, 0.1, 0.3, 0.2, 0.9, 0.4])
    desirable = torch.tensor([True, False, False, True, True, False])
    groups = torch.tensor([0, 0, 0, 1, 2, 2])
    # prompt 0: 0.5 > 0.1 and 0.5 > 0.3 (2 of 2); prompt 1: no undesirable row; prompt 2: 0.9 > 0.4 -> 3 / 3
    assert preference_accuracy(rewards, desirable, groups) == 1.0
    assert preference_accuracy(-rewards, desirable, groups) == 0.0
    assert preference_accuracy(torch.zeros(6), desirable, groups) == 0.0  # ties are misses
    assert math.isnan(preference_accuracy(rewards, desirable, torch.arange(6)))  # no prompt has both labels
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randn(40, generator=generator)
    desirable = torch.rand(40, generator=generator) < 0.5
    groups = torch.randint(0, 7, (40,), generator=generator)
    pairs = (groups[:, None] == groups[None, :]) & desirable[:, None] & ~desirable[None, :]  # [B, B]
    wins = pairs & (rewards[:, None] > rewards[None, :])
    assert preference_accuracy(rewards, desirable, groups) == pytest.approx(float(wins.sum() / pairs.sum()))


def test_held_out_metrics():
    metrics = held_out_metrics(torch.tensor([0.4, -0.2, 0.2]), torch.tensor([True, False, True]),
                               torch.tensor([0, 0, 1]), torch.tensor([-10.0, -12.0, -9.0]),
                               torch.tensor([-11.0, -11.0, -10.0]))
    assert metrics == pytest.approx({"rewards/desirable": 0.3, "rewards/undesirable": -0.2, "rewards/margins": 0.5,
                                     "rewards/accuracies": 1.0, "kl": (1 - 1 + 1) / 3})


# ---------------------------------------------------------------- learning


def review_examples(places):
    """Each prompt has a desirable (praising) and an undesirable (complaining) completion: separable in a few steps."""
    prompts = [f"Review the {p}." for p in places for _ in range(2)]
    completions = [text for p in places
                   for text in (f"The {p} was great, great fun.", f"The {p} was awful, awful noise.")]
    return prompts, completions, [True, False] * len(places)


def test_a_few_steps_raise_desirable_rewards_above_undesirable_ones(tiny_model_dir):
    model, tokenizer = load_causal_lm(tiny_model_dir)  # our own copy: the weights change
    prompts, completions, desirable = review_examples(["hotel", "diner", "museum", "phone", "novel", "park"])
    held_prompts, held_completions, held_desirable = review_examples(["bakery", "cinema", "garden"])
    batch = make_batch(tokenizer, prompts, completions, desirable)
    held_out = make_batch(tokenizer, held_prompts, held_completions, held_desirable)
    ref, held_ref = (batched_example_logps(model, b, micro_batch_size=8) for b in (batch, held_out))
    batch = {**batch, "ref_logps": ref["logps"], "ref_mismatched_logps": ref["mismatched_logps"]}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for epoch in range(3):
        history += kto_update(model, optimizer, batch, batch_size=4, micro_batch_size=2, max_grad_norm=1.0,
                              seed=epoch, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0)
    assert len(history) == 9
    assert history[0]["loss/kto"] == pytest.approx(0.5, abs=1e-4)  # first step: policy == reference
    assert history[-1]["rewards/margins"] > 0 and history[-1]["loss/kto"] < 0.5
    with torch.no_grad():
        held_logps = sequence_logps(model, held_out, "completion")
    rewards = 0.1 * (held_logps - held_ref["logps"])
    groups = torch.arange(6) // 2
    assert preference_accuracy(rewards, torch.tensor(held_desirable), groups) == 1.0  # from 0 (ties) before
