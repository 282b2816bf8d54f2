"""Every MLflow metric key the flows log, with what it means: the one catalog that docs/reference/metrics.md is
generated from (`python scripts/docs_reference.py`).

A key is a literal name or a pattern with `<placeholder>` parts (`time/<stage>_s`), each placeholder standing for
one name of letters, digits and underscores. With RLHF_CHECK_METRIC_NAMES=1 (set for every test by
tests/conftest.py), `flows.tracking.Tracker.log_metrics` refuses a key that matches no entry: a new metric is
added here, with its description, or it is not logged. Descriptions name the flows that log the key; values are
per iteration (GRPO, PPO: step = iteration), per epoch (DPO, KTO, reward model: step = epoch) or once (step 0).
"""

from __future__ import annotations

import re
from functools import lru_cache

METRICS: dict[str, str] = {
    # --- online flows (GRPO, PPO): the rollout batch, from rlhf_core.metrics.rollout_metrics
    "reward/mean": "GRPO, PPO: mean over the iteration's responses of the summed reward (the weighted sum of the "
                   "`rewards` sources, before PPO's score shaping).",
    "reward/std": "GRPO, PPO: standard deviation of that summed reward over the iteration's responses.",
    "reward/zero_std_group_frac": "GRPO, PPO: share of prompt groups whose responses all got the same reward: "
                                  "their GRPO advantages are 0, so they give no gradient.",
    "sampling/rounds": "GRPO with `dynamic_sampling.enabled`: generation rounds the iteration took (1 to "
                       "`dynamic_sampling.max_rounds`).",
    "sampling/zero_variance_groups": "GRPO with `dynamic_sampling.enabled`: groups generated in the iteration's "
                                     "rounds whose rewards were all equal (dropped unless the batch was short).",
    "sampling/informative_groups": "GRPO with `dynamic_sampling.enabled`: groups in the trained batch whose rewards "
                                   "differ (`prompts_per_iteration` when the rounds found enough).",
    "heldout/reward_mean": "GRPO, PPO, SFT, DPO, KTO with `heldout.every > 0`: mean summed reward of the policy's "
                           "`heldout.samples` responses per held-out prompt (step = iterations or epochs done; 0 is "
                           "the start model).",
    "heldout/pass_at_k": "GRPO, PPO, SFT, DPO, KTO with `heldout.every > 0`: share of held-out prompts with at least "
                         "one of their k responses scoring `heldout.pass_threshold` or more (pass@k).",
    "heldout/maj_at_k": "GRPO, PPO, SFT, DPO, KTO with `heldout.every > 0`: share of held-out prompts whose most "
                        "frequent answer (the response's last number, else its text) scores `heldout.pass_threshold` "
                        "or more (maj@k).",
    "heldout/length_mean": "GRPO, PPO, SFT, DPO, KTO with `heldout.every > 0`: mean held-out response length in "
                           "tokens.",
    "response/length_mean": "GRPO, PPO: mean response length in tokens (EOS included).",
    "response/length_max": "GRPO, PPO: longest response of the iteration, in tokens.",
    "response/truncated_frac": "GRPO, PPO: share of responses that hit `generation.max_new_tokens` without "
                               "emitting EOS.",
    "perf/generated_tokens_per_s": "GRPO, PPO: response tokens generated per wall second of the generation stage.",
    # --- online flows: the update (mean over the iteration's optimizer steps)
    "loss/policy": "GRPO, PPO: the policy loss (`loss.policy_loss`: the clipped surrogate, GSPO-token or CISPO, "
                   "whose value contains log pi), minus `loss.entropy_coef` times the entropy when set (GRPO: with the "
                   "KL term when `kl.coef > 0` and `kl.placement` is `loss`, and the truncated-IS weights when "
                   "`loss.tis_cap` is set), reduced by `loss.aggregation`.",
    "policy/entropy": "GRPO, PPO: mean per-token entropy of the policy on the sampled responses (nats).",
    "policy/clip_frac_low": "GRPO, PPO: share of response tokens where the lower clip of the policy loss's ratio "
                            "(1 - its eps_low; GSPO: of the sequence ratio) is active. ppo_clip, gspo: ratio below "
                            "it with a negative advantage (no gradient); cispo: the importance weight is raised to "
                            "it (the gradient is kept, with that weight).",
    "policy/clip_frac_high": "GRPO, PPO: share of response tokens where the upper clip (1 + its eps_high) is active. "
                             "ppo_clip, gspo: ratio above it with a positive advantage (no gradient); cispo: the "
                             "importance weight is capped at it (gradient kept).",
    "policy/dual_clip_frac": "GRPO, PPO with `loss.dual_clip_c`: share of response tokens with a negative advantage "
                             "whose loss is capped at -dual_clip_c * A (ratio far above 1: no gradient).",
    "policy/seq_clip_frac": "GRPO, PPO with `loss.policy_loss: gspo`: share of the sequences whose sequence ratio "
                            "exp(mean log(pi / pi_old)) lies outside [1 - gspo_clip_low, 1 + gspo_clip_high].",
    "policy/approx_kl": "GRPO, PPO: 0.5 (log pi - log pi_old)^2 per token: how far the optimizer steps moved the "
                        "policy on this batch (0 with one on-policy step).",
    "policy/grad_norm": "GRPO, PPO, DPO, KTO: global gradient norm before clipping to `optim.max_grad_norm`.",
    "rollout/tis_weight_mean": "GRPO with `loss.tis_cap`: mean truncated importance weight "
                               "min(exp(old_logprobs - sampling_logprobs), tis_cap) per response token.",
    "rollout/tis_capped_frac": "GRPO with `loss.tis_cap`: share of response tokens whose importance weight hit "
                               "the cap.",
    "rollout/logprob_abs_diff": "GRPO with `loss.tis_cap`: mean |trainer - sampler| log-prob per response token: "
                                "the sampler/trainer mismatch (the number to watch after a vLLM upgrade).",
    "kl/mean": "GRPO (only when `kl.coef > 0`, the KL in the loss or in the rewards): the k-estimate "
               "(`kl.estimator`, bounded by `kl.clamp` when set, before any importance correction) of KL(pi || ref) "
               "per response token, averaged over the update's tokens. PPO: KL(pi_old || ref) summed over each "
               "response (`kl.estimator`), averaged over responses (nats per response).",
    "kl/clamp_frac": "GRPO with `kl.clamp`: share of response tokens whose |log pi - log ref| exceeds the clamp (its "
                     "KL is bounded there and has no gradient).",
    # --- PPO: scores, KL control, GAE and the critic
    "kl/coef": "PPO: the KL coefficient beta used for this iteration's per-token rewards (fixed, or set by the "
               "adaptive controller when `kl.target` is set).",
    "ppo/score_mean": "PPO: mean score put on each response's last token: the summed reward minus "
                      "`scores.missing_eos_penalty` for responses without EOS, then clipped (`scores.clip`) and "
                      "standardised (`scores.normalize`) if set.",
    "ppo/non_score_reward": "PPO: mean over responses of the summed KL penalty -beta KL_t.",
    "ppo/advantages_mean": "PPO: mean GAE advantage over response tokens (about 0 when whitened).",
    "ppo/advantages_std": "PPO: standard deviation of the GAE advantages over response tokens.",
    "ppo/returns_mean": "PPO: mean return (advantage + old value) over response tokens: the critic's target.",
    "ppo/returns_std": "PPO: standard deviation of the returns over response tokens.",
    "loss/value": "PPO: the clipped value loss 0.5 max((V - R)^2, (clip(V, V_old +- clip_range_value) - R)^2), "
                  "reduced like the policy loss (weighted by `value.vf_coef` in the total loss).",
    "value/clip_frac": "PPO: share of response tokens where the clipped value term is strictly larger (the clip "
                       "removes that token's value gradient).",
    "value/explained_variance": "PPO: 1 - Var(returns - old values) / Var(returns): how much of the return the "
                                "critic predicted (0 = nothing, 1 = all).",
    # --- DPO (training means over the epoch's steps; the same names under eval/ on held-out pairs)
    "rewards/chosen": "DPO: mean implicit reward beta * (log pi - log ref) of the chosen responses (summed "
                      "log-probs; per token for simpo).",
    "rewards/rejected": "DPO: mean implicit reward of the rejected responses.",
    "rewards/margins": "DPO: mean chosen - rejected implicit reward. KTO: mean desirable - undesirable implicit "
                       "reward.",
    "rewards/accuracies": "DPO: share of training pairs whose chosen implicit reward is above the rejected one (a "
                          "tie counts as wrong).",
    "logps/chosen": "DPO: mean summed log-prob of the chosen responses under the policy.",
    "logps/rejected": "DPO: mean summed log-prob of the rejected responses under the policy.",
    "loss/dpo": "DPO: the preference loss (`loss_type`) without RPO's NLL term.",
    "loss/train": "SFT, DPO, KTO, reward model: the training loss, mean over the epoch's optimizer steps (DPO: with "
                  "RPO's NLL term when `rpo_alpha` is set).",
    "eval/loss": "SFT: mean NLL per trained (assistant) token of the held-out conversations.",
    "eval/token_accuracy": "SFT: share of the held-out trained tokens that are the policy's top-1 prediction.",
    "eval/tokens": "SFT: trained (assistant) tokens in the held-out conversations.",
    "eval/rewards/chosen": "DPO: mean implicit reward of the held-out chosen responses.",
    "eval/rewards/rejected": "DPO: mean implicit reward of the held-out rejected responses.",
    "eval/rewards/margins": "DPO: mean held-out chosen - rejected implicit reward. KTO: mean held-out desirable - "
                            "undesirable implicit reward.",
    "eval/rewards/accuracies": "DPO: share of held-out pairs ranked right by the implicit reward. KTO: share of "
                               "(desirable, undesirable) completion pairs of the same held-out prompt ranked "
                               "right.",
    # --- KTO
    "rewards/desirable": "KTO: mean implicit reward beta * (log pi - log ref) of the desirable completions of "
                         "each step.",
    "rewards/undesirable": "KTO: mean implicit reward of the undesirable completions.",
    "logps/desirable": "KTO: mean summed log-prob of the desirable completions under the policy.",
    "logps/undesirable": "KTO: mean summed log-prob of the undesirable completions under the policy.",
    "kl": "KTO: the reference point z0, the estimate of KL(pi || ref) on mismatched (prompt, another prompt's "
          "completion) sequences, clamped at 0, mean over the epoch's steps.",
    "loss/kto": "KTO: the KTO loss (the same value as loss/train).",
    "eval/rewards/desirable": "KTO: mean implicit reward of the held-out desirable completions.",
    "eval/rewards/undesirable": "KTO: mean implicit reward of the held-out undesirable completions.",
    "eval/kl": "KTO: z0 over the whole held-out set.",
    # --- reward model
    "loss/eval": "Reward model: the Bradley-Terry loss on the held-out pairs.",
    "reward_model/train_accuracy": "Reward model: share of training pairs with r(chosen) > r(rejected), mean over "
                                   "the epoch's steps.",
    "reward_model/grad_norm": "Reward model: global gradient norm before clipping, mean over the epoch's steps.",
    "reward_model/eval_accuracy": "Reward model: share of held-out pairs with r(chosen) > r(rejected) (a tie "
                                  "counts as wrong).",
    "reward_model/eval_margin": "Reward model: mean r(chosen) - r(rejected) on the held-out pairs.",
    "reward_model/eval_chosen_rewards": "Reward model: mean reward of the held-out chosen responses.",
    "reward_model/eval_rejected_rewards": "Reward model: mean reward of the held-out rejected responses.",
    # --- preference data (step 0)
    "data/prompts": "Preference data: prompts sampled from.",
    "data/responses": "Preference data: responses judged (prompts x generation.group_size).",
    "data/empty_responses": "Preference data: empty responses (never part of a pair).",
    "judge/abstained": "Preference data: responses the judge gave no score (NaN: a skipped prompt of the human "
                       "judge).",
    "judge/score_mean": "Preference data: mean judge score over the scored responses.",
    "pairs/count": "Preference data: pairs written to pairs.parquet.",
    "pairs/prompts": "Preference data: prompts with at least one pair.",
    "pairs/gap_mean": "Preference data: mean chosen_score - rejected_score over the pairs.",
    "unpaired/desirable": "Preference data: responses labelled desirable in unpaired.parquet.",
    "unpaired/undesirable": "Preference data: responses labelled undesirable in unpaired.parquet.",
    # --- evaluation (step 0)
    "pairs": "Evaluation: (candidate, baseline) response pairs compared (prompts x generation.group_size).",
    "win_rate": "Evaluation: the candidate's (wins + ties / 2) / pairs.",
    "wins": "Evaluation: pairs where the candidate's reward is higher.",
    "losses": "Evaluation: pairs where the baseline's reward is higher.",
    "ties": "Evaluation: pairs with equal rewards.",
    "promoted": "Evaluation: 1 when the champion alias was moved to the candidate, else 0.",
    "candidate/reward_mean": "Evaluation: the candidate's mean held-out reward (the judge: the summed `rewards`).",
    "baseline/reward_mean": "Evaluation: the baseline's mean held-out reward.",
    "candidate/kl_mean": "Evaluation: the candidate's mean KL to the reference, k1 summed over each response on its "
                         "own samples (nats per response).",
    "baseline/kl_mean": "Evaluation: the baseline's mean KL to the reference (nats per response).",
    "candidate/length_mean": "Evaluation: the candidate's mean response length in tokens.",
    "baseline/length_mean": "Evaluation: the baseline's mean response length in tokens.",
    # --- wall time
    "time/checkpoint_s": "GRPO, PPO, DPO, KTO: seconds the update spent writing its checkpoint (weights, AdamW "
                         "state, hash): what the crash-resume guarantee costs.",
    "time/tracking_s": "Every training flow and preference data: seconds spent logging to MLflow (files, "
                       "registration) for this iteration or epoch.",
    "time/<stage>_s": "Wall seconds of one stage of the iteration or epoch. GRPO: prompts, generation, scoring, "
                      "advantages, update; PPO: the same and values; DPO, KTO, reward model: train, eval; "
                      "preference data: prompts, generation, judge, pairing.",
}

PLACEHOLDER = re.compile(r"<([a-z_]+)>")


def key_pattern(key: str) -> re.Pattern:
    """A catalog key as a regex: literal text escaped, each `<name>` one run of letters, digits or underscores."""
    parts = PLACEHOLDER.split(key)  # literal, name, literal, name, ..., literal
    return re.compile("".join(re.escape(part) if i % 2 == 0 else r"[A-Za-z0-9_]+" for i, part in enumerate(parts)))


@lru_cache(maxsize=1)
def _patterns() -> tuple[re.Pattern, ...]:
    return tuple(key_pattern(key) for key in METRICS)


def catalog_entry(name: str) -> str | None:
    """The catalog key that documents metric `name` (a literal key first, then patterns), None if none does."""
    if name in METRICS:
        return name
    return next((key for key, pattern in zip(METRICS, _patterns()) if pattern.fullmatch(name)), None)


def unknown_metrics(names) -> list[str]:
    """The names no catalog entry matches, in the order given."""
    return [name for name in names if catalog_entry(name) is None]
