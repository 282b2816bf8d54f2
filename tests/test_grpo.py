"""GRPO's loss and update on a tiny random-init Llama: gradient accumulation, the on-policy REINFORCE form,
the KL term's value, and the old-logprobs / step-count contract of `grpo_update`."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

import rlhf_core.grpo as grpo_module
from rlhf_core.batch import collate, response_lists, select_rows
from rlhf_core.config import KLConfig, LossConfig, OptimConfig
from rlhf_core.grpo import grpo_loss, grpo_update, update_from_rollouts
from rlhf_core.kl import kl_k1
from rlhf_core.logprobs import batched_response_logprobs, position_ids_from_mask
from rlhf_core.models import load_causal_lm
from rlhf_core.policy_losses import AGGREGATION_MODES, POLICY_LOSSES
from rlhf_core.update import Normalizers

PROMPTS = ["What is 2 + 3?", "Hi", "Compute 17 times 4, please, and show your work.", "x",
           "A longer prompt about GRPO", "Why?"]
RESPONSES = ["5", "Hello there! How are you today?", "68", "yes no maybe so", "It normalises rewards per group.",
             "Because."]
NORM_LENGTH = 16  # Dr. GRPO's constant length (max_new_tokens in training)
LOSS_KWARGS = dict(clip_eps_low=0.2, clip_eps_high=0.28, kl_estimator="k3", norm_length=NORM_LENGTH,
                   temperature=1.0, chunk_size=1024)


def make_batch(tokenizer, seed=0):
    """6 rollouts with ragged prompts (left-padded) and responses (right-padded, ending with EOS), random
    advantages [6] and ref_logprobs [6, T] near a random-init model's ~-log(V)."""
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    response_ids = [tokenizer(r)["input_ids"] + [tokenizer.eos_token_id] for r in RESPONSES]
    generator = torch.Generator().manual_seed(seed)
    ref_logprobs = [(-10.0 + torch.randn(len(r), generator=generator)).tolist() for r in response_ids]
    advantages = torch.randn(len(PROMPTS), generator=generator).tolist()
    batch = collate(prompt_ids, response_ids, tokenizer.pad_token_id, per_token={"ref_logprobs": ref_logprobs},
                    per_seq={"advantages": advantages})
    lengths = batch["response_mask"].sum(1)
    assert len(set(lengths.tolist())) > 3 and len(set(batch["prompt_mask"].sum(1).tolist())) > 3  # really ragged
    assert batch["prompt_mask"][:, 0].any() and not batch["prompt_mask"][:, 0].all()  # left padding present
    return batch


def full_normalizers(batch):
    return Normalizers(num_seqs=float(batch["response_mask"].shape[0]),
                       num_tokens=float(batch["response_mask"].sum()))


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    """Our own copy: these tests write .grad on it (the weights are never changed)."""
    model, tokenizer = load_causal_lm(tiny_model_dir)
    return model.eval(), tokenizer


def gradients(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------- gradient accumulation


@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
@pytest.mark.parametrize("aggregation", AGGREGATION_MODES)
def test_micro_batch_gradients_add_up_to_full_batch(lm, aggregation, kl_coef):
    model, tokenizer = lm
    batch = make_batch(tokenizer)
    norm = full_normalizers(batch)  # the mini-batch's counts, given to every micro-batch
    kwargs = dict(LOSS_KWARGS, kl_coef=kl_coef, aggregation=aggregation)

    full_loss, full_metrics = grpo_loss(model, batch, norm, **kwargs)
    full = gradients(model, full_loss)

    model.zero_grad(set_to_none=True)
    total_loss, total_metrics = 0.0, {}
    for rows in torch.tensor([4, 0, 5, 2, 1, 3]).split([1, 2, 3]):  # shuffled rows, micro-batches of 1, 2, 3
        micro = select_rows(batch, rows)
        assert micro["response_ids"].shape[1] <= batch["response_ids"].shape[1]
        loss, metrics = grpo_loss(model, micro, norm, **kwargs)
        loss.backward()  # accumulates into .grad
        total_loss += loss.item()
        for key, value in metrics.items():
            total_metrics[key] = total_metrics.get(key, 0.0) + float(value)
    accumulated = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    assert accumulated.keys() == full.keys() and len(full) == len(list(model.parameters()))
    scale = max(g.abs().max().item() for g in full.values())
    assert scale > 1e-3  # a real gradient, not zeros everywhere
    for name, grad in full.items():
        torch.testing.assert_close(accumulated[name], grad, rtol=0.0, atol=2e-6 * scale, msg=name)
    assert total_loss == pytest.approx(full_loss.item(), rel=1e-5, abs=1e-6)
    assert total_metrics.keys() == {k for k in full_metrics}
    assert "kl/mean" in full_metrics  # ref_logprobs are given: the KL is reported, a loss term only with kl_coef > 0
    for key, value in full_metrics.items():
        assert total_metrics[key] == pytest.approx(float(value), rel=1e-5, abs=1e-6), key


def test_per_micro_batch_normalisers_would_not_add_up(lm):
    """The counter-check: normalising each micro-batch by its own size gives a different gradient, so the
    test above can tell the two apart."""
    model, tokenizer = lm
    batch = make_batch(tokenizer)
    kwargs = dict(LOSS_KWARGS, kl_coef=0.0, aggregation="token-mean")
    full = gradients(model, grpo_loss(model, batch, full_normalizers(batch), **kwargs)[0])
    model.zero_grad(set_to_none=True)
    for rows in torch.arange(6).split([1, 2, 3]):
        micro = select_rows(batch, rows)
        grpo_loss(model, micro, full_normalizers(micro), **kwargs)[0].backward()
    name = "model.embed_tokens.weight"
    assert not torch.allclose(model.get_parameter(name).grad, full[name], atol=1e-4)


# ---------------------------------------------------------------- on-policy: REINFORCE


def reference_logprobs(model, batch):
    """Independent formulation: the plain HF forward on [prompt | response], full log_softmax, then gather.
    -> [B, T] (values at padding are meaningless)."""
    input_ids = torch.cat([batch["prompt_ids"], batch["response_ids"]], dim=1)  # [B, P+T]
    attention_mask = torch.cat([batch["prompt_mask"], batch["response_mask"]], dim=1).long()
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask)).logits  # [B, P+T, V]
    prompt_len = batch["prompt_ids"].shape[1]
    logp = torch.log_softmax(logits[:, prompt_len - 1:-1].float(), dim=-1)  # [B, T, V]: predicts response tokens
    return logp.gather(-1, batch["response_ids"][..., None]).squeeze(-1)  # [B, T]


def test_on_policy_loss_is_reinforce(lm):
    model, tokenizer = lm
    batch = make_batch(tokenizer)
    mask, advantages = batch["response_mask"], batch["advantages"]
    norm = full_normalizers(batch)
    loss, metrics = grpo_loss(model, batch, norm, **dict(LOSS_KWARGS, kl_coef=0.0, aggregation="token-mean"))

    # ratio == 1 everywhere: nothing is clipped, approx_kl is 0, and the loss is -sum_b A_b * len_b / N
    assert float(metrics["policy/clip_frac_low"]) == 0.0
    assert float(metrics["policy/clip_frac_high"]) == 0.0
    assert float(metrics["policy/approx_kl"]) == 0.0
    expected_loss = -(advantages * mask.sum(1)).sum() / mask.sum()
    torch.testing.assert_close(loss.detach(), expected_loss)
    torch.testing.assert_close(metrics["loss/policy"], expected_loss)  # the KL (reported) is not in the loss
    without_ref = {k: v for k, v in batch.items() if k != "ref_logprobs"}
    assert "kl/mean" in metrics and "kl/mean" not in grpo_loss(model, without_ref, norm, **dict(
        LOSS_KWARGS, kl_coef=0.0, aggregation="token-mean"))[1]

    # gradient == grad of -(sum over response tokens of A * log pi) / num_tokens (REINFORCE)
    grads = gradients(model, loss)
    logprobs = reference_logprobs(model, batch)
    reinforce = -torch.where(mask, advantages[:, None] * logprobs, 0.0).sum() / norm.num_tokens
    reinforce_grads = gradients(model, reinforce)
    scale = max(g.abs().max().item() for g in grads.values())
    assert scale > 1e-3
    for name, grad in reinforce_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0.0, atol=2e-6 * scale, msg=name)


def test_clip_fractions_with_old_logprobs(lm):
    """old = log pi - 1: ratio e > 1 + 0.28 on every token, so the high clip binds exactly on the tokens of
    rows with A > 0 and their gradient is 0; old = log pi + 1: ratio 1/e < 1 - 0.2, the low clip binds where A < 0."""
    model, tokenizer = lm
    batch = make_batch(tokenizer)
    mask, advantages = batch["response_mask"], batch["advantages"]
    assert (advantages > 0).any() and (advantages < 0).any()
    norm = full_normalizers(batch)
    logprobs = batched_response_logprobs(model, batch, micro_batch_size=6)
    kwargs = dict(LOSS_KWARGS, kl_coef=0.0, aggregation="token-mean")

    with torch.no_grad():
        _, high = grpo_loss(model, {**batch, "old_logprobs": logprobs - 1.0}, norm, **kwargs)
        _, low = grpo_loss(model, {**batch, "old_logprobs": logprobs + 1.0}, norm, **kwargs)
    def tokens_with(rows):  # fraction of the response tokens that lie in these rows
        return float(mask[rows].sum()) / norm.num_tokens

    assert float(high["policy/clip_frac_high"]) == pytest.approx(tokens_with(advantages > 0), abs=1e-6)
    assert float(high["policy/clip_frac_low"]) == 0.0
    assert float(low["policy/clip_frac_low"]) == pytest.approx(tokens_with(advantages < 0), abs=1e-6)
    assert float(low["policy/clip_frac_high"]) == 0.0
    assert float(high["policy/approx_kl"]) == pytest.approx(0.5, rel=1e-4)  # 0.5 * (log pi - old)^2 = 0.5 * 1^2

    # with only positive advantages every token is clipped high: the loss is a constant, the gradient 0
    positive = {**batch, "advantages": advantages.abs() + 0.1, "old_logprobs": logprobs - 1.0}
    loss, _ = grpo_loss(model, positive, norm, **kwargs)
    expected = -(1 + 0.28) * (positive["advantages"] * mask.sum(1)).sum() / mask.sum()
    torch.testing.assert_close(loss.detach(), expected)
    assert all((g == 0).all() for g in gradients(model, loss).values())


# ---------------------------------------------------------------- the KL term


@pytest.mark.parametrize("estimator, expected", [
    pytest.param("k1", lambda c: -c, id="k1"),                   # log pi - log ref = -c
    pytest.param("k2", lambda c: 0.5 * c**2, id="k2"),           # (log pi - log ref)^2 / 2
    pytest.param("k3", lambda c: math.expm1(c) - c, id="k3"),    # (r - 1) - log r, log r = c: 0.1487 at c = 0.5
])
def test_kl_metric_hand_values(lm, estimator, expected):
    model, tokenizer = lm
    batch = make_batch(tokenizer)
    mask, advantages = batch["response_mask"], batch["advantages"]
    norm = full_normalizers(batch)
    own = batched_response_logprobs(model, batch, micro_batch_size=6)  # the model's own log-probs
    kwargs = dict(LOSS_KWARGS, kl_coef=0.1, kl_estimator=estimator, aggregation="token-mean")
    with torch.no_grad():
        _, same = grpo_loss(model, {**batch, "ref_logprobs": own}, norm, **kwargs)
        c = 0.5
        loss, shifted = grpo_loss(model, {**batch, "ref_logprobs": own + c}, norm, **kwargs)
    assert abs(float(same["kl/mean"])) < 1e-6
    assert float(shifted["kl/mean"]) == pytest.approx(expected(c), rel=1e-4)
    # on-policy token-mean loss = -sum_b A_b len_b / N + kl_coef * KL
    policy_part = -(advantages * mask.sum(1)).sum() / mask.sum()
    assert float(loss) == pytest.approx(float(policy_part) + 0.1 * expected(c), rel=1e-4, abs=1e-6)


def test_kl_term_pulls_toward_the_reference(lm):
    """With zero advantages only the KL term has a gradient; a gradient-descent step along it raises log pi
    where ref > pi (k3's gradient w.r.t. log pi is 1 - ref/pi < 0 there)."""
    model, tokenizer = lm
    batch = make_batch(tokenizer)
    batch["advantages"] = torch.zeros_like(batch["advantages"])
    norm = full_normalizers(batch)
    own = batched_response_logprobs(model, batch, micro_batch_size=6)
    batch["ref_logprobs"] = own + 0.5
    loss, _ = grpo_loss(model, batch, norm, **dict(LOSS_KWARGS, kl_coef=0.1, aggregation="token-mean"))
    grads = gradients(model, loss)
    assert any(g.abs().max() > 0 for g in grads.values())
    with torch.no_grad():
        saved = {n: p.clone() for n, p in model.named_parameters()}
        try:
            for name, p in model.named_parameters():
                p -= 1e-2 * grads[name]
            after = batched_response_logprobs(model, batch, micro_batch_size=6)
        finally:
            for name, p in model.named_parameters():
                p.copy_(saved[name])
    mask = batch["response_mask"]
    assert (after - own)[mask].mean() > 0


# ---------------------------------------------------------------- grpo_update


def _spy_on_old_logprobs(monkeypatch):
    calls = []
    original = grpo_module.batched_response_logprobs

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(grpo_module, "batched_response_logprobs", spy)
    return calls


def test_grpo_update_multi_step_computes_old_logprobs_once(tiny_model_dir, monkeypatch):
    model, tokenizer = load_causal_lm(tiny_model_dir)
    batch = make_batch(tokenizer)
    calls = _spy_on_old_logprobs(monkeypatch)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = grpo_update(model, optimizer, batch, epochs=2, mini_batches=2, micro_batch_size=2, max_grad_norm=1.0,
                          seed=0, **dict(LOSS_KWARGS, kl_coef=0.0, aggregation="token-mean"))
    assert len(calls) == 1  # once, before the first step, not once per step
    assert len(history) == 2 * 2
    assert int(optimizer.state[next(iter(model.parameters()))]["step"]) == 4
    # step 1 runs on the weights old_logprobs came from; later steps see a moved policy
    assert history[0]["policy/approx_kl"] < 1e-10
    assert all(h["policy/approx_kl"] > 1e-8 for h in history[1:])
    assert all(math.isfinite(h["policy/grad_norm"]) and h["policy/grad_norm"] > 0 for h in history)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_grpo_update_single_step_is_on_policy_and_changes_weights(tiny_model_dir, monkeypatch):
    model, tokenizer = load_causal_lm(tiny_model_dir)
    batch = make_batch(tokenizer)
    calls = _spy_on_old_logprobs(monkeypatch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = grpo_update(model, optimizer, batch, epochs=1, mini_batches=1, micro_batch_size=4, max_grad_norm=1.0,
                          seed=0, **dict(LOSS_KWARGS, kl_coef=0.0, aggregation="token-mean"))
    assert calls == []  # no extra forward pass: the ratio is exactly 1
    assert len(history) == 1
    assert history[0]["policy/approx_kl"] == 0.0
    assert history[0]["policy/clip_frac_low"] == 0.0 and history[0]["policy/clip_frac_high"] == 0.0
    mask, advantages = batch["response_mask"], batch["advantages"]
    expected_loss = float(-(advantages * mask.sum(1)).sum() / mask.sum())
    assert history[0]["loss/policy"] == pytest.approx(expected_loss, rel=1e-5)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert "model.embed_tokens.weight" in changed and len(changed) == len(before)


# ---------------------------------------------------------------- truncated importance sampling


def test_truncated_is_weights_hand_values():
    old = torch.tensor([[-1.0, -2.0, -0.5]])
    sampling = torch.tensor([[-1.0, -2.0 - math.log(2.0), -0.5 + math.log(4.0)]])
    # p_train / p_sampler = 1, 2 (capped at 1.5), 1/4
    torch.testing.assert_close(grpo_module.truncated_is_weights(old, sampling, cap=1.5),
                               torch.tensor([[1.0, 1.5, 0.25]]))


def test_tis_weights_scale_the_loss_token_by_token(lm):
    """Sampler log-probs equal to the trainer's: the loss and its metrics are unchanged; the sampler
    under-estimating every token by log 2 with cap 1.5: every token's loss is 1.5x, and all are counted capped."""
    model, tokenizer = lm
    batch = make_batch(tokenizer)
    mask = batch["response_mask"].bool()
    norm = full_normalizers(batch)
    kwargs = dict(LOSS_KWARGS, kl_coef=0.0, aggregation="token-mean")
    with torch.no_grad():
        base, _ = grpo_loss(model, batch, norm, **kwargs)
        logprobs = batched_response_logprobs(model, batch, micro_batch_size=6)
        same, metrics = grpo_loss(model, {**batch, "sampling_logprobs": logprobs}, norm, tis_cap=2.0, **kwargs)
        assert abs(float(metrics["rollout/tis_weight_mean"]) - 1.0) < 1e-5
        assert float(metrics["rollout/logprob_abs_diff"]) < 1e-5
        torch.testing.assert_close(same, base, rtol=1e-5, atol=1e-6)
        lower = torch.where(mask, logprobs - math.log(2.0), 0.0)
        capped, metrics = grpo_loss(model, {**batch, "sampling_logprobs": lower}, norm, tis_cap=1.5, **kwargs)
    torch.testing.assert_close(capped, 1.5 * base, rtol=1e-5, atol=1e-6)
    assert float(metrics["rollout/tis_capped_frac"]) == pytest.approx(1.0)
    assert float(metrics["rollout/logprob_abs_diff"]) == pytest.approx(math.log(2.0), abs=1e-5)


def test_tis_config_is_refused_where_it_would_do_nothing():
    from pydantic import ValidationError

    from rlhf_core.config import GRPOConfig, PPOConfig

    assert GRPOConfig(loss={"tis_cap": 2.0}).loss.tis_cap == 2.0
    with pytest.raises(ValidationError, match="GRPO only"):
        PPOConfig(loss={"tis_cap": 2.0})
    with pytest.raises(ValidationError, match="greedy decoding"):
        GRPOConfig(loss={"tis_cap": 2.0}, generation={"temperature": 0.0})
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        GRPOConfig(loss={"tis_cap": 0.5})


# ---------------------------------------------------------------- policy losses, entropy bonus, KL options


def accumulated_gradients(model, batch, norm, kwargs, split=(1, 2, 3)):
    """(full loss, full grads, full metrics), (summed micro losses, accumulated grads, summed metrics)."""
    full_loss, full_metrics = grpo_loss(model, batch, norm, **kwargs)
    full = gradients(model, full_loss)
    model.zero_grad(set_to_none=True)
    total_loss, total_metrics = 0.0, {}
    for rows in torch.tensor([4, 0, 5, 2, 1, 3]).split(list(split)):
        loss, metrics = grpo_loss(model, select_rows(batch, rows), norm, **kwargs)
        loss.backward()
        total_loss += loss.item()
        for key, value in metrics.items():
            total_metrics[key] = total_metrics.get(key, 0.0) + float(value)
    accumulated = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return (full_loss.item(), full, full_metrics), (total_loss, accumulated, total_metrics)


VARIANTS = {
    "gspo": dict(policy_loss="gspo", clip_eps_low=0.01, clip_eps_high=0.02, aggregation="seq-mean-token-mean"),
    "cispo": dict(policy_loss="cispo", clip_eps_low=1.0, clip_eps_high=0.1),
    "dual_clip": dict(policy_loss="ppo_clip", dual_clip_c=1.1),
    "entropy_bonus": dict(entropy_coef=0.05),
    "kl_corrected_clamped": dict(kl_coef=0.1, kl_importance_corrected=True, kl_clamp=0.3),
    "token_advantages": dict(policy_loss="gspo", clip_eps_low=0.01, clip_eps_high=0.02),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_new_options_micro_batch_gradients_add_up_to_full_batch(lm, variant):
    model, tokenizer = lm
    batch = make_batch(tokenizer)
    generator = torch.Generator().manual_seed(1)
    own = batched_response_logprobs(model, batch, micro_batch_size=6)
    mask = batch["response_mask"]
    # off-policy by up to +-0.3 per token, so the clips, the dual clip and the KL clamp bind on some tokens
    batch["old_logprobs"] = torch.where(mask, own + 0.3 * torch.randn(own.shape, generator=generator), 0.0)
    batch["ref_logprobs"] = torch.where(mask, own + 0.5 * torch.randn(own.shape, generator=generator), 0.0)
    if variant == "token_advantages":  # REINFORCE++-style: one advantage per token
        batch["advantages"] = torch.where(mask, torch.randn(own.shape, generator=generator), 0.0)
    kwargs = dict(LOSS_KWARGS, kl_coef=0.0, aggregation="token-mean")
    kwargs.update(VARIANTS[variant])
    norm = full_normalizers(batch)
    (full_loss, full, full_metrics), (total_loss, accumulated, total_metrics) = accumulated_gradients(
        model, batch, norm, kwargs)
    scale = max(g.abs().max().item() for g in full.values())
    assert scale > 1e-4 and accumulated.keys() == full.keys()
    for name, grad in full.items():
        torch.testing.assert_close(accumulated[name], grad, rtol=0.0, atol=2e-6 * scale, msg=name)
    assert total_loss == pytest.approx(full_loss, rel=1e-5, abs=1e-6)
    assert total_metrics.keys() == full_metrics.keys()
    for key, value in full_metrics.items():
        assert total_metrics[key] == pytest.approx(float(value), rel=1e-5, abs=1e-6), key
    expected_keys = {"gspo": "policy/seq_clip_frac", "token_advantages": "policy/seq_clip_frac",
                     "dual_clip": "policy/dual_clip_frac", "kl_corrected_clamped": "kl/clamp_frac"}
    if variant in expected_keys:
        assert 0 < float(full_metrics[expected_keys[variant]]) < 1, expected_keys[variant]  # really exercised


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_on_policy_every_policy_loss_gives_the_reinforce_gradient(lm, name):
    model, tokenizer = lm
    batch = make_batch(tokenizer)
    norm = full_normalizers(batch)
    kwargs = dict(LOSS_KWARGS, kl_coef=0.0, aggregation="token-mean")
    reference = gradients(model, grpo_loss(model, batch, norm, **kwargs)[0])  # ppo_clip on-policy: REINFORCE
    loss, metrics = grpo_loss(model, batch, norm, **dict(kwargs, policy_loss=name, clip_eps_low=3e-4,
                                                         clip_eps_high=4e-4))
    grads = gradients(model, loss)
    scale = max(g.abs().max().item() for g in reference.values())
    for key, grad in reference.items():
        torch.testing.assert_close(grads[key], grad, rtol=0.0, atol=2e-6 * scale, msg=key)
    assert float(metrics["policy/clip_frac_low"]) == float(metrics["policy/clip_frac_high"]) == 0.0


def test_entropy_bonus_subtracts_coef_times_the_aggregated_entropy(lm):
    model, tokenizer = lm
    batch = make_batch(tokenizer)
    norm = full_normalizers(batch)
    for aggregation in AGGREGATION_MODES:
        kwargs = dict(LOSS_KWARGS, kl_coef=0.0, aggregation=aggregation)
        with torch.no_grad():
            base, metrics = grpo_loss(model, batch, norm, **kwargs)
            bonus, _ = grpo_loss(model, batch, norm, **kwargs, entropy_coef=0.1)
            _, entropy = grpo_module.response_logprobs(model, batch["prompt_ids"], batch["prompt_mask"],
                                                       batch["response_ids"], batch["response_mask"].bool())
        expected = grpo_module.aggregate(entropy, batch["response_mask"].bool(), aggregation, norm_length=NORM_LENGTH)
        torch.testing.assert_close(bonus, base - 0.1 * expected, rtol=1e-5, atol=1e-6)
        if aggregation == "token-mean":
            torch.testing.assert_close(expected, metrics["policy/entropy"])


def test_importance_corrected_kl_on_policy_keeps_the_value_and_gives_the_k1_reinforce_gradient(lm):
    """On-policy r = 1 in value, so the loss is unchanged; its gradient becomes sum_t k1_t grad log pi_t / N (the
    reverse KL's score-function gradient) instead of k3's (1 - ref/pi) grad log pi."""
    model, tokenizer = lm
    batch = make_batch(tokenizer)
    batch["advantages"] = torch.zeros_like(batch["advantages"])  # only the KL term has a gradient
    own = batched_response_logprobs(model, batch, micro_batch_size=6)
    mask = batch["response_mask"].bool()
    batch["ref_logprobs"] = own + 0.3 * torch.randn(own.shape, generator=torch.Generator().manual_seed(2))
    norm = full_normalizers(batch)
    kwargs = dict(LOSS_KWARGS, kl_coef=0.1, aggregation="token-mean")
    plain, _ = grpo_loss(model, batch, norm, **kwargs)
    corrected, _ = grpo_loss(model, batch, norm, **kwargs, kl_importance_corrected=True)
    torch.testing.assert_close(corrected.detach(), plain.detach())
    plain_grads, corrected_grads = gradients(model, plain), gradients(model, corrected)
    logprobs = reference_logprobs(model, batch)
    k1 = kl_k1(logprobs.detach(), batch["ref_logprobs"])
    score_function = 0.1 * torch.where(mask, k1 * logprobs, 0.0).sum() / norm.num_tokens
    expected = gradients(model, score_function)
    scale = max(g.abs().max().item() for g in expected.values())
    for key, grad in expected.items():
        torch.testing.assert_close(corrected_grads[key], grad, rtol=0.0, atol=2e-6 * scale, msg=key)
    name = "model.embed_tokens.weight"
    assert not torch.allclose(plain_grads[name], corrected_grads[name], atol=1e-3 * scale)


# ---------------------------------------------------------------- end to end: the advantage stage and the update


def scored_table(model, tokenizer, seed=0) -> pd.DataFrame:
    """The scoring stage's columns for 6 rollouts in 2 groups of 3: the sampler's log-probs are the model's own,
    the reference's are shifted by noise."""
    batch = make_batch(tokenizer, seed)
    own = batched_response_logprobs(model, batch, micro_batch_size=6)
    mask = batch["response_mask"]
    ref = own + 0.2 * torch.randn(own.shape, generator=torch.Generator().manual_seed(seed))
    prompt_ids = [row[m].tolist() for row, m in zip(batch["prompt_ids"], batch["prompt_mask"].bool())]
    response_ids = [row[m].tolist() for row, m in zip(batch["response_ids"], mask.bool())]
    return pd.DataFrame({"prompt_ids": prompt_ids, "response_ids": response_ids, "group_id": [0, 0, 0, 1, 1, 1],
                         "rewards": [1.0, 0.0, 0.5, 0.0, 0.0, 1.0],
                         "sampling_logprobs": response_lists(own, mask), "ref_logprobs": response_lists(ref, mask)})


E2E = [
    pytest.param({"dual_clip_c": 3.0}, "grpo", {}, "policy/dual_clip_frac", id="dual_clip-grpo"),
    pytest.param({"policy_loss": "gspo"}, "reinforce_pp", {"coef": 0.05, "placement": "reward", "estimator": "k1"},
                 "policy/seq_clip_frac", id="gspo-reinforce_pp-kl_in_reward"),
    pytest.param({"policy_loss": "cispo", "entropy_coef": 0.01}, "reinforce_pp_baseline",
                 {"coef": 0.05, "importance_corrected": True, "clamp": 5.0}, "kl/clamp_frac",
                 id="cispo-reinforce_pp_baseline-kl_corrected"),
    pytest.param({"policy_loss": "gspo", "gspo_clip_low": 0.01}, "batch_std", {}, "policy/seq_clip_frac",
                 id="gspo-batch_std"),
]


@pytest.mark.parametrize("loss, estimator, kl, metric", E2E)
def test_grpo_update_runs_with_each_policy_loss_and_estimator(tiny_model_dir, rlhf_home, loss, estimator, kl,
                                                              metric):
    from flows.metrics_catalog import unknown_metrics
    from tasks.advantages import compute_advantages
    from tasks.refs import publish

    model, tokenizer = load_causal_lm(tiny_model_dir)
    kl_config = KLConfig(**kl)
    table = compute_advantages.fn(publish(scored_table(model, tokenizer), "scored"), estimator, kl_config).read()
    if estimator.startswith("reinforce_pp"):  # one advantage per response token
        assert [len(a) for a in table["advantages"]] == [len(r) for r in table["response_ids"]]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = update_from_rollouts(model, optimizer, table, tokenizer.pad_token_id, loss=LossConfig(**loss),
                                   kl=kl_config, optim=OptimConfig(mini_batches=2, micro_batch_size=2),
                                   device="cpu", temperature=1.0, max_new_tokens=16, seed=0)
    assert len(history) == 2 and all(math.isfinite(h["loss/policy"]) for h in history)
    assert metric in history[0] and unknown_metrics(history[0]) == []
    assert ("kl/mean" in history[0]) == bool(kl)
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


def test_kl_in_the_reward_changes_the_advantages_and_leaves_the_loss_without_a_kl_term(tiny_model_dir, rlhf_home,
                                                                                       monkeypatch):
    from tasks.advantages import compute_advantages
    from tasks.refs import publish

    model, tokenizer = load_causal_lm(tiny_model_dir)
    scored = publish(scored_table(model, tokenizer), "scored")
    in_reward = KLConfig(coef=0.5, placement="reward", estimator="k1")
    with_kl = compute_advantages.fn(scored, "reinforce_pp", in_reward).read()["advantages"]
    without = compute_advantages.fn(scored, "reinforce_pp", KLConfig(coef=0.5)).read()["advantages"]
    assert any(not np.allclose(a, b) for a, b in zip(with_kl, without))
    assert all(np.ptp(a) > 0 for a in with_kl if len(a) > 1)  # the KL makes the advantage vary along a response
    assert all(np.ptp(a) == 0 for a in without)  # without it, the return is the reward on every token
    with pytest.raises(ValueError, match="pass the flow's kl section"):
        compute_advantages.fn(scored, "reinforce_pp")
    seen = {}
    monkeypatch.setattr(grpo_module, "grpo_update", lambda model, optimizer, batch, **kwargs: seen.update(
        kwargs, batch=batch) or [])
    table = scored.read().assign(advantages=with_kl)
    update_from_rollouts(model, None, table, tokenizer.pad_token_id, loss=LossConfig(policy_loss="gspo"),
                         kl=in_reward, optim=OptimConfig(), device="cpu", temperature=1.0, max_new_tokens=16, seed=0)
    assert seen["kl_coef"] == 0.0  # already in the advantages: not a second time in the loss
    assert (seen["policy_loss"], seen["clip_eps_low"], seen["clip_eps_high"]) == ("gspo", 3e-4, 4e-4)
    assert seen["batch"]["advantages"].shape == seen["batch"]["response_mask"].shape  # [B, T], collated per token
