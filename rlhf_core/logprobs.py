"""Per-token log-probs and entropy of given responses, without materialising a full-vocabulary log-softmax.

The backbone runs once over `[prompt | response]`; the LM head and log-softmax then run over the real response
tokens only, `chunk_size` tokens at a time. Under autograd each chunk is checkpointed, so the backward pass
recomputes a chunk's [chunk, V] logits instead of keeping them all: peak extra memory is one chunk's logits,
not B * T * V floats. Logits are divided by the sampling temperature, matching `generation.py`.

Assumes the LM head applies directly to the backbone's last hidden state (Llama, Qwen, Mistral, GPT-2...);
models with logit soft-capping or scaling (Gemma 2, Cohere) are not special-cased.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from rlhf_core.batch import map_micro_batches


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions count real tokens only, so left padding does not shift them. [B, L] -> [B, L]"""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_hidden_states(model, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
                           response_mask: Tensor) -> Tensor:
    """Hidden states that predict each response token.
    prompt_ids, prompt_mask: [B, P] (left-padded); response_ids, response_mask: [B, T] (right-padded)
    -> [B, T, H]: row b, column t is the state at the position just before response token t."""
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)  # [B, P+T]
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1).long()
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    hidden = out.last_hidden_state  # [B, P+T, H]
    prompt_len = prompt_ids.shape[1]
    return hidden[:, prompt_len - 1: -1]  # [B, T, H]


def _chunk_logprobs_entropy(hidden: Tensor, targets: Tensor, head_weight: Tensor, head_bias: Tensor | None,
                            temperature: float, with_entropy: bool = True) -> tuple[Tensor, Tensor | None]:
    """hidden: [N, H], targets: [N] -> (logprobs [N], entropy [N] or None) in float32."""
    logits = torch.nn.functional.linear(hidden, head_weight, head_bias).float()  # [N, V]
    if temperature != 1.0:  # a full pass over [N, V]: skipped when it would divide by one
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    token_logprobs = logp.gather(-1, targets[:, None]).squeeze(-1)
    # entropy costs two more passes over [N, V] (exp, multiply): only for callers that report it
    entropy = -(logp.exp() * logp).sum(-1) if with_entropy else None
    return token_logprobs, entropy


def logprobs_from_hidden(hidden: Tensor, targets: Tensor, mask: Tensor, lm_head: torch.nn.Linear, *,
                         temperature: float = 1.0, chunk_size: int = 1024,
                         with_entropy: bool = True) -> tuple[Tensor, Tensor | None]:
    """Log-probs of `targets` and the entropy of the predictive distribution, at masked positions only.
    hidden: [B, T, H], targets: [B, T], mask: [B, T] bool -> (logprobs [B, T], entropy [B, T]); 0 where mask
    is False; entropy is None when not `with_entropy`."""
    assert hidden.shape[:2] == targets.shape == mask.shape, (hidden.shape, targets.shape, mask.shape)
    # under mixed precision the backbone's states are bf16; the head and log-softmax run in the head's dtype
    flat_hidden, flat_targets = hidden[mask].to(lm_head.weight.dtype), targets[mask]  # [N, H], [N]
    pieces_lp, pieces_ent = [], []
    for start in range(0, flat_targets.shape[0], chunk_size):
        args = (flat_hidden[start:start + chunk_size], flat_targets[start:start + chunk_size],
                lm_head.weight, lm_head.bias, temperature, with_entropy)
        # Recomputing a chunk in backward only saves memory when there are several: with one, its logits are the
        # peak either way, and checkpointing would just run the LM head twice.
        if torch.is_grad_enabled() and flat_hidden.requires_grad and flat_targets.shape[0] > chunk_size:
            lp, ent = checkpoint(_chunk_logprobs_entropy, *args, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs_entropy(*args)
        pieces_lp.append(lp)
        pieces_ent.append(ent)
    logprobs = hidden.new_zeros(mask.shape, dtype=torch.float32)
    entropy = hidden.new_zeros(mask.shape, dtype=torch.float32) if with_entropy else None
    if pieces_lp:
        logprobs = logprobs.masked_scatter(mask, torch.cat(pieces_lp))
        if with_entropy:
            entropy = entropy.masked_scatter(mask, torch.cat(pieces_ent))
    return logprobs, entropy


def response_logprobs(model, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor,
                      *, temperature: float = 1.0, chunk_size: int = 1024, with_entropy: bool = True,
                      target_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Per-token log-probs and entropy of each response given its prompt.
    prompt_ids, prompt_mask: [B, P]; response_ids, response_mask: [B, T] -> (logprobs [B, T], entropy [B, T] or
    None without `with_entropy`). target_mask [B, T] (default response_mask): the tokens whose log-probs are
    computed, e.g. SFT's assistant tokens of a multi-turn conversation, while every real token is attended to.
    `model`: a causal LM, or a ResponseScorer (possibly under DDP/FSDP)."""
    if isinstance(getattr(model, "module", model), ResponseScorer):
        return model(prompt_ids, prompt_mask, response_ids, response_mask, temperature=temperature,
                     chunk_size=chunk_size, with_entropy=with_entropy, target_mask=target_mask)
    hidden = response_hidden_states(model, prompt_ids, prompt_mask, response_ids, response_mask)
    targets = response_mask.bool() if target_mask is None else target_mask.bool() & response_mask.bool()
    return logprobs_from_hidden(hidden, response_ids, targets, model.get_output_embeddings(),
                                temperature=temperature, chunk_size=chunk_size, with_entropy=with_entropy)


class ResponseScorer(torch.nn.Module):
    """A causal LM whose forward is `response_logprobs`. DDP and FSDP synchronise around a module's forward, and
    the log-prob pass calls the backbone and the LM head separately, so distributed training wraps the LM in
    this and every loss reaches it through `response_logprobs` unchanged."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor,
                **kwargs) -> tuple[Tensor, Tensor | None]:
        return response_logprobs(self.lm, prompt_ids, prompt_mask, response_ids, response_mask, **kwargs)


def batched_response_logprobs(model, batch: dict[str, Tensor], *, micro_batch_size: int, temperature: float = 1.0,
                              chunk_size: int = 1024) -> Tensor:
    """Log-probs of every response in a collated batch (see batch.py), micro-batch by micro-batch, no grad.
    -> [B, T] aligned with batch["response_ids"], 0 on padding."""
    def logprobs_of(micro: dict[str, Tensor]) -> tuple[Tensor]:
        logprobs, _ = response_logprobs(model, micro["prompt_ids"], micro["prompt_mask"], micro["response_ids"],
                                        micro["response_mask"], temperature=temperature, chunk_size=chunk_size,
                                        with_entropy=False)
        return (logprobs,)

    return map_micro_batches(logprobs_of, batch, micro_batch_size)[0]
