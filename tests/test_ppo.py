"""PPO on the shared pieces: per-token rewards and GAE, the actor-critic loss, gradients, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_core.batch import collate, select_rows
from rlhf_core.checkpoint import trainable_parameters
from rlhf_core.config import LossConfig, OptimConfig, RuntimeConfig, ValueConfig
from rlhf_core.config.training import PPOUpdateArgs, TrainingSetup
from rlhf_core.logprobs import batched_response_logprobs
from rlhf_core.models import load_causal_lm
from rlhf_core.ppo import ppo_advantages, ppo_loss, ppo_update, rollout_logprobs_and_values
from rlhf_core.training import TrainingState, actor_critic_groups, adamw, save_trained
from rlhf_core.update import Normalizers
from rlhf_core.value_head import VALUE_HEAD_FILE, ActorCritic

LOSS_KWARGS = dict(clip_eps_low=0.2, clip_eps_high=0.2, clip_range_value=0.2, vf_coef=0.5,
                   aggregation="token-mean", norm_length=4, temperature=1.0, chunk_size=16)


def test_ppo_advantages_hand_computed():
    # one response of 2 tokens; k1 KL = old - ref = [0.5, -0.5]; beta = 0.1; score 1.0 on the last token
    out = ppo_advantages(torch.tensor([1.0]), torch.tensor([[-1.0, -1.0]]), torch.tensor([[-1.5, -0.5]]),
                         torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), kl_coef=0.1, kl_estimator="k1",
                         gamma=1.0, lam=1.0, whiten_advantages=False)
    torch.testing.assert_close(out["kl"], torch.tensor([[0.5, -0.5]]))
    torch.testing.assert_close(out["rewards"], torch.tensor([[-0.05, 0.05 + 1.0]]))
    # gamma = lam = 1, values 0: advantages are rewards-to-go: [-0.05 + 1.05, 1.05]
    torch.testing.assert_close(out["advantages"], torch.tensor([[1.0, 1.05]]))
    torch.testing.assert_close(out["returns"], out["advantages"])


def make_batch(tokenizer, actor_critic, advantages_seed=0):
    prompts = [tokenizer("Hello there")["input_ids"], tokenizer("A longer prompt about cats")["input_ids"],
               tokenizer("Hi")["input_ids"]]
    responses = [tokenizer(" fine thanks")["input_ids"] + [tokenizer.eos_token_id],
                 tokenizer(" they purr a lot")["input_ids"], tokenizer(" yo")["input_ids"]]
    batch = collate(prompts, responses, tokenizer.pad_token_id)
    old_logprobs, old_values = rollout_logprobs_and_values(actor_critic, batch, micro_batch_size=2, temperature=1.0,
                                                           chunk_size=16)
    generator = torch.Generator().manual_seed(advantages_seed)
    mask = batch["response_mask"]
    batch.update(old_logprobs=old_logprobs, old_values=old_values,
                 advantages=torch.where(mask, torch.randn(mask.shape, generator=generator), 0.0),
                 returns=torch.where(mask, torch.randn(mask.shape, generator=generator), 0.0))
    return batch


def test_ppo_loss_on_policy_equals_hand_formula(tiny_model_dir):
    model, tokenizer = load_causal_lm(tiny_model_dir)
    actor_critic = ActorCritic(model).eval()
    batch = make_batch(tokenizer, actor_critic)
    mask = batch["response_mask"]
    n = float(mask.sum())
    loss, metrics = ppo_loss(actor_critic, batch, Normalizers(num_seqs=3, num_tokens=n), **LOSS_KWARGS)
    # ratio 1 and values == old values == 0 (zero-initialised head): nothing is clipped, and
    # loss = -sum(A)/N + vf_coef * 0.5 * sum(R^2)/N
    expected_policy = -batch["advantages"][mask].sum() / n
    expected_value = 0.5 * (batch["returns"][mask] ** 2).sum() / n
    torch.testing.assert_close(metrics["loss/policy"], expected_policy)
    torch.testing.assert_close(metrics["loss/value"], expected_value)
    torch.testing.assert_close(loss.detach(), expected_policy + 0.5 * expected_value)
    assert float(metrics["policy/clip_frac_low"]) == float(metrics["value/clip_frac"]) == 0.0


def test_value_head_and_shared_backbone_get_gradients_and_the_reference_gets_none(tiny_model_dir):
    model, tokenizer = load_causal_lm(tiny_model_dir)
    reference, _ = load_causal_lm(tiny_model_dir)
    actor_critic = ActorCritic(model).eval()
    batch = make_batch(tokenizer, actor_critic)
    batched_response_logprobs(reference, batch, micro_batch_size=2)  # the scoring stage's use of the reference
    loss, _ = ppo_loss(actor_critic, batch, Normalizers(num_seqs=3, num_tokens=float(batch["response_mask"].sum())),
                       **LOSS_KWARGS)
    loss.backward()
    assert actor_critic.value_head.weight.grad.abs().sum() > 0
    assert model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0  # the critic's loss reaches the backbone
    assert all(p.grad is None for p in reference.parameters())


def test_ppo_gradient_accumulation_matches_the_full_batch(tiny_model_dir):
    model, tokenizer = load_causal_lm(tiny_model_dir)
    actor_critic = ActorCritic(model).eval()
    torch.nn.init.normal_(actor_critic.value_head.weight, std=0.1)  # non-zero values exercise the value clip
    batch = make_batch(tokenizer, actor_critic)
    batch["old_values"] = batch["old_values"] + 0.5 * batch["response_mask"]
    norm = Normalizers(num_seqs=3, num_tokens=float(batch["response_mask"].sum()))
    params = trainable_parameters(actor_critic)

    def gradients(row_groups):
        actor_critic.zero_grad()
        for rows in row_groups:
            loss, _ = ppo_loss(actor_critic, select_rows(batch, torch.tensor(rows)), norm, **LOSS_KWARGS)
            loss.backward()
        return [p.grad.clone() for p in params]

    full, split = gradients([[0, 1, 2]]), gradients([[2], [0, 1]])
    for a, b in zip(full, split):
        torch.testing.assert_close(a, b, atol=1e-6 * max(1.0, float(a.abs().max())), rtol=1e-4)


ARGS = PPOUpdateArgs(loss=LossConfig(), value=ValueConfig(), optim=OptimConfig(), temperature=1.0, max_new_tokens=8,
                     seed=0)


def save_actor_critic_checkpoint(actor_critic, tokenizer, optimizer, root):
    """The checkpoint PPO's train stage writes for this actor-critic and optimizer -> (folder, sha256)."""
    state = TrainingState(module=actor_critic, model=actor_critic, tokenizer=tokenizer, optimizer=optimizer)
    return save_trained(state, TrainingSetup(runtime=RuntimeConfig()), root, "ppo")


def test_ppo_update_steps_and_value_head_checkpoint_round_trip(tiny_model_dir, tmp_path):
    model, tokenizer = load_causal_lm(tiny_model_dir)
    actor_critic = ActorCritic(model).eval()
    batch = make_batch(tokenizer, actor_critic)
    optimizer = torch.optim.AdamW(trainable_parameters(actor_critic), lr=1e-2)
    history = ppo_update(actor_critic, optimizer, batch, epochs=2, mini_batches=2, micro_batch_size=1,
                         max_grad_norm=1.0, seed=0, **LOSS_KWARGS)
    assert len(history) == 4 and history[0]["policy/approx_kl"] < 1e-10 < history[-1]["policy/approx_kl"]
    assert actor_critic.value_head.weight.abs().sum() > 0  # the head learned

    folder, _ = save_actor_critic_checkpoint(actor_critic, tokenizer, optimizer, tmp_path)
    assert (folder / VALUE_HEAD_FILE).is_file()
    reloaded_model, _ = load_causal_lm(folder)
    reloaded = ActorCritic(reloaded_model).eval()
    assert reloaded.load_value_head(folder)
    _, original_values = rollout_logprobs_and_values(actor_critic, batch, micro_batch_size=3, temperature=1.0,
                                                     chunk_size=16)
    _, reloaded_values = rollout_logprobs_and_values(reloaded, batch, micro_batch_size=3, temperature=1.0,
                                                     chunk_size=16)
    torch.testing.assert_close(original_values, reloaded_values)


def test_separate_critic_takes_the_value_loss_and_the_policy_does_not(tiny_model_dir, tmp_path):
    model, tokenizer = load_causal_lm(tiny_model_dir)
    critic, _ = load_causal_lm(tiny_model_dir)
    actor_critic = ActorCritic(model, critic).eval()
    torch.nn.init.normal_(actor_critic.value_head.weight, std=0.1)
    batch = make_batch(tokenizer, actor_critic)
    norm = Normalizers(num_seqs=3, num_tokens=float(batch["response_mask"].sum()))
    _, _, values = actor_critic(batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
                                batch["response_mask"])
    value_only = ((values - batch["returns"]) ** 2).sum() / norm.num_tokens
    value_only.backward()
    assert critic.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())  # the policy is untouched by the critic's loss

    optimizer = adamw(actor_critic_groups(actor_critic, ARGS), ARGS.lr)
    folder, _ = save_actor_critic_checkpoint(actor_critic, tokenizer, optimizer, tmp_path)
    assert (folder / "critic" / "model.safetensors").is_file() and (folder / VALUE_HEAD_FILE).is_file()


def test_value_head_has_its_own_learning_rate_and_every_parameter_is_in_one_group(tiny_model_dir):
    model, _ = load_causal_lm(tiny_model_dir)
    actor_critic = ActorCritic(model)
    groups = actor_critic.parameter_groups(lr=1e-5, head_lr=1e-3)
    assert [g["lr"] for g in groups] == [1e-5, 1e-3]
    assert groups[1]["params"] == list(actor_critic.value_head.parameters())
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len(trainable_parameters(actor_critic))
    assert all(a is b for a, b in zip(grouped, trainable_parameters(actor_critic)))  # same order: saved state fits
    assert actor_critic.parameter_groups(lr=1e-5, head_lr=None)[1]["lr"] == 1e-5


# ---------------------------------------------------------------- policy losses and the entropy bonus


def test_ppo_entropy_bonus_subtracts_coef_times_the_mean_entropy(tiny_model_dir):
    model, tokenizer = load_causal_lm(tiny_model_dir)
    actor_critic = ActorCritic(model).eval()
    batch = make_batch(tokenizer, actor_critic)
    norm = Normalizers(num_seqs=3, num_tokens=float(batch["response_mask"].sum()))
    with torch.no_grad():
        base, base_metrics = ppo_loss(actor_critic, batch, norm, **LOSS_KWARGS)
        bonus, metrics = ppo_loss(actor_critic, batch, norm, **LOSS_KWARGS, entropy_coef=0.1)
    # token-mean: the bonus is 0.1 * the mean entropy over the response tokens, in the policy part only
    torch.testing.assert_close(metrics["loss/policy"], base_metrics["loss/policy"] - 0.1 * metrics["policy/entropy"])
    torch.testing.assert_close(bonus, base - 0.1 * metrics["policy/entropy"])
    torch.testing.assert_close(metrics["loss/value"], base_metrics["loss/value"])


PPO_VARIANTS = {
    "gspo": dict(policy_loss="gspo", clip_eps_low=0.01, clip_eps_high=0.02),
    "cispo": dict(policy_loss="cispo", clip_eps_low=1.0, clip_eps_high=0.05),
    "dual_clip": dict(dual_clip_c=1.1, entropy_coef=0.05),
}


@pytest.mark.parametrize("variant", sorted(PPO_VARIANTS))
def test_ppo_gradient_accumulation_with_each_policy_loss(tiny_model_dir, variant):
    model, tokenizer = load_causal_lm(tiny_model_dir)
    actor_critic = ActorCritic(model).eval()
    batch = make_batch(tokenizer, actor_critic)
    mask = batch["response_mask"]
    shift = 0.3 * torch.randn(mask.shape, generator=torch.Generator().manual_seed(3))
    batch["old_logprobs"] = torch.where(mask, batch["old_logprobs"] + shift, 0.0)  # off-policy: clips bind
    norm = Normalizers(num_seqs=3, num_tokens=float(mask.sum()))
    kwargs = {**LOSS_KWARGS, **PPO_VARIANTS[variant]}
    params = trainable_parameters(actor_critic)

    def run(row_groups):
        actor_critic.zero_grad()
        total, sums = 0.0, {}
        for rows in row_groups:
            loss, metrics = ppo_loss(actor_critic, select_rows(batch, torch.tensor(rows)), norm, **kwargs)
            loss.backward()
            total += loss.item()
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        return total, [p.grad.clone() for p in params], sums

    (full_loss, full, full_metrics), (split_loss, split, split_metrics) = run([[0, 1, 2]]), run([[2], [0, 1]])
    assert split_loss == pytest.approx(full_loss, rel=1e-5, abs=1e-6)
    for a, b in zip(full, split):
        torch.testing.assert_close(a, b, atol=1e-6 * max(1.0, float(a.abs().max())), rtol=1e-4)
    for key, value in full_metrics.items():
        assert split_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    extra = {"gspo": "policy/seq_clip_frac", "dual_clip": "policy/dual_clip_frac"}.get(variant)
    assert extra is None or extra in full_metrics


def test_ppo_update_from_rollouts_passes_the_chosen_loss_and_its_clip_range(monkeypatch):
    import pandas as pd

    import rlhf_core.ppo as ppo_module

    seen = {}
    monkeypatch.setattr(ppo_module, "ppo_update", lambda *args, **kwargs: seen.update(kwargs) or [])
    table = pd.DataFrame({"prompt_ids": [[5, 6]], "response_ids": [[7, 8]], "old_logprobs": [[-1.0, -1.0]],
                          "old_values": [[0.0, 0.0]], "advantages": [[1.0, -1.0]], "returns": [[1.0, 0.0]]})
    loss = LossConfig(policy_loss="gspo", gspo_clip_high=1e-3, entropy_coef=0.01)
    ppo_module.update_from_rollouts(None, None, table, 0, loss=loss, value=ValueConfig(), optim=OptimConfig(),
                                    device="cpu", temperature=1.0, max_new_tokens=4, seed=0)
    assert (seen["policy_loss"], seen["clip_eps_low"], seen["clip_eps_high"]) == ("gspo", 3e-4, 1e-3)
    assert seen["entropy_coef"] == 0.01 and seen["dual_clip_c"] is None
    ppo_module.update_from_rollouts(None, None, table, 0, loss=LossConfig(dual_clip_c=3.0), value=ValueConfig(),
                                    optim=OptimConfig(), device="cpu", temperature=1.0, max_new_tokens=4, seed=0)
    assert (seen["policy_loss"], seen["clip_eps_low"], seen["dual_clip_c"]) == ("ppo_clip", 0.2, 3.0)


def test_ppo_update_runs_with_gspo_and_an_entropy_bonus(tiny_model_dir):
    model, tokenizer = load_causal_lm(tiny_model_dir)
    actor_critic = ActorCritic(model).eval()
    batch = make_batch(tokenizer, actor_critic)
    optimizer = torch.optim.AdamW(trainable_parameters(actor_critic), lr=1e-2)
    history = ppo_update(actor_critic, optimizer, batch, epochs=1, mini_batches=2, micro_batch_size=1,
                         max_grad_norm=1.0, seed=0, **dict(LOSS_KWARGS, policy_loss="gspo", clip_eps_low=3e-4,
                                                           clip_eps_high=4e-4, entropy_coef=0.01))
    assert len(history) == 2 and all(math.isfinite(h["loss/policy"]) for h in history)
    assert history[0]["policy/seq_clip_frac"] == 0.0  # step 1 is on-policy: s_i = 1
