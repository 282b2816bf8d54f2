"""The chat template, applied one way by every stage: generation, scoring, DPO/KTO tokenisation, evaluation, SFT.

A prompt is a string (one user turn) or a list of messages `{"role", "content"}` (multi-turn, an optional leading
system turn). It is rendered by the tokenizer's template with the generation prompt (`<|im_start|>assistant\\n` for
ChatML) and tokenised without special tokens (the template writes them); `data.system_prompt` becomes the first
turn when the conversation has no system turn of its own. A tokenizer without a template encodes a single user turn
as plain text (as `tokenizer(text)` would) and refuses anything it cannot render.

SFT trains on the assistant turns only (`conversation_ids`): the template's `{% generation %}` markers say which
tokens those are when the template has them (transformers' `return_assistant_tokens_mask`); otherwise each
assistant turn's tokens are found by prefix matching: the conversation rendered up to the turn with the generation
prompt must be a token prefix of the conversation rendered through the turn, which must be a prefix of the whole
conversation, and the difference is the turn. Each turn's tokens end at its EOS, which is trained (the model must
learn to stop); what the template writes after it (ChatML's newline) is not.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from rlhf_core.conversation import Message, as_messages
from rlhf_core.errors import UserInputError

Prompt = str | Sequence[Message]
_GENERATION_MARKER = re.compile(r"{%-?\s*generation\s*-?%}")


def with_system_prompt(prompt: Prompt, system_prompt: str | None = None) -> list[Message]:
    """A prompt as messages (`conversation.as_messages`), with `system_prompt` as the first turn when it has no
    system turn of its own."""
    messages = as_messages(prompt)
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer, messages: list[Message], generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, prompt: Prompt, system_prompt: str | None = None) -> list[int]:
    """Token ids of one prompt, ready for the reply to follow."""
    messages = with_system_prompt(prompt, system_prompt)
    if has_template(tokenizer):
        return _render(tokenizer, messages, generation_prompt=True)
    if len(messages) == 1 and messages[0]["role"] == "user":
        return tokenizer(messages[0]["content"], add_special_tokens=True)["input_ids"]
    raise UserInputError("the tokenizer has no chat template, so only a single user turn without a system prompt "
                         f"can be rendered (got roles {[m['role'] for m in messages]}): use a model with a chat "
                         "template, or plain string prompts")


def chat_prompt_ids(tokenizer, prompts: Sequence[Prompt], system_prompt: str | None = None) -> list[list[int]]:
    """`prompt_ids` of each prompt (a string or a list of messages)."""
    return [prompt_ids(tokenizer, prompt, system_prompt) for prompt in prompts]


def _assistant_spans_by_prefix(tokenizer, messages: list[Message], full: list[int]) -> list[tuple[int, int]]:
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = (_render(tokenizer, messages[:k], True), _render(tokenizer, messages[:k + 1], False))
        if through[:len(before)] != before or full[:len(through)] != through:
            raise UserInputError(
                f"the chat template does not render assistant turn {k} as a continuation of the turns before it "
                "(token prefixes differ), so its tokens cannot be found by prefix matching: use a template with "
                "{% generation %} markers")
        spans.append((len(before), len(through)))
    return spans


def conversation_ids(tokenizer, messages: Sequence[Message],
                     system_prompt: str | None = None) -> tuple[list[int], list[bool]]:
    """(token ids of the whole conversation, per token: an assistant token SFT trains on). Raises UserInputError
    when the template cannot say which tokens are the assistant's, or there are none."""
    messages = with_system_prompt(messages, system_prompt)
    if not has_template(tokenizer):
        raise UserInputError("SFT on conversations needs a tokenizer with a chat template (this one has none): "
                             "use plain `text` rows instead")
    if _GENERATION_MARKER.search(tokenizer.chat_template):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
    else:
        ids = _render(tokenizer, messages, generation_prompt=False)
        mask = [False] * len(ids)
        for start, stop in _assistant_spans_by_prefix(tokenizer, messages, ids):
            for i in range(start, stop):
                mask[i] = True
                if ids[i] == tokenizer.eos_token_id:
                    break  # the template's own text after the turn's EOS is not the assistant's to learn
    if not any(mask):
        raise UserInputError("the conversation has no assistant tokens to train on")
    return ids, mask
