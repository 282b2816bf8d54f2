"""LLM-as-judge, pointwise: a causal LM reads a grading prompt (the template with the prompt and the response put in,
rendered with its chat template as one user turn) and the score is the probability it gives to the "yes" answer
among the two answers, read from its next-token distribution: P(yes) / (P(yes) + P(no)) in [0, 1]. Nothing is
sampled or parsed, so the score is deterministic and never fails to parse (the G-Eval / "probability of the grade
token" style of judging; Liu et al. 2023)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rlhf_core.chat import prompt_ids
from rlhf_core.errors import UserInputError

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
        rows = input_ids[start:start + batch_size]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].double()
        answers = torch.log_softmax(logits, dim=-1)[:, list(answer_ids)]
        scores.append(torch.softmax(answers, dim=-1)[:, 0].cpu())
    return torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float64)
