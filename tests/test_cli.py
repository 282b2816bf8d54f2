"""The command line as a user meets it: help that lists every flow and field, config files and flags read exactly,
and each kind of user error ending the command with one line (the last), exit status 2 and no traceback, before the
orchestration engine starts. The commands run as real subprocesses (`python -m flows.cli`, the console script's
code path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.arguments import ConfigInputError, parse_arguments
from flows.cli import FLOWS, flow_help, main, overview
from rlhf_core.config import DPOConfig, GRPOConfig
from rlhf_core.config.fields import config_fields

REPO = Path(__file__).resolve().parents[1]


def rlhf(*args: str, cwd: Path = REPO, env: dict | None = None, code: str | None = None):
    """`rlhf ARGS` in a fresh process (or `code` run with ARGS as sys.argv[1:])."""
    command = [sys.executable, "-m", "flows.cli", *args] if code is None else [sys.executable, "-c", code, *args]
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    environment.pop("PREFECT_API_URL", None) if "PREFECT_API_URL" not in (env or {}) else None
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=300)


def test_help_lists_every_flow_and_every_field(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(f"  {name} " in text for name in FLOWS) and "rlhf <flow> --help" in text
    for name, flow in FLOWS.items():
        text = flow_help(name)
        for option in ("--config", "--dry-run", "--debug"):
            assert option in text
        for field in config_fields(flow.config, flow.config()):
            assert "--" + field.name.replace("_", "-") in text, (name, field.name)
    assert "--optim.epochs  int (>= 1) = 2" in flow_help("ppo")  # the flow's own default, not OptimConfig's
    assert main(["dpo", "--help"]) == 0 and "--loss-type" in capsys.readouterr().out
    assert overview().startswith("usage: rlhf")
    for name in ("sft", "pipeline"):  # the new flows' defaults check out before any work
        assert main([name, "--dry-run"]) == 0, capsys.readouterr().err


def test_flag_values_are_read_as_the_field_expects():
    config = parse_arguments(DPOConfig, ["--data.eval-path", "null", "--tracking.experiment", "2024",
                                         "--runtime.mixed-precision", "no", "--model.lora.rank=4",
                                         "--optim.lr", "2e-5", "--data.duplicates", "error"]).config
    assert config.data.eval_path is None  # null, not the string 'null'
    assert config.tracking.experiment == "2024"  # text as typed, not the int 2024
    assert config.runtime.mixed_precision == "no"  # a choice, not YAML's boolean "no"
    assert config.model.lora.rank == 4 and config.optim.lr == 2e-5 and config.optim.epochs == 1
    grpo = parse_arguments(GRPOConfig, ["--tracking.log-rollouts", "--rewards",
                                        '[{"function": "response_length", "weight": 0.5}]']).config
    assert grpo.tracking.log_rollouts is True and grpo.rewards[0].weight == 0.5


@pytest.mark.parametrize("text, message", [
    ("optim:\n  lr: 1.0e-5\n  lr: 2.0e-5\n", r"grpo\.yaml line 3 column 3: repeated key 'lr'"),
    ("optim: {lr: [1,\n", r"grpo\.yaml line 2 column 1: "),
    ("optim: {lr: -1}\n", r"grpo\.yaml: optim\.lr: Input should be greater than 0 \(got -1\)"),
    ("[1, 2]\n", r"grpo\.yaml: expected a mapping of config fields, got list"),
])
def test_config_file_errors_name_the_file_line_and_field(tmp_path, text, message, reliability):
    path = tmp_path / "grpo.yaml"
    path.write_text(text)
    with pytest.raises(ConfigInputError, match=message):
        parse_arguments(GRPOConfig, ["--config", str(path)])
    (tmp_path / "grpo.json").write_text('{"seed": 1, "seed": 2}')
    with pytest.raises(ConfigInputError, match=r"grpo\.json: repeated key 'seed'"):
        parse_arguments(GRPOConfig, ["--config", str(tmp_path / "grpo.json")])
    reliability.record("bad input", "a config file with a repeated key, a syntax error or a bad value",
                       "one line naming the file and the line (YAML/JSON) or the field")


def test_unknown_flag_suggests_the_field(capsys):
    assert main(["grpo", "--optim.lrr", "1e-5"]) == 2
    assert "--optim.lrr: no such field; did you mean --optim.lr?" in capsys.readouterr().err


def test_config_files_and_reward_modules_resolve_from_anywhere(tmp_path):
    """`--config configs/...` works outside the project folder (looked up like data files: the current directory,
    then the project), and a reward module in the current directory imports."""
    (tmp_path / "my_rewards.py").write_text("def short(prompts, responses, **columns):\n"
                                            "    return [-len(r) for r in responses]\n")
    result = rlhf("grpo", "--config", "configs/grpo_demo.yaml", "--rewards", '[{"function": "my_rewards:short"}]',
                  "--data.extra-columns", "[]", "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "function: my_rewards:short" in result.stdout and "prompts_per_iteration: 8" in result.stdout


def user_error_cases(tmp_path: Path) -> list[tuple[str, list[str], dict, str]]:
    bad_rows = tmp_path / "prompts.jsonl"
    bad_rows.write_text('{"prompt": "a"}\n{"prompt": 5}\n')
    own_data = ["--data.extra-columns", "[]", "--rewards", '[{"function": "response_length"}]']
    return [
        ("a config value out of range", ["grpo", "--optim.lr", "-1"], {}, "--optim.lr: Input should be greater"),
        ("a bad row in the data file", ["grpo", "--data.path", str(bad_rows), *own_data], {},
         f"{bad_rows} line 2: field 'prompt': expected str, got int 5"),
        ("a model folder that does not exist", ["dpo", "--model.name-or-path", str(tmp_path / "nope")], {},
         f"model path '{tmp_path / 'nope'}' does not exist"),
        ("a reward function that does not import", ["grpo", "--rewards", '[{"function": "nowhere_xyz:fn"}]'], {},
         "reward function 'nowhere_xyz:fn': no module named 'nowhere_xyz'"),
        ("an unreachable Prefect server", ["kto"], {"PREFECT_API_URL": "http://127.0.0.1:9/api"},
         "the Prefect server (PREFECT_API_URL) at http://127.0.0.1:9/api does not answer"),
        ("an unreachable MLflow server", ["reward-model"], {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"},
         "the MLflow server (MLFLOW_TRACKING_URI) at http://127.0.0.1:9 does not answer"),
    ]


def test_each_kind_of_user_error_ends_with_one_line_and_exit_status_2(tmp_path, reliability):
    for case, args, env, message in user_error_cases(tmp_path):
        result = rlhf(*args, env={"RLHF_HOME": str(tmp_path / "home"), **env})
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (case, result.stderr)
        assert message in lines[-1] and lines[-1].startswith(f"rlhf {args[0]}: "), (case, lines[-1])
        assert "Traceback" not in result.stderr + result.stdout, case
        assert "temporary server" not in result.stderr + result.stdout, case  # found before the engine started
        assert not (tmp_path / "home" / "checkpoints").exists()
        reliability.record("bad input", f"{case}, from the CLI",
                           "exit status 2, one line naming it as the last line, no traceback, before the "
                           "orchestration engine starts")
    debug = rlhf("grpo", "--optim.lr", "-1", "--debug")
    assert debug.returncode == 2 and "Traceback" in debug.stderr  # --debug shows where it came from


@pytest.mark.slow
def test_a_user_error_found_inside_the_run_is_still_one_last_line(tmp_path, tiny_model_dir, reliability):
    """With the checks before the run switched off, the flow itself finds the bad prompt: its run fails in
    Prefect with the message, the console shows no traceback for it, and the CLI's line is still the last one,
    after Prefect's own shutdown lines."""
    prompts = tmp_path / "long.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"prompt": "word " * 1100}) + "\n")
    code = ("import sys, flows.preflight as p\n"
            "p.CHECKS = {kind: (lambda config: None) for kind in p.CHECKS}\n"
            "from flows.cli import main\nsys.exit(main())")
    result = rlhf("grpo", "--model.name-or-path", str(tiny_model_dir), "--data.path", str(prompts),
                  "--prompts-per-iteration", "2", "--data.extra-columns", "[]", "--rewards",
                  '[{"function": "response_length"}]', code=code,
                  env={"RLHF_HOME": str(tmp_path / "home")})
    output = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert "temporary server" in result.stdout + result.stderr  # the engine did run the flow
    assert output[-1].startswith("rlhf grpo: ") and "row 1: the prompt is" in output[-1]
    assert "Traceback" not in result.stdout + result.stderr
    reliability.record("bad input", "a user error found inside the Prefect run (CLI)",
                       "the run fails with the message; the console prints no traceback; the CLI's one line is "
                       "the last, exit status 2")
