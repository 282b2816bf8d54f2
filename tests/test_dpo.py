"""DPO core: one forward pass for chosen + rejected equals two, micro-batching leaves the gradient unchanged,
policy == reference gives log 2 and no accurate pairs, and a few steps on a tiny model learn a separable set."""

from __future__ import annotations

import math
from typing import get_args

import pandas as pd
import pytest
import torch

from rlhf_core.batch import collate, select_rows
from rlhf_core.config import DPOConfig
from rlhf_core.dpo import batched_pair_logprobs, collate_pairs, dpo_loss, dpo_update, pair_logprobs, tokenize_pairs
from rlhf_core.logprobs import response_logprobs
from rlhf_core.models import load_causal_lm
from rlhf_core.preference_losses import PREFERENCE_LOSSES, rpo_nll
from rlhf_core.update import Normalizers

PROMPTS = ["Review the hotel.", "Say something about the weather today, please.", "Hi", "Rate the diner."]
CHOSEN = ["Lovely.", "It is sunny and warm, a perfect day for a long walk.", "Hello there, how can I help?", "Good"]
REJECTED = ["It was dirty and the staff were rude to everyone.", "Rain.", "No", "The food was cold and bland."]
LOSS_KWARGS = dict(loss_type="sigmoid", beta=0.1, label_smoothing=0.0, simpo_gamma=0.5, rpo_alpha=None)


def make_batch(tokenizer, prompts=PROMPTS, chosen=CHOSEN, rejected=REJECTED, **per_pair):
    return collate_pairs(*tokenize_pairs(tokenizer, prompts, chosen, rejected), tokenizer.pad_token_id,
                         per_pair=per_pair or None)


def test_loss_type_literal_equals_registry_keys():
    choices = get_args(DPOConfig.model_fields["loss_type"].annotation)
    assert set(choices) == set(PREFERENCE_LOSSES) and len(set(choices)) == len(choices)
    assert DPOConfig().loss_type in PREFERENCE_LOSSES


def test_response_is_plain_text_plus_eos_and_eos_is_in_the_mask(tiny_model):
    _, tokenizer = tiny_model
    prompt_ids, chosen_ids, _ = tokenize_pairs(tokenizer, PROMPTS[:1], CHOSEN[:1], REJECTED[:1])
    assert chosen_ids[0] == tokenizer("Lovely.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert tokenizer.decode(prompt_ids[0]).rstrip().endswith("assistant")  # chat template, generation prompt
    batch = make_batch(tokenizer)
    assert batch["chosen_mask"].sum(-1).tolist() == [len(ids) for ids in tokenize_pairs(
        tokenizer, PROMPTS, CHOSEN, REJECTED)[1]]
    assert (batch["response_mask"] == (batch["chosen_mask"] | batch["rejected_mask"])).all()


def test_chosen_and_rejected_in_one_forward_equal_two_separate_forwards(tiny_model):
    model, tokenizer = tiny_model
    prompt_ids, chosen_ids, rejected_ids = tokenize_pairs(tokenizer, PROMPTS, CHOSEN, REJECTED)
    with torch.no_grad():
        joint = pair_logprobs(model, make_batch(tokenizer))
        for name, responses in [("chosen", chosen_ids), ("rejected", rejected_ids)]:
            alone = collate(prompt_ids, responses, tokenizer.pad_token_id)
            logprobs, _ = response_logprobs(model, alone["prompt_ids"], alone["prompt_mask"], alone["response_ids"],
                                            alone["response_mask"])
            torch.testing.assert_close(joint[f"{name}_logps"], logprobs.sum(-1), atol=1e-4, rtol=1e-5)
            assert joint[f"{name}_lengths"].tolist() == [float(len(r)) for r in responses]


def test_policy_equal_to_reference_gives_log_2_and_no_accurate_pairs(tiny_model):
    model, tokenizer = tiny_model
    batch = make_batch(tokenizer)
    ref = batched_pair_logprobs(model, batch, micro_batch_size=3)  # 3 then 1: micro-batching the reference too
    batch = {**batch, "ref_chosen_logps": ref["chosen_logps"], "ref_rejected_logps": ref["rejected_logps"]}
    with torch.no_grad():
        loss, metrics = dpo_loss(model, batch, Normalizers(num_seqs=4, num_tokens=0), **LOSS_KWARGS)
    torch.testing.assert_close(loss, torch.tensor(math.log(2)), atol=1e-5, rtol=0)
    torch.testing.assert_close(metrics["loss/dpo"], torch.tensor(math.log(2)), atol=1e-5, rtol=0)
    assert float(metrics["rewards/accuracies"]) == 0.0  # ties are not wins
    assert abs(float(metrics["rewards/margins"])) < 1e-5
    torch.testing.assert_close(metrics["logps/chosen"], ref["chosen_logps"].mean())


@pytest.mark.parametrize("loss_type, rpo_alpha", [("sigmoid", None), ("ipo", None), ("simpo", 0.5)])
def test_micro_batched_gradient_equals_full_batch_gradient(tiny_model, loss_type, rpo_alpha):
    model, tokenizer = tiny_model
    batch = make_batch(tokenizer, ref_chosen_logps=[-40.0, -90.0, -60.0, -20.0],
                       ref_rejected_logps=[-70.0, -30.0, -15.0, -55.0])
    kwargs = {**LOSS_KWARGS, "loss_type": loss_type, "rpo_alpha": rpo_alpha}
    norm = Normalizers(num_seqs=4, num_tokens=float(batch["response_mask"].sum()))
    params = [p for p in model.parameters() if p.requires_grad]

    def gradients_and_metrics(row_groups):
        model.zero_grad(set_to_none=True)
        totals = {}
        for rows in row_groups:
            loss, metrics = dpo_loss(model, select_rows(batch, torch.tensor(rows)), norm, **kwargs)
            loss.backward()
            totals = {k: totals.get(k, 0.0) + float(v) for k, v in metrics.items()}
        grads = [p.grad.clone() for p in params]
        model.zero_grad(set_to_none=True)
        return grads, totals

    full_grads, full_metrics = gradients_and_metrics([[0, 1, 2, 3]])
    micro_grads, micro_metrics = gradients_and_metrics([[2], [0, 3], [1]])  # uneven; select_rows trims padding
    full, micro = torch.cat([g.flatten() for g in full_grads]), torch.cat([g.flatten() for g in micro_grads])
    assert full.norm() > 0 and (micro - full).norm() <= 1e-5 * full.norm()  # float32 summation order only
    assert micro_metrics == pytest.approx(full_metrics, rel=1e-4, abs=1e-6)


def test_rpo_adds_the_chosen_nll_per_token(tiny_model):
    model, tokenizer = tiny_model
    batch = make_batch(tokenizer, ref_chosen_logps=[-40.0] * 4, ref_rejected_logps=[-50.0] * 4)
    norm = Normalizers(num_seqs=4, num_tokens=0)
    with torch.no_grad():
        plain, _ = dpo_loss(model, batch, norm, **LOSS_KWARGS)
        with_rpo, metrics = dpo_loss(model, batch, norm, **{**LOSS_KWARGS, "rpo_alpha": 0.5})
        logps = pair_logprobs(model, batch)
    torch.testing.assert_close(with_rpo, plain + 0.5 * rpo_nll(logps["chosen_logps"], logps["chosen_lengths"]).mean())
    torch.testing.assert_close(metrics["loss/dpo"], plain)


def separable_pairs(places):
    """Chosen always praises, rejected always complains: a preference the tiny model can pick up in a few steps."""
    return pd.DataFrame({"prompt": [f"Review the {p}." for p in places],
                         "chosen": [f"The {p} was great, great fun." for p in places],
                         "rejected": [f"The {p} was awful, awful noise." for p in places]})


def accuracy(model, tokenizer, df, ref):
    logps = batched_pair_logprobs(model, make_batch(tokenizer, df["prompt"], df["chosen"], df["rejected"]),
                                  micro_batch_size=8)
    return float(((logps["chosen_logps"] - ref["chosen_logps"]) > (logps["rejected_logps"] - ref["rejected_logps"]))
                 .float().mean())


def test_a_few_steps_raise_held_out_implicit_reward_accuracy(tiny_model_dir):
    model, tokenizer = load_causal_lm(tiny_model_dir)  # our own copy: the weights change
    train = separable_pairs(["hotel", "diner", "museum", "phone", "novel", "park", "cafe", "train"])
    held_out = separable_pairs(["bakery", "cinema", "garden", "laptop"])
    batch = make_batch(tokenizer, train["prompt"], train["chosen"], train["rejected"])
    ref = batched_pair_logprobs(model, batch, micro_batch_size=8)
    ref_held_out = batched_pair_logprobs(model, make_batch(tokenizer, held_out["prompt"], held_out["chosen"],
                                                            held_out["rejected"]), micro_batch_size=8)
    batch = {**batch, "ref_chosen_logps": ref["chosen_logps"], "ref_rejected_logps": ref["rejected_logps"]}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for epoch in range(3):
        history += dpo_update(model, optimizer, batch, batch_size=4, micro_batch_size=2, max_grad_norm=1.0,
                              seed=epoch, **LOSS_KWARGS)
    assert len(history) == 6
    assert history[0]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-4)  # first step: policy == reference
    assert history[-1]["loss/dpo"] < 0.6 and history[-1]["rewards/margins"] > 0
    assert accuracy(model, tokenizer, held_out, ref_held_out) == 1.0  # from 0 (all ties) before training
