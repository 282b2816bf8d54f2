"""DPO (Rafailov et al. 2023) and its offline relatives on the shared update loop.

The loss of a pair depends on the summed log-probs of its chosen and rejected responses under the policy and
under a frozen reference (computed once per dataset, beforehand); the losses themselves live in
`preference_losses.py` (sigmoid = DPO eq. 7, robust, hinge, ipo, simpo). Chosen and rejected go through the model
in ONE forward pass: their rows are concatenated into one batch, so both see the same weights, dropout state and
padding rules, and the backbone runs once per micro-batch.

Layout. Prompts are rendered with the chat template; each response is its plain text plus EOS, and EOS stays in
the response mask (the policy must learn where a good reply stops). A *pair batch* has one row per pair:
`prompt_ids`/`prompt_mask` [P, Lp] left-padded, `chosen_ids`/`chosen_mask` and `rejected_ids`/`rejected_mask`
[P, T] right-padded to a common T, and `response_mask` = chosen_mask | rejected_mask, which only tells
`select_rows` how far it may trim and `run_update` how many rows there are. Rows being pairs, `run_update`'s
`Normalizers.num_seqs` counts pairs, so `sum(losses) / num_seqs` is the exact mean over a mini-batch's pairs
however it is cut into micro-batches. Departure from the paper: optional RPO term (Pang et al. 2024),
`rpo_alpha * NLL(chosen) per token`, added to each pair's loss.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from rlhf_core.batch import ceil_div, collate, select_rows
from rlhf_core.chat import Prompt, chat_prompt_ids
from rlhf_core.logprobs import response_logprobs
from rlhf_core.preference_losses import PREFERENCE_LOSSES, implicit_rewards, pair_comparison, rpo_nll
from rlhf_core.update import Normalizers, run_update


def response_token_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Plain text + EOS per response (no chat markup: the prompt's template already opened the reply)."""
    return [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]


def tokenize_pairs(tokenizer, prompts: Sequence[Prompt], chosen: Sequence[str], rejected: Sequence[str],
                   system_prompt: str | None = None) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """(prompt_ids, chosen_ids, rejected_ids) per pair, untruncated (`batch.truncate_sequences` cuts a pair);
    prompts are strings or messages."""
    assert len(prompts) == len(chosen) == len(rejected), (len(prompts), len(chosen), len(rejected))
    return (chat_prompt_ids(tokenizer, list(prompts), system_prompt), response_token_ids(tokenizer, chosen),
            response_token_ids(tokenizer, rejected))


def collate_pairs(prompt_ids: Sequence[Sequence[int]], chosen_ids: Sequence[Sequence[int]],
                  rejected_ids: Sequence[Sequence[int]], pad_id: int,
                  per_pair: dict[str, Sequence[float]] | None = None, device="cpu") -> dict[str, Tensor]:
    """A pair batch (module docstring): collated as 2P rows [chosen; rejected] so both share one width T,
    then folded back to one row per pair. per_pair values are [P] floats (e.g. ref_chosen_logps)."""
    num_pairs = len(prompt_ids)
    rows = collate(list(prompt_ids) * 2, list(chosen_ids) + list(rejected_ids), pad_id, device=device)
    response_ids, response_mask = rows["response_ids"], rows["response_mask"]  # [2P, T]
    batch = {"prompt_ids": rows["prompt_ids"][:num_pairs], "prompt_mask": rows["prompt_mask"][:num_pairs],
             "chosen_ids": response_ids[:num_pairs], "chosen_mask": response_mask[:num_pairs],
             "rejected_ids": response_ids[num_pairs:], "rejected_mask": response_mask[num_pairs:],
             "response_mask": response_mask[:num_pairs] | response_mask[num_pairs:]}
    for name, values in (per_pair or {}).items():
        batch[name] = torch.as_tensor(list(values), dtype=torch.float32, device=device)
    return batch


def pair_logprobs(model, batch: dict[str, Tensor], *, chunk_size: int = 1024) -> dict[str, Tensor]:
    """Summed response log-probs and lengths of chosen and rejected, from one forward pass over 2P rows.
    batch: a pair batch -> {"chosen_logps", "rejected_logps", "chosen_lengths", "rejected_lengths"}: each [P]"""
    num_pairs = batch["prompt_ids"].shape[0]
    prompt_ids = torch.cat([batch["prompt_ids"], batch["prompt_ids"]])  # [2P, Lp]
    prompt_mask = torch.cat([batch["prompt_mask"], batch["prompt_mask"]])
    response_ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])  # [2P, T]: rows [chosen; rejected]
    response_mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]]).bool()
    logprobs, _ = response_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask,
                                    chunk_size=chunk_size, with_entropy=False)  # [2P, T], 0 on padding
    logps_per_seq, lengths = logprobs.sum(-1), response_mask.sum(-1).float()  # [2P]
    return {"chosen_logps": logps_per_seq[:num_pairs], "rejected_logps": logps_per_seq[num_pairs:],
            "chosen_lengths": lengths[:num_pairs], "rejected_lengths": lengths[num_pairs:]}


@torch.no_grad()
def batched_pair_logprobs(model, batch: dict[str, Tensor], *, micro_batch_size: int,
                          chunk_size: int = 1024) -> dict[str, Tensor]:
    """`pair_logprobs` over a whole pair batch, `micro_batch_size` pairs per forward, without grad. -> each [P]"""
    pieces = [pair_logprobs(model, select_rows(batch, rows), chunk_size=chunk_size)
              for rows in torch.arange(batch["prompt_ids"].shape[0]).split(micro_batch_size)]
    return {key: torch.cat([p[key] for p in pieces]) for key in pieces[0]}


def preference_logps(logps: dict[str, Tensor], loss_type: str) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) [P] as the loss sees them: summed log-probs, or the average per token for a
    length-normalised loss (SimPO, Meng et al. 2024 eq. 6)."""
    if PREFERENCE_LOSSES[loss_type].length_normalized:
        return logps["chosen_logps"] / logps["chosen_lengths"], logps["rejected_logps"] / logps["rejected_lengths"]
    return logps["chosen_logps"], logps["rejected_logps"]


def reward_metrics(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor,
                   ref_rejected_logps: Tensor, beta: float) -> dict[str, Tensor]:
    """Per-pair implicit rewards beta * (logp - ref_logp) and their summaries, detached: each [P].
    A tie (policy == reference) counts as not accurate."""
    pairs = pair_comparison(implicit_rewards(chosen_logps.detach(), ref_chosen_logps, beta),
                            implicit_rewards(rejected_logps.detach(), ref_rejected_logps, beta))
    return {f"rewards/{name}": pairs[key] for name, key in
            [("chosen", "chosen"), ("rejected", "rejected"), ("margins", "margin"), ("accuracies", "accuracy")]}


def dpo_loss(model, batch: dict[str, Tensor], norm: Normalizers, *, loss_type: str, beta: float,
             label_smoothing: float, simpo_gamma: float, rpo_alpha: float | None,
             chunk_size: int = 1024) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss of one micro-batch of pairs, divided by the mini-batch's global pair count so micro-batches add up.
    batch: a pair batch with ref_chosen_logps, ref_rejected_logps [P] (absent for a reference-free loss: zeros).
    The loss gets the options it declares (`PreferenceLoss.options`)."""
    logps = pair_logprobs(model, batch, chunk_size=chunk_size)
    zeros = torch.zeros_like(logps["chosen_logps"])
    ref_chosen, ref_rejected = batch.get("ref_chosen_logps", zeros), batch.get("ref_rejected_logps", zeros)
    chosen, rejected = preference_logps(logps, loss_type)
    entry = PREFERENCE_LOSSES[loss_type]
    given = {"label_smoothing": label_smoothing, "simpo_gamma": simpo_gamma}
    losses = entry.loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta,
                        **{name: given[name] for name in entry.options})  # [P]
    total = losses
    if rpo_alpha:  # RPO: NLL of the chosen response per token, on top of the preference loss
        total = total + rpo_alpha * rpo_nll(logps["chosen_logps"], logps["chosen_lengths"])
    loss = total.sum() / norm.num_seqs  # num_seqs counts pairs: rows of a pair batch are pairs
    per_pair = {**reward_metrics(chosen, rejected, ref_chosen, ref_rejected, beta),
                "logps/chosen": logps["chosen_logps"].detach(), "logps/rejected": logps["rejected_logps"].detach(),
                "loss/dpo": losses.detach()}
    metrics = {key: value.sum() / norm.num_seqs for key, value in per_pair.items()}
    return loss, {**metrics, "loss/train": loss.detach()}


def dpo_update(model, optimizer, batch: dict[str, Tensor], *, batch_size: int, micro_batch_size: int,
               max_grad_norm: float, seed: int, on_step=None, **loss_kwargs) -> list[dict[str, float]]:
    """One shuffled pass over a pair batch, `batch_size` pairs per optimizer step; one metrics dict per step."""
    num_pairs = batch["prompt_ids"].shape[0]

    def loss_fn(m, micro, norm):
        return dpo_loss(m, micro, norm, **loss_kwargs)

    return run_update(model, optimizer, batch, loss_fn, epochs=1, mini_batches=ceil_div(num_pairs, batch_size),
                      micro_batch_size=micro_batch_size, max_grad_norm=max_grad_norm, seed=seed, on_step=on_step)


REF_COLUMNS = ["ref_chosen_logps", "ref_rejected_logps"]


def pair_batch(pairs, pad_id: int, device: str) -> dict[str, Tensor]:
    """A tokenized pairs table (prompt_ids, chosen_ids, rejected_ids and, when present, the reference log-probs)
    as a pair batch."""
    per_pair = {name: pairs[name] for name in REF_COLUMNS if name in pairs}
    return collate_pairs(pairs["prompt_ids"].tolist(), pairs["chosen_ids"].tolist(), pairs["rejected_ids"].tolist(),
                         pad_id, per_pair=per_pair, device=device)


def update_from_pairs(model, optimizer, pairs, pad_id: int, *, device: str, **update_kwargs) -> list[dict[str, float]]:
    """One DPO epoch on a tokenized pairs table with reference log-probs; `update_kwargs` are `dpo_update`'s.
    The same call in one process and on every rank."""
    return dpo_update(model, optimizer, pair_batch(pairs, pad_id, device), **update_kwargs)
