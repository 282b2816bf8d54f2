"""Comparing a candidate policy with a baseline on the same held-out prompts and sampling seeds.

Both models answer every prompt `k` times with the same per-response seeds, so response `k` of the candidate and
response `k` of the baseline form a pair: the judge (the summed reward) picks a winner per pair, a tie counts one
half. The KL to the reference is k1 summed over each response's tokens, on the model's own samples: an unbiased
estimate of KL(pi || ref) per response.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from rlhf_core.verifiable import extract_final_number


def paired_outcomes(candidate_rewards: np.ndarray, baseline_rewards: np.ndarray) -> np.ndarray:
    """+1 where the candidate's response scores higher, -1 where lower, 0 for a tie.
    candidate_rewards, baseline_rewards: [N] -> [N] int"""
    if candidate_rewards.shape != baseline_rewards.shape:
        raise ValueError(f"paired rewards differ in shape: {candidate_rewards.shape} vs {baseline_rewards.shape}")
    return np.sign(candidate_rewards - baseline_rewards).astype(np.int64)


def win_rate(outcomes: np.ndarray) -> float:
    """(wins + ties / 2) / pairs. outcomes: [N] of +1/0/-1"""
    if len(outcomes) == 0:
        raise ValueError("no pairs to compare")
    return float((np.sum(outcomes == 1) + 0.5 * np.sum(outcomes == 0)) / len(outcomes))


def sequence_kl(logprobs: list[list[float]], ref_logprobs: list[list[float]]) -> np.ndarray:
    """k1 estimate of KL(pi || ref) per response: sum_t log pi(y_t) - log ref(y_t).
    logprobs, ref_logprobs: N lists of per-token values (the response's tokens) -> [N]"""
    return np.array([float(np.sum(np.asarray(lp, dtype=np.float64) - np.asarray(rp, dtype=np.float64)))
                     for lp, rp in zip(logprobs, ref_logprobs, strict=True)])


def comparison_summary(candidate_rewards: np.ndarray, baseline_rewards: np.ndarray, candidate_kl: np.ndarray,
                       baseline_kl: np.ndarray, candidate_lengths: np.ndarray, baseline_lengths: np.ndarray,
                       outcomes: np.ndarray | None = None) -> dict[str, float]:
    """The evaluation's numbers, all [N] inputs paired row by row -> scalar metrics. outcomes: [N] +1/0/-1 per pair
    from another judge (a pairwise one), else the rewards' paired_outcomes."""
    if outcomes is None:
        outcomes = paired_outcomes(candidate_rewards, baseline_rewards)
    return {
        "pairs": float(len(outcomes)),
        "win_rate": win_rate(outcomes),
        "wins": float(np.sum(outcomes == 1)),
        "losses": float(np.sum(outcomes == -1)),
        "ties": float(np.sum(outcomes == 0)),
        "candidate/reward_mean": float(np.mean(candidate_rewards)),
        "baseline/reward_mean": float(np.mean(baseline_rewards)),
        "candidate/kl_mean": float(np.mean(candidate_kl)),
        "baseline/kl_mean": float(np.mean(baseline_kl)),
        "candidate/length_mean": float(np.mean(candidate_lengths)),
        "baseline/length_mean": float(np.mean(baseline_lengths)),
    }


def promotion_decision(summary: dict[str, float], min_win_rate: float, max_kl: float | None) -> tuple[bool, str]:
    """(promote?, why): the candidate must beat `min_win_rate` strictly (so an identical model, all ties = 0.5,
    never replaces the champion at the default 0.5) and, when `max_kl` is set, stay within it."""
    rate, kl = summary["win_rate"], summary["candidate/kl_mean"]
    if rate <= min_win_rate:
        return False, f"win rate {rate:.3f} <= {min_win_rate:.3f}"
    if max_kl is not None and kl > max_kl:
        return False, f"win rate {rate:.3f} > {min_win_rate:.3f} but KL {kl:.3f} > max_kl {max_kl:.3f}"
    within = f", KL {kl:.3f} <= {max_kl:.3f}" if max_kl is not None else ""
    return True, f"win rate {rate:.3f} > {min_win_rate:.3f}{within}"


def answer_of(response: str) -> str:
    """What maj@k votes on: the response's last number where it has one (the arithmetic task's answer), else its
    text with whitespace folded."""
    number = extract_final_number(response)
    return str(number) if number is not None else " ".join(response.split())


def sample_metrics(rewards: np.ndarray, group_ids: np.ndarray, answers: list[str], threshold: float,
                   prefix: str = "heldout/") -> dict[str, float]:
    """k responses per prompt -> mean reward, pass@k (share of prompts with a response whose reward >= threshold:
    with n = k samples, the unbiased estimator 1 - C(n - c, k) / C(n, k) of Chen et al. 2021 is exactly this) and
    maj@k (share of prompts whose most frequent answer, ties to the earliest, is correct; an answer's correctness is
    that of its first response). rewards, group_ids: [B]; answers: B strings."""
    correct = rewards >= threshold
    passed, majority = [], []
    for group in np.unique(group_ids):
        rows = np.flatnonzero(group_ids == group)
        votes = Counter(answers[i] for i in rows)
        top = max(votes.values())
        winner = next(answers[i] for i in rows if votes[answers[i]] == top)
        passed.append(bool(correct[rows].any()))
        majority.append(bool(correct[next(i for i in rows if answers[i] == winner)]))
    return {f"{prefix}reward_mean": float(np.mean(rewards)), f"{prefix}pass_at_k": float(np.mean(passed)),
            f"{prefix}maj_at_k": float(np.mean(majority))}
