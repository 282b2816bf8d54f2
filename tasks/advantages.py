"""The advantage stage: one advantage per response from the rewards of its group (outcome estimators), or one per
response token (REINFORCE++), with the KL to the reference folded into the rewards when kl.placement is 'reward'."""

from __future__ import annotations

import torch
from prefect import task

from rlhf_core.advantages import ADVANTAGE_ESTIMATORS, OUTCOME_ADVANTAGES
from rlhf_core.batch import collate, response_lists
from rlhf_core.config import KLConfig
from rlhf_core.kl import kl_estimate
from rlhf_core.registry import lookup
from tasks.cache import STAGE_TASK_OPTIONS
from tasks.refs import ArtifactRef, publish


@task(name="compute-advantages", **STAGE_TASK_OPTIONS)
def compute_advantages(scored: ArtifactRef, estimator: str, kl: KLConfig | None = None) -> ArtifactRef:
    """`advantages`: a number per row (outcome estimators) or a list per row aligned with `response_ids` (token-level
    ones). Their KL_t = kl.estimator(sampling_logprobs, ref_logprobs) is pi_old's (the sampler's log-probs) to the
    reference, folded in with kl.coef when kl.placement is 'reward' (0 otherwise)."""
    df = scored.read()
    advantage_fn = lookup(ADVANTAGE_ESTIMATORS, estimator, "advantage estimator")
    rewards = torch.tensor(df["rewards"].to_numpy(), dtype=torch.float64)
    group_ids = torch.tensor(df["group_id"].to_numpy(), dtype=torch.long)
    if estimator in OUTCOME_ADVANTAGES:
        return publish(df.assign(advantages=advantage_fn(rewards, group_ids).numpy()), "advantages")
    if kl is None and "ref_logprobs" in df:  # the flow computed a KL: dropping it here would be silent
        raise ValueError(f"advantage estimator {estimator!r} is token-level and the scored table has ref_logprobs: "
                         "pass the flow's kl section (kl=config.kl) so that a KL placed in the reward is used")
    in_reward = kl is not None and kl.placement == "reward" and kl.coef > 0
    per_token = {"sampling_logprobs": df["sampling_logprobs"], "ref_logprobs": df["ref_logprobs"]} if in_reward else {}
    batch = collate(df["prompt_ids"], df["response_ids"], 0, per_token=per_token)
    mask = batch["response_mask"]
    kl_per_token = (torch.where(mask, kl_estimate(batch["sampling_logprobs"], batch["ref_logprobs"], kl.estimator,
                                                  kl.clamp), 0.0) if in_reward else torch.zeros(mask.shape))
    advantages = advantage_fn(rewards, group_ids, kl_per_token.double(), mask, kl.coef if in_reward else 0.0)
    return publish(df.assign(advantages=response_lists(advantages, mask)), "advantages")
