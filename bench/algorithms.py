"""One optimizer step of each algorithm on a workload, stage by stage, through the same `rlhf_core` functions the
flows' tasks call (without Prefect, Parquet or MLflow: their cost is measured by `bench.flow_overhead`).

Each `*_step` returns {stage: seconds} for one step; `measure` runs warm-up steps, then timed ones, and reports
medians. Every stage ends with a device synchronisation so its time is its own.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager, nullcontext

import torch

from bench.peak import synchronize
from bench.workloads import (PAD_ID, Workload, causal_lm, forward_flops, llama_config, sequence_classifier, token_rows,
                             train_flops)
from rlhf_core import dpo, kto
from rlhf_core.advantages import OUTCOME_ADVANTAGES
from rlhf_core.batch import collate
from rlhf_core.generation import sample_responses
from rlhf_core.grpo import grpo_update
from rlhf_core.logprobs import batched_response_logprobs
from rlhf_core.models import use_mixed_precision
from rlhf_core.ppo import ppo_advantages, ppo_update, rollout_logprobs_and_values
from rlhf_core.reward_model import reward_model_loss, sequence_rewards
from rlhf_core.update import run_update
from rlhf_core.training import adamw
from rlhf_core.value_head import ActorCritic

UPDATE = dict(max_grad_norm=1.0, seed=0)


class Stages(dict):
    """{stage: seconds} of one step; `with stages("update"): ...` times a stage up to a device sync."""

    def __init__(self, device: str):
        super().__init__()
        self.device = device

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        synchronize(self.device)
        self[name] = self.get(name, 0.0) + time.perf_counter() - start


def autocast(device: str, precision: str):
    """The bf16 autocast region `runtime.mixed_precision: bf16` puts a model's forward in (for `bench.generation`)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16)


class Setup:
    """Models, optimizer and fixed inputs of one (algorithm, workload), built once before the timed steps."""

    def __init__(self, workload: Workload, device: str, with_reference: bool = True):
        self.workload, self.device = workload, device
        self.policy = causal_lm(workload, device)
        self.reference = causal_lm(workload, device) if with_reference else None
        self.config = llama_config(workload)
        vocab = workload.model["vocab_size"]
        self.prompts = token_rows(workload.prompts, workload.prompt_len, vocab, seed=1)
        self.responses = token_rows(2 * workload.prompts, workload.response_len, vocab, seed=2)

    def optimizer(self, module: torch.nn.Module) -> torch.optim.Optimizer:
        return adamw([{"params": list(module.parameters())}], lr=1e-6)

    def generate(self, stages: Stages, model) -> dict[str, torch.Tensor]:
        """GRPO/PPO rollouts: every prompt `samples` times, exactly `response_len` new tokens (no EOS id)."""
        w = self.workload
        prompt_ids = [p for p in self.prompts for _ in range(w.samples)]
        with stages("generation"):
            rollouts = sample_responses(model, prompt_ids, eos_ids=[], pad_id=PAD_ID, max_new_tokens=w.response_len,
                                        temperature=1.0, top_p=1.0, seeds=list(range(len(prompt_ids))))
        return collate(rollouts.prompt_ids, rollouts.response_ids, PAD_ID, device=self.device)

    def update_flops(self, rows: int) -> float:
        w = self.workload
        return train_flops(self.policy, self.config, rows, w.prompt_len + w.response_len, w.response_len)


def grpo_step(setup: Setup, stages: Stages) -> None:
    w = setup.workload
    batch = setup.generate(stages, setup.policy)
    with stages("scoring"):  # a reward function costs ~nothing next to the models; random scores stand in
        rewards = torch.randn(batch["prompt_ids"].shape[0], generator=torch.Generator().manual_seed(0))
        group_ids = torch.arange(w.prompts).repeat_interleave(w.samples)
        batch["advantages"] = OUTCOME_ADVANTAGES["grpo"](rewards, group_ids).to(setup.device)
    with stages("reference"):
        batch["ref_logprobs"] = batched_response_logprobs(setup.reference, batch, micro_batch_size=w.micro_batch_size)
    with stages("update"):
        grpo_update(setup.policy, setup.opt, batch, epochs=1, mini_batches=1, micro_batch_size=w.micro_batch_size,
                    clip_eps_low=0.2, clip_eps_high=0.28, kl_coef=0.05, kl_estimator="k3", aggregation="token-mean",
                    norm_length=w.response_len, temperature=1.0, chunk_size=1024, **UPDATE)


def ppo_step(setup: Setup, stages: Stages) -> None:
    w = setup.workload
    batch = setup.generate(stages, setup.actor_critic.policy)
    mask = batch["response_mask"].bool()
    with stages("scoring"):  # the reward model reads prompt + response
        with torch.no_grad():
            ids = torch.cat([batch["prompt_ids"], batch["response_ids"]], dim=1)
            attention = torch.cat([batch["prompt_mask"], batch["response_mask"]], dim=1).long()
            scores = sequence_rewards(setup.reward_model, {"input_ids": ids, "attention_mask": attention})
    with stages("reference"):
        ref_logprobs = batched_response_logprobs(setup.reference, batch, micro_batch_size=w.micro_batch_size)
    with stages("values"):
        old_logprobs, old_values = rollout_logprobs_and_values(setup.actor_critic, batch,
                                                               micro_batch_size=w.micro_batch_size,
                                                               temperature=1.0, chunk_size=1024)
    with stages("advantages"):
        batch.update(old_logprobs=old_logprobs, old_values=old_values, **{
            k: v for k, v in ppo_advantages(scores.float(), old_logprobs, ref_logprobs, old_values, mask,
                                            kl_coef=0.05, kl_estimator="k1", gamma=1.0, lam=0.95,
                                            whiten_advantages=True).items() if k in ("advantages", "returns")})
    with stages("update"):
        ppo_update(setup.actor_critic, setup.opt, batch, epochs=1, mini_batches=1, micro_batch_size=w.micro_batch_size,
                   clip_eps_low=0.2, clip_eps_high=0.2, clip_range_value=0.2, vf_coef=0.1, aggregation="token-mean",
                   norm_length=w.response_len, temperature=1.0, chunk_size=1024, **UPDATE)


def dpo_step(setup: Setup, stages: Stages) -> None:
    w = setup.workload
    batch = setup.pairs
    with stages("reference"):  # the flow computes this once per dataset; shown per step for comparison
        ref = dpo.batched_pair_logprobs(setup.reference, batch, micro_batch_size=w.micro_batch_size // 2)
        batch.update(ref_chosen_logps=ref["chosen_logps"], ref_rejected_logps=ref["rejected_logps"])
    with stages("update"):
        dpo.dpo_update(setup.policy, setup.opt, batch, batch_size=w.prompts, micro_batch_size=w.micro_batch_size // 2,
                       loss_type="sigmoid", beta=0.1, label_smoothing=0.0, simpo_gamma=0.0, rpo_alpha=None, **UPDATE)


def kto_step(setup: Setup, stages: Stages) -> None:
    w = setup.workload
    batch = setup.examples
    with stages("reference"):
        ref = kto.batched_example_logps(setup.reference, batch, micro_batch_size=w.micro_batch_size)
        batch.update(ref_logps=ref["logps"], ref_mismatched_logps=ref["mismatched_logps"])
    with stages("update"):
        kto.kto_update(setup.policy, setup.opt, batch, batch_size=w.prompts, micro_batch_size=w.micro_batch_size,
                       beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, **UPDATE)


def reward_model_step(setup: Setup, stages: Stages) -> None:
    w = setup.workload
    with stages("update"):
        run_update(setup.reward_model, setup.opt, setup.text_pairs, lambda m, micro, norm: reward_model_loss(
            m, micro, norm, center_coef=0.01), epochs=1, mini_batches=1, micro_batch_size=w.micro_batch_size // 2,
            **UPDATE)


def prepare(algorithm: str, workload: Workload, device: str, precision: str) -> tuple[Setup, float]:
    """The algorithm's models and inputs, and the model FLOPs of its update. precision "bf16" or
    "bf16-master" is what `runtime.mixed_precision` of that name does to the flows' models."""
    setup, flops = build(algorithm, workload, device)
    models = {id(m): m for m in (getattr(setup, name, None) for name in ("policy", "reference", "reward_model"))
              if m is not None}
    for model in models.values():
        use_mixed_precision(model, device, "no" if precision == "fp32" else precision)
    return setup, flops


def build(algorithm: str, workload: Workload, device: str) -> tuple[Setup, float]:
    w = workload
    setup = Setup(w, device, with_reference=algorithm != "reward_model")
    rows = w.prompts * w.samples
    if algorithm == "grpo":
        setup.opt = setup.optimizer(setup.policy)
    elif algorithm == "ppo":
        setup.actor_critic = ActorCritic(setup.policy).eval()
        setup.reward_model = sequence_classifier(w, device, seed=1)
        setup.opt = setup.optimizer(setup.actor_critic)
    elif algorithm in ("dpo", "kto"):
        chosen, rejected = setup.responses[:w.prompts], setup.responses[w.prompts:]
        setup.opt = setup.optimizer(setup.policy)
        if algorithm == "dpo":
            setup.pairs = dpo.collate_pairs(setup.prompts, chosen, rejected, PAD_ID, device=device)
            rows = 2 * w.prompts
        else:
            desirable = [i % 2 == 0 for i in range(w.prompts)]
            setup.examples = kto.collate_examples(setup.prompts, chosen, rejected, desirable, PAD_ID, device=device)
            # KTO's update also runs a no-grad forward over the mismatched sequences (its z0 estimate)
            seq_len = w.prompt_len + w.response_len
            z0_pass = forward_flops(setup.policy, setup.config, w.prompts, seq_len, w.response_len)
            return setup, setup.update_flops(w.prompts) + z0_pass
    elif algorithm == "reward_model":
        setup.reward_model = sequence_classifier(w, device)
        setup.policy = setup.reward_model
        setup.opt = setup.optimizer(setup.reward_model)
        setup.text_pairs = text_pair_batch(setup, device)
        rows = 2 * w.prompts
        return setup, train_flops(setup.reward_model, setup.config, rows, w.prompt_len + w.response_len, 0)
    return setup, setup.update_flops(rows)


def text_pair_batch(setup: Setup, device: str) -> dict[str, torch.Tensor]:
    """A `collate_text_pairs`-shaped batch from token ids: prompt + response as one sequence per side."""
    w = setup.workload
    sides = {"chosen": setup.responses[:w.prompts], "rejected": setup.responses[w.prompts:]}
    batch = {}
    for side, responses in sides.items():
        ids = torch.tensor([p + r for p, r in zip(setup.prompts, responses)], device=device)
        batch[f"{side}_input_ids"] = ids
        batch[f"{side}_attention_mask"] = torch.ones_like(ids)
    batch["response_mask"] = torch.ones_like(batch["chosen_input_ids"], dtype=torch.bool)
    batch["prompt_mask"] = torch.ones(w.prompts, 1, dtype=torch.bool, device=device)
    return batch


STEPS = {"grpo": grpo_step, "ppo": ppo_step, "dpo": dpo_step, "kto": kto_step, "reward_model": reward_model_step}


def measure(algorithm: str, workload: Workload, device: str, precision: str, steps: int, warmup: int) -> dict:
    """Median seconds per stage and per optimizer step over `steps` steps after `warmup` ones."""
    setup, flops = prepare(algorithm, workload, device, precision)
    timings = []
    for step in range(warmup + steps):
        stages = Stages(device)
        STEPS[algorithm](setup, stages)
        if step >= warmup:
            timings.append(dict(stages))
    median = {stage: statistics.median(t[stage] for t in timings) for stage in timings[0]}
    return {"stages_s": median, "step_s": statistics.median(sum(t.values()) for t in timings),
            "update_flops": flops, "steps": steps}
