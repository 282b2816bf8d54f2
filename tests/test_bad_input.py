"""Bad input through the real GRPO flow: a clear error naming the file, row, field or function, before any
rollout is generated, and nothing left behind (no MLflow run, no checkpoint, no stage output but the validated
input itself). Reward functions that fail or return NaN can only fail once they run: the run stops at the scoring
stage, before any update, with the run marked FAILED in MLflow and no checkpoint written."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
from test_flow_grpo import tiny_config

from flows.grpo import grpo
from rlhf_core.config import DataConfig, ModelConfig, RewardSpec
from tasks.paths import use_tracking_uri

pytestmark = pytest.mark.slow

REWARDS = textwrap.dedent("""
    def raises(prompts, responses, **columns):
        raise KeyError("missing key")

    def nan_at_row_2(prompts, responses, **columns):
        return [float("nan") if i == 2 else 0.0 for i in range(len(responses))]
""")


def write(tmp_path: Path, name: str, content: bytes | str) -> str:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def corrupt_parquet(tmp_path):
    import pandas as pd

    pd.DataFrame({"prompt": ["a", "b"]}).to_parquet(tmp_path / "whole.parquet")
    return write(tmp_path, "prompts.parquet", (tmp_path / "whole.parquet").read_bytes()[:-40])


# (case, how the config is broken, what the error must say)
DATA_CASES = [
    ("truncated Parquet file", corrupt_parquet, r"prompts\.parquet"),
    ("JSONL without the prompt column", lambda t: write(t, "p.jsonl", '{"question": "a"}\n'),
     r"p\.jsonl: required field 'prompt' not found; columns present: \['question'\]"),
    ("wrongly typed prompt", lambda t: write(t, "p.jsonl", '{"prompt": "a"}\n{"prompt": 5}\n'),
     r"p\.jsonl line 2: field 'prompt'"),
    ("invalid JSON line", lambda t: write(t, "p.jsonl", '{"prompt": "a"}\n{"prompt": \n'),
     r"p\.jsonl line 2: invalid JSON"),
    ("empty dataset", lambda t: write(t, "p.jsonl", "\n"), r"p\.jsonl: contains no rows"),
    ("duplicated rows", lambda t: write(t, "p.jsonl", '{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "a"}\n'),
     r"p\.jsonl line 3: the same row as line 1"),
    ("non-UTF-8 text", lambda t: write(t, "p.jsonl", b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n'),
     r"p\.jsonl line 2: not valid UTF-8"),
    ("prompt longer than the context", lambda t: write(t, "p.jsonl", '{"prompt": "a"}\n{"prompt": "%s"}\n'
                                                       % ("word " * 1100)),
     r"p\.jsonl row 1: the prompt is \d+ tokens; .* more than the model's context of 1024"),
]


def assert_nothing_left(home: Path) -> None:
    assert not (home / "checkpoints").exists() or not any((home / "checkpoints").iterdir())
    stages = {p.name for p in (home / "artifacts").iterdir()} if (home / "artifacts").exists() else set()
    assert stages <= {"datasets"}, stages  # at most the validated input, never a rollout
    use_tracking_uri()
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


@pytest.mark.parametrize("case, make_path, message", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_dataset_fails_before_any_work(prefect_harness, rlhf_home, tmp_path, tiny_model_dir, reliability,
                                           case, make_path, message):
    data = DataConfig(path=make_path(tmp_path), extra_columns=[], duplicates="error")
    config = tiny_config(tiny_model_dir, data=data, rewards=[RewardSpec(function="response_length")])
    with pytest.raises(Exception, match=message):
        grpo(config)
    assert_nothing_left(rlhf_home)
    reliability.record("bad input", case, "clear error naming the file and row or field, before any work")


def no_weights(tmp_path):
    folder = tmp_path / "empty-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return str(folder)


MODEL_CASES = [
    ("a model path that does not exist", lambda t: str(t / "nowhere"), r"nowhere.*does not exist"),
    ("a model folder without weights", no_weights, r"empty-model.*no weights"),
]


@pytest.mark.parametrize("case, make_path, message", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_bad_model_path_fails_before_any_work(prefect_harness, rlhf_home, tmp_path, tiny_model_dir, reliability,
                                              case, make_path, message):
    with pytest.raises(Exception, match=message):
        grpo(tiny_config(tiny_model_dir, model=ModelConfig(name_or_path=make_path(tmp_path))))
    assert_nothing_left(rlhf_home)
    reliability.record("bad input", case, "clear error naming the path, before any work")


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    (tmp_path / "broken_rewards.py").write_text("import a_module_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in ("my_rewards", "broken_rewards"):
        sys.modules.pop(name, None)


def test_reward_function_that_does_not_import_fails_before_any_work(prefect_harness, rlhf_home, tiny_model_dir,
                                                                   reward_module, reliability):
    config = tiny_config(tiny_model_dir, rewards=[RewardSpec(function="broken_rewards:score")])
    with pytest.raises(Exception, match=r"broken_rewards.*a_module_that_is_not_installed"):
        grpo(config)
    assert_nothing_left(rlhf_home)
    reliability.record("bad input", "a reward function path that does not import",
                       "clear error naming the module, before any work")


@pytest.mark.parametrize("function, message", [("raises", r"'my_rewards:raises' raised KeyError: 'missing key'"),
                                               ("nan_at_row_2", r"'my_rewards:nan_at_row_2': row 2 is NaN")])
def test_reward_function_that_fails_stops_the_run_before_the_update(prefect_harness, rlhf_home, tiny_model_dir,
                                                                     reward_module, reliability, function, message):
    config = tiny_config(tiny_model_dir, rewards=[RewardSpec(function=f"my_rewards:{function}")],
                         data=DataConfig(path="data/arithmetic_train.jsonl", extra_columns=[]))
    with pytest.raises(Exception, match=message):
        grpo(config)
    assert not (rlhf_home / "checkpoints").exists() or not any((rlhf_home / "checkpoints").iterdir())
    assert not (rlhf_home / "artifacts" / "scored").exists()
    use_tracking_uri()
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert mlflow.MlflowClient().search_model_versions() == []
    what = "raises" if function == "raises" else "returns NaN"
    reliability.record("bad input", f"a reward function that {what}",
                       "clear error naming the function (and row); run FAILED at scoring, no checkpoint")
