"""Config models: Literals equal their registries, bad values are rejected naming the field, and the CLI merges a
config file with flags (flags win), prints a round-trippable config with --dry-run, and exits 2 on bad input."""

import re
from pathlib import Path
from typing import get_args

import pytest
import yaml
from pydantic import ValidationError

from flows.arguments import ConfigInputError, parse_arguments
from flows.cli import main
from rlhf_core.advantages import ADVANTAGE_ESTIMATORS, TOKEN_ADVANTAGES
from rlhf_core.config import (AdvantageConfig, GenerationConfig, GRPOConfig, KLConfig, LossConfig, OptimConfig,
                              PPOConfig, RewardModelConfig, RewardSpec, RuntimeConfig)
from rlhf_core.config.common import TOKEN_LEVEL_ESTIMATORS
from rlhf_core.kl import KL_ESTIMATORS
from rlhf_core.policy_losses import AGGREGATION_MODES, POLICY_LOSSES

# ---------------------------------------------------------------- Literals == registries


@pytest.mark.parametrize("model, field, registry", [
    (KLConfig, "estimator", KL_ESTIMATORS),
    (AdvantageConfig, "estimator", ADVANTAGE_ESTIMATORS),
    (LossConfig, "aggregation", AGGREGATION_MODES),
    (LossConfig, "policy_loss", POLICY_LOSSES),
])
def test_literal_equals_registry_keys(model, field, registry):
    choices = get_args(model.model_fields[field].annotation)
    assert choices and len(set(choices)) == len(choices)
    assert set(choices) == set(registry)
    assert model.model_fields[field].default in registry


def test_token_level_estimator_names_equal_their_registry():
    assert set(TOKEN_LEVEL_ESTIMATORS) == set(TOKEN_ADVANTAGES)


# ---------------------------------------------------------------- policy loss, KL and advantage options


@pytest.mark.parametrize("values, field", [
    ({"loss": {"policy_loss": "grpo"}}, "loss.policy_loss"),
    ({"loss": {"dual_clip_c": 1.0}}, "loss.dual_clip_c"),  # c > 1: at 1 it would cap every negative-advantage token
    ({"loss": {"policy_loss": "gspo", "gspo_clip_low": 1.0}}, "loss.gspo_clip_low"),
    ({"loss": {"policy_loss": "gspo", "gspo_clip_high": 0.0}}, "loss.gspo_clip_high"),
    ({"loss": {"policy_loss": "cispo", "cispo_eps_low": 1.5}}, "loss.cispo_eps_low"),
    ({"loss": {"policy_loss": "cispo", "cispo_eps_high": -0.1}}, "loss.cispo_eps_high"),
    ({"loss": {"entropy_coef": -0.01}}, "loss.entropy_coef"),
    ({"loss": {"entropy_coef": 2.0}}, "loss.entropy_coef"),
    ({"kl": {"coef": 0.1, "clamp": 0.0}}, "kl.clamp"),
    ({"kl": {"coef": 0.1, "placement": "advantage"}}, "kl.placement"),
    ({"advantage": {"estimator": "reinforce"}}, "advantage.estimator"),
])
def test_new_fields_are_bounded_and_named(values, field):
    with pytest.raises(ValidationError) as excinfo:
        GRPOConfig(**values)
    assert error_locations(excinfo) == [field]


@pytest.mark.parametrize("config_class", [GRPOConfig, PPOConfig])
@pytest.mark.parametrize("loss, needle", [
    ({"gspo_clip_low": 1e-3}, "loss.gspo_clip_low is an option of policy_loss 'gspo'"),
    ({"policy_loss": "cispo", "gspo_clip_high": 1e-3}, "loss.gspo_clip_high is an option of policy_loss 'gspo'"),
    ({"policy_loss": "gspo", "dual_clip_c": 3.0}, "loss.dual_clip_c is an option of policy_loss 'ppo_clip'"),
    ({"cispo_eps_high": 0.3}, "loss.cispo_eps_high is an option of policy_loss 'cispo'"),
    ({"policy_loss": "gspo", "cispo_eps_low": 1.0}, "loss.cispo_eps_low is an option of policy_loss 'cispo'"),
])
def test_an_option_of_another_policy_loss_is_refused(config_class, loss, needle):
    with pytest.raises(ValidationError, match=needle):
        config_class(loss=loss)


def test_each_policy_loss_has_its_own_clip_range():
    assert LossConfig().clip_range == (0.2, 0.28)
    assert LossConfig(policy_loss="gspo").clip_range == (3e-4, 4e-4)  # the GSPO paper's
    assert LossConfig(policy_loss="gspo", gspo_clip_low=1e-3, gspo_clip_high=2e-3).clip_range == (1e-3, 2e-3)
    assert LossConfig(policy_loss="cispo").clip_range == (1.0, 0.28)  # no lower bound: 1 - 1 = 0 never binds
    assert LossConfig(policy_loss="cispo", cispo_eps_low=0.5, cispo_eps_high=1.0).clip_range == (0.5, 1.0)
    assert LossConfig(dual_clip_c=3.0, entropy_coef=0.01).clip_range == (0.2, 0.28)
    assert PPOConfig(loss={"policy_loss": "gspo"}).loss.clip_range == (3e-4, 4e-4)


@pytest.mark.parametrize("kl, needle", [
    ({"placement": "reward"}, "kl.coef is 0"),
    ({"importance_corrected": True}, "kl.coef is 0"),
    ({"clamp": 10.0}, "kl.coef is 0"),
    ({"coef": 0.1, "placement": "reward", "importance_corrected": True}, "importance_corrected reweights"),
])
def test_kl_options_without_their_kl_term_are_refused(kl, needle):
    with pytest.raises(ValidationError, match=needle):
        KLConfig(**kl)


def test_kl_in_the_reward_needs_a_token_level_estimator():
    kl = {"coef": 0.05, "placement": "reward", "estimator": "k1", "clamp": 10.0}
    for estimator in TOKEN_LEVEL_ESTIMATORS:
        assert GRPOConfig(kl=kl, advantage={"estimator": estimator}).kl.placement == "reward"
    with pytest.raises(ValidationError, match="advantage.estimator 'rloo' would ignore it"):
        GRPOConfig(kl=kl, advantage={"estimator": "rloo"})
    # in the loss, a token-level estimator is fine: its returns then have no KL part
    assert GRPOConfig(kl={"coef": 0.05, "importance_corrected": True},
                      advantage={"estimator": "reinforce_pp"}).kl.importance_corrected


def test_configs_with_the_new_options_round_trip_through_their_dump():
    configs = [GRPOConfig(loss={"policy_loss": "gspo", "gspo_clip_low": 1e-3, "entropy_coef": 0.01},
                          kl={"coef": 0.1, "placement": "reward", "clamp": 5.0},
                          advantage={"estimator": "reinforce_pp_baseline"}),
               GRPOConfig(loss={"dual_clip_c": 3.0}, kl={"coef": 0.1, "importance_corrected": True}),
               PPOConfig(loss={"policy_loss": "cispo", "cispo_eps_high": 2.0})]
    for config in configs:
        assert type(config)(**config.model_dump()) == config


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


@pytest.mark.parametrize("argv", [["sfft"], [], ["--dry-run"]])
def test_main_unknown_flow_exits_2_with_usage(argv, capsys):
    assert main(argv) == 2
    assert "usage: rlhf" in capsys.readouterr().err


def test_a_reward_spec_names_exactly_one_source():
    with pytest.raises(ValidationError, match="exactly one of `function`, `model` or `judge`"):
        RewardSpec()
    with pytest.raises(ValidationError, match="exactly one of `function`, `model` or `judge`"):
        RewardSpec(function="arithmetic_answer", model="models:/reward-model@newest")
    assert RewardSpec(model="/some/reward-model").name == "/some/reward-model"


def test_dpo_config_rejects_options_its_loss_would_ignore():
    from rlhf_core.config import DPOConfig

    with pytest.raises(ValidationError, match="margin_column is used by the reward model only"):
        DPOConfig(data={"margin_column": "margin"})
    with pytest.raises(ValidationError, match="not hinge"):
        DPOConfig(loss_type="hinge", label_smoothing=0.1)
    assert DPOConfig(loss_type="robust", label_smoothing=0.1).label_smoothing == 0.1


def test_every_float_field_of_every_flow_refuses_nan_and_inf(reliability):
    """One rule (allow_inf_nan=False on every config model) with one message, for every float field: an infinite
    weight decay or a NaN reward weight never reaches training."""
    from flows.cli import FLOWS
    from rlhf_core.config.fields import config_fields

    checked = 0
    for flow in FLOWS.values():
        for field in config_fields(flow.config, flow.config()):
            if not re.match(r"float\b", field.type) or "[]" in field.name:
                continue
            flag = "--" + field.name.replace("_", "-")
            for bad in ("nan", "inf", "-inf"):
                with pytest.raises(ConfigInputError, match=f"{flag}: Input should be a finite number"):
                    parse_arguments(flow.config, [flag, bad])
            checked += 1
    with pytest.raises(ConfigInputError, match=r"--rewards \(0\.weight\): Input should be a finite number"):
        parse_arguments(GRPOConfig, ["--rewards", '[{"function": "response_length", "weight": .nan}]'])
    assert checked > 40
    reliability.record("bad input", f"NaN or inf in any of the {checked} float config fields (and a reward weight)",
                       "refused before any work: 'Input should be a finite number', naming the field")


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_file_is_a_valid_config_of_its_flow(path):
    from flows.arguments import read_config_file
    from rlhf_core.config import GRPOConfig, PPOConfig

    flow_config = {"grpo": GRPOConfig, "ppo": PPOConfig}[path.name.split("_")[0]]
    flow_config.model_validate(read_config_file(str(path))[1])
