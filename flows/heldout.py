"""Evaluation during training (the `heldout` section of GRPO, PPO, SFT, DPO and KTO): the policy answers the
held-out prompts k times each with the same seeds every time, on the start model, then every `heldout.every`
iterations (epochs) and after the last; the mean reward, pass@k and maj@k go to MLflow at step = iterations
(epochs) done. Generation and scoring are the flows' cached stages, so a rerun after a crash replays the
evaluations already done."""

from __future__ import annotations

import time

from flows.inputs import check_num_prompts, check_prompts_fit, resolve_prompts, resolve_rewards
from flows.tracking import Tracker
from rlhf_core.config import GenerationConfig, HeldOutConfig, ModelConfig, RewardSpec, RuntimeConfig
from rlhf_core.config.training import LogprobPass
from rlhf_core.evaluation import answer_of, sample_metrics
from tasks.data import sample_prompts
from tasks.refs import CheckpointRef
from tasks.sharded_stages import generation_stage, scoring_stage
from tasks.sharding import ShardRunner

HELDOUT_ITERATION = -1  # the sampling seeds' iteration: one fixed stream, apart from every training iteration's


class HeldOutEvaluation:
    """Resolved once, before the first iteration or epoch (data, rewards, prompt lengths checked like the training
    data's); `run(policy, done)` evaluates when `done` iterations (epochs) call for it."""

    def __init__(self, heldout: HeldOutConfig, rewards: list[RewardSpec], generation: GenerationConfig,
                 model: ModelConfig, runtime: RuntimeConfig, seed: int, last: int, micro_batch_size: int,
                 policy: CheckpointRef):
        self.heldout, self.runtime, self.seed, self.last = heldout, runtime, seed, last
        self.trust = model.trust_remote_code
        if not self.enabled:
            return
        data = heldout.data
        self.rewards = resolve_rewards(rewards, data.extra_columns)
        dataset = resolve_prompts(data)
        check_num_prompts(heldout.num_prompts, dataset.rows, data.path, "heldout.num_prompts")
        check_prompts_fit(dataset, policy, data, generation.max_new_tokens)
        self.prompts = sample_prompts(dataset, heldout.num_prompts or dataset.rows, 0, seed)
        self.generation = generation.model_copy(update={"group_size": heldout.samples})
        self.logprobs = LogprobPass(temperature=generation.temperature or 1.0, micro_batch_size=micro_batch_size,
                                    chunk_size=1024)

    @classmethod
    def of_online(cls, config, policy: CheckpointRef) -> "HeldOutEvaluation":
        """GRPO's and PPO's: their own rewards and generation unless the section names others."""
        heldout = config.heldout
        return cls(heldout, heldout.rewards or config.rewards, heldout.generation or config.generation, config.model,
                   config.runtime, config.seed, config.iterations, config.optim.micro_batch_size, policy)

    @classmethod
    def of_offline(cls, config, policy: CheckpointRef) -> "HeldOutEvaluation":
        """SFT's, DPO's and KTO's, per epoch: the section's rewards (required) and generation."""
        heldout = config.heldout
        return cls(heldout, heldout.rewards or [], heldout.generation or GenerationConfig(), config.model,
                   config.runtime, config.seed, config.optim.epochs, config.optim.micro_batch_size, policy)

    @property
    def enabled(self) -> bool:
        return self.heldout.every > 0

    def due(self, done: int) -> bool:
        return self.enabled and (done % self.heldout.every == 0 or done == self.last)

    def run(self, policy: CheckpointRef, done: int, tracker: Tracker, shards: ShardRunner | None = None) -> None:
        if not self.due(done):
            return
        start = time.perf_counter()
        rollouts = generation_stage(policy, self.prompts, self.generation, self.runtime,
                                    self.heldout.data.system_prompt, self.seed, HELDOUT_ITERATION, self.trust, shards)
        scored = scoring_stage(rollouts, self.rewards, None, self.logprobs, self.runtime, self.trust, shards).read()
        metrics = sample_metrics(scored["rewards"].to_numpy(), scored["group_id"].to_numpy(),
                                 [answer_of(r) for r in scored["response"]], self.heldout.pass_threshold)
        metrics |= {"heldout/length_mean": float(scored["response_length"].mean()),
                    "time/heldout_s": time.perf_counter() - start}
        tracker.log_metrics(metrics, step=done)
        k = self.heldout.samples
        print(f"held-out after {done}: reward {metrics['heldout/reward_mean']:.3f}, pass@{k} "
              f"{metrics['heldout/pass_at_k']:.3f}, maj@{k} {metrics['heldout/maj_at_k']:.3f}")
