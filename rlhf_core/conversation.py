"""Chat-shaped data in the Hugging Face conventions, brought to one canonical form.

A message is `{"role": "system" | "user" | "assistant", "content": str}`; a conversation is a list of them with at
most one system turn, the first. A prompt is a string (one user turn) or a conversation that ends with a user
turn; a reply is a string or a list holding one assistant message. A preference pair comes in two shapes (TRL's
"explicit" and "implicit prompt"): a prompt with two replies, or two whole conversations whose shared leading turns
are the prompt (UltraFeedback-binarized, Anthropic HH once `rlhf_core.formats` has parsed it), each then ending in
exactly one assistant message of its own.

Every function here is pure: it returns the canonical value or raises ValueError saying what is wrong with the
value, and rlhf_core/data.py prefixes the file, the line or row and the field. Values read back from Parquet are
numpy arrays of dicts, not lists: `as_messages` takes either.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

ROLES = ("system", "user", "assistant")
Message = dict[str, str]


def _got(value: Any) -> str:
    return f"got {type(value).__name__} {value!r:.80}"  # the form rlhf_core.data uses for a wrong type


def _is_list(value: Any) -> bool:
    """A list of messages as JSON, Python or pandas gives it (a list column comes back from Parquet as arrays)."""
    return isinstance(value, (list, tuple, np.ndarray))


def as_messages(value: str | Sequence[Mapping[str, Any]]) -> list[Message]:
    """A string as one user turn; messages (a list, or the numpy array pandas reads back from Parquet) as plain
    `{"role", "content"}` dicts, other keys dropped. Does not validate: see `conversation`."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return [{"role": m["role"], "content": m["content"]} for m in value]


def prompt_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The prompt as text, for reward functions, reward models and people: the user's content when there is one
    user turn, else each turn as "<role>: <content>", joined by blank lines. System turns are left out (a reward
    function judges the question, not the instructions the policy was given)."""
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) == 1 and turns[0]["role"] == "user":
        return turns[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in turns)


def conversation_key(messages: Sequence[Mapping[str, Any]]) -> str:
    """One string per distinct conversation, for grouping and equality (held-out prompts, distinct prompts)."""
    return json.dumps([[m["role"], m["content"]] for m in as_messages(messages)], ensure_ascii=False)


def conversation(value: Any) -> list[Message]:
    """`value` as a valid conversation: a non-empty list of messages with known roles and string contents, a
    system turn only first. Raises ValueError naming the first bad message (0-based)."""
    if not _is_list(value):
        raise ValueError(f"expected a list of messages {{role, content}}, {_got(value)}")
    if len(value) == 0:
        raise ValueError("an empty conversation (a list of no messages)")
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {i}: expected an object {{role, content}}, {_got(message)}")
        role, content = message.get("role"), message.get("content")
        if role is None:
            raise ValueError(f"message {i}: no 'role' (keys: {sorted(message)})")
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r}; roles: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"message {i} ({role}): content must be a string, {_got(content)}")
        if role == "system" and i > 0:
            raise ValueError(f"message {i}: a system turn after the first message (only a leading one is allowed)")
    return as_messages(value)


def prompt_messages(value: Any) -> list[Message]:
    """A prompt (a non-empty string, or a conversation ending with a user turn) as messages."""
    if isinstance(value, str):
        if not value or value.isspace():  # not value.strip(): no copy of each of a million prompts
            raise ValueError(f"expected a non-empty string, {_got(value)}")
        return [{"role": "user", "content": value}]
    if _is_list(value):
        messages = conversation(value)
        if messages[-1]["role"] != "user":
            raise ValueError(f"the last turn is a{'n' if messages[-1]['role'] == 'assistant' else ''} "
                             f"{messages[-1]['role']} turn: a prompt ends with the user's turn (the reply is the "
                             "policy's to write)")
        if not messages[-1]["content"].strip():
            raise ValueError(f"message {len(messages) - 1} (user): empty content")
        return messages
    raise ValueError(f"expected str, {_got(value)}; a prompt is a string or a list of messages {{role, content}}")


def reply_messages(value: Any) -> list[Message]:
    """A reply, or a whole conversation ending in one (the implicit-prompt shape), as messages whose last is the
    assistant's non-empty reply. A string is one assistant message."""
    if isinstance(value, str):
        if not value or value.isspace():
            raise ValueError(f"expected a non-empty string, {_got(value)}")
        return [{"role": "assistant", "content": value}]
    if not _is_list(value):
        raise ValueError(f"expected str, {_got(value)}; a reply is a string or a list of messages "
                         "{role, content} ending with the assistant's")
    messages = conversation(value)
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"the last turn is a {messages[-1]['role']} turn, not the assistant's reply")
    if not messages[-1]["content"].strip():
        raise ValueError(f"message {len(messages) - 1} (assistant): an empty reply")
    return messages


def reply_text(value: Any) -> str:
    """A single reply (a string, or a list of one assistant message) as its text."""
    messages = reply_messages(value)
    if len(messages) != 1:
        raise ValueError(f"expected one assistant message, got {len(messages)} messages (roles "
                         f"{[m['role'] for m in messages]}); a whole conversation goes in `messages` (SFT) or in "
                         "both chosen and rejected (pairs)")
    return messages[0]["content"]


def split_shared_prompt(chosen: Sequence[Message], rejected: Sequence[Message]) -> tuple[list[Message], str, str]:
    """(prompt messages, chosen reply, rejected reply) of two whole conversations: their shared leading turns are
    the prompt, and after it each must be exactly one assistant message. Identical conversations give a tie (the
    same reply twice), which the caller drops."""
    chosen, rejected = as_messages(chosen), as_messages(rejected)
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise ValueError("chosen and rejected share no leading turns, so there is no prompt: give a prompt "
                         "column with single replies, or two conversations that begin with the same turns")
    for side, messages in (("chosen", chosen), ("rejected", rejected)):
        if len(messages) - shared != 1:
            raise ValueError(f"chosen and rejected differ at turn {shared} and {side} goes on for "
                             f"{len(messages) - shared} turns after it: the two conversations may differ only in "
                             "their last assistant turn")
    prompt = chosen[:shared]
    if prompt[-1]["role"] != "user":
        raise ValueError(f"the shared turns end with a{'n' if prompt[-1]['role'] == 'assistant' else ''} "
                         f"{prompt[-1]['role']} turn (turn {shared - 1}), not the user's: a prompt ends with the "
                         "user's turn")
    return prompt, chosen[-1]["content"], rejected[-1]["content"]


def last_user_content(messages: Sequence[Message]) -> str:
    return next(m["content"] for m in reversed(as_messages(messages)) if m["role"] == "user")


def preference_pair(prompt: Any, chosen: Any, rejected: Any) -> tuple[list[Message], str, str]:
    """(prompt messages, chosen text, rejected text) of a pair in either shape. Explicit: `prompt` with two single
    replies. Implicit: two whole conversations (`split_shared_prompt`); a prompt column given as well (UltraFeedback
    has one) must agree with the shared prompt's last user turn. Values are validated replies (`reply_messages`)
    and a validated prompt or None."""
    chosen, rejected = reply_messages(chosen), reply_messages(rejected)
    if len(chosen) == 1 and len(rejected) == 1:
        if prompt is None:
            raise ValueError("no prompt: chosen and rejected are single replies, so the pair needs a prompt "
                             "column (or chosen and rejected as whole conversations that share their prompt)")
        return prompt_messages(prompt), chosen[0]["content"], rejected[0]["content"]
    shared, chosen_text, rejected_text = split_shared_prompt(chosen, rejected)
    if prompt is not None and last_user_content(prompt_messages(prompt)).strip() != \
            last_user_content(shared).strip():
        raise ValueError(f"the prompt column ({last_user_content(prompt_messages(prompt))!r:.60}) differs from the "
                         f"last user turn chosen and rejected share ({last_user_content(shared)!r:.60})")
    return shared, chosen_text, rejected_text


def sft_messages(value: Any) -> list[Message]:
    """A whole SFT conversation: valid (`conversation`) with at least one assistant turn to train on."""
    messages = conversation(value)
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"no assistant turn to train on (roles {[m['role'] for m in messages]})")
    return messages
