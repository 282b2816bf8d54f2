"""The evaluation flow: does the candidate beat the champion? If so, it becomes the champion.

    prompts   <- the held-out prompts
    for model in (candidate, baseline):          # same prompts, same per-response seeds
        rollouts[model] <- generate(model, prompts)
        scored[model]   <- judge(rollouts) + reference log-probs
    comparison <- pair the responses; win / loss / tie per pair
    log metrics, table and plots; move `champion` to the candidate when it wins

The baseline is the current champion of the candidate's registered model, or the reference model while there
is none. Every stage is cached like the training flows' stages: a re-run after a crash, or the same comparison
asked twice, samples nothing again.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.evaluation_report import evaluation_markdown, log_evaluation, move_champion
from flows.inputs import check_num_prompts, check_runtime, resolve_prompts, resolve_rewards
from flows.tracking import mlflow_run
from rlhf_core.config import EvaluationConfig
from rlhf_core.config.training import LogprobPass
from rlhf_core.evaluation import promotion_decision
from rlhf_core.model_files import REGISTRY_PREFIX, check_causal_lm
from tasks.data import sample_prompts
from tasks.evaluation import compare_models, judge_pairs, summarize_pairs
from tasks.models import RegisteredModelMissing, registered_version, resolve_model
from tasks.rollouts import generate_rollouts
from tasks.scoring import score_rollouts


def choose_baseline(config: EvaluationConfig, candidate_name: str | None) -> str:
    """The model the candidate is compared with, as a name, folder or registry URI."""
    if config.baseline == "reference":
        return config.reference
    if config.baseline != "champion":
        return config.baseline
    champion = f"{REGISTRY_PREFIX}{candidate_name}@{config.tracking.champion_alias}"
    try:
        registered_version(champion)
    except RegisteredModelMissing:
        print(f"no {champion} yet: comparing with the reference {config.reference!r}")
        return config.reference
    return champion


@flow(name="evaluate", log_prints=True)
def evaluate(config: EvaluationConfig = EvaluationConfig()) -> dict:
    """Compare a candidate with the champion (or the reference); returns the summary, `promoted` included."""
    check_runtime(config.runtime)
    version = registered_version(config.candidate) if config.candidate.startswith(REGISTRY_PREFIX) else None
    baseline_uri = choose_baseline(config, version.name if version else None)
    models = {"candidate": config.candidate, "baseline": baseline_uri}
    refs = {side: resolve_model(uri) for side, uri in models.items()}
    reference = resolve_model(config.reference)
    judge = resolve_model(config.pairwise_judge.model) if config.pairwise_judge else None
    for role, ref in [*refs.items(), ("reference", reference), ("pairwise judge", judge)]:
        if ref is not None:
            check_causal_lm(Path(ref.path), f"the {role}")
    rewards = resolve_rewards(config.rewards, config.data.extra_columns)
    dataset = resolve_prompts(config.data)
    check_num_prompts(config.num_prompts, dataset.rows, config.data.path)
    trust = config.trust_remote_code
    logprobs = LogprobPass(temperature=config.generation.temperature, micro_batch_size=config.micro_batch_size,
                           chunk_size=1024)

    with mlflow_run(config.tracking.experiment, config, flow_run.id, flow_run.name) as tracker:
        prompts = sample_prompts(dataset, config.num_prompts or dataset.rows, 0, config.seed)
        scored = {}
        for side, model in refs.items():
            rollouts = generate_rollouts(model, prompts, config.generation, config.runtime, config.data.system_prompt,
                                         config.seed, 0, trust)
            scored[side] = score_rollouts(rollouts, rewards, reference, logprobs, config.runtime, trust)
        comparison = compare_models(scored["candidate"], scored["baseline"])
        if config.pairwise_judge:  # the judge decides each pair instead of the rewards
            comparison = judge_pairs(comparison, judge, config.pairwise_judge, config.runtime,
                                     config.micro_batch_size)
        pairs = comparison.read()
        summary = summarize_pairs(pairs)
        table = log_evaluation(tracker, pairs, comparison.path, summary, models,
                               version.run_id if version else None, config.tracking.log_rollouts)
        wins, why = promotion_decision(summary, config.min_win_rate, config.max_kl)
        promoted = False
        if refs["candidate"].sha256 == refs["baseline"].sha256:
            decision = f"not promoted: the candidate is the baseline {baseline_uri} (same weights)"
        elif not wins:
            decision = f"not promoted: {why}"
        elif not config.promote:
            decision = f"wins ({why}); not promoted (promote: false)"
        else:
            replaced = move_champion(tracker, version.name, version.version, config.tracking.champion_alias, summary)
            promoted = True
            decision = (f"promoted {version.name} v{version.version} to @{config.tracking.champion_alias} "
                        f"(replacing {'v' + replaced if replaced else 'no champion'}): {why}")
        tracker.client.set_tag(tracker.run_id, "decision", decision)
        tracker.log_metrics({"promoted": float(promoted)}, step=0)
        create_markdown_artifact(key="evaluation", markdown=evaluation_markdown(table, summary, decision),
                                 description="candidate vs baseline on held-out prompts")
        print(decision)
    return {**summary, "promoted": promoted, "decision": decision, "baseline": baseline_uri}
