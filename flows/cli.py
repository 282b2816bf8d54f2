"""`rlhf <flow> [--config FILE] [--section.field VALUE ...] [--dry-run] [--debug]`, `rlhf up|down`, `rlhf --help`.

The config file gives the base values, flags override them (`--generation.group-size 4 --optim.lr 2e-5`), and the
flow's pydantic model validates the result (flows/arguments.py). Then, before the orchestration engine starts, the
flow's inputs are checked (flows/preflight.py: data files, models, reward functions, servers), so that a user's
mistake shows in seconds. A mistake of the user's (`UserInputError`) ends the command with one line naming the
file, row, field or flag, as the last line, and exit status 2; `--debug` or RLHF_DEBUG=1 adds the traceback.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import sys
import textwrap
import traceback
from typing import NamedTuple

import yaml
from pydantic import BaseModel

from flows.arguments import OPTIONS, ConfigInputError, parse_arguments
from rlhf_core.config import (DPOConfig, EvaluationConfig, GRPOConfig, KTOConfig, PPOConfig, PreferenceDatasetConfig,
                              RewardModelConfig)
from rlhf_core.config.fields import config_fields, first_line
from rlhf_core.config.pipeline import PipelineConfig
from rlhf_core.config.sft import SFTConfig
from rlhf_core.errors import UserInputError



class Flow(NamedTuple):
    config: type[BaseModel]
    module: str
    function: str
    summary: str


FLOWS = {
    "sft": Flow(SFTConfig, "flows.sft", "sft", "supervised fine-tuning on conversations (the assistant's tokens)"),
    "grpo": Flow(GRPOConfig, "flows.grpo", "grpo", "online RL: G samples per prompt, group-normalised rewards"),
    "ppo": Flow(PPOConfig, "flows.ppo", "ppo", "online RL: actor-critic, KL-penalised rewards, GAE"),
    "reward-model": Flow(RewardModelConfig, "flows.reward_model", "reward_model",
                         "train a Bradley-Terry reward model on preference pairs"),
    "preference-data": Flow(PreferenceDatasetConfig, "flows.preference_data", "preference_data",
                            "sample responses, judge them (rewards or a human), write pairs"),
    "dpo": Flow(DPOConfig, "flows.dpo", "dpo", "offline: DPO and its variants on preference pairs"),
    "kto": Flow(KTOConfig, "flows.kto", "kto", "offline: KTO on desirable/undesirable examples"),
    "evaluate": Flow(EvaluationConfig, "flows.evaluation", "evaluate",
                     "candidate vs champion on held-out prompts; promote the winner"),
    "pipeline": Flow(PipelineConfig, "flows.pipeline", "pipeline",
                     "SFT -> preference data -> reward model -> PPO/GRPO/DPO -> evaluation, one flow"),
}
SERVICE_COMMANDS = {"up": "start the Prefect server, a process worker and the MLflow server on this machine",
                    "down": "stop them"}
USAGE = (f"usage: rlhf {{{','.join(FLOWS)}}} [--config FILE] [--section.field VALUE ...] [--dry-run] [--debug]\n"
         "       rlhf up|down [--host 127.0.0.1] [--prefect-port 4200] [--mlflow-port 5000]\n"
         "       rlhf --help | rlhf <flow> --help")


def overview() -> str:
    """`rlhf --help`: the commands, one line each."""
    width = max(map(len, [*FLOWS, *SERVICE_COMMANDS])) + 2
    lines = [USAGE, "", "Post-train a causal LM with human/AI feedback; each command runs one Prefect flow, tracked "
             "in MLflow.", "", "flows:"]
    lines += [f"  {name:<{width}}{flow.summary}" for name, flow in FLOWS.items()]
    lines += ["", "service:"] + [f"  {name:<{width}}{text}" for name, text in SERVICE_COMMANDS.items()]
    lines += ["", "`rlhf <flow> --help` lists the flow's options and every config field with its default.",
              "Data and runs go to $RLHF_HOME (default ~/.rlhf); rerunning a command resumes it from its cache."]
    return "\n".join(lines)


def flow_help(name: str) -> str:
    """`rlhf <flow> --help`: the options, then every field as a flag with its type, default and description."""
    config_cls = FLOWS[name].config
    lines = [f"usage: rlhf {name} [--config FILE] [--section.field VALUE ...] [--dry-run] [--debug]", "",
             first_line(config_cls.__doc__), "", "options:"]
    lines += [f"  {option:<12}{text}" for option, text in OPTIONS.items()]
    lines += ["", "fields (`--optim.lr 2e-5`, or `optim: {lr: 2e-5}` in the --config file; values are YAML: "
              "`null`, `[a, b]`, `{k: v}`):"]
    for field in config_fields(config_cls, config_cls()):
        flag = "--" + field.name.replace("_", "-")
        if field.is_section:
            lines += ["", *textwrap.wrap(f"{flag}: {field.description}", 110, initial_indent="  ",
                                         subsequent_indent="    ")]
            continue
        lines.append(f"  {flag}  {field.type} = {field.default}")
        lines += textwrap.wrap(field.description, 110, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


class _WithoutUserErrorTraceback(logging.Filter):
    """A user's mistake is logged by the run as its message alone (its traceback shows the flow's code, not what
    to fix); every other exception keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], UserInputError):
            record.exc_info = record.exc_text = None
        return True


def run_flow(name: str, config):
    """Calls the flow in this process (Prefect starts a temporary server for it unless PREFECT_API_URL names one)."""
    import importlib

    flow = getattr(importlib.import_module(FLOWS[name].module), FLOWS[name].function)
    for logger in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(logger).addFilter(_WithoutUserErrorTraceback())
    return flow(config)  # the final checkpoint's folder; for preference-data, the dataset's folder


class _WithoutServerShutdownLine(logging.Filter):
    """Prefect's "Stopping temporary server" (logged at exit, after the command's result) would otherwise be the
    last line; the CLI prints its own result line as the last one instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Stopping temporary server")


def main(argv: list[str] | None = None) -> int:
    console = argv is None  # the console script, not a call from Python
    if console:  # `rlhf grpo --help | head` ends quietly, like any command
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        argv = sys.argv[1:]
    if argv and argv[0] in SERVICE_COMMANDS:
        from flows.service import main as service_main

        return service_main(argv)
    if argv[:1] in (["--help"], ["-h"], ["help"]):
        print(overview())
        return 0
    if not argv or argv[0] not in FLOWS:
        unknown = f"rlhf: unknown command {argv[0]!r}\n" if argv else ""
        print(f"{unknown}{USAGE}", file=sys.stderr)
        return 2
    name = argv[0]
    if console:
        logging.getLogger("prefect").addFilter(_WithoutServerShutdownLine())
    debug = "--debug" in argv or os.environ.get("RLHF_DEBUG", "") not in ("", "0")
    try:
        args = parse_arguments(FLOWS[name].config, argv[1:])
        if args.help:
            print(flow_help(name))
            return 0
        if os.getcwd() not in sys.path:  # reward modules in the current directory import, as with `python -m`
            sys.path.insert(0, os.getcwd())
        from flows.preflight import check_before_start

        with contextlib.redirect_stdout(sys.stdout if args.dry_run else io.StringIO()):
            check_before_start(args.config)  # its notices (rows dropped...) are the run's to print, once
        if args.dry_run:
            print(yaml.safe_dump(args.config.model_dump(mode="json"), sort_keys=False))
            return 0
        output = run_flow(name, args.config)
    except UserInputError as error:
        if debug:
            traceback.print_exc()
        kind = "invalid configuration: " if isinstance(error, ConfigInputError) else ""
        print(f"rlhf {name}: {kind}{error}", file=sys.stderr, flush=True)
        return 2
    except Exception as error:
        traceback.print_exc()  # not the user's to fix: the traceback is the report
        print(f"rlhf {name} failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        return 1
    print(f"output: {output}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
