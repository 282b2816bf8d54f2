"""On-policy distillation through the GRPO flow on tiny models: the student samples, the teacher (kl.reference)
gives the per-token log-probs its reverse KL is measured to, no task reward; the held-out judge reports before and
after. And a teacher with another vocabulary is refused before any work."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
from flow_helpers import mlflow_run_of
from test_flow_grpo import tiny_config
from tiny_models import save_tiny_model

from flows.grpo import grpo
from rlhf_core.batch import collate, response_lists
from rlhf_core.config import AdvantageConfig, DataConfig, HeldOutConfig, KLConfig, RewardSpec
from rlhf_core.errors import UserInputError
from rlhf_core.logprobs import batched_response_logprobs
from rlhf_core.models import load_causal_lm, load_tokenizer

pytestmark = pytest.mark.slow


def distillation_config(student, teacher, **overrides):
    return tiny_config(student, rewards=[], kl=KLConfig(coef=1.0, estimator="k1", placement="reward",
                                                         reference=str(teacher)),
                       advantage=AdvantageConfig(estimator="reinforce_pp"),
                       heldout=HeldOutConfig(every=2, data=DataConfig(path="data/arithmetic_eval.jsonl"),
                                             num_prompts=4, samples=2,
                                             rewards=[RewardSpec(function="arithmetic_answer")]), **overrides)


def test_the_student_is_scored_against_the_teacher(prefect_harness, rlhf_home, tmp_path, tiny_model_dir,
                                                   tokenizer_dir):
    teacher = save_tiny_model(tmp_path / "teacher", tokenizer_dir, seed=1)
    state = grpo(distillation_config(tiny_model_dir, teacher), return_state=True)
    assert state.is_completed()
    run = mlflow_run_of(state.state_details.flow_run_id)
    folder = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="data/iter_000")
    scored = pd.read_parquet(f"{folder}/scored.parquet")
    assert (scored["rewards"] == 0.0).all()  # no task reward: the KL is all there is

    # the reference log-probs are the teacher's, not the start model's
    model, tokenizer = load_causal_lm(teacher)
    batch = collate(scored["prompt_ids"], scored["response_ids"], tokenizer.pad_token_id)
    teacher_logprobs = response_lists(batched_response_logprobs(model.eval(), batch, micro_batch_size=16,
                                                                temperature=1.0), batch["response_mask"])
    stored = [np.asarray(x) for x in scored["ref_logprobs"]]
    assert all(np.array_equal(a, np.asarray(b, dtype=a.dtype)) for a, b in zip(stored, teacher_logprobs))
    # and each token's advantage folds -KL_t = -(log student - log teacher) of the sampler's log-probs
    kl_history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "kl/mean")
    assert len(kl_history) == 2 and all(np.isfinite(m.value) for m in kl_history)
    heldout = mlflow.MlflowClient().get_metric_history(run.info.run_id, "heldout/reward_mean")
    assert sorted(m.step for m in heldout) == [0, 2]  # before and after


def test_a_teacher_with_another_vocabulary_is_refused(prefect_harness, rlhf_home, tmp_path, tiny_model_dir,
                                                      tokenizer_dir):
    teacher = save_tiny_model(tmp_path / "teacher", tokenizer_dir, seed=1)
    tokenizer, _ = load_tokenizer(teacher)
    tokenizer.add_tokens(["<an-extra-token>"])
    tokenizer.save_pretrained(teacher)
    state = grpo(distillation_config(tiny_model_dir, teacher), return_state=True)
    assert state.is_failed()
    with pytest.raises(UserInputError, match="kl.reference .*its tokenizer is not the policy's"):
        state.result()
    assert not (rlhf_home / "checkpoints").exists() or not any((rlhf_home / "checkpoints").iterdir())
