"""Rollout rows <-> padded tensors.

A batch is a dict of tensors with leading dimension B: `prompt_ids`/`prompt_mask` [B, P] left-padded,
`response_ids`/`response_mask` [B, T] right-padded (so every response starts at column P), and any per-token
extras ([B, T], e.g. `old_logprobs`, `ref_logprobs`) aligned with the response columns.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from rlhf_core.generation import pad_sequences


def ceil_div(numerator: int, denominator: int) -> int:
    """The smallest integer >= numerator / denominator (batches, shares, passes: a partial one counts)."""
    return -(-numerator // denominator)


def collate(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], pad_id: int,
            per_token: dict[str, Sequence[Sequence[float]]] | None = None,
            per_seq: dict[str, Sequence[float]] | None = None, device="cpu") -> dict[str, Tensor]:
    """Pad rows into a batch. per_token values are [B, T] floats aligned with responses; per_seq values [B]."""
    prompt, prompt_mask = pad_sequences([list(p) for p in prompt_ids], pad_id, "left", device)
    response, response_mask = pad_sequences([list(r) for r in response_ids], pad_id, "right", device)
    batch = {"prompt_ids": prompt, "prompt_mask": prompt_mask, "response_ids": response,
             "response_mask": response_mask}
    width = response.shape[1]
    for name, rows in (per_token or {}).items():
        values = torch.zeros((len(rows), width), dtype=torch.float32)
        for i, row in enumerate(rows):
            values[i, :len(row)] = torch.as_tensor(list(row), dtype=torch.float32)
        batch[name] = values.to(device)
    for name, values in (per_seq or {}).items():
        batch[name] = torch.as_tensor(list(values), dtype=torch.float32, device=device)
    return batch


def truncate_sequences(prompt_ids: Sequence[int], responses: Sequence[Sequence[int]], max_length: int | None,
                       max_prompt_length: int) -> tuple[list[int], list[list[int]]]:
    """Fit one prompt and each of its responses into `max_length` tokens, the same cut for every response (so a
    pair's two sides see the same prompt). Only when the longest prompt + response is too long: the prompt keeps
    its last `max_prompt_length` tokens (the question and the chat markup that opens the reply are at its end),
    then every response keeps its first `max_length - len(prompt)` tokens (a cut response loses its EOS).
    None: no limit."""
    prompt, responses = list(prompt_ids), [list(r) for r in responses]
    longest = max((len(r) for r in responses), default=0)
    if max_length is None or len(prompt) + longest <= max_length:
        return prompt, responses
    assert 0 < max_prompt_length < max_length, (max_prompt_length, max_length)
    prompt = prompt[-max_prompt_length:]
    return prompt, [r[:max_length - len(prompt)] for r in responses]


def select_rows(batch: dict[str, Tensor], rows: Tensor) -> dict[str, Tensor]:
    """Rows of every tensor, with columns that are padding in all selected rows trimmed away, so short
    micro-batches cost less."""
    out = {k: v[rows] for k, v in batch.items()}
    prompt_cols = out["prompt_mask"].any(0).nonzero()
    response_cols = out["response_mask"].any(0).nonzero()
    first = int(prompt_cols[0]) if len(prompt_cols) else 0
    last = int(response_cols[-1]) + 1 if len(response_cols) else 1
    for k, v in out.items():
        if k.startswith("prompt_"):
            out[k] = v[:, first:]
        elif v.dim() == 2:  # every other [B, T] tensor is aligned with the response columns
            out[k] = v[:, :last]
    return out


def length_sorted(batch: dict[str, Tensor], rows: Tensor) -> Tensor:
    """`rows` reordered by sequence length (prompt + response tokens; ties keep their order), so that micro-batches
    cut from it hold similar lengths and `select_rows` trims more padding. The loss sums over micro-batches with
    global normalisers, so the order changes no gradient, only which padding is computed. rows: [N] -> [N]"""
    lengths = batch["prompt_mask"][rows].sum(1) + batch["response_mask"][rows].sum(1)
    return rows[torch.sort(lengths, stable=True).indices]


def response_lists(values: Tensor, mask: Tensor) -> list[list[float]]:
    """[B, T] tensor -> one list per row holding the masked-in values (the inverse of collate's per_token)."""
    return [row[m].tolist() for row, m in zip(values.detach().float().cpu(), mask.bool().cpu())]


@torch.no_grad()
def map_micro_batches(fn, batch: dict[str, Tensor], micro_batch_size: int, *,
                      sort_by_length: bool = True) -> tuple[Tensor, ...]:
    """Run `fn(micro_batch) -> tuple of [b, t] tensors` over the batch in micro-batches (of similar lengths unless
    `sort_by_length` is False), without grad, and stitch the results back into [B, T] tensors aligned with
    batch["response_ids"] (0 on padding)."""
    mask = batch["response_mask"]
    rows_in_order = torch.arange(mask.shape[0], device=mask.device)
    if sort_by_length:
        rows_in_order = length_sorted(batch, rows_in_order)
    outputs: list[Tensor] = []
    for rows in rows_in_order.split(micro_batch_size):
        results = fn(select_rows(batch, rows))
        if not outputs:
            outputs = [torch.zeros(mask.shape, dtype=torch.float32, device=mask.device) for _ in results]
        for out, result in zip(outputs, results):
            out[rows, :result.shape[1]] = result.float()
    return tuple(outputs)
