"""LLM-as-judge. Pointwise: a causal LM reads a grading prompt (the template with the prompt and the response put in,
rendered with its chat template as one user turn) and the score is the probability it gives to the "yes" answer
among the two answers, read from its next-token distribution: P(yes) / (P(yes) + P(no)) in [0, 1]. Nothing is
sampled or parsed, so the score is deterministic and never fails to parse (the G-Eval / "probability of the grade
token" style of judging; Liu et al. 2023). Pairwise: the same reading of "A" against "B" for two responses shown
side by side, asked in both orders (Zheng et al. 2023, "Judging LLM-as-a-judge", swap to cancel position bias)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rlhf_core.chat import prompt_ids
from rlhf_core.errors import UserInputError
from rlhf_core.generation import pad_sequences
from rlhf_core.logprobs import position_ids_from_mask

def answer_token_ids(tokenizer, answers: Sequence[str]) -> list[int]:
    """The first token of each answer ("Yes", "No"), as the judge would start its reply; they must differ."""
    ids = [tokenizer.encode(answer, add_special_tokens=False)[:1] for answer in answers]
    if any(not i for i in ids) or len({i[0] for i in ids}) != len(ids):
        raise UserInputError(f"judge answers {list(answers)}: each must start with a token of its own in the judge's "
                             "tokenizer")
    return [i[0] for i in ids]


def judge_prompts(tokenizer, template: str, prompts: Sequence[str], responses: Sequence[str]) -> list[list[int]]:
    """Token ids of each grading prompt, ending where the judge's answer begins."""
    return [prompt_ids(tokenizer, template.format(prompt=p, response=r)) for p, r in zip(prompts, responses,
                                                                                          strict=True)]


@torch.no_grad()
def yes_probability(model, input_ids: Sequence[Sequence[int]], answer_ids: Sequence[int], pad_id: int,
                    batch_size: int = 8) -> Tensor:
    """P(answer 0) / sum_a P(answer a) at the token after each prompt. input_ids: B prompts (left-padded here, so
    the last position is every row's next token) -> [B] float64."""
    device = next(model.parameters()).device
    scores = []
    for start in range(0, len(input_ids), batch_size):
        ids, mask = pad_sequences([list(r) for r in input_ids[start:start + batch_size]], pad_id, "left", device)
        logits = model(input_ids=ids, attention_mask=mask.long(),
                       position_ids=position_ids_from_mask(mask)).logits[:, -1].double()
        answers = torch.log_softmax(logits, dim=-1)[:, list(answer_ids)]
        scores.append(torch.softmax(answers, dim=-1)[:, 0].cpu())
    return torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float64)


def pairwise_preference(model, tokenizer, template: str, prompts: Sequence[str], first: Sequence[str],
                        second: Sequence[str], answers: Sequence[str], batch_size: int = 8) -> Tensor:
    """How strongly the judge prefers `first` to `second`, in both orders to cancel its position bias:
    (P(A | first shown as A) + P(B | first shown as B)) / 2, each P renormalised over the two answers (A, B).
    template has {prompt}, {a} and {b}. prompts, first, second: [N] -> [N] float64 in [0, 1] (0.5: no preference)."""
    answer_ids = answer_token_ids(tokenizer, answers)

    def shown(a_side, b_side):
        return [prompt_ids(tokenizer, template.format(prompt=p, a=a, b=b)) for p, a, b in zip(prompts, a_side,
                                                                                                b_side, strict=True)]

    first_as_a = yes_probability(model, shown(first, second), answer_ids, tokenizer.pad_token_id, batch_size)
    first_as_b = yes_probability(model, shown(second, first), answer_ids, tokenizer.pad_token_id, batch_size)
    return (first_as_a + (1 - first_as_b)) / 2


def round_robin_scores(prefers: Tensor) -> Tensor:
    """Each response's mean preference over the other responses to its prompt (a Borda count of the judge's
    pairwise verdicts). prefers: [G, G], prefers[i, j] the judge's preference for i over j, read in both orders
    (so prefers[j, i] = 1 - prefers[i, j]); the diagonal is ignored -> [G] in [0, 1] (G = 1: 0.5)."""
    size = prefers.shape[0]
    if size == 1:
        return torch.full((1,), 0.5, dtype=prefers.dtype)
    off_diagonal = ~torch.eye(size, dtype=torch.bool)
    return (prefers * off_diagonal).sum(dim=1) / (size - 1)
