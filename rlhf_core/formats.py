"""Converters from public data sets' layouts to the shapes rlhf_core.conversation reads, by name (`data.format`).

`auto` converts nothing: it reads the shapes themselves (plain strings, lists of messages, explicit or
implicit-prompt preference pairs, prompt + completion, a `messages` conversation, plain `text`), which is what
UltraFeedback-binarized, TRL's preference, unpaired and SFT sets and plain prompt files hold. A named format
rewrites each row first, on its canonical fields (after the column mapping), and the usual checks then run on the
result:

  hh   Anthropic HH-RLHF: a transcript string "\\n\\nHuman: ...\\n\\nAssistant: ...". Pairs: `chosen` and
       `rejected` become conversations, whose shared turns are the prompt (the implicit-prompt rule). Prompts:
       the transcript without its last assistant turn (point `prompt_column` at `chosen`). SFT: the `messages`
       field holds a transcript.

Each format declares, per kind of data, the converter and the fields it reads raw (their usual type check is
replaced by the converter's); the configs' `format` fields list exactly the formats of their kind (a test checks
it).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlhf_core.conversation import Message, prompt_messages, reply_messages, sft_messages

KINDS = ("prompts", "pairs", "examples", "conversations")  # read_prompts, split_pairs, split_examples, SFT


@dataclass(frozen=True)
class Format:
    """How a format rewrites a row of one kind: `convert(fields)` returns the fields it changes (ValueError naming
    the field when one cannot be read), None: nothing to convert; `raw`: the fields it reads, which are checked
    only for being present (the converter checks the rest)."""

    convert: Callable[[dict[str, Any]], dict[str, Any]] | None
    raw: tuple[str, ...] = ()


_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def hh_messages(transcript: Any) -> list[Message]:
    """"\\n\\nHuman: Hi\\n\\nAssistant: Hello" -> [user "Hi", assistant "Hello"] (each turn's text stripped)."""
    if not isinstance(transcript, str):
        raise ValueError(f"expected an HH transcript string, got {type(transcript).__name__} {transcript!r:.80}")
    pieces = _HH_TURN.split(transcript.lstrip())
    if pieces[0].strip() or len(pieces) < 3:
        raise ValueError(f"not an HH transcript (\"\\n\\nHuman: ...\\n\\nAssistant: ...\"): {transcript!r:.80}")
    return [{"role": _HH_ROLES[role], "content": text.strip()} for role, text in zip(pieces[1::2], pieces[2::2])]


def _field(name: str, parse: Callable[[Any], Any], fields: dict[str, Any]) -> Any:
    try:
        return parse(fields[name])
    except ValueError as e:
        raise ValueError(f"field {name!r}: {e}") from None


def _hh_pair(fields: dict[str, Any]) -> dict[str, Any]:
    return {side: _field(side, lambda text: reply_messages(hh_messages(text)), fields)
            for side in ("chosen", "rejected")}


def _hh_prompt(fields: dict[str, Any]) -> dict[str, Any]:
    def prompt(text: Any) -> list[Message]:
        messages = hh_messages(text)
        return prompt_messages(messages[:-1] if messages[-1]["role"] == "assistant" else messages)

    return {"prompt": _field("prompt", prompt, fields)}


def _hh_conversation(fields: dict[str, Any]) -> dict[str, Any]:
    if fields.get("messages") is None:  # a prompt/completion or text row of the same file
        return {}
    return {"messages": _field("messages", lambda text: sft_messages(hh_messages(text)), fields)}


FORMATS: dict[str, dict[str, Format]] = {
    "auto": {kind: Format(None) for kind in KINDS},
    "hh": {"prompts": Format(_hh_prompt, ("prompt",)), "pairs": Format(_hh_pair, ("chosen", "rejected")),
           "conversations": Format(_hh_conversation, ("messages",))},
}


def formats_of(kind: str) -> list[str]:
    """The formats that convert `kind` (the values of that kind's config field `format`)."""
    return [name for name, kinds in FORMATS.items() if kind in kinds]


def data_format(name: str, kind: str) -> Format:
    """FORMATS[name][kind], or ValueError naming the formats of that kind."""
    if kind not in FORMATS.get(name, {}):
        raise ValueError(f"format {name!r} does not convert {kind}; formats of {kind}: {formats_of(kind)}")
    return FORMATS[name][kind]
