"""Tests for rlhf_core.formats and the public layouts the data layer reads: Anthropic HH (`format: hh`), and under
`auto` UltraFeedback-binarized, TRL's conversational prompt/completion, UltraChat's messages and plain text. Each
fixture is a few rows in the data set's exact schema, written by the test (nothing downloaded)."""

import json
import typing

import pytest

from rlhf_core.config import DataConfig, PreferenceDataConfig, SFTDataConfig, UnpairedDataConfig
from rlhf_core.config.data import ConversationFormat, PairFormat, PromptFormat
from rlhf_core.data import DatasetError
from rlhf_core.formats import FORMATS, KINDS, data_format, formats_of, hh_messages
from tasks.data import read_conversations, read_prompts, split_examples, split_pairs


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_each_format_field_lists_the_formats_of_its_kind():
    assert set(FORMATS["auto"]) == set(KINDS)  # auto reads every kind
    assert list(typing.get_args(PromptFormat)) == formats_of("prompts")
    assert list(typing.get_args(PairFormat)) == formats_of("pairs")
    assert list(typing.get_args(ConversationFormat)) == formats_of("conversations")
    assert formats_of("examples") == ["auto"] and "format" not in UnpairedDataConfig.model_fields  # nothing to pick
    with pytest.raises(ValueError, match=r"format 'hh' does not convert examples; formats of examples: \['auto'\]"):
        data_format("hh", "examples")


HH_ROWS = [  # Anthropic/hh-rlhf: two transcripts that differ in the last assistant turn
    {"chosen": "\n\nHuman: What is 2 + 2?\n\nAssistant: 4.",
     "rejected": "\n\nHuman: What is 2 + 2?\n\nAssistant: Five, I think."},
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit.\n\nAssistant: An apple.",
     "rejected": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit.\n\nAssistant: No."},
    {"chosen": "\n\nHuman: Say hi.\n\nAssistant: Hi!", "rejected": "\n\nHuman: Say hi.\n\nAssistant: Hello!"},
]


def test_hh_transcript_to_messages():
    assert hh_messages(HH_ROWS[1]["chosen"]) == [user("Hi"), assistant("Hello! How can I help?"),
                                                 user("Name a fruit."), assistant("An apple.")]
    with pytest.raises(ValueError, match="not an HH transcript"):
        hh_messages("Just some text")


def test_hh_pairs_take_the_shared_turns_as_the_prompt(tmp_path):
    data = PreferenceDataConfig(path=write_jsonl(tmp_path / "hh.jsonl", HH_ROWS), eval_path=None, format="hh",
                                eval_fraction=0.3)
    train, held_out = split_pairs(data, seed=0)
    pairs = {row.chosen: row for row in [*train.itertuples(), *held_out.itertuples()]}
    assert set(pairs) == {"4.", "An apple.", "Hi!"}
    assert pairs["4."].prompt == "What is 2 + 2?" and pairs["4."].rejected == "Five, I think."
    assert pairs["An apple."].prompt_messages == [user("Hi"), assistant("Hello! How can I help?"),
                                                  user("Name a fruit.")]
    assert pairs["An apple."].prompt == "user: Hi\n\nassistant: Hello! How can I help?\n\nuser: Name a fruit."


def test_hh_pairs_that_differ_before_the_last_turn_name_the_line(tmp_path):
    rows = [*HH_ROWS, {"chosen": "\n\nHuman: A\n\nAssistant: B", "rejected": "\n\nHuman: C\n\nAssistant: D"}]
    data = PreferenceDataConfig(path=write_jsonl(tmp_path / "hh.jsonl", rows), eval_path=None, format="hh")
    with pytest.raises(DatasetError, match=r"hh\.jsonl line 4: chosen and rejected share no leading turns"):
        split_pairs(data, seed=0)
    rows[3] = {"chosen": "Human said hi", "rejected": HH_ROWS[0]["rejected"]}
    data = PreferenceDataConfig(path=write_jsonl(tmp_path / "hh.jsonl", rows), eval_path=None, format="hh")
    with pytest.raises(DatasetError, match=r"hh\.jsonl line 4: field 'chosen': not an HH transcript"):
        split_pairs(data, seed=0)


def test_hh_prompts_and_sft_conversations(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", HH_ROWS)
    prompts = read_prompts(DataConfig(path=path, format="hh", prompt_column="chosen", extra_columns=[]))
    assert prompts["prompt"].tolist()[0] == "What is 2 + 2?"  # the transcript without its last assistant turn
    assert prompts["prompt_messages"].tolist()[1][-1] == user("Name a fruit.")
    examples = read_conversations(SFTDataConfig(path=path, eval_path=None, format="hh", messages_column="chosen"))
    assert examples["messages"].tolist()[0] == [user("What is 2 + 2?"), assistant("4.")]


ULTRAFEEDBACK_ROWS = [  # HuggingFaceH4/ultrafeedback_binarized, split train_prefs (message keys: content, role)
    {"prompt": f"Question {i}?", "prompt_id": f"{i:064x}",
     "chosen": [{"content": f"Question {i}?", "role": "user"}, {"content": f"Good answer {i}.", "role": "assistant"}],
     "rejected": [{"content": f"Question {i}?", "role": "user"}, {"content": f"Bad answer {i}.", "role": "assistant"}],
     "messages": [{"content": f"Question {i}?", "role": "user"}, {"content": f"Good answer {i}.", "role": "assistant"}],
     "score_chosen": 8.5, "score_rejected": 3.0} for i in range(10)]


def test_ultrafeedback_binarized_loads_under_auto(tmp_path):
    path = write_jsonl(tmp_path / "uf.jsonl", ULTRAFEEDBACK_ROWS)
    train, held_out = split_pairs(PreferenceDataConfig(path=path, eval_path=None), seed=0)
    assert len(train) == 9 and len(held_out) == 1
    first = train.iloc[0]
    assert (first.prompt, first.chosen, first.rejected) == ("Question 0?", "Good answer 0.", "Bad answer 0.")
    assert first.prompt_messages == [user("Question 0?")]
    examples = read_conversations(SFTDataConfig(path=path, eval_path=None))  # its `messages` column, for SFT
    assert examples["messages"].tolist()[0] == [user("Question 0?"), assistant("Good answer 0.")]


def test_ultrafeedback_with_a_prompt_column_that_disagrees_names_the_line(tmp_path):
    rows = [dict(row) for row in ULTRAFEEDBACK_ROWS]
    rows[2]["prompt"] = "Another question?"
    with pytest.raises(DatasetError, match=r"uf\.jsonl line 3: the prompt column \('Another question\?'\) differs"):
        split_pairs(PreferenceDataConfig(path=write_jsonl(tmp_path / "uf.jsonl", rows), eval_path=None), seed=0)


def test_trl_conversational_prompt_completion_for_kto(tmp_path):
    rows = [{"prompt": [user(f"Review film {i}.")], "completion": [assistant("Great!" if i % 2 else "Dull.")],
             "label": bool(i % 2)} for i in range(12)]  # trl-lib/kto-mix-14k's layout
    train, held_out = split_examples(UnpairedDataConfig(path=write_jsonl(tmp_path / "kto.jsonl", rows),
                                                        eval_path=None, eval_fraction=0.2), seed=0)
    assert len(train) + len(held_out) == 12 and held_out["prompt"].nunique() == 2
    assert set(train["completion"]) == {"Great!", "Dull."} and train["prompt"].iloc[0].startswith("Review film")


def test_ultrachat_messages_prompt_completion_and_plain_text_rows_for_sft(tmp_path):
    rows = [{"prompt": "Hi", "prompt_id": "0", "messages": [user("Hi"), assistant("Hello"), user("Bye"),
                                                             assistant("Bye!")]},  # UltraChat: prompt + messages
            {"prompt": "2 + 2?", "completion": "4"},  # prompt/completion
            {"text": "Once upon a time there was a model."}]  # plain text: every token trained
    examples = read_conversations(SFTDataConfig(path=write_jsonl(tmp_path / "sft.jsonl", rows), eval_path=None))
    assert examples["messages"].tolist() == [rows[0]["messages"], [user("2 + 2?"), assistant("4")], []]
    assert examples["text"].tolist() == [None, None, "Once upon a time there was a model."]
    assert examples["example_id"].tolist() == [0, 1, 2]
