"""Mixed precision and the rollout model's dtype: lower-precision compute, unchanged training state."""

from __future__ import annotations

import pytest
import torch

from rlhf_core.batch import collate
from rlhf_core.config import DataConfig, GenerationConfig, RuntimeConfig
from rlhf_core.logprobs import batched_response_logprobs
from rlhf_core.models import load_causal_lm, use_mixed_precision
from tasks.data import load_prompt_dataset, sample_prompts
from tasks.models import resolve_model
from tasks.rollouts import generate_rollouts


def batch_of(tokenizer):
    prompts = [tokenizer.encode("What is 2 + 3?"), tokenizer.encode("Say hello.")]
    responses = [tokenizer.encode(" It is 5."), tokenizer.encode(" Hello there, friend!")]
    return collate(prompts, responses, tokenizer.pad_token_id)


def test_bf16_mixed_precision_keeps_fp32_weights_and_close_logprobs(tiny_model_dir):
    model, tokenizer = load_causal_lm(tiny_model_dir)
    batch = batch_of(tokenizer)
    exact = batched_response_logprobs(model.eval(), batch, micro_batch_size=2)
    use_mixed_precision(model, "cpu", "bf16")
    mixed = batched_response_logprobs(model, batch, micro_batch_size=2)
    assert mixed.dtype == torch.float32  # the head and log-softmax stay in float32
    mask = batch["response_mask"].bool()
    assert not torch.equal(mixed[mask], exact[mask])  # the backbone did run in bf16
    assert mixed[mask] == pytest.approx(exact[mask], abs=0.1)  # bf16 has ~3 significant digits

    # a training step under mixed precision: gradients and weights stay float32
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    from rlhf_core.logprobs import response_logprobs
    logprobs, _ = response_logprobs(model, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"], mask)
    (-logprobs.sum()).backward()
    optimizer.step()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_no_mixed_precision_changes_nothing(tiny_model_dir):
    model, tokenizer = load_causal_lm(tiny_model_dir)
    forward = model.forward
    assert use_mixed_precision(model, "cpu", "no").forward == forward


def test_rollouts_in_bf16_weights_sample_valid_responses(rlhf_home, tiny_model_dir):
    from tasks.data import dataset_fingerprints

    data = DataConfig(path="data/arithmetic_train.jsonl")
    prompts = sample_prompts.fn(load_prompt_dataset.fn(data, dataset_fingerprints(data)[0]), 2, 0, 0)
    policy = resolve_model.fn(str(tiny_model_dir))
    runs = {dtype: generate_rollouts.fn(policy, prompts, GenerationConfig(group_size=2, max_new_tokens=5, dtype=dtype),
                                        RuntimeConfig(), None, seed=0, iteration=0).read()
            for dtype in (None, "bfloat16")}
    low = runs["bfloat16"]
    assert len(low) == 4 and all(1 <= n <= 5 for n in low["response_length"])
    assert all(lp <= 0 for row in low["sampling_logprobs"] for lp in row)
    # the same seeds: the bf16 sampler mostly picks the same first token as the fp32 one
    first = lambda df: [ids[0] for ids in df["response_ids"]]  # noqa: E731
    assert sum(a == b for a, b in zip(first(low), first(runs[None]))) >= 2


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def log_likelihood_gradients(model, batch, micro_batches: int, dtype=None) -> dict[str, torch.Tensor]:
    """The gradient of the responses' summed log-likelihood, accumulated over `micro_batches` pieces (inside
    `compute_copies(model, dtype)`)."""
    from rlhf_core.logprobs import response_logprobs
    from rlhf_core.precision import compute_copies

    model.zero_grad(set_to_none=True)
    with compute_copies(model, dtype):
        for rows in torch.arange(batch["prompt_ids"].shape[0]).tensor_split(micro_batches):
            logprobs, _ = response_logprobs(model, batch["prompt_ids"][rows], batch["prompt_mask"][rows],
                                            batch["response_ids"][rows], batch["response_mask"][rows].bool())
            (-logprobs.sum()).backward()
    return gradients(model)


def relative_error(approx: dict, exact: dict) -> float:
    diff = sum(float((approx[k] - exact[k]).pow(2).sum()) for k in exact)
    return (diff / sum(float(exact[k].pow(2).sum()) for k in exact)) ** 0.5


def test_bf16_master_gradients_agree_with_fp32_and_accumulate_in_fp32(tiny_model_dir):
    """bf16-master: the update's gradients from bf16 compute copies agree with fp32's as closely as autocast's do
    (the stated tolerance: within 4x autocast's relative error, and under 5% of the gradient's norm), land in
    fp32, and accumulate over micro-batches in fp32 (the two micro-batches' own gradients add up to their sum
    bit for bit); the fp32 weights come back bit for bit and tied weights stay tied."""
    from rlhf_core.precision import compute_copies, compute_dtype

    model, tokenizer = load_causal_lm(tiny_model_dir)
    model.eval()
    batch = batch_of(tokenizer)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    exact = log_likelihood_gradients(model, batch, micro_batches=1)

    master = log_likelihood_gradients(model, batch, micro_batches=2, dtype=torch.bfloat16)
    assert all(model.state_dict()[k].dtype == v.dtype and torch.equal(model.state_dict()[k], v)
               for k, v in weights.items())
    assert master.keys() == exact.keys() and all(g.dtype == torch.float32 for g in master.values())
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight

    # each micro-batch alone, summed in fp32: bit-equal to what compute_copies accumulated
    first = log_likelihood_gradients(model, {k: v[:1] for k, v in batch.items()}, 1, torch.bfloat16)
    second = log_likelihood_gradients(model, {k: v[1:] for k, v in batch.items()}, 1, torch.bfloat16)
    assert all(torch.equal(master[k], first[k] + second[k]) for k in master)

    use_mixed_precision(model, "cpu", "bf16-master")
    assert compute_dtype(model) == torch.bfloat16
    with compute_copies(model, torch.bfloat16):
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    autocast = log_likelihood_gradients(model, batch, micro_batches=2)  # outside compute_copies: autocast only
    master_error, autocast_error = relative_error(master, exact), relative_error(autocast, exact)
    assert 0 < master_error <= max(4 * autocast_error, 1e-6) and master_error < 0.05, (master_error, autocast_error)


def test_bf16_master_update_trains_fp32_weights_close_to_an_fp32_update(tiny_model_dir):
    """One GRPO-style update through run_update: bf16-master moves the fp32 weights (the optimizer and clipping
    saw fp32 gradients) by nearly what an fp32 update does, as closely as autocast's update does."""
    from rlhf_core.grpo import grpo_update

    def updated(mixed_precision: str) -> dict[str, torch.Tensor]:
        model, tokenizer = load_causal_lm(tiny_model_dir)
        use_mixed_precision(model.eval(), "cpu", mixed_precision)
        batch = batch_of(tokenizer)
        batch["advantages"] = torch.tensor([1.0, -1.0])
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        grpo_update(model, optimizer, batch, epochs=1, mini_batches=1, micro_batch_size=1, clip_eps_low=0.2,
                    clip_eps_high=0.2, kl_coef=0.0, kl_estimator="k3", aggregation="token-mean", norm_length=8,
                    temperature=1.0, chunk_size=1024, max_grad_norm=1.0, seed=0)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        return {k: v - before[k] for k, v in model.state_dict().items()}

    exact, master, autocast = updated("no"), updated("bf16-master"), updated("bf16")
    master_error, autocast_error = relative_error(master, exact), relative_error(autocast, exact)
    assert 0 < master_error <= max(4 * autocast_error, 1e-6), (master_error, autocast_error)


@pytest.mark.slow
def test_grpo_flow_trains_with_bf16_master_weights(prefect_harness, rlhf_home, tiny_model_dir):
    """The flow end to end with runtime.mixed_precision bf16-master: its checkpoints hold fp32 weights (the
    masters) that moved, and a rerun of the same config takes every stage from the cache (same checkpoint)."""
    from safetensors.torch import load_file
    from test_flow_grpo import tiny_config

    from flows.grpo import grpo

    config = tiny_config(tiny_model_dir, runtime=RuntimeConfig(mixed_precision="bf16-master"),
                         rewards=[{"function": "response_length"}])  # varies per response: a real gradient
    final = grpo(config)
    weights, start = load_file(f"{final}/model.safetensors"), load_file(f"{tiny_model_dir}/model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert any(not torch.equal(weights[k], start[k]) for k in start)
    assert grpo(config) == final


def test_bf16_master_is_refused_where_it_cannot_run():
    with pytest.raises(ValueError, match="num_processes 1"):
        RuntimeConfig(mixed_precision="bf16-master", num_processes=2)
    with pytest.raises(ValueError, match="dtype float32"):
        RuntimeConfig(mixed_precision="bf16-master", dtype="bfloat16")
