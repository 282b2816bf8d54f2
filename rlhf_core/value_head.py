"""The PPO actor-critic: a causal LM whose last hidden state also feeds a linear value head.

By default actor and critic share every backbone parameter (one forward pass yields both the log-probs and the
values) and the head is the only critic-specific parameter. With a separate critic, a copy of the backbone
(initialised from the policy) feeds the head instead: twice the memory and compute, no interference between
the two losses. The head is saved beside the Hugging Face weights as `value_head.safetensors`, a separate critic
under `critic/`, so a PPO checkpoint stays a loadable causal-LM folder. The head starts at zero (values 0): a
random head's large early errors would dominate the shared backbone's first gradients.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import AutoModelForCausalLM

from rlhf_core.logprobs import logprobs_from_hidden, response_hidden_states
from rlhf_core.models import load_causal_lm, parse_dtype

VALUE_HEAD_FILE = "value_head.safetensors"
CRITIC_DIR = "critic"


class ActorCritic(torch.nn.Module):
    def __init__(self, policy: torch.nn.Module, critic: torch.nn.Module | None = None):
        """critic: None shares the policy's backbone; else a causal LM whose backbone feeds the value head."""
        super().__init__()
        self.policy = policy
        self.critic = critic
        hidden_size = policy.config.hidden_size
        self.value_head = torch.nn.Linear(hidden_size, 1, dtype=policy.dtype, device=policy.device)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor, *,
                temperature: float = 1.0, chunk_size: int = 1024) -> tuple[Tensor, Tensor, Tensor]:
        """-> (logprobs [B, T], entropy [B, T], values [B, T]) for the response tokens; 0 on padding.
        values[b, t] estimates the return from the state just before response token t."""
        mask = response_mask.bool()
        hidden = response_hidden_states(self.policy, prompt_ids, prompt_mask, response_ids, mask)  # [B, T, H]
        logprobs, entropy = logprobs_from_hidden(hidden, response_ids, mask, self.policy.get_output_embeddings(),
                                                 temperature=temperature, chunk_size=chunk_size)
        if self.critic is not None:
            hidden = response_hidden_states(self.critic, prompt_ids, prompt_mask, response_ids, mask)
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()  # [B, T]
        return logprobs, entropy, torch.where(mask, values, 0.0)

    def parameter_groups(self, lr: float, head_lr: float | None) -> list[dict]:
        """Optimizer parameter groups: everything at `lr`, the value head at `head_lr` (None: `lr`).
        The head comes last, so parameter indices (and saved optimizer state) match across runs."""
        head = list(self.value_head.parameters())
        rest = [p for p in self.parameters() if p.requires_grad and all(p is not h for h in head)]
        return [{"params": rest, "lr": lr}, {"params": head, "lr": head_lr or lr}]

    def load_value_head(self, folder: str | Path) -> bool:
        """Load the head saved beside a checkpoint, if any. Returns whether one was found."""
        path = Path(folder) / VALUE_HEAD_FILE
        if not path.is_file():
            return False
        self.value_head.load_state_dict(load_file(str(path), device=str(self.value_head.weight.device)))
        return True


def write_value_head(state: dict[str, Tensor], folder: str | Path) -> None:
    """The value head's weights (`weight`, `bias`) as `value_head.safetensors` in a checkpoint folder."""
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(Path(folder) / VALUE_HEAD_FILE))


def load_actor_critic(policy: torch.nn.Module, checkpoint: str | Path, critic: str, device: str, dtype: str,
                      trust_remote_code: bool = False) -> ActorCritic:
    """PPO's actor-critic around a loaded policy LM, in eval mode, with the value head saved in `checkpoint` (a
    zero head when it has none yet). critic="separate": the critic backbone saved under critic/, or a copy of
    the policy on first use, read from disk every time: the critic must never be a (cached) policy object."""
    critic_model = None
    if critic == "separate":
        saved = Path(checkpoint) / CRITIC_DIR
        critic_model = (AutoModelForCausalLM.from_pretrained(saved, dtype=parse_dtype(dtype),
                                                             trust_remote_code=trust_remote_code).to(device)
                        if saved.is_dir() else load_causal_lm(Path(checkpoint), device, dtype, trust_remote_code)[0])
    actor_critic = ActorCritic(policy, critic_model)
    actor_critic.load_value_head(checkpoint)
    return actor_critic.eval()


def save_actor_critic(module: ActorCritic, weights: dict[str, Tensor], folder: Path, merged: bool) -> None:
    """A PPO checkpoint from the actor-critic's full weights (`module.state_dict()` names): the policy as a causal
    LM folder, the value head beside it, a separate critic under critic/."""
    from rlhf_core.lora import save_model

    save_model(module.policy, folder, merged, state_dict=with_prefix_removed(weights, "policy."))
    write_value_head(with_prefix_removed(weights, "value_head."), folder)
    if module.critic is not None:
        module.critic.save_pretrained(Path(folder) / CRITIC_DIR, state_dict=with_prefix_removed(weights, "critic."))


def with_prefix_removed(weights: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of a state dict under `prefix` (a submodule's), named as that submodule names them."""
    return {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}
