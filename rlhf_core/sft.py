"""Supervised fine-tuning (SFT): next-token cross-entropy on the assistant's tokens, on the shared update loop.

Layout. An example is one token sequence (a conversation rendered by the chat template, or plain text) and a
mask of the tokens to train (`chat.conversation_ids`: the assistant turns, each through its EOS; all tokens but
the first for plain text). It is cut before its first trained token into `prompt_ids` (left-padded) and
`response_ids` (right-padded), with `loss_mask` [B, T] over the response: every real token is attended to, only
masked ones are scored, so user turns between assistant turns condition the loss without being trained. The loss
is the summed NLL of a mini-batch's trained tokens divided by their global count (`Normalizers.num_tokens` counts
`loss_mask`): the exact per-token mean however the mini-batch is cut into micro-batches or over ranks (TRL's
default, "token-mean"). No packing: on these models packing would need a block-diagonal attention mask to stay
exact, and padding is already trimmed per micro-batch of similar lengths (`batch.length_sorted`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rlhf_core.batch import ceil_div, collate, map_micro_batches
from rlhf_core.chat import Message, conversation_ids
from rlhf_core.errors import UserInputError
from rlhf_core.logprobs import response_hidden_states, response_logprobs
from rlhf_core.update import Normalizers, run_update


def example_tokens(tokenizer, messages: Sequence[Message], text: str | None, *, system_prompt: str | None = None,
                   max_length: int | None = None) -> dict[str, list | bool]:
    """One example's `prompt_ids`, `response_ids`, `loss_mask` (aligned with response_ids) and `truncated`.
    text: a plain-text example (messages empty); else the conversation. max_length cuts the end."""
    if text is not None:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
        mask = [False] + [True] * (len(ids) - 1)  # the first token has nothing to be predicted from
    else:
        ids, mask = conversation_ids(tokenizer, messages, system_prompt)
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, mask = ids[:max_length], mask[:max_length]
    if not any(mask):
        raise UserInputError(f"max_length={max_length} cuts every trained token of an example ({len(mask)} tokens "
                             "kept, the assistant's turn starts later): raise max_length")
    first = mask.index(True)
    return {"prompt_ids": ids[:first], "response_ids": ids[first:], "loss_mask": mask[first:],
            "truncated": truncated}


def sft_batch(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
              loss_mask: Sequence[Sequence[bool]], pad_id: int, device="cpu") -> dict[str, Tensor]:
    """Collated examples with `loss_mask` [B, T] bool (False on padding)."""
    batch = collate(prompt_ids, response_ids, pad_id, per_token={"loss_mask": loss_mask}, device=device)
    batch["loss_mask"] = batch["loss_mask"].bool()
    return batch


def sft_loss(model, batch: dict[str, Tensor], norm: Normalizers, *,
             chunk_size: int = 1024) -> tuple[Tensor, dict[str, Tensor]]:
    """Summed NLL of the micro-batch's trained tokens / the mini-batch's global count of them.
    batch: an `sft_batch` micro-batch -> (loss [], metrics)"""
    logprobs, _ = response_logprobs(model, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
                                    batch["response_mask"], chunk_size=chunk_size, with_entropy=False,
                                    target_mask=batch["loss_mask"])  # [B, T], 0 off the trained tokens
    loss = -logprobs.sum() / norm.num_tokens
    return loss, {"loss/train": loss.detach()}


def sft_update(model, optimizer, batch: dict[str, Tensor], *, batch_size: int, micro_batch_size: int,
               max_grad_norm: float, seed: int, on_step=None, chunk_size: int = 1024) -> list[dict[str, float]]:
    """One shuffled pass over the examples, `batch_size` examples per optimizer step; one metrics dict per step."""
    def loss_fn(m, micro, norm):
        return sft_loss(m, micro, norm, chunk_size=chunk_size)

    num_rows = batch["prompt_ids"].shape[0]
    return run_update(model, optimizer, batch, loss_fn, epochs=1, mini_batches=ceil_div(num_rows, batch_size),
                      micro_batch_size=micro_batch_size, max_grad_norm=max_grad_norm, seed=seed, on_step=on_step)


def update_from_examples(model, optimizer, examples, pad_id: int, *, device: str,
                         **update_kwargs) -> list[dict[str, float]]:
    """One SFT epoch on a tokenized examples table; `update_kwargs` are `sft_update`'s. The same call in one
    process and on every rank."""
    batch = sft_batch(examples["prompt_ids"].tolist(), examples["response_ids"].tolist(),
                      examples["loss_mask"].tolist(), pad_id, device)
    return sft_update(model, optimizer, batch, **update_kwargs)


def _token_logprobs_and_hits(lm, micro: dict[str, Tensor], chunk_size: int) -> tuple[Tensor, Tensor]:
    """Log-prob of each trained token and whether it is the model's top-1 prediction. -> ([b, t], [b, t])"""
    hidden = response_hidden_states(lm, micro["prompt_ids"], micro["prompt_mask"], micro["response_ids"],
                                    micro["response_mask"])
    mask = micro["loss_mask"] & micro["response_mask"].bool()
    flat_hidden, targets = hidden[mask], micro["response_ids"][mask]  # [N, H], [N]
    head = lm.get_output_embeddings()
    logprobs, hits = [], []
    for start in range(0, targets.shape[0], chunk_size):
        logits = torch.nn.functional.linear(flat_hidden[start:start + chunk_size].to(head.weight.dtype), head.weight,
                                            head.bias).float()  # [n, V]
        chunk_targets = targets[start:start + chunk_size]
        logprobs.append(torch.log_softmax(logits, -1).gather(-1, chunk_targets[:, None]).squeeze(-1))
        hits.append((logits.argmax(-1) == chunk_targets).float())
    zeros = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    if not logprobs:
        return zeros, zeros.clone()
    return zeros.masked_scatter(mask, torch.cat(logprobs)), zeros.clone().masked_scatter(mask, torch.cat(hits))


@torch.no_grad()
def token_stats(lm, batch: dict[str, Tensor], *, micro_batch_size: int, chunk_size: int = 1024) -> dict[str, Tensor]:
    """Per example: the summed NLL of its trained tokens, their count and how many the model predicts top-1.
    lm: a causal LM; batch: an `sft_batch` -> {"nll", "tokens", "correct"}: each [B]"""
    logprobs, hits = map_micro_batches(lambda micro: _token_logprobs_and_hits(lm, micro, chunk_size), batch,
                                       micro_batch_size)
    mask = batch["loss_mask"] & batch["response_mask"].bool()
    return {"nll": -logprobs.sum(-1), "tokens": mask.sum(-1).float(), "correct": hits.sum(-1)}
