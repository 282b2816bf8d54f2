"""A flow's config from the command line: `--config FILE` gives base values, `--section.field VALUE` flags override
them, and the flow's pydantic model validates the result.

Errors are `ConfigInputError`s whose one-line message names where the bad value came from: the flag
(`--optim.lr: Input should be greater than 0`), or the config file and the field (`grpo.yaml: optim.lr: ...`), or
the file's line for YAML/JSON syntax and repeated keys.

A flag's value is read as YAML (numbers, `true`, `null`, `[a, b]`, `{k: v}`), except where the field takes text:
then it is the text as typed (`--tracking.experiment 2024` is the string "2024"; `null` is None where None is
allowed).
"""

from __future__ import annotations

import difflib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from rlhf_core.config.fields import section_class, union_members
from rlhf_core.errors import UserInputError
from tasks.paths import resolve_data_path

OPTIONS = {"--config": "FILE: a YAML or JSON file of config values (flags override them)",
           "--dry-run": "check the config, the data files, the models and the reward functions (no weights are "
                        "loaded, no run starts), then print the config",
           "--debug": "on an error, print the full traceback (also: RLHF_DEBUG=1)",
           "--help": "this list of options and fields"}


class ConfigInputError(UserInputError):
    """A config file or flag that cannot be read or does not validate."""


@dataclass
class Arguments:
    config: BaseModel | None = None
    config_file: Path | None = None
    dry_run: bool = False
    debug: bool = False
    help: bool = False
    flags: dict[str, str] = field(default_factory=dict)  # dotted field -> the flag as typed


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML with repeated keys refused: a second `lr:` in a file would otherwise silently win."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"repeated key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ConfigInputError(f"{source}{where}: {e.problem}") from None
    except yaml.YAMLError as e:
        raise ConfigInputError(f"{source}: {e}") from None


def _unique_json_object(pairs: list[tuple[str, Any]]) -> dict:
    keys = [key for key, _ in pairs]
    if repeated := sorted({key for key in keys if keys.count(key) > 1}):
        raise ConfigInputError(f"repeated key {repeated[0]!r}")
    return dict(pairs)


def read_config_file(name: str) -> tuple[Path, dict]:
    """(resolved path, values) of a YAML or JSON config file; relative names are looked up like data files: in
    the current directory, then in the project folder."""
    path = resolve_data_path(name)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigInputError(f"--config {name}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    if path.suffix.lower() == ".json":
        try:
            values = json.loads(text, object_pairs_hook=_unique_json_object)
        except json.JSONDecodeError as e:
            raise ConfigInputError(f"{path} line {e.lineno} column {e.colno}: {e.msg}") from None
        except ConfigInputError as e:
            raise ConfigInputError(f"{path}: {e}") from None
    else:
        values = load_yaml(text, str(path))
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigInputError(f"{path}: expected a mapping of config fields, got {type(values).__name__}")
    return path, values


def field_annotation(config_cls: type[BaseModel], dotted: str):
    """The type of the field at `dotted` ("optim.lr"); ConfigInputError with the closest names if there is none."""
    cls, annotation = config_cls, None
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        if cls is None or part not in cls.model_fields:
            known = sorted(_dotted_names(config_cls))
            close = difflib.get_close_matches(dotted, known, n=3, cutoff=0.75)
            hint = f"; did you mean {', '.join('--' + c.replace('_', '-') for c in close)}?" if close else ""
            raise ConfigInputError(f"--{dotted.replace('_', '-')}: no such field{hint} (`--help` lists them)")
        annotation = cls.model_fields[part].annotation
        cls = section_class(annotation) if depth < len(parts) - 1 else None
    return annotation


def _dotted_names(cls: type[BaseModel], prefix: str = "") -> list[str]:
    names = []
    for name, info in cls.model_fields.items():
        names.append(prefix + name)
        if (section := section_class(info.annotation)) is not None:
            names += _dotted_names(section, f"{prefix}{name}.")
    return names


def flag_value(raw: str, annotation, flag: str) -> Any:
    """The value of `--flag raw` for a field of type `annotation`."""
    members = union_members(annotation)
    if raw in ("null", "~"):
        return None
    takes_text = str in members or any(typing.get_origin(m) is typing.Literal and raw in typing.get_args(m)
                                       for m in members)
    return raw if takes_text else load_yaml(raw, flag)


def _set(values: dict, dotted: str, value: Any) -> None:
    *sections, name = dotted.split(".")
    for section in sections:
        inner = values.get(section)
        values[section] = inner = dict(inner) if isinstance(inner, dict) else {}
        values = inner
    values[name] = value


def _field_name(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def parse_arguments(config_cls: type[BaseModel], argv: list[str]) -> Arguments:
    """The validated config (None with --help) and the options, from `argv` (the words after the flow's name)."""
    args, flag_values, config_name = Arguments(), {}, None
    i = 0
    while i < len(argv):
        word = argv[i]
        name, has_value, inline = word.partition("=")
        if word in ("--help", "-h"):
            args.help = True
        elif word == "--dry-run":
            args.dry_run = True
        elif word == "--debug":
            args.debug = True
        elif not word.startswith("--") or word == "--":
            raise ConfigInputError(f"{word!r}: expected an option such as --config FILE or --optim.lr 1e-5")
        else:
            dotted = _field_name(name)
            annotation = None if dotted == "config" else field_annotation(config_cls, dotted)
            if has_value:
                raw = inline
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                i += 1
                raw = argv[i]
            elif annotation is bool:
                raw = "true"  # `--tracking.log-rollouts` alone switches it on
            else:
                raise ConfigInputError(f"{name} needs a value" + (" (a file path)" if dotted == "config" else ""))
            if dotted == "config":
                config_name = raw
            else:
                flag_values[dotted] = flag_value(raw, annotation, name)
                args.flags[dotted] = name
        i += 1
    if args.help:
        return args
    file_values = {}
    if config_name is not None:
        args.config_file, file_values = read_config_file(config_name)
    values = json.loads(json.dumps(file_values))  # a deep copy: flags are laid over it
    for dotted, value in flag_values.items():
        _set(values, dotted, value)
    try:
        args.config = config_cls.model_validate(values)
    except ValidationError as e:
        raise ConfigInputError(validation_message(e, args)) from None
    return args


def validation_message(error: ValidationError, args: Arguments) -> str:
    """One line: each problem with the flag or the file (and field) its value came from."""
    problems = []
    for item in error.errors():
        dotted = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        flag = next((flag for name, flag in args.flags.items() if dotted == name or dotted.startswith(name + ".")),
                    None)
        if "input" in item and item["type"] not in ("missing", "extra_forbidden") and not isinstance(
                item["input"], (dict, list)):
            message += f" (got {item['input']!r:.60})"
        if flag:
            inner = dotted.removeprefix(flag.removeprefix("--").replace("-", "_")).lstrip(".")
            problems.append(f"{flag}{f' ({inner})' if inner else ''}: {message}")
        else:
            where = ": ".join(str(part) for part in (args.config_file, dotted) if part)
            problems.append(f"{where}: {message}" if where else message)
    return "; ".join(problems)
