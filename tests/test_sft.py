"""SFT's core: which tokens a conversation trains (by prefix matching, cross-checked against a template's
generation markers), the loss against a plain full-sequence forward, and micro-batch invariance of the gradient."""

from __future__ import annotations

import copy

import pytest
import torch

from rlhf_core.chat import conversation_ids, prompt_ids
from rlhf_core.errors import UserInputError
from rlhf_core.models import load_causal_lm, load_tokenizer
from rlhf_core.sft import example_tokens, sft_batch, sft_loss, token_stats
from rlhf_core.update import Normalizers

CONVERSATION = [{"role": "system", "content": "You add numbers."},
                {"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "5"},
                {"role": "user", "content": "And 4 + 4?"}, {"role": "assistant", "content": "It is 8."}]
# SmolLM2's template with {% generation %} markers around each assistant turn's content and end-of-turn token
MARKED_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)[0]


def test_multi_turn_mask_is_each_assistant_turn_through_its_eos(tokenizer):
    ids, mask = conversation_ids(tokenizer, CONVERSATION)
    trained = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "5<|im_end|>It is 8.<|im_end|>"  # the contents and EOS; not the "\n" the template adds after
    # the untrained tokens are the rest of the rendering, in order
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    # the first turn's context is exactly what generation renders for it
    first = mask.index(True)
    assert ids[:first] == prompt_ids(tokenizer, CONVERSATION[:2])


def test_prefix_matching_agrees_with_the_templates_generation_markers(tokenizer):
    marked = copy.deepcopy(tokenizer)
    marked.chat_template = MARKED_TEMPLATE
    assert conversation_ids(marked, CONVERSATION) == conversation_ids(tokenizer, CONVERSATION)
    # and so it does with the default system turn the template adds
    assert conversation_ids(marked, CONVERSATION[1:]) == conversation_ids(tokenizer, CONVERSATION[1:])


def test_examples_split_before_the_first_trained_token_and_plain_text_trains_all_but_the_first(tokenizer):
    example = example_tokens(tokenizer, CONVERSATION, None)
    assert example["prompt_ids"] == prompt_ids(tokenizer, CONVERSATION[:2]) and example["loss_mask"][0]
    assert not example["truncated"]
    plain = example_tokens(tokenizer, [], "Once upon a time")
    ids = tokenizer("Once upon a time")["input_ids"]
    assert plain["prompt_ids"] == ids[:1] and plain["response_ids"] == ids[1:] + [tokenizer.eos_token_id]
    assert all(plain["loss_mask"])
    cut = example_tokens(tokenizer, CONVERSATION, None, max_length=len(example["prompt_ids"]) + 1)
    assert cut["truncated"] and cut["loss_mask"] == [True]
    with pytest.raises(UserInputError, match="max_length=5 cuts every trained token"):
        example_tokens(tokenizer, CONVERSATION, None, max_length=5)
    with pytest.raises(UserInputError, match="no assistant tokens"):
        conversation_ids(tokenizer, CONVERSATION[:2])


def batch_of(tokenizer, conversations):
    rows = [example_tokens(tokenizer, c, None) for c in conversations]
    return sft_batch([r["prompt_ids"] for r in rows], [r["response_ids"] for r in rows],
                     [r["loss_mask"] for r in rows], tokenizer.pad_token_id)


CONVERSATIONS = [CONVERSATION, CONVERSATION[1:3],
                 [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there, friend!"}]]


def test_loss_equals_the_mean_nll_of_assistant_tokens_from_a_plain_forward(tiny_model_dir, tokenizer):
    """Two formulations: the loss from the prompt/response split with its loss mask, and a full-sequence forward
    of each conversation with the cross-entropy picked at the assistant positions by hand."""
    model, _ = load_causal_lm(tiny_model_dir)
    model.eval()
    batch = batch_of(tokenizer, CONVERSATIONS)
    tokens = batch["loss_mask"].sum()
    loss, _ = sft_loss(model, batch, Normalizers(num_seqs=3, num_tokens=float(tokens)))
    total, count = 0.0, 0
    for conversation in CONVERSATIONS:
        ids, mask = conversation_ids(tokenizer, conversation)
        logits = model(torch.tensor([ids])).logits[0].float()  # [L, V]
        logp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
        trained = torch.tensor(mask[1:])
        total, count = total - logp[trained].sum(), count + int(trained.sum())
    assert count == int(tokens)
    torch.testing.assert_close(loss, total / count, atol=1e-5, rtol=1e-5)
    stats = token_stats(model, batch, micro_batch_size=2)
    torch.testing.assert_close(stats["nll"].sum(), total.detach(), atol=1e-4, rtol=1e-5)
    assert stats["tokens"].tolist() == [float(m.sum()) for m in batch["loss_mask"]]
    assert 0 <= float(stats["correct"].sum()) <= count


def test_gradient_does_not_depend_on_the_micro_batch_split(tiny_model_dir, tokenizer):
    model, _ = load_causal_lm(tiny_model_dir)
    batch = batch_of(tokenizer, CONVERSATIONS)
    norm = Normalizers(num_seqs=3, num_tokens=float(batch["loss_mask"].sum()))

    def gradient(splits):
        model.zero_grad()
        for rows in splits:
            loss, _ = sft_loss(model, {k: v[rows] for k, v in batch.items()}, norm)
            loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    whole = gradient([torch.arange(3)])
    split = gradient([torch.tensor([0]), torch.tensor([1, 2])])
    one_by_one = gradient([torch.tensor([i]) for i in range(3)])
    # the bound: the same gradient with another split of the same rows (another float32 summation order)
    self_difference = (split - one_by_one).abs().max()
    assert (whole - split).abs().max() <= 10 * self_difference + 1e-7 * whole.abs().max()
