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

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf_core.batch import ceil_div
from rlhf_core.lora import adapter_folder
from rlhf_core.model_files import DEFAULT_REWARD_BACKBONE, minilm_path  # noqa: F401 (re-exported)
from rlhf_core.models import (PAD_TOKEN, ModelLoadError, check_model_folder, ensure_distinct_pad_token, parse_dtype,
                              resolve_model_path)
from rlhf_core.preference_losses import pair_comparison
from rlhf_core.update import Normalizers, run_update

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


def load_reward_model(path: Path, device: str = "cpu", dtype: str = "float32", trust_remote_code: bool = False,
                      with_adapter: bool = False, head_seed: int = 0):
    """(sequence classifier with one output, tokenizer) from a local folder, in eval mode. A backbone without a
    score head gets a new one drawn from `head_seed` (torch's global generator is left as it was).
    An adapter-only LoRA folder loads as its base + adapter; with_adapter: a merged one too (see lora.py)."""
    check_model_folder(Path(path))
    tokenizer = AutoTokenizer.from_pretrained(path)
    added = ensure_pad_token(tokenizer)
    tokenizer.padding_side = "right"
    weights = (adapter_folder(path) or path) if with_adapter else path
    with torch.random.fork_rng(devices=[]):  # the same new head in every process, epoch and resumed run
        torch.manual_seed(head_seed)
        model = AutoModelForSequenceClassification.from_pretrained(weights, num_labels=1, dtype=parse_dtype(dtype),
                                                                   trust_remote_code=trust_remote_code)
    if added:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id  # causal LMs find the last real token by it
    return model.to(device).eval(), tokenizer


def score_head_names(model) -> list[str]:
    """The sequence classifier's head modules: new at load time, so under LoRA they train in full beside the
    adapter (`score` in causal LMs, `classifier` in BERT-style encoders)."""
    names = [name for name in ("score", "classifier") if isinstance(getattr(model, name, None), torch.nn.Module)]
    if not names:
        raise ModelLoadError(f"{type(model).__name__} has no `score` or `classifier` head for LoRA to train")
    return names


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
    return {name: float(value.mean()) for name, value in reward_model_pair_metrics(chosen_rewards,
                                                                                   rejected_rewards).items()}


def reward_model_pair_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, Tensor]:
    """`pair_comparison` under the reward model's metric names. chosen_rewards, rejected_rewards: [P] -> each [P]"""
    pairs = pair_comparison(chosen_rewards, rejected_rewards)
    return {"reward_model/accuracy": pairs["accuracy"], "reward_model/margin": pairs["margin"],
            "reward_model/chosen_rewards": pairs["chosen"], "reward_model/rejected_rewards": pairs["rejected"]}


def bradley_terry_losses(chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | None = None,
                         center_coef: float = 0.0) -> Tensor:
    """Per pair: -log sigmoid(r_c - r_r - margin) + center_coef * (r_c + r_r)^2.
    chosen_rewards, rejected_rewards, margin: [P] -> [P]"""
    assert chosen_rewards.shape == rejected_rewards.shape and chosen_rewards.ndim == 1, "expected two [P] tensors"
    target = chosen_rewards - rejected_rewards - (margin if margin is not None else 0.0)
    # Ouyang et al. 2022 eq. 1; margin: Touvron et al. 2023 eq. 2; centring: Eisenstein et al. 2023
    return -F.logsigmoid(target) + center_coef * (chosen_rewards + rejected_rewards) ** 2


def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | None = None,
                       center_coef: float = 0.0) -> tuple[Tensor, dict[str, float]]:
    """The mean of `bradley_terry_losses` and the pair metrics. chosen_rewards, rejected_rewards, margin: [P]"""
    loss = bradley_terry_losses(chosen_rewards, rejected_rewards, margin, center_coef).mean()
    return loss, pair_metrics(chosen_rewards.detach(), rejected_rewards.detach())


def collate_text_pairs(tokenizer, prompts: list[str], chosen: list[str], rejected: list[str], max_length: int,
                       margin: Tensor | None = None) -> dict[str, Tensor]:
    """A pair batch for `run_update`: `chosen_<feature>` and `rejected_<feature>` [P, L] (input_ids,
    attention_mask, token_type_ids if any), right-padded to one width L by encoding the 2P texts together;
    `response_mask` [P, L] = either side's attention (how far `select_rows` may trim), a one-column
    `prompt_mask` [P, 1] (the whole text is one sequence) and `margin` [P] if given."""
    num_pairs = len(prompts)
    features = encode_pairs(tokenizer, prompts + prompts, chosen + rejected, max_length)  # rows [chosen; rejected]
    batch = {f"{side}_{name}": rows for name, value in features.items()
             for side, rows in zip(("chosen", "rejected"), value.split(num_pairs))}
    batch["response_mask"] = (features["attention_mask"][:num_pairs] | features["attention_mask"][num_pairs:]).bool()
    batch["prompt_mask"] = torch.ones(num_pairs, 1, dtype=torch.bool)
    if margin is not None:
        batch["margin"] = margin.float()
    return batch


def reward_model_loss(model, batch: dict[str, Tensor], norm: Normalizers, *,
                      center_coef: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Bradley-Terry loss of one micro-batch of text pairs, chosen and rejected in one forward pass, divided by
    the mini-batch's global pair count so micro-batches add up. batch: `collate_text_pairs` rows."""
    names = [key.removeprefix("chosen_") for key in batch if key.startswith("chosen_")]
    features = {name: torch.cat([batch[f"chosen_{name}"], batch[f"rejected_{name}"]]) for name in names}
    chosen_rewards, rejected_rewards = sequence_rewards(model, features).chunk(2)  # [P], [P]
    losses = bradley_terry_losses(chosen_rewards, rejected_rewards, batch.get("margin"), center_coef)
    loss = losses.sum() / norm.num_seqs
    per_pair = reward_model_pair_metrics(chosen_rewards, rejected_rewards)
    return loss, {"loss/train": loss.detach(), **{k: v.sum() / norm.num_seqs for k, v in per_pair.items()}}


def train_reward_model_epoch(model, optimizer: torch.optim.Optimizer, tokenizer, prompts: list[str],
                             chosen: list[str], rejected: list[str], margin: Tensor | None, *, batch_size: int,
                             micro_batch_size: int, max_length: int, center_coef: float, max_grad_norm: float,
                             seed: int, on_step: Callable[[dict[str, float]], None] | None = None
                             ) -> list[dict[str, float]]:
    """One pass over the pairs in a seeded random order on the shared update loop, `batch_size` pairs per step,
    `micro_batch_size` per forward; one metrics dict per step. prompts, chosen, rejected, margin: [P]"""
    model.eval()  # dropout off: the scores (and so the run) are deterministic
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate_text_pairs(tokenizer, prompts, chosen, rejected, max_length,
                                                            margin).items()}

    def loss_fn(m, micro, norm):
        return reward_model_loss(m, micro, norm, center_coef=center_coef)

    history = run_update(model, optimizer, batch, loss_fn, epochs=1, mini_batches=ceil_div(len(prompts), batch_size),
                         micro_batch_size=micro_batch_size, max_grad_norm=max_grad_norm, seed=seed, on_step=on_step)
    return [{**{k: v for k, v in step.items() if k != "policy/grad_norm"},
             "reward_model/grad_norm": step["policy/grad_norm"]} for step in history]
