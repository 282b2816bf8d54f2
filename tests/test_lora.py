"""LoRA adapters (rlhf_core/lora.py) and gradient checkpointing on a tiny random-init Llama: what trains, what the
reference computes, what each checkpoint format loads back as, and that the optimizer state survives a save."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rlhf_core.checkpoint import restore_optimizer, save_checkpoint, trainable_parameters
from rlhf_core.config import LoraConfig, RuntimeConfig
from rlhf_core.logprobs import response_logprobs
from rlhf_core.lora import (ADAPTER_DIR, adapter_disabled, add_lora, has_adapter, mark_adapter_trainable,
                            merged_state_dict)
from rlhf_core.models import ModelLoadError, enable_gradient_checkpointing, load_causal_lm
from rlhf_core.reward_model import load_reward_model, score_head_names, sequence_rewards
from rlhf_core.training import prepare_training
from rlhf_core.value_head import ActorCritic

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def lora_model(path, target_modules=ATTENTION, seed=1):
    """The tiny model with a rank-4 adapter whose B is random (a fresh adapter's B = 0 would hide every bug)."""
    model, tokenizer = load_causal_lm(path)
    torch.manual_seed(seed)  # A is drawn from the global generator
    add_lora(model.eval(), rank=4, alpha=8.0, dropout=0.0, target_modules=target_modules)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model, tokenizer


def batch(vocab: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """prompt_ids, prompt_mask [2, 5] (row 1 left-padded by 2); response_ids, response_mask [2, 4] (row 0 padded)."""
    generator = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, vocab, (2, 5), generator=generator)
    response_ids = torch.randint(3, vocab, (2, 4), generator=generator)
    prompt_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool)
    response_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    return prompt_ids, prompt_mask, response_ids, response_mask


def logprobs_of(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return response_logprobs(model, *inputs, with_entropy=False)[0]


def test_only_adapter_parameters_train(tiny_model_dir):
    model, _ = lora_model(tiny_model_dir)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    # 2 layers x 4 attention projections x (A, B)
    assert len(trainable) == 2 * 4 * 2 and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert type(model.base_model).__name__ == "LlamaModel"  # the backbone the shared log-prob code calls
    a = model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert a.shape == (4, 64)  # rank x hidden_size


def test_value_head_trains_beside_the_adapter(tiny_model_dir):
    model, _ = lora_model(tiny_model_dir)
    actor_critic = ActorCritic(model)
    rest, head = actor_critic.parameter_groups(1e-3, 1e-2)
    assert len(rest["params"]) == 16 and all(p.shape[0] in (4, 64, 32) for p in rest["params"])
    assert len(head["params"]) == 2 and head["lr"] == 1e-2  # value head weight and bias


def test_adapter_disabled_is_exactly_the_base_model(tiny_model_dir, tiny_model):
    model, tokenizer = lora_model(tiny_model_dir)
    inputs = batch(len(tokenizer))
    base = logprobs_of(tiny_model[0], inputs)
    adapted = logprobs_of(model, inputs)
    assert (adapted - base).abs().max() > 1e-3  # the adapter changes the policy...
    with adapter_disabled(model):
        with adapter_disabled(model):  # nested (overlapping shards): the outer block still sees the base
            pass
        assert torch.equal(logprobs_of(model, inputs), base)  # ...and disabling it gives the base bit for bit
    assert torch.equal(logprobs_of(model, inputs), adapted)
    assert sum(p.requires_grad for p in model.parameters()) == 16  # peft's toggle flips these: restored


def test_adapter_only_checkpoint_round_trip(tiny_model_dir, tmp_path):
    model, tokenizer = lora_model(tiny_model_dir)
    inputs = batch(len(tokenizer))
    folder, _ = save_checkpoint(model, tokenizer, None, tmp_path)
    weights = load_file(str(folder / "adapter_model.safetensors"))
    assert len(weights) == 16 and all("lora_" in key for key in weights)  # no base weight is copied
    assert not (folder / "model.safetensors").exists()
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir) and config["r"] == 4

    loaded, _ = load_causal_lm(folder)
    assert has_adapter(loaded)
    assert torch.equal(logprobs_of(loaded.eval(), inputs), logprobs_of(model, inputs))


def test_merged_checkpoint_matches_the_adapter_model(tiny_model_dir, tmp_path):
    model, tokenizer = lora_model(tiny_model_dir, target_modules="all-linear")
    inputs = batch(len(tokenizer))
    folder, _ = save_checkpoint(model, tokenizer, None, tmp_path, merged=True)
    assert (folder / "model.safetensors").is_file() and not (folder / "adapter_config.json").exists()
    assert (folder / ADAPTER_DIR / "adapter_config.json").is_file()

    # the merged weight is W + (alpha / rank) B @ A, computed by hand for one layer
    layer = model.model.layers[1].mlp.down_proj
    expected = layer.base_layer.weight + 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert torch.allclose(merged_state_dict(model)["model.layers.1.mlp.down_proj.weight"], expected, atol=1e-7)

    merged, _ = load_causal_lm(folder)
    assert not has_adapter(merged)
    # fp32 rounding of W + BA vs W x + B(A x): ~1e-6 on log-probs of magnitude ~11
    torch.testing.assert_close(logprobs_of(merged.eval(), inputs), logprobs_of(model, inputs), atol=1e-5, rtol=0)
    resumed, _ = load_causal_lm(folder, with_adapter=True)  # training continues the adapter on the base
    assert has_adapter(resumed) and torch.equal(logprobs_of(resumed.eval(), inputs), logprobs_of(model, inputs))


def test_gradient_checkpointing_recomputes_and_keeps_gradients(tiny_model_dir):
    inputs = None
    grads = {}
    for checkpointing in (False, True):
        model, tokenizer = lora_model(tiny_model_dir)
        inputs = inputs or batch(len(tokenizer))
        if checkpointing:
            enable_gradient_checkpointing(model)
        calls = []
        model.model.layers[0].self_attn.register_forward_hook(lambda *args, calls=calls: calls.append(1))
        logprobs, _ = response_logprobs(model, *inputs)
        logprobs.sum().backward()
        # eval mode (dropout off) throughout: checkpointing must not depend on train mode
        assert not model.training and len(calls) == (2 if checkpointing else 1)  # recomputed in backward
        grads[checkpointing] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) == 16
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # generation-style passes are not checkpointed
        calls.clear()
        response_logprobs(model, *inputs)
        assert len(calls) == 1


def test_optimizer_state_round_trip(tiny_model_dir, tmp_path):
    model, tokenizer = lora_model(tiny_model_dir)
    inputs = batch(len(tokenizer))
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        response_logprobs(model, *inputs)[0].sum().backward()
        optimizer.step()
    folder, _ = save_checkpoint(model, tokenizer, optimizer, tmp_path)

    loaded, _ = load_causal_lm(folder)
    assert mark_adapter_trainable(loaded.eval()) == [n for n, p in model.named_parameters() if p.requires_grad]
    restored = torch.optim.AdamW(trainable_parameters(loaded), lr=1e-2)
    assert restore_optimizer(restored, folder)
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            assert torch.equal(restored.state_dict()["state"][index][key], value), (index, key)
    # one more identical step from both: the same adapter weights
    for opt, m in ((optimizer, model), (restored, loaded)):
        opt.zero_grad()
        response_logprobs(m, *inputs)[0].sum().backward()
        opt.step()
    for (name, a), b in zip(model.named_parameters(), loaded.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_prepare_training(tiny_model_dir):
    lora = LoraConfig(rank=2, target_modules=["q_proj"])
    model, _ = load_causal_lm(tiny_model_dir)
    assert prepare_training(model, lora, RuntimeConfig(gradient_checkpointing=True)) is True  # fresh adapter
    assert sum(p.numel() for p in trainable_parameters(model)) == 2 * 2 * (2 * 64)  # 2 layers x (A + B) x r x 64
    assert model.model.layers[0].gradient_checkpointing
    assert prepare_training(model, lora, RuntimeConfig()) is False  # continued: the saved optimizer state applies
    with pytest.raises(ModelLoadError, match="model.lora"):
        prepare_training(model, None, RuntimeConfig())
    with pytest.raises(ValueError, match="target_modules"):
        prepare_training(load_causal_lm(tiny_model_dir)[0], LoraConfig(target_modules=["no_such_proj"]),
                         RuntimeConfig())


def test_reward_model_adapter_keeps_its_score_head(tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    model, tokenizer = load_reward_model(tiny_model_dir)
    lora = LoraConfig(rank=4, target_modules="all-linear")
    assert score_head_names(model) == ["score"]
    prepare_training(model, lora, RuntimeConfig(), modules_to_save=score_head_names(model))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "score.modules_to_save.default.weight" in trainable and len(trainable) == 2 * 7 * 2 + 1
    with torch.no_grad():
        model.score.modules_to_save["default"].weight.mul_(3.0)  # a trained head differs from the initial one
    texts = tokenizer(["a b c", "d e"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = sequence_rewards(model, dict(texts))
    folder, _ = save_checkpoint(model, tokenizer, None, tmp_path)
    torch.manual_seed(123)  # the base's fresh head is drawn from another seed: only the saved head can match
    loaded, _ = load_reward_model(folder)
    with torch.no_grad():
        assert torch.allclose(sequence_rewards(loaded, dict(texts)), expected, atol=1e-6)


def test_configs_refuse_lora_where_it_cannot_run():
    from pydantic import ValidationError

    from rlhf_core.config import DPOConfig, GRPOConfig, PPOConfig

    lora = {"rank": 4}
    assert GRPOConfig(model={"lora": lora}).model.lora.rank == 4
    two_processes = GRPOConfig(model={"lora": lora}, runtime={"num_processes": 2}, prompts_per_iteration=4,
                               generation={"group_size": 2})  # the torchrun update builds the adapter too
    assert two_processes.model.lora.rank == 4
    with pytest.raises(ValidationError, match="lora"):
        PPOConfig(model={"lora": lora}, value={"critic": "separate"})
    with pytest.raises(ValidationError, match="rank"):
        DPOConfig(model={"lora": {"rank": 0}})
