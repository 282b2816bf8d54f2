"""The same rlhf_core code on a CUDA device: every algorithm's step runs there, and what it computes matches the CPU.

Skipped where no GPU is visible (CI has none); run on a GPU machine with `python -m pytest tests/test_cuda.py`.
Tolerances: fp32 on the GPU runs other kernels (other summation orders) than on the CPU, so log-probs agree to
~1e-5 and gradients to ~1e-4 relative, not bitwise. TF32 stays off (PyTorch's default for matmuls), as in training.
"""

from __future__ import annotations

import pytest
import torch

from bench.algorithms import STEPS, measure
from bench.workloads import PAD_ID, SMOL, Workload, causal_lm, token_rows
from rlhf_core.batch import collate
from rlhf_core.checkpoint import restore_optimizer, save_checkpoint
from rlhf_core.generation import sample_responses
from rlhf_core.grpo import grpo_update
from rlhf_core.logprobs import batched_response_logprobs
from rlhf_core.models import use_mixed_precision

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

TOY = Workload("toy", {**SMOL, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 256},
               prompts=4, samples=2, prompt_len=6, response_len=5, micro_batch_size=4)


@pytest.mark.parametrize("algorithm", list(STEPS))
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_algorithm_steps_on_cuda(algorithm, precision):
    result = measure(algorithm, TOY, "cuda", precision, steps=1, warmup=1)
    assert result["stages_s"]["update"] > 0


def uneven_batch(device: str) -> dict[str, torch.Tensor]:
    """Prompts and responses of different lengths, so padding on both sides is exercised."""
    vocab = TOY.model["vocab_size"]
    prompts = [row[:n] for row, n in zip(token_rows(4, 6, vocab, seed=1), (6, 3, 5, 2))]
    responses = [row[:n] for row, n in zip(token_rows(4, 5, vocab, seed=2), (5, 1, 3, 4))]
    return collate(prompts, responses, PAD_ID, device=device)


def test_logprobs_match_cpu():
    cpu = batched_response_logprobs(causal_lm(TOY, "cpu"), uneven_batch("cpu"), micro_batch_size=2)
    gpu = batched_response_logprobs(causal_lm(TOY, "cuda"), uneven_batch("cuda"), micro_batch_size=2)
    mask = uneven_batch("cpu")["response_mask"].bool()
    torch.testing.assert_close(gpu.cpu()[mask], cpu[mask], rtol=1e-5, atol=1e-5)


def test_sampling_is_seeded_per_row_on_cuda():
    """The rollout guarantee on a GPU: a row's response depends on its seed and prompt, not on its batch."""
    model = causal_lm(TOY, "cuda")
    prompts = token_rows(4, 6, TOY.model["vocab_size"], seed=1)
    args = dict(eos_ids=[], pad_id=PAD_ID, max_new_tokens=8, temperature=1.0, top_p=0.9)
    together = sample_responses(model, prompts, seeds=[10, 11, 12, 13], **args)
    alone = sample_responses(model, prompts[2:3], seeds=[12], **args)
    again = sample_responses(model, prompts, seeds=[10, 11, 12, 13], **args)
    assert alone.response_ids[0] == together.response_ids[2]
    assert again.response_ids == together.response_ids
    assert len({tuple(r) for r in together.response_ids}) > 1


def grpo_step(device: str, precision: str = "fp32") -> torch.nn.Module:
    model = causal_lm(TOY, device).train()
    if precision == "bf16":
        use_mixed_precision(model, device, "bf16")
    batch = uneven_batch(device)
    batch["advantages"] = torch.tensor([1.0, -0.5, 0.25, -0.75], device=device)
    batch["ref_logprobs"] = batched_response_logprobs(causal_lm(TOY, device, seed=1), batch, micro_batch_size=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # the step is the gradient: comparable across devices
    grpo_update(model, optimizer, batch, epochs=1, mini_batches=1, micro_batch_size=2, clip_eps_low=0.2,
                clip_eps_high=0.28, kl_coef=0.05, kl_estimator="k3", aggregation="token-mean", norm_length=5,
                temperature=1.0, chunk_size=1024, max_grad_norm=1e9, seed=0)
    return model


def test_grpo_update_matches_cpu():
    before = causal_lm(TOY, "cpu").state_dict()
    cpu, gpu = grpo_step("cpu").state_dict(), grpo_step("cuda").state_dict()
    for name, weight in cpu.items():
        step_cpu, step_gpu = weight - before[name], gpu[name].cpu() - before[name]
        torch.testing.assert_close(step_gpu, step_cpu, rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_mixed_precision_on_cuda_keeps_fp32_weights_and_a_close_step():
    before = causal_lm(TOY, "cpu").state_dict()
    exact, mixed = grpo_step("cuda").state_dict(), grpo_step("cuda", "bf16").state_dict()
    assert all(w.dtype == torch.float32 for w in mixed.values())
    steps = torch.cat([(exact[n].cpu() - before[n]).flatten() for n in before])
    mixed_steps = torch.cat([(mixed[n].cpu() - before[n]).flatten() for n in before])
    assert torch.cosine_similarity(steps, mixed_steps, dim=0) > 0.99


def test_checkpoint_of_a_cuda_model_loads_on_cpu_and_resumes_adam_on_cuda(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    from rlhf_core.models import load_causal_lm

    model = causal_lm(TOY, "cuda").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = uneven_batch("cuda")
    model(input_ids=batch["prompt_ids"]).logits.mean().backward()
    optimizer.step()
    path, _ = save_checkpoint(model, AutoTokenizer.from_pretrained(tokenizer_dir), optimizer, tmp_path)
    loaded, _ = load_causal_lm(path, device="cpu")
    for name, weight in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], weight.cpu()), name

    resumed = torch.optim.AdamW(causal_lm(TOY, "cuda").parameters(), lr=1e-3)
    assert restore_optimizer(resumed, path)
    saved, restored = optimizer.state_dict()["state"], resumed.state_dict()["state"]
    assert saved.keys() == restored.keys()
    for index, state in saved.items():
        assert restored[index]["exp_avg"].device.type == "cuda"
        assert torch.equal(restored[index]["exp_avg"], state["exp_avg"])
        assert torch.equal(restored[index]["exp_avg_sq"], state["exp_avg_sq"])
