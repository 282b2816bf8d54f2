"""`rlhf <flow> [--config FILE.yaml|.json] [--section.field VALUE ...] [--dry-run]`

The config file gives the base values, flags override them (`--generation.group-size 4 --optim.lr 2e-5`), and
the result is validated by the flow's pydantic model before anything is loaded: a bad value exits with status
2 and a message naming the field. `--dry-run` prints the validated config and exits.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError
from pydantic_settings import CliApp

from rlhf_core.config import (DPOConfig, EvaluationConfig, GRPOConfig, KTOConfig, PPOConfig, PreferenceDatasetConfig,
                              RewardModelConfig)

FLOWS = {"grpo": (GRPOConfig, "flows.grpo", "grpo"), "ppo": (PPOConfig, "flows.ppo", "ppo"),
         "reward-model": (RewardModelConfig, "flows.reward_model", "reward_model"),
         "preference-data": (PreferenceDatasetConfig, "flows.preference_data", "preference_data"),
         "dpo": (DPOConfig, "flows.dpo", "dpo"), "kto": (KTOConfig, "flows.kto", "kto"),
         "evaluate": (EvaluationConfig, "flows.evaluation", "evaluate")}
USAGE = (f"usage: rlhf {{{','.join(FLOWS)}}} [--config FILE] [--section.field VALUE ...] [--dry-run]\n"
         "       rlhf up|down [--host 127.0.0.1] [--prefect-port 4200] [--mlflow-port 5000]")


def read_config_file(path: str) -> dict:
    text = Path(path).read_text()
    values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of config fields, got {type(values).__name__}")
    return values


def parse_config(config_cls, args: list[str]):
    """(config, dry_run) from `--config FILE`, `--dry-run` and field flags."""
    args = list(args)
    file_values = {}
    if "--config" in args:
        index = args.index("--config")
        if index + 1 == len(args):
            raise ValueError("--config needs a file path")
        file_values = read_config_file(args[index + 1])
        del args[index:index + 2]
    dry_run = "--dry-run" in args
    args = [a for a in args if a != "--dry-run"]
    return CliApp.run(config_cls, cli_args=args, cli_exit_on_error=False, **file_values), dry_run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("up", "down"):
        from flows.service import main as service_main

        return service_main(argv)
    if not argv or argv[0] not in FLOWS:
        print(USAGE, file=sys.stderr)
        return 2
    config_cls, module, function = FLOWS[argv[0]]
    try:
        config, dry_run = parse_config(config_cls, argv[1:])
    except (ValidationError, ValueError, OSError, yaml.YAMLError) as e:
        print(f"invalid configuration: {e}", file=sys.stderr)
        return 2
    if dry_run:
        print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        return 0
    import importlib

    flow = getattr(importlib.import_module(module), function)
    try:
        output = flow(config)  # the final checkpoint's folder; for preference-data, the dataset's folder
    except Exception as error:
        # One line to find at the end of the log; the traceback is above it. At exit Prefect may keep trying to
        # deliver queued events for minutes if its server is gone: interrupting it then loses nothing of ours.
        print(f"rlhf {argv[0]} failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        raise
    print(f"output: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
