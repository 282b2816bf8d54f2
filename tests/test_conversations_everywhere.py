"""One multi-turn conversation with a system turn, given as the prompt of every kind of data: every stage renders
it to the same prompt tokens (generation and so scoring and evaluation, the checks before a run, DPO's and KTO's
tokenisation, SFT's context before the reply), and reward functions get its messages beside its text."""

from __future__ import annotations

import json
from pathlib import Path

from rlhf_core.chat import prompt_ids
from rlhf_core.config import (DataConfig, GenerationConfig, PreferenceDataConfig, RuntimeConfig, SFTDataConfig,
                              UnpairedDataConfig)
from rlhf_core.models import load_tokenizer
from tasks.data import chat_prompts, read_prompts, split_conversations, split_examples, split_pairs
from tasks.dpo import tokenize_pairs
from tasks.kto import tokenize_unpaired
from tasks.refs import CheckpointRef, publish
from tasks.rollouts import rollout_frame
from tasks.scoring import RewardSources, reward_values
from tasks.sft import tokenize_conversations

PROMPT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."},
          {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Another one?"}]
OTHER = [{"role": "user", "content": "Name a fruit."}]


def write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def seen_messages(prompts, responses, **columns):
    """A reward function that records what it is given."""
    seen_messages.calls.append(columns["prompt_messages"])
    return [0.0] * len(responses)


def test_one_conversation_has_the_same_prompt_tokens_in_every_stage(tmp_path, rlhf_home, tiny_model_dir,
                                                                     monkeypatch):
    tokenizer, _ = load_tokenizer(tiny_model_dir)
    expected = prompt_ids(tokenizer, PROMPT)
    assert tokenizer.decode(expected).endswith("<|im_start|>user\nAnother one?<|im_end|>\n<|im_start|>assistant\n")
    model = CheckpointRef(path=str(tiny_model_dir), sha256="tiny")

    data = DataConfig(path=write(tmp_path / "prompts.jsonl", [{"prompt": PROMPT}, {"prompt": OTHER}]),
                      extra_columns=[])
    prompts = read_prompts(data)
    assert prompts["prompt"].tolist() == ["user: Name a colour.\n\nassistant: Red.\n\nuser: Another one?",
                                          "Name a fruit."]
    table = publish(prompts, "prompts")
    assert prompt_ids(tokenizer, chat_prompts(prompts)[0]) == expected  # the checks before a run (preflight)
    rollouts = rollout_frame(model, table, GenerationConfig(group_size=2, max_new_tokens=4), RuntimeConfig(),
                             None, seed=0, iteration=0)
    assert rollouts["prompt_ids"][0] == expected == rollouts["prompt_ids"][1]  # generation, scoring, evaluation

    seen_messages.calls = []
    monkeypatch.setattr("rlhf_core.rewards.REWARD_FUNCTIONS", {"seen_messages": seen_messages})
    reward_values(rollouts, RewardSources(specs=[{"function": "seen_messages"}], fingerprints=[None], models=[None]),
                  RuntimeConfig(), batch_size=4)
    assert seen_messages.calls[0][0] == PROMPT and seen_messages.calls[0][2] == OTHER

    pairs = PreferenceDataConfig(path=write(tmp_path / "pairs.jsonl", [
        {"prompt": PROMPT, "chosen": "Blue.", "rejected": "I like colours."},
        {"prompt": OTHER, "chosen": "A pear.", "rejected": "No."}]))
    pairs = pairs.model_copy(update={"eval_path": pairs.path})
    train, _ = split_pairs(pairs, seed=0)
    both = publish(train, "preferences")
    tokens = tokenize_pairs.fn(model, both, max_length=None, max_prompt_length=256).read()
    assert tokens.set_index("prompt")["prompt_ids"][prompts["prompt"][0]].tolist() == expected  # DPO

    unpaired = UnpairedDataConfig(path=write(tmp_path / "unpaired.jsonl", [
        {"prompt": PROMPT, "completion": "Blue.", "label": True},
        {"prompt": OTHER, "completion": "No.", "label": False},
        {"prompt": PROMPT, "completion": "Never.", "label": False},
        {"prompt": OTHER, "completion": "A pear.", "label": True}]))
    unpaired = unpaired.model_copy(update={"eval_path": unpaired.path})  # KTO holds out whole prompts: 2 are few
    train, _ = split_examples(unpaired, seed=0)
    examples = publish(train, "unpaired")
    kto_tokens = tokenize_unpaired.fn(model, examples, max_length=None, max_prompt_length=256, seed=0).read()
    rows = kto_tokens[kto_tokens["prompt"] == prompts["prompt"][0]]
    assert all(ids.tolist() == expected for ids in rows["prompt_ids"])  # KTO

    sft_data = SFTDataConfig(path=write(tmp_path / "sft.jsonl", [
        {"messages": [*PROMPT, {"role": "assistant", "content": "Blue."}]},
        {"messages": [*OTHER, {"role": "assistant", "content": "A pear."}]}]))
    sft_data = sft_data.model_copy(update={"eval_path": sft_data.path})
    train, _ = split_conversations(sft_data, seed=0)
    conversations = publish(train, "conversations")
    sft_tokens = tokenize_conversations.fn(model, conversations, max_length=None, system_prompt=None).read()
    # SFT trains both assistant turns; the context before the last one is the prompt's rendering
    row = next(i for i, messages in enumerate(sft_tokens["messages"]) if len(messages) == 5)
    whole = list(sft_tokens["prompt_ids"][row]) + list(sft_tokens["response_ids"][row])
    mask = list(sft_tokens["loss_mask"][row])
    last_turn = max(i for i, trained in enumerate(mask) if trained and (i == 0 or not mask[i - 1]))
    assert whole[:len(sft_tokens["prompt_ids"][row]) + last_turn] == expected  # SFT
    assert tokenizer.decode([t for t, m in zip(sft_tokens["response_ids"][row], mask) if m]) == \
        "Red.<|im_end|>Blue.<|im_end|>"
