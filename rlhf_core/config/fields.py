"""Every field of a flow's config as one flat list: the dotted name config files and flags use (`optim.lr`), a
readable type, the flow's own default and the description. `rlhf <flow> --help` prints it and the docs'
configuration reference is generated from it, so both say what the UI form says.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass

from pydantic import BaseModel
from pydantic.fields import FieldInfo

_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "min length"),
           ("max_length", "max length"))


@dataclass(frozen=True)
class ConfigField:
    name: str  # dotted: "optim.lr"; "rewards[].weight" for each item of a list of sections
    type: str  # "float (> 0, <= 1)", "\"cpu\" | \"cuda\"", "section"
    default: str  # JSON of the flow's default ("" for a section)
    description: str
    is_section: bool = False


def union_members(annotation) -> list:
    """The alternatives of a type, Annotated[...] unwrapped: `int | None` -> [int, NoneType]."""
    if typing.get_origin(annotation) is typing.Annotated:
        return union_members(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in union_members(arg)]
    return [annotation]


def section_class(annotation) -> type[BaseModel] | None:
    """The config section a field holds (`X` or `X | None`), else None."""
    found = [m for m in union_members(annotation) if isinstance(m, type) and issubclass(m, BaseModel)]
    return found[0] if len(found) == 1 else None


def list_item_class(annotation) -> type[BaseModel] | None:
    """`X` for a `list[X]` field whose items are config sections (`rewards: list[RewardSpec]`)."""
    if typing.get_origin(annotation) is list:
        return section_class(typing.get_args(annotation)[0])
    return None


def bounds(metadata: list) -> list[str]:
    """">= 0", "< 1" ... from a field's metadata (annotated_types objects, or a FieldInfo inside Annotated)."""
    out = []
    for item in metadata:
        if isinstance(item, FieldInfo):
            out += bounds(item.metadata)
            continue
        for attribute, symbol in _BOUNDS:
            value = getattr(item, attribute, None)
            if value is not None:
                out.append(f"{symbol} {value:g}" if isinstance(value, float) else f"{symbol} {value}")
    return out


def type_text(annotation) -> str:
    """`int`, `str | None`, `"k1" | "k2"`, `list[RewardSpec]`, `int (>= 0) | "run-date"`."""
    origin = typing.get_origin(annotation)
    if annotation is type(None):
        return "None"
    if origin is typing.Annotated:
        inner, *metadata = typing.get_args(annotation)
        limits = bounds(metadata)
        return type_text(inner) + (f" ({', '.join(limits)})" if limits else "")
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_text(arg) for arg in typing.get_args(annotation))
    if origin is typing.Literal:
        return " | ".join(json.dumps(arg) for arg in typing.get_args(annotation))
    if origin in (list, tuple, dict, set):
        return f"{origin.__name__}[{', '.join(type_text(arg) for arg in typing.get_args(annotation))}]"
    return getattr(annotation, "__name__", str(annotation))


def first_line(doc: str | None) -> str:
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def _shown(value) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, list):
        value = [v.model_dump(mode="json", exclude_defaults=True) if isinstance(v, BaseModel) else v for v in value]
    return json.dumps(value)


def config_fields(cls: type[BaseModel], values: BaseModel | None = None, prefix: str = "",
                  note: str = "") -> list[ConfigField]:
    """Every field of `cls`, sections expanded. values: the flow's default instance of this section (its
    effective defaults: PPO's optim.epochs is 2, OptimConfig's 1), or None where the section is unset by default
    (`model.lora`): its fields then show the section class's own defaults, and `note` says when they apply."""
    fields = []
    for name, info in cls.model_fields.items():
        dotted = f"{prefix}{name}"
        section = section_class(info.annotation)
        if values is None:
            value = None if info.is_required() else info.get_default(call_default_factory=True)
        else:
            value = getattr(values, name)
        description = " ".join(filter(None, [note, info.description or (first_line(section.__doc__) if section
                                                                         else "")]))
        if section is not None and isinstance(value, BaseModel):
            fields.append(ConfigField(dotted, "section", "", description, is_section=True))
            fields += config_fields(section, value, f"{dotted}.", note)
            continue
        limits = bounds(info.metadata)
        fields.append(ConfigField(dotted, type_text(info.annotation) + (f" ({', '.join(limits)})" if limits else ""),
                                  _shown(value), description))
        if section is not None:  # an optional section, unset by default: its fields when it is set
            fields += config_fields(section, None, f"{dotted}.", f"(when {dotted} is set)")
        if (item := list_item_class(info.annotation)) is not None:
            fields += config_fields(item, None, f"{dotted}[].", f"(each item of {dotted})")
    return fields
