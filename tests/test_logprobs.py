import pytest
import torch

import rlhf_core.logprobs as logprobs_module
from rlhf_core.batch import collate
from rlhf_core.logprobs import batched_response_logprobs, position_ids_from_mask, response_logprobs
from rlhf_core.models import load_causal_lm

# Ragged rows: prompt lengths 5, 2, 4 (left-padded to P = 5), response lengths 3, 1, 4 (right-padded to T = 4).
PROMPTS = [[504, 2644, 314, 253, 1345], [19556, 905], [33, 34, 1232, 81]]
RESPONSES = [[4022, 198, 2], [17397], [905, 12285, 7506, 2]]


@pytest.fixture(scope="module")
def batch(tiny_model) -> dict[str, torch.Tensor]:
    _, tokenizer = tiny_model
    return collate(PROMPTS, RESPONSES, tokenizer.pad_token_id)


def test_position_ids_from_mask_left_padding():
    mask = torch.tensor([[False, False, True, True, True],
                         [True, True, True, True, True],
                         [False, True, True, True, False]])  # a right-padded response column too
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2],
                                                     [0, 1, 2, 3, 4],
                                                     [0, 0, 1, 2, 2]]


def _naive_logits(model, batch) -> torch.Tensor:
    """Full-vocabulary logits over [prompt | response], positions counted by hand from each row's left padding.
    -> [B, P+T, V]"""
    input_ids = torch.cat([batch["prompt_ids"], batch["response_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["response_mask"]], dim=1)
    n_left_pad = (~batch["prompt_mask"]).sum(-1)  # [B]
    position_ids = (torch.arange(input_ids.shape[1])[None, :] - n_left_pad[:, None]).clamp(min=0)
    return model(input_ids=input_ids, attention_mask=attention_mask.long(), position_ids=position_ids).logits


def _naive_logprobs_entropy(model, batch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log_softmax(logits / T) gathered at each real response token, one (row, column) at a time."""
    logits = _naive_logits(model, batch)
    prompt_len = batch["prompt_ids"].shape[1]
    logprobs = torch.zeros(batch["response_ids"].shape)
    entropy = torch.zeros(batch["response_ids"].shape)
    for b, t in batch["response_mask"].nonzero().tolist():
        logp = torch.log_softmax(logits[b, prompt_len - 1 + t] / temperature, dim=-1)  # predicts response token t
        logprobs[b, t] = logp[batch["response_ids"][b, t]]
        entropy[b, t] = -(logp.exp() * logp).sum(-1)
    return logprobs, entropy


@pytest.mark.parametrize("chunk_size", [1, 3, 4096])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@torch.no_grad()
def test_response_logprobs_match_naive_log_softmax(tiny_model, batch, temperature, chunk_size):
    model, _ = tiny_model
    logprobs, entropy = response_logprobs(model, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
                                          batch["response_mask"], temperature=temperature, chunk_size=chunk_size)
    expected_logprobs, expected_entropy = _naive_logprobs_entropy(model, batch, temperature)
    mask = batch["response_mask"]
    assert logprobs.shape == entropy.shape == mask.shape == (3, 4)
    torch.testing.assert_close(logprobs, expected_logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, expected_entropy, atol=1e-4, rtol=1e-5)
    assert (logprobs[~mask] == 0).all() and (entropy[~mask] == 0).all()
    assert (logprobs[mask] < 0).all() and (entropy[mask] > 0).all()


@torch.no_grad()
def test_temperature_changes_logprobs(tiny_model, batch):
    model, _ = tiny_model
    args = (model, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"], batch["response_mask"])
    at_one, _ = response_logprobs(*args, temperature=1.0)
    at_half, _ = response_logprobs(*args, temperature=0.5)
    assert not torch.allclose(at_one[batch["response_mask"]], at_half[batch["response_mask"]], atol=1e-3)


@pytest.mark.parametrize("chunk_size, expected_calls", [
    (2, [2, 2, 2, 2] * 2),  # 8 real tokens in chunks of 2: 4 forward calls, then 4 recomputations in backward
    (8, [8]),               # one chunk: no checkpointing, the LM head runs once
])
def test_chunked_checkpointed_gradients_match_full_logits(tiny_model_dir, batch, monkeypatch, chunk_size,
                                                          expected_calls):
    model, _ = load_causal_lm(tiny_model_dir)  # a private copy: backward writes .grad
    model.eval()
    mask = batch["response_mask"]
    temperature = 0.7

    calls = []
    chunk_fn = logprobs_module._chunk_logprobs_entropy
    monkeypatch.setattr(logprobs_module, "_chunk_logprobs_entropy",
                        lambda *args: calls.append(args[0].shape[0]) or chunk_fn(*args))
    logprobs, _ = response_logprobs(model, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"], mask,
                                    temperature=temperature, chunk_size=chunk_size)
    (logprobs * mask).sum().backward()
    assert calls == expected_calls
    chunked = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    logits = _naive_logits(model, batch)[:, batch["prompt_ids"].shape[1] - 1: -1]  # [B, T, V]
    naive = torch.log_softmax(logits / temperature, dim=-1).gather(-1, batch["response_ids"][..., None]).squeeze(-1)
    (naive * mask).sum().backward()

    # Chunking changes the float32 summation order (diffs up to ~1e-5 of a tensor's largest entry, identical with
    # checkpointing off): tolerance relative to each tensor's scale; a wrong gradient is off by O(1) of it.
    for name, p in model.named_parameters():
        scale = p.grad.abs().max()
        assert scale > 0, name
        torch.testing.assert_close(chunked[name], p.grad, rtol=1e-4, atol=1e-4 * float(scale),
                                   msg=lambda m, name=name: f"{name}: {m}")


@torch.no_grad()
def test_padding_does_not_change_logprobs(tiny_model, batch):
    model, tokenizer = tiny_model
    pad = tokenizer.pad_token_id
    extra_left, extra_right = 3, 2
    B = batch["prompt_ids"].shape[0]
    padded = {
        "prompt_ids": torch.cat([torch.full((B, extra_left), pad), batch["prompt_ids"]], dim=1),
        "prompt_mask": torch.cat([torch.zeros(B, extra_left, dtype=torch.bool), batch["prompt_mask"]], dim=1),
        "response_ids": torch.cat([batch["response_ids"], torch.full((B, extra_right), pad)], dim=1),
        "response_mask": torch.cat([batch["response_mask"], torch.zeros(B, extra_right, dtype=torch.bool)], dim=1),
    }
    logprobs, entropy = response_logprobs(model, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
                                          batch["response_mask"])
    padded_logprobs, padded_entropy = response_logprobs(model, padded["prompt_ids"], padded["prompt_mask"],
                                                        padded["response_ids"], padded["response_mask"])
    T = batch["response_ids"].shape[1]
    torch.testing.assert_close(padded_logprobs[:, :T], logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded_entropy[:, :T], entropy, atol=1e-4, rtol=0)
    assert (padded_logprobs[:, T:] == 0).all()

    # and each row alone, with no padding at all, gives the same values
    for b, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        alone, _ = response_logprobs(model, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.bool),
                                     torch.tensor([response]), torch.ones(1, len(response), dtype=torch.bool))
        torch.testing.assert_close(alone[0], logprobs[b, :len(response)], atol=1e-5, rtol=0)


@pytest.mark.parametrize("micro_batch_size", [1, 2])
def test_micro_batches_match_one_call(tiny_model, batch, micro_batch_size):
    model, _ = tiny_model
    with torch.no_grad():
        whole, _ = response_logprobs(model, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
                                     batch["response_mask"], temperature=0.7)
    micro = batched_response_logprobs(model, batch, micro_batch_size=micro_batch_size, temperature=0.7)
    assert micro.shape == whole.shape
    torch.testing.assert_close(micro, whole, atol=1e-5, rtol=0)
    assert (micro[~batch["response_mask"]] == 0).all()
