"""Config models: Literals equal their registries, bad values are rejected naming the field, and the CLI merges a
config file with flags (flags win), prints a round-trippable config with --dry-run, and exits 2 on bad input."""

from typing import get_args

import pytest
import yaml
from pydantic import ValidationError

from flows.arguments import parse_arguments
from flows.cli import main
from rlhf_core.advantages import OUTCOME_ADVANTAGES
from rlhf_core.config import (AdvantageConfig, GenerationConfig, GRPOConfig, KLConfig, LossConfig, OptimConfig,
                              PPOConfig, RewardModelConfig, RewardSpec, RuntimeConfig)
from rlhf_core.kl import KL_ESTIMATORS
from rlhf_core.policy_losses import AGGREGATION_MODES

# ---------------------------------------------------------------- Literals == registries


@pytest.mark.parametrize("model, field, registry", [
    (KLConfig, "estimator", KL_ESTIMATORS),
    (AdvantageConfig, "estimator", OUTCOME_ADVANTAGES),
    (LossConfig, "aggregation", AGGREGATION_MODES),
])
def test_literal_equals_registry_keys(model, field, registry):
    choices = get_args(model.model_fields[field].annotation)
    assert choices and len(set(choices)) == len(choices)
    assert set(choices) == set(registry)
    assert model.model_fields[field].default in registry


# ---------------------------------------------------------------- invalid values


def error_locations(excinfo) -> list[str]:
    return [".".join(str(part) for part in error["loc"]) for error in excinfo.value.errors()]


@pytest.mark.parametrize("values, field", [
    ({"optim": {"lr": 0.0}}, "optim.lr"),
    ({"optim": {"lr": -1e-5}}, "optim.lr"),
    ({"generation": {"group_size": 0}}, "generation.group_size"),
    ({"generation": {"top_p": 1.5}}, "generation.top_p"),
    ({"runtime": {"device": "tpu"}}, "runtime.device"),
    ({"runtime": {"dtype": "float8"}}, "runtime.dtype"),
    ({"kl": {"estimator": "k4"}}, "kl.estimator"),
    ({"kl": {"coef": -0.1}}, "kl.coef"),
    ({"loss": {"aggregation": "sum"}}, "loss.aggregation"),
    ({"advantage": {"estimator": "ppo"}}, "advantage.estimator"),
    ({"optim": {"learning_rate": 1e-5}}, "optim.learning_rate"),  # unknown key: a typo is an error
    ({"iteratons": 3}, "iteratons"),
])
def test_invalid_field_is_rejected_by_name(values, field):
    with pytest.raises(ValidationError) as excinfo:
        GRPOConfig(**values)
    assert error_locations(excinfo) == [field]
    assert field in str(excinfo.value)


def test_unknown_device_message_lists_the_valid_ones():
    with pytest.raises(ValidationError, match="unknown device 'tpu'"):
        RuntimeConfig(device="tpu")
    assert RuntimeConfig(device="cuda:1").device == "cuda:1"


def test_duplicated_reward_function_is_rejected():
    rewards = [{"function": "arithmetic_answer"}, {"function": "arithmetic_answer", "weight": 0.5}]
    with pytest.raises(ValidationError, match="rewards: a source is listed twice"):
        GRPOConfig(rewards=rewards)
    GRPOConfig(rewards=[{"function": "arithmetic_answer"}, {"function": "answer_format", "weight": 0.5}])  # distinct


def test_mini_batches_cannot_exceed_responses_per_iteration():
    sizes = dict(prompts_per_iteration=2, generation={"group_size": 3})  # 6 responses per iteration
    assert GRPOConfig(**sizes, optim={"mini_batches": 6}).optim.mini_batches == 6
    with pytest.raises(ValidationError, match=r"optim\.mini_batches=7 exceeds the 6 responses"):
        GRPOConfig(**sizes, optim={"mini_batches": 7})


def test_empty_rewards_rejected():
    with pytest.raises(ValidationError) as excinfo:
        GRPOConfig(rewards=[])
    assert error_locations(excinfo) == ["rewards"]


def test_sub_models_reject_extra_keys_and_bounds():
    with pytest.raises(ValidationError):
        OptimConfig(lr=1e-5, momentum=0.9)
    with pytest.raises(ValidationError):
        GenerationConfig(top_p=0.0)  # gt 0
    assert GenerationConfig(top_p=1.0).top_p == 1.0  # le 1 includes 1


# ---------------------------------------------------------------- CLI


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump({
        "iterations": 3,
        "generation": {"group_size": 2, "max_new_tokens": 16},
        "optim": {"lr": 2e-5},
        "kl": {"coef": 0.05},
    }))
    return path


def test_parse_config_merges_file_and_flags_flags_win(config_file):
    args = parse_arguments(GRPOConfig, ["--config", str(config_file), "--generation.group-size", "4"])
    config = args.config
    assert args.dry_run is False
    assert config.generation.group_size == 4  # the flag wins over the file's 2
    assert config.generation.max_new_tokens == 16  # ...and the file's sibling value survives (deep merge)
    assert config.iterations == 3 and config.optim.lr == 2e-5 and config.kl.coef == 0.05  # from the file
    assert config.generation.temperature == GenerationConfig().temperature  # default
    assert isinstance(config, GRPOConfig)


def test_a_section_given_in_part_keeps_the_flows_own_defaults(tmp_path):
    """PPO's optim defaults to epochs=2, mini_batches=2 and its data to no extra columns; the reward model's optim
    to lr=3e-4: setting one field of the section, in code, in a file or on the command line, keeps the others."""
    assert (PPOConfig().optim.epochs, OptimConfig().epochs) == (2, 1)  # the two defaults differ
    ppo = PPOConfig(optim={"lr": 2e-5}, data={"path": "mine.jsonl"}, model={"lora": {"rank": 4}})
    assert (ppo.optim.lr, ppo.optim.epochs, ppo.optim.mini_batches) == (2e-5, 2, 2)
    assert ppo.data.extra_columns == [] and ppo.model.lora.rank == 4
    assert PPOConfig(optim=OptimConfig(lr=2e-5)).optim.epochs == 1  # a whole section object is taken as given
    path = tmp_path / "rm.yaml"
    path.write_text("optim: {epochs: 3}\n")
    for config in (parse_arguments(RewardModelConfig, ["--config", str(path)]).config,
                   parse_arguments(RewardModelConfig, ["--optim.epochs", "3"]).config):
        assert (config.optim.epochs, config.optim.lr, config.optim.batch_size) == (3, 3e-4, 16)
        assert config.model.name_or_path == RewardModelConfig().model.name_or_path


def test_parse_config_json_file_and_dry_run_flag(tmp_path):
    path = tmp_path / "grpo.json"
    path.write_text('{"seed": 7, "loss": {"aggregation": "seq-mean-token-mean"}}')
    args = parse_arguments(GRPOConfig, ["--dry-run", "--config", str(path), "--kl.coef", "0.1"])
    config = args.config
    assert args.dry_run is True
    assert (config.seed, config.loss.aggregation, config.kl.coef) == (7, "seq-mean-token-mean", 0.1)


def test_main_dry_run_prints_round_trippable_yaml(config_file, capsys):
    assert main(["grpo", "--config", str(config_file), "--dry-run"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = parse_arguments(GRPOConfig, ["--config", str(config_file)]).config
    assert GRPOConfig(**printed) == expected
    assert printed["generation"]["group_size"] == 2 and printed["optim"]["lr"] == 2e-5


def test_main_rejects_invalid_value_naming_the_field(capsys, reliability):
    assert main(["grpo", "--optim.lr", "-1"]) == 2
    captured = capsys.readouterr()
    assert "optim.lr" in captured.err and captured.out == ""
    reliability.record("bad input", "a config value out of range from the CLI (--optim.lr -1)",
                       "exit status 2, message naming optim.lr, before anything is loaded")


@pytest.mark.parametrize("content, needle", [
    ({"optim": {"learning_rate": 1}}, "optim.learning_rate"),  # typo in the file
    ({"prompts_per_iteration": 1, "generation": {"group_size": 2}, "optim": {"mini_batches": 3}}, "mini_batches"),
    ([1, 2], "expected a mapping"),
])
def test_main_rejects_invalid_file(tmp_path, capsys, content, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(content))
    assert main(["grpo", "--config", str(path), "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert needle in captured.err and captured.out == ""


@pytest.mark.parametrize("argv", [
    ["grpo", "--config", "/nonexistent/grpo.yaml"],
    ["grpo", "--optim.learning-rate", "1e-5"],  # unknown flag
    ["grpo", "--config"],  # missing value
])
def test_main_bad_arguments_exit_2(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "invalid configuration" in err
    assert argv[-1] != "--config" or "--config needs a value (a file path)" in err


@pytest.mark.parametrize("argv", [["sft"], [], ["--dry-run"]])
def test_main_unknown_flow_exits_2_with_usage(argv, capsys):
    assert main(argv) == 2
    assert "usage: rlhf" in capsys.readouterr().err


def test_a_reward_spec_names_exactly_one_source():
    with pytest.raises(ValidationError, match="exactly one of `function` or `model`"):
        RewardSpec()
    with pytest.raises(ValidationError, match="exactly one of `function` or `model`"):
        RewardSpec(function="arithmetic_answer", model="models:/reward-model@newest")
    assert RewardSpec(model="/some/reward-model").name == "/some/reward-model"


def test_dpo_config_rejects_options_its_loss_would_ignore():
    from rlhf_core.config import DPOConfig

    with pytest.raises(ValidationError, match="margin_column is used by the reward model only"):
        DPOConfig(data={"margin_column": "margin"})
    with pytest.raises(ValidationError, match="not hinge"):
        DPOConfig(loss_type="hinge", label_smoothing=0.1)
    assert DPOConfig(loss_type="robust", label_smoothing=0.1).label_smoothing == 0.1
