"""Batched sampling of responses with a KV cache.

Departs from `model.generate` in four ways that matter for RL:
- every row samples from its own seeded generator (Gumbel-max), so a response depends on its seed and prompt
  only, not on which other rows share its batch: sharding or re-batching the rollout stage changes nothing (the
  generators live on the model's device: a seed gives one response on a CPU, another on a GPU, each reproducible);
- the log-prob recorded for each sampled token is taken from the tempered distribution *before* top-p
  truncation, which is the distribution the trainer's log-probs are computed from (same temperature);
- a row that emits EOS leaves the batch (its KV-cache rows, mask, positions and generator are dropped), so a ragged
  batch costs what its tokens cost, not rows x the longest response;
- rows with the same prompt (a GRPO/PPO group) share one prompt pass, whose KV cache is copied to each of them.

Layout (shared with `logprobs.py`): prompts are left-padded to P columns, responses right-padded to T columns,
so every response starts at column P. The response mask keeps the EOS token: the policy must learn to stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


@dataclass
class Rollouts:
    """Plain Python lists, one entry per sampled response, ready for a Parquet table."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]  # no padding; ends with EOS when `finished`
    sampling_logprobs: list[list[float]]  # log-prob of each response token under the sampling distribution
    finished: list[bool]  # True when the response emitted EOS within max_new_tokens


def pad_sequences(seqs: list[list[int]], pad_id: int, side: str, device="cpu") -> tuple[Tensor, Tensor]:
    """ids: [B, max_len] padded on `side`, mask: [B, max_len] bool (True on real tokens)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = True
    return ids.to(device), mask.to(device)


def top_p_filter(logprobs: Tensor, top_p: float) -> Tensor:
    """Set to -inf every token outside the smallest set whose probability reaches top_p (nucleus sampling).
    logprobs: [B, V] -> [B, V]"""
    if top_p >= 1.0:
        return logprobs
    sorted_lp, order = logprobs.sort(dim=-1, descending=True)
    mass_before = sorted_lp.exp().cumsum(dim=-1) - sorted_lp.exp()
    drop_sorted = mass_before >= top_p  # the token that crosses top_p is kept, so at least one survives
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logprobs.masked_fill(drop, float("-inf"))


def sample_tokens(logprobs: Tensor, top_p: float, generators: list[torch.Generator] | None) -> Tensor:
    """One token per row by Gumbel-max over the top-p-filtered log-probs; greedy when generators is None.
    logprobs: [B, V] -> [B]"""
    filtered = top_p_filter(logprobs, top_p)
    if generators is None:
        return filtered.argmax(dim=-1)
    vocab = logprobs.shape[-1]
    uniform = torch.stack([torch.rand(vocab, generator=g, device=g.device) for g in generators]).to(logprobs.device)
    gumbel = -torch.log(-torch.log(uniform.clamp_(1e-20, 1.0 - 1e-7)))
    return (filtered + gumbel).argmax(dim=-1)


@torch.no_grad()
def sample_responses(model, prompt_ids: list[list[int]], *, eos_ids: list[int], pad_id: int, max_new_tokens: int,
                     temperature: float, top_p: float, seeds: list[int] | None,
                     on_step: Callable[[], None] | None = None) -> Rollouts:
    """Sample one response per prompt. seeds: one per prompt (None: greedy decoding).
    temperature 0 also means greedy; log-probs are then those of the untempered distribution.
    Rows that emit EOS leave the batch for the following steps, so a ragged batch costs what its tokens cost; rows
    with the same prompt share its prompt pass."""
    device = next(model.parameters()).device
    greedy = seeds is None or temperature == 0
    # on the model's device: a CPU generator would make every decode step wait for a host-to-device copy
    generators = None if greedy else [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    scale = 1.0 if temperature == 0 else temperature
    unique, row_prompt = distinct_prompts(prompt_ids)
    input_ids, attention_mask = pad_sequences(unique, pad_id, "left", device)  # [U, P]
    eos = torch.tensor(eos_ids, device=device)
    batch = len(prompt_ids)

    # [B, T] results; after its EOS a row keeps pad_id and log-prob 0, which `_to_rollouts` cuts off
    token_matrix = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprob_matrix = torch.zeros((batch, max_new_tokens), dtype=torch.float32, device=device)
    rows = torch.arange(batch, device=device)  # [b]: the full-batch index of each row still decoded
    step_input = input_ids  # [U, P] for the prompt pass, then [b, 1]
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    cache = None
    for step in range(max_new_tokens):
        out = model(input_ids=step_input, attention_mask=attention_mask.long(), position_ids=position_ids,
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache, logits = out.past_key_values, out.logits[:, -1]  # [b, V]
        if step == 0 and len(unique) < batch:  # rows sharing a prompt (a GRPO group): one prompt pass, copied
            index = row_prompt.to(device)
            cache.reorder_cache(index)
            logits, attention_mask, position_ids = logits[index], attention_mask[index], position_ids[index]
        step_logprobs = torch.log_softmax(logits.float() / scale, dim=-1)  # [b, V]
        token = sample_tokens(step_logprobs, top_p, generators)  # [b]
        token_matrix[rows, step] = token
        logprob_matrix[rows, step] = step_logprobs.gather(-1, token[:, None]).squeeze(-1)
        alive = ~torch.isin(token, eos)  # [b]: False where the row just emitted EOS (recorded above)
        if on_step is not None:  # progress reporting lives with the caller
            on_step()
        if not bool(alive.all()):  # rows finished: drop them from the cache and every per-row input
            if not bool(alive.any()):
                break
            keep = alive.nonzero().squeeze(-1)
            cache.reorder_cache(keep)  # index_select on dim 0 of every layer's states, whatever the layer type
            rows, token = rows[keep], token[keep]
            attention_mask, position_ids = attention_mask[keep], position_ids[keep]
            generators = None if generators is None else [generators[i] for i in keep.tolist()]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=-1)
        position_ids = position_ids[:, -1:] + 1
        step_input = token[:, None]

    steps = step + 1
    return _to_rollouts(prompt_ids, token_matrix[:, :steps].cpu(), logprob_matrix[:, :steps].cpu(), set(eos_ids))


def distinct_prompts(prompt_ids: list[list[int]]) -> tuple[list[list[int]], Tensor]:
    """The distinct prompts in order of first appearance, and each row's index among them -> ([U] prompts, [B])."""
    index: dict[tuple[int, ...], int] = {}
    rows = [index.setdefault(tuple(p), len(index)) for p in prompt_ids]
    return [list(p) for p in index], torch.tensor(rows, dtype=torch.long)


def _to_rollouts(prompt_ids: list[list[int]], tokens: Tensor, logprobs: Tensor, eos_ids: set[int]) -> Rollouts:
    responses, response_logprobs, finished = [], [], []
    for row_tokens, row_logprobs in zip(tokens.tolist(), logprobs.tolist()):
        end = next((i + 1 for i, t in enumerate(row_tokens) if t in eos_ids), len(row_tokens))
        responses.append(row_tokens[:end])
        response_logprobs.append(row_logprobs[:end])
        finished.append(end <= len(row_tokens) and row_tokens[end - 1] in eos_ids)
    return Rollouts([list(p) for p in prompt_ids], responses, response_logprobs, finished)
