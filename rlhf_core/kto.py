"""KTO (Ethayarajh et al. 2024) on unpaired data, on the shared update loop.

Each example is (prompt, completion, label): desirable or undesirable, with no partner. Its loss
(`preference_losses.kto_loss`) compares the log-ratio r = log pi(y|x) - log ref(y|x) with a reference point z0, an
estimate of KL(pi || ref) from *mismatched* sequences: one example's prompt followed by another example's completion.
The reference is the starting model, frozen; its log-probs are computed once per dataset, as for DPO.

Departures from the paper and from TRL:
- The mismatch is fixed once per dataset: row i borrows the completion of the next row, in a seeded permutation,
  whose prompt differs from its own (TRL shifts completions inside each batch and may pair a row with a completion
  of its own prompt). Being fixed, the mismatched sequences get their reference log-probs in the same cached stage
  as the examples.
- z0 is estimated once per *mini-batch* (one optimizer step) through `run_update`'s `mini_batch_stats`: a no-grad
  policy pass over the mini-batch's mismatched sequences, mean log-ratio summed over ranks, clamped at 0, detached.
  So the loss, and its gradient, do not depend on how the mini-batch is cut into micro-batches or ranks (TRL
  estimates it per micro-batch).

Layout. A *KTO batch* has one row per example, like DPO's pair batch (and built by `dpo.collate_pairs`):
`prompt_ids`/`prompt_mask` [B, Lp] left-padded, `completion_ids`/`completion_mask` and `mismatched_ids`/
`mismatched_mask` [B, T] right-padded to one common T, `response_mask` = completion_mask | mismatched_mask (it only
tells `select_rows` how far it may trim and `run_update` how many rows there are), `desirable` [B] bool, and
`ref_logps`, `ref_mismatched_logps` [B] (summed over each completion, EOS included). A completion is its plain
text plus EOS after the chat-templated prompt, as in DPO.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from rlhf_core.batch import ceil_div, select_rows, truncate_sequences
from rlhf_core.dpo import batched_pair_logprobs, collate_pairs, response_token_ids
from rlhf_core.chat import Prompt, chat_prompt_ids
from rlhf_core.logprobs import response_logprobs
from rlhf_core.preference_losses import implicit_rewards, kto_loss, kto_reference_point
from rlhf_core.update import Normalizers, global_sum, run_update

# A KTO batch is DPO's pair batch with the example's completion as one side and its mismatched one as the other.
_FROM_PAIR = {"chosen_ids": "completion_ids", "chosen_mask": "completion_mask",
              "rejected_ids": "mismatched_ids", "rejected_mask": "mismatched_mask"}
_TO_PAIR = {kto_name: pair_name for pair_name, kto_name in _FROM_PAIR.items()}


def mismatched_rows(prompts: Sequence, seed: int) -> list[int]:
    """For each row i, the row j whose completion it borrows: the first row after i in a seeded cyclic permutation
    whose prompt differs from i's. prompts: [B] hashable -> [B] row indices. Raises ValueError with < 2 prompts."""
    n = len(prompts)
    if len(set(prompts)) < 2:
        raise ValueError(f"mismatched pairs need at least 2 distinct prompts, got {len(set(prompts))} in {n} rows")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    cycle = [prompts[row] for row in order]
    # following[p]: the first position after p (cycle walked twice) with another prompt than p's. One backward
    # sweep: a run of one prompt is walked once in all, not once per row (O(n), not O(n^2) on skewed data).
    following: list[int | None] = [None] * (2 * n)
    for p in range(2 * n - 2, -1, -1):
        following[p] = p + 1 if cycle[(p + 1) % n] != cycle[p % n] else following[p + 1]
    rows = [0] * n
    for position, row in enumerate(order):
        rows[row] = order[following[position] % n]
    return rows


def tokenize_examples(tokenizer, prompts: Sequence[Prompt], completions: Sequence[str], *, max_length: int | None,
                      max_prompt_length: int, seed: int, system_prompt: str | None = None,
                      prompt_keys: Sequence[str] | None = None) -> dict[str, list]:
    """Token columns of unpaired examples (one list entry per row): `prompt_ids` (chat template; prompts are
    strings or messages) and
    `completion_ids` (plain text + EOS), cut to `max_length` by `truncate_sequences`; `mismatched_row`
    (`mismatched_rows`) and `mismatched_ids`: that row's cut completion, cut again to fit after this row's prompt
    (the example's own tokens never depend on its mismatch); `truncated`: the example lost tokens. prompt_keys:
    one string per distinct prompt, for the mismatch (default: the prompts themselves, when strings)."""
    assert len(prompts) == len(completions), (len(prompts), len(completions))
    prompt_ids = chat_prompt_ids(tokenizer, list(prompts), system_prompt)
    completion_ids = response_token_ids(tokenizer, list(completions))
    cut = [truncate_sequences(p, [c], max_length, max_prompt_length) for p, c in zip(prompt_ids, completion_ids)]
    prompts_cut, completions_cut = [p for p, _ in cut], [c for _, (c,) in cut]
    rows = mismatched_rows(list(prompts if prompt_keys is None else prompt_keys), seed)
    # room >= 1: truncate_sequences leaves every prompt shorter than max_length
    room = [None if max_length is None else max_length - len(p) for p in prompts_cut]
    return {"prompt_ids": prompts_cut, "completion_ids": completions_cut, "mismatched_row": rows,
            "mismatched_ids": [completions_cut[j][:room[i]] for i, j in enumerate(rows)],
            "truncated": [len(pc) + len(cc) < len(p) + len(c)
                          for p, c, pc, cc in zip(prompt_ids, completion_ids, prompts_cut, completions_cut)]}


def collate_examples(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                     mismatched_ids: Sequence[Sequence[int]], desirable: Sequence[bool], pad_id: int,
                     per_example: dict[str, Sequence[float]] | None = None, device="cpu") -> dict[str, Tensor]:
    """A KTO batch (module docstring). per_example values are [B] floats (ref_logps, ref_mismatched_logps)."""
    pairs = collate_pairs(prompt_ids, completion_ids, mismatched_ids, pad_id, per_pair=per_example, device=device)
    batch = {_FROM_PAIR.get(key, key): value for key, value in pairs.items()}
    batch["desirable"] = torch.as_tensor(list(desirable), dtype=torch.bool, device=device)
    return batch


def sequence_logps(model, batch: dict[str, Tensor], side: str, *, chunk_size: int = 1024) -> Tensor:
    """Summed log-probs of one side ("completion" or "mismatched") of a KTO batch after each row's prompt.
    batch: a KTO batch -> [B]"""
    logprobs, _ = response_logprobs(model, batch["prompt_ids"], batch["prompt_mask"], batch[f"{side}_ids"],
                                    batch[f"{side}_mask"].bool(), chunk_size=chunk_size, with_entropy=False)  # [B, T]
    return logprobs.sum(-1)


@torch.no_grad()
def batched_example_logps(model, batch: dict[str, Tensor], *, micro_batch_size: int,
                          chunk_size: int = 1024) -> dict[str, Tensor]:
    """Summed log-probs of every row's completion and mismatched sequence, without grad; both sides share one
    forward pass of 2 * micro_batch_size sequences. batch: a KTO batch -> {"logps", "mismatched_logps"}: each [B]"""
    pair_view = {_TO_PAIR.get(key, key): value for key, value in batch.items()}
    logps = batched_pair_logprobs(model, pair_view, micro_batch_size=micro_batch_size, chunk_size=chunk_size)
    return {"logps": logps["chosen_logps"], "mismatched_logps": logps["rejected_logps"]}


@torch.no_grad()
def reference_point_stats(model, mini_batch: dict[str, Tensor], *, micro_batch_size: int,
                          chunk_size: int = 1024) -> dict[str, Tensor]:
    """`run_update`'s mini_batch_stats for KTO: z0 = max(0, mean log-ratio of the mini-batch's mismatched
    sequences) (Ethayarajh et al. 2024), from no-grad policy passes of `micro_batch_size` rows, and the counts of
    desirable and undesirable rows; sums and counts are added over ranks, so all are global mini-batch values.
    mini_batch: a KTO batch (with `row_weight` [B], 0 on padding rows) -> {"z0", "num_desirable",
    "num_undesirable"}: each [] float"""
    desirable = mini_batch["desirable"]
    device = desirable.device
    weight = mini_batch.get("row_weight", torch.ones(len(desirable), device=device))  # 0: a padding row
    logps = torch.cat([sequence_logps(model, select_rows(mini_batch, rows), "mismatched", chunk_size=chunk_size)
                       for rows in torch.arange(len(desirable), device=device).split(micro_batch_size)])  # [B]
    log_ratio_sum = global_sum(((logps - mini_batch["ref_mismatched_logps"]) * weight).sum().item(), device)
    num_rows = global_sum(weight.sum().item(), device)
    num_desirable = global_sum((desirable.float() * weight).sum().item(), device)
    z0 = max(log_ratio_sum / num_rows, 0.0)  # clamped like kto_reference_point: a KL estimate is never < 0
    return {name: torch.tensor(value, dtype=torch.float32, device=device) for name, value in
            [("z0", z0), ("num_desirable", num_desirable), ("num_undesirable", num_rows - num_desirable)]}


def per_label_sums(values: Tensor, desirable: Tensor, num_desirable: Tensor, num_undesirable: Tensor,
                   name: str) -> dict[str, Tensor]:
    """This micro-batch's share of the mini-batch mean of `values` over each label (sum / the mini-batch's count),
    so micro-batch values add up to the exact means; NaN for a label the mini-batch lacks.
    values: [B], desirable: [B] bool, counts: [] -> {f"{name}/desirable", f"{name}/undesirable"}: each []"""
    assert values.shape == desirable.shape, (values.shape, desirable.shape)
    return {f"{name}/desirable": values[desirable].sum() / num_desirable,
            f"{name}/undesirable": values[~desirable].sum() / num_undesirable}


def kto_batch_loss(model, batch: dict[str, Tensor], norm: Normalizers, *, beta: float, desirable_weight: float,
                   undesirable_weight: float, chunk_size: int = 1024) -> tuple[Tensor, dict[str, Tensor]]:
    """KTO loss of one micro-batch, divided by the mini-batch's global row count so micro-batches add up.
    batch: a KTO batch plus the mini-batch's `reference_point_stats` (z0, num_desirable, num_undesirable: [])."""
    logps = sequence_logps(model, batch, "completion", chunk_size=chunk_size)  # [B]: the only pass with grad
    desirable = batch["desirable"]
    losses = kto_loss(logps, batch["ref_logps"], desirable, batch["z0"], beta=beta,
                      desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)  # [B]
    loss = losses.sum() / norm.num_seqs  # num_seqs counts examples: rows of a KTO batch are examples
    counts = batch["num_desirable"], batch["num_undesirable"]
    metrics = {**per_label_sums(implicit_rewards(logps, batch["ref_logps"], beta), desirable, *counts, "rewards"),
               **per_label_sums(logps.detach(), desirable, *counts, "logps")}
    metrics["rewards/margins"] = metrics["rewards/desirable"] - metrics["rewards/undesirable"]  # linear: adds up
    metrics["kl"] = batch["z0"] * len(losses) / norm.num_seqs  # z0 weighted by this micro-batch's share: sums to z0
    return loss, {**metrics, "loss/kto": loss.detach(), "loss/train": loss.detach()}


def kto_update(model, optimizer, batch: dict[str, Tensor], *, batch_size: int, micro_batch_size: int,
               max_grad_norm: float, seed: int, on_step=None, beta: float, desirable_weight: float,
               undesirable_weight: float, chunk_size: int = 1024) -> list[dict[str, float]]:
    """One shuffled pass over a KTO batch, `batch_size` examples per optimizer step (z0 estimated over them);
    one metrics dict per step."""
    num_rows = batch["desirable"].shape[0]

    def stats_fn(m, mini):
        return reference_point_stats(m, mini, micro_batch_size=micro_batch_size, chunk_size=chunk_size)

    def loss_fn(m, micro, norm):
        return kto_batch_loss(m, micro, norm, beta=beta, desirable_weight=desirable_weight,
                              undesirable_weight=undesirable_weight, chunk_size=chunk_size)

    return run_update(model, optimizer, batch, loss_fn, epochs=1, mini_batches=ceil_div(num_rows, batch_size),
                      micro_batch_size=micro_batch_size, max_grad_norm=max_grad_norm, seed=seed, on_step=on_step,
                      mini_batch_stats=stats_fn)


def preference_accuracy(rewards: Tensor, desirable: Tensor, group_ids: Tensor) -> float:
    """Share of (desirable, undesirable) pairs with the same prompt where the desirable one's reward is higher
    (a tie is a miss); NaN without such pairs. rewards: [B], desirable: [B] bool, group_ids: [B] (one per prompt)"""
    assert rewards.shape == desirable.shape == group_ids.shape and rewards.dim() == 1, (
        rewards.shape, desirable.shape, group_ids.shape)
    order = torch.argsort(group_ids, stable=True)
    sizes = torch.unique_consecutive(group_ids[order], return_counts=True)[1].tolist()
    wins = pairs = 0
    for group_rewards, group_desirable in zip(rewards[order].split(sizes), desirable[order].split(sizes)):
        good, bad = group_rewards[group_desirable], group_rewards[~group_desirable]
        wins += int((good[:, None] > bad[None, :]).sum())  # [D, U]: every pair of the prompt
        pairs += len(good) * len(bad)
    return wins / pairs if pairs else float("nan")


def held_out_metrics(rewards: Tensor, desirable: Tensor, group_ids: Tensor, mismatched_logps: Tensor,
                     ref_mismatched_logps: Tensor) -> dict[str, float]:
    """Summary of a held-out set: mean implicit reward per label and their margin, `preference_accuracy`, and the
    KL estimate z0 over the whole set. all: [B] (desirable bool, group_ids one per prompt) -> floats (NaN when a
    label is absent)."""
    desirable_mean, undesirable_mean = rewards[desirable].mean(), rewards[~desirable].mean()  # empty -> NaN
    return {"rewards/desirable": float(desirable_mean), "rewards/undesirable": float(undesirable_mean),
            "rewards/margins": float(desirable_mean - undesirable_mean),
            "rewards/accuracies": preference_accuracy(rewards, desirable, group_ids),
            "kl": float(kto_reference_point(mismatched_logps, ref_mismatched_logps))}


REF_COLUMNS = ["ref_logps", "ref_mismatched_logps"]


def example_batch(examples, pad_id: int, device: str) -> dict[str, Tensor]:
    """A tokenized examples table (prompt_ids, completion_ids, mismatched_ids, label and, when present, the
    reference log-probs) as a KTO batch."""
    per_example = {name: examples[name] for name in REF_COLUMNS if name in examples}
    return collate_examples(examples["prompt_ids"].tolist(), examples["completion_ids"].tolist(),
                            examples["mismatched_ids"].tolist(), examples["label"].tolist(), pad_id,
                            per_example=per_example, device=device)


def update_from_examples(model, optimizer, examples, pad_id: int, *, device: str,
                         **update_kwargs) -> list[dict[str, float]]:
    """One KTO epoch on a tokenized examples table with reference log-probs; `update_kwargs` are `kto_update`'s.
    The same call in one process and on every rank."""
    return kto_update(model, optimizer, example_batch(examples, pad_id, device), **update_kwargs)
