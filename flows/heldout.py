"""Evaluation during training (the `heldout` section of GRPO and PPO): the policy answers the held-out prompts k
times each with the same seeds every time, on the start model, then every `heldout.every` iterations and after the
last; the mean reward, pass@k and maj@k go to MLflow at step = iterations done. Generation and scoring are the
flows' cached stages, so a rerun after a crash replays the evaluations already done."""

from __future__ import annotations

import time

from flows.inputs import check_num_prompts, check_prompts_fit, resolve_prompts, resolve_rewards
from flows.tracking import Tracker
from rlhf_core.config.training import LogprobPass
from rlhf_core.evaluation import answer_of, sample_metrics
from tasks.data import sample_prompts
from tasks.refs import CheckpointRef
from tasks.sharded_stages import generation_stage, scoring_stage
from tasks.sharding import ShardRunner

HELDOUT_ITERATION = -1  # the sampling seeds' iteration: one fixed stream, apart from every training iteration's


class HeldOutEvaluation:
    """Resolved once, before the first iteration (data, rewards, prompt lengths checked like the training data's);
    `run(policy, done)` evaluates when `done` iterations call for it."""

    def __init__(self, config, policy: CheckpointRef):
        self.config, self.heldout = config, config.heldout
        if not self.enabled:
            return
        data = self.heldout.data
        self.rewards = resolve_rewards(self.heldout.rewards or config.rewards, data.extra_columns)
        dataset = resolve_prompts(data)
        check_num_prompts(self.heldout.num_prompts, dataset.rows, data.path, "heldout.num_prompts")
        check_prompts_fit(dataset, policy, data, config.generation.max_new_tokens)
        self.prompts = sample_prompts(dataset, self.heldout.num_prompts or dataset.rows, 0, config.seed)
        self.generation = config.generation.model_copy(update={"group_size": self.heldout.samples})
        self.logprobs = LogprobPass.from_config(config)

    @property
    def enabled(self) -> bool:
        return self.heldout.every > 0

    def due(self, done: int) -> bool:
        return self.enabled and (done % self.heldout.every == 0 or done == self.config.iterations)

    def run(self, policy: CheckpointRef, done: int, tracker: Tracker, shards: ShardRunner) -> None:
        if not self.due(done):
            return
        start, config = time.perf_counter(), self.config
        rollouts = generation_stage(policy, self.prompts, self.generation, config.runtime,
                                    self.heldout.data.system_prompt, config.seed, HELDOUT_ITERATION,
                                    config.model.trust_remote_code, shards)
        scored = scoring_stage(rollouts, self.rewards, None, self.logprobs, config.runtime,
                               config.model.trust_remote_code, shards).read()
        metrics = sample_metrics(scored["rewards"].to_numpy(), scored["group_id"].to_numpy(),
                                 [answer_of(r) for r in scored["response"]], self.heldout.pass_threshold)
        metrics |= {"heldout/length_mean": float(scored["response_length"].mean()),
                    "time/heldout_s": time.perf_counter() - start}
        tracker.log_metrics(metrics, step=done)
        print(f"held-out after {done} iteration(s): reward {metrics['heldout/reward_mean']:.3f}, pass@"
              f"{self.heldout.samples} {metrics['heldout/pass_at_k']:.3f}, maj@{self.heldout.samples} "
              f"{metrics['heldout/maj_at_k']:.3f}")
