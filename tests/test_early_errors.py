"""No silent failure: inputs that used to run to "Completed" (and register a useless model) or fail late now stop
the command before any work, with one line naming the file, field or setting and exit status 2; and the guards
that can only act inside a run (a reward that hangs, a judge that ties everything) fail that run by name.
Each case records a row of the reliability table."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from transformers import AutoModelForSequenceClassification

from flows.cli import main
from rlhf_core.config import DPOConfig, KTOConfig, RewardModelConfig
from rlhf_core.models import load_tokenizer

OWN_PROMPTS = ["--data.extra-columns", "[]", "--rewards", '[{"function": "response_length"}]']


def prompts(tmp_path: Path, count: int) -> str:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Say {i}."}) + "\n" for i in range(count)))
    return str(path)


def pairs(tmp_path: Path, tied: int, untied: int) -> str:
    rows = [{"prompt": f"p{i}", "chosen": "same", "rejected": "same"} for i in range(tied)]
    rows += [{"prompt": f"q{i}", "chosen": "good", "rejected": f"bad {i}"} for i in range(untied)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def classifier_folder(tmp_path: Path, tiny_model_dir: Path) -> str:
    """A sequence classifier (with its tokenizer): fine as a reward model, wrong as a policy."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    tokenizer, _ = load_tokenizer(tiny_model_dir)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp_path / "classifier")
    tokenizer.save_pretrained(tmp_path / "classifier")
    return str(tmp_path / "classifier")


def copy_of(tiny_model_dir: Path, dest: Path, drop: tuple[str, ...] = (), truncate: bool = False) -> str:
    dest.mkdir()
    for file in tiny_model_dir.iterdir():
        if file.name not in drop:
            (dest / file.name).write_bytes(file.read_bytes()[:-1000] if truncate and file.suffix == ".safetensors"
                                           else file.read_bytes())
    return str(dest)


# (case, argv builder (tmp_path, tiny_model_dir) -> argv, what the one line must say)
CASES = [
    ("an infinite weight decay", lambda t, m: ["grpo", "--optim.weight-decay", "inf"],
     "--optim.weight-decay: Input should be a finite number"),
    ("a NaN reward weight", lambda t, m: ["grpo", "--rewards", '[{"function": "response_length", "weight": .nan}]'],
     "--rewards (0.weight): Input should be a finite number"),
    ("GRPO with one response per prompt and a group-baselined estimator", lambda t, m: [
        "grpo", "--generation.group-size", "1"], "with generation.group_size 1 every advantage is 0"),
    ("fewer prompts than prompts_per_iteration", lambda t, m: [
        "grpo", "--model.name-or-path", str(m), "--data.path", prompts(t, 3), "--prompts-per-iteration", "8",
        *OWN_PROMPTS], "prompts_per_iteration=8 exceeds the 3 prompts of"),
    ("evaluation num_prompts above the data size", lambda t, m: [
        "evaluate", "--candidate", str(m), "--baseline", "reference", "--reference", str(m), "--promote", "false",
        "--data.path", prompts(t, 3), "--num-prompts", "5", *OWN_PROMPTS], "num_prompts=5 exceeds the 3 prompts"),
    ("every pair's chosen equals its rejected", lambda t, m: [
        "dpo", "--model.name-or-path", str(m), "--data.path", pairs(t, 4, 0)],
     "in every one of its 4 pairs the chosen and rejected responses are the same text"),
    ("a reward function needing a column extra_columns does not pass", lambda t, m: [
        "grpo", "--model.name-or-path", str(m), "--data.extra-columns", "[]"],
     "reward function 'arithmetic_answer' needs the argument(s) ['answer']"),
    ("a causal LM as a reward model", lambda t, m: ["grpo", "--rewards", json.dumps([{"model": str(m)}])],
     "is a LlamaForCausalLM with no trained score head"),
    ("a sequence classifier as the policy", lambda t, m: [
        "dpo", "--model.name-or-path", classifier_folder(t, m)],
     "is a LlamaForSequenceClassification, not a causal language model"),
    ("a truncated safetensors file", lambda t, m: [
        "kto", "--model.name-or-path", copy_of(m, t / "cut", truncate=True)], "model.safetensors: truncated"),
    ("a model folder without tokenizer files", lambda t, m: [
        "dpo", "--model.name-or-path", copy_of(m, t / "no-tok", drop=("tokenizer.json", "tokenizer_config.json"))],
     "has no tokenizer files"),
    ("a system prompt for a tokenizer without a chat template", lambda t, m: [
        "grpo", "--model.name-or-path", copy_of(m, t / "plain", drop=("chat_template.jinja",)),
        "--data.system-prompt", "Be brief.", *OWN_PROMPTS], "has no chat template to put it in"),
    ("runtime.device cuda on a CPU-only torch", lambda t, m: ["reward-model", "--runtime.device", "cuda"],
     "runtime.device 'cuda': this torch"),
    ("an output_dir that is a file", lambda t, m: [
        "preference-data", "--model.name-or-path", str(m), "--output-dir", str(t / "pairs.jsonl")],
     "is a file, not a folder"),
    ("RLHF_HOME that is a file", lambda t, m: ["dpo", "--model.name-or-path", str(m)],
     "not a writable folder"),
]


@pytest.mark.parametrize("case, argv, message", CASES, ids=[c[0] for c in CASES])
def test_inputs_that_cannot_work_stop_the_command_before_any_work(case, argv, message, tmp_path, tiny_model_dir,
                                                                  monkeypatch, capsys, reliability):
    home = tmp_path / "home"
    if case == "RLHF_HOME that is a file":
        home.write_text("")
    if case == "an output_dir that is a file":
        (tmp_path / "pairs.jsonl").write_text("")
    monkeypatch.setenv("RLHF_HOME", str(home))
    if "cuda" in case and __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    args = argv(tmp_path, tiny_model_dir)
    capsys.readouterr()  # what making the inputs printed
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not home.is_dir() or not (home / "mlflow").exists()  # no MLflow run, nothing registered
    reliability.record("silent failure", f"{case} (CLI)",
                       "exit status 2 before any work, one line naming the field, file or model")


def test_some_tied_pairs_are_dropped_with_a_count(tmp_path, capsys):
    from tasks.data import split_pairs

    data = DPOConfig(data={"path": pairs(tmp_path, 2, 10), "eval_fraction": 0.2}).data
    train, held_out = split_pairs(data, seed=0)
    assert len(train) + len(held_out) == 10 and (train["chosen"] != train["rejected"]).all()
    assert "dropped 2 pair(s) of 12 whose chosen and rejected responses are the same text" in capsys.readouterr().out


def test_own_training_data_is_never_evaluated_on_the_shipped_held_out_file(reliability):
    for config in (DPOConfig, RewardModelConfig, KTOConfig):
        assert config().data.eval_path is not None  # the demo keeps its shipped held-out file
        own = config(data={"path": "mine.jsonl"}).data
        assert own.eval_path is None  # its eval_fraction is held out of mine.jsonl instead
        assert config(data={"path": "mine.jsonl", "eval_path": "my_eval.jsonl"}).data.eval_path == "my_eval.jsonl"
    reliability.record("silent failure", "own training file with the shipped held-out file left in place",
                       "holds out eval_fraction of the user's file instead (shown by --dry-run and the params)")


@pytest.mark.slow
def test_train_file_equal_to_eval_file_is_a_warning_and_a_run_tag(prefect_harness, rlhf_home, tmp_path,
                                                                   tiny_model_dir, reliability):
    import test_flow_dpo
    from flow_helpers import mlflow_run_of

    from flows.dpo import dpo

    pairs_file = test_flow_dpo.write_review_pairs(tmp_path / "pairs.jsonl")
    config = test_flow_dpo.small_config(pairs_file, tiny_model_dir, optim={"epochs": 1},
                                        data={"path": str(pairs_file), "eval_path": str(pairs_file)})
    state = dpo(config, return_state=True)
    state.result()
    run = mlflow_run_of(state.state_details.flow_run_id)
    assert run.data.tags["warning.eval_is_train"] == "data.eval_path has the same content as data.path"
    reliability.record("silent failure", "the held-out file is the training file",
                       "a warning in the log and the MLflow tag warning.eval_is_train")


@pytest.mark.slow
def test_a_reward_function_that_hangs_fails_the_scoring_stage_by_name(prefect_harness, rlhf_home, tmp_path,
                                                                      tiny_model_dir, monkeypatch, reliability):
    from test_bad_input import assert_nothing_left  # noqa: F401 (the same guarantees: nothing trained)
    from test_flow_grpo import tiny_config

    from flows.grpo import grpo
    from rlhf_core.config import DataConfig, RewardSpec

    (tmp_path / "slow_rewards.py").write_text(textwrap.dedent("""
        import time

        def stuck(prompts, responses, **columns):
            time.sleep(3600)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tiny_config(tiny_model_dir, iterations=1, rewards=[RewardSpec(function="slow_rewards:stuck",
                                                                           timeout_s=2)],
                         data=DataConfig(path=prompts(tmp_path, 4), extra_columns=[]))
    state = grpo(config, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match=r"reward function 'slow_rewards:stuck' did not return within its "
                                        r"timeout_s=2 s"):
        state.result()
    assert not (rlhf_home / "checkpoints").exists() or not any((rlhf_home / "checkpoints").iterdir())
    reliability.record("silent failure", "a reward function that hangs",
                       "the scoring stage fails after rewards[].timeout_s naming the function; nothing trained")


@pytest.mark.slow
def test_a_judge_that_ties_everything_fails_the_preference_data_flow(prefect_harness, rlhf_home, tmp_path,
                                                                     tiny_model_dir, reliability):
    import test_flow_preference_data as t

    from flows.preference_data import preference_data
    from rlhf_core.config import JudgeConfig, RewardSpec

    (tmp_path / "flat_rewards.py").write_text("def flat(prompts, responses, **columns):\n"
                                              "    return [0.5] * len(responses)\n")
    sys.path.insert(0, str(tmp_path))
    try:
        prompts_file = Path(prompts(tmp_path, 4))
        config = t.small_config(prompts_file, tiny_model_dir, output_dir=str(tmp_path / "out"),
                                judge=JudgeConfig(rewards=[RewardSpec(function="flat_rewards:flat")]))
        state = preference_data(config, return_state=True)
    finally:
        sys.path.remove(str(tmp_path))
    assert state.is_failed()
    with pytest.raises(Exception, match=r"the judge flat_rewards:flat put no two responses to the same prompt "
                                        r"min_gap=0\.02 apart in 4 prompts, so there are no pairs"):
        state.result()
    assert not (tmp_path / "out").exists()  # no empty pairs file for the next flow to trip on
    reliability.record("silent failure", "a judge that ties every response",
                       "the preference-data flow fails naming the judge and min_gap; no empty files written")


@pytest.mark.slow
def test_a_data_folder_with_space_hash_question_mark_and_non_ascii_keeps_everything_inside(
        prefect_harness, tmp_path, tiny_model_dir, monkeypatch, reliability):
    """MLflow's store and artifacts, Prefect's database and every stage file stay inside RLHF_HOME whatever its
    name, and the registered checkpoint downloads back from `models:/...@newest`."""
    from test_flow_grpo import tiny_config

    from flows.grpo import grpo
    from rlhf_core.config import DataConfig
    from tasks.models import download_registered_model
    from tasks.paths import sqlite_path, tracking_uri

    home = tmp_path / "we ird #1 ?ö" / "home"
    monkeypatch.setenv("RLHF_HOME", str(home))
    data = DataConfig(path=prompts(tmp_path, 4), extra_columns=[])
    before = set(tmp_path.iterdir())
    final = grpo(tiny_config(tiny_model_dir, iterations=1, data=data, rewards=[{"function": "response_length"}]))
    assert Path(final).parent.parent == home and sqlite_path(tracking_uri()) == home / "mlflow" / "mlflow.db"
    # nothing written beside the data folder (under a name cut at `?` or percent-encoded)
    assert set(tmp_path.iterdir()) - before == {home.parent} and list(home.parent.iterdir()) == [home]
    downloaded = download_registered_model("models:/tiny-policy@newest")
    assert downloaded.is_relative_to(home) and (downloaded / "model.safetensors").is_file()
    assert pd.Series(list((home / "mlflow" / "artifacts").rglob("model.safetensors"))).size >= 1
    reliability.record("silent failure", "RLHF_HOME with a space, #, ? and non-ASCII characters",
                       "every file inside it; the registered checkpoint downloads back")
