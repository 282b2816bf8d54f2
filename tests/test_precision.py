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
