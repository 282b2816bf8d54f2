"""The data sections of the flows' configs: where the rows are (a file, a folder, a hub id with its split and
subset), which columns hold what, which public layout they follow (`format`, rlhf_core/formats.py), what repeated
rows do, and which rows are held out. docs/data.md shows every accepted shape."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rlhf_core.config.common import _Config

Duplicates = Literal["drop", "error", "keep"]
DUPLICATES_DESCRIPTION = (
    "rows equal to an earlier row in every field: drop (each kept once; the count and the first lines are printed), "
    "error (refuse the file), or keep (a repeated row weighs as often as it appears)")
SOURCES = (".jsonl, .json, .parquet, a datasets.save_to_disk folder, a folder of data files, or a hub id org/name "
           "from the local datasets cache (read offline); relative paths are looked up in the current directory, "
           "then in the project folder")
SPLIT_DESCRIPTION = ("split of a hub id or a folder of data files (datasets.load_dataset's split: train, test, "
                     "train[:1000] ...); a file has none")
SUBSET_DESCRIPTION = "configuration of a hub id that has several (datasets.load_dataset's name); None: its only one"
FORMAT_DESCRIPTION = ("auto: the shapes of docs/data.md (strings or lists of {role, content} messages); hh: "
                      "Anthropic HH transcripts \"\\n\\nHuman: ...\\n\\nAssistant: ...\"")
# rlhf_core.formats.formats_of(kind) for each kind; tests/test_formats.py checks they agree
PromptFormat = Literal["auto", "hh"]
PairFormat = Literal["auto", "hh"]
ConversationFormat = Literal["auto", "hh"]

SHIPPED_PAIRS = ("data/preferences/train/pairs.parquet", "data/preferences/eval/pairs.parquet")
SHIPPED_UNPAIRED = ("data/preferences/train/unpaired.parquet", "data/preferences/eval/unpaired.parquet")
SHIPPED_SFT = ("data/sft/arithmetic_train.jsonl", "data/sft/arithmetic_eval.jsonl")
SHIPPED_EVAL_NOTE = (" The shipped held-out file goes only with the shipped training file: with your own `path`, "
                     "leaving it holds out `eval_fraction` of your file instead, never unrelated data.")


def held_out_of_the_users_data(data: _Config, shipped: tuple[str, str]) -> None:
    """The user's own training file with the shipped held-out file would evaluate on unrelated data: hold out part
    of the user's file instead (eval_path None; `--dry-run` and the MLflow params show it)."""
    if data.path != shipped[0] and data.eval_path == shipped[1]:
        data.eval_path = None


class DataConfig(_Config):
    """The prompt file and its columns."""

    path: str = Field("data/arithmetic_train.jsonl", description="prompts: " + SOURCES)
    split: str = Field("train", min_length=1, description=SPLIT_DESCRIPTION)
    subset: str | None = Field(None, description=SUBSET_DESCRIPTION)
    format: PromptFormat = Field("auto", description=FORMAT_DESCRIPTION + (
        " (the prompt is the transcript without its last assistant turn: set prompt_column to chosen)"))
    prompt_column: str = Field("prompt", description="column holding the prompt: a string or a list of messages")
    extra_columns: list[str] = Field(["answer"], description="columns passed to reward functions (e.g. answer)")
    system_prompt: str | None = Field(None, description=(
        "system message prepended by the chat template to prompts that have no system turn of their own"))
    duplicates: Duplicates = Field("drop", description=DUPLICATES_DESCRIPTION + (
        "; drop by default: a prompt listed twice is only sampled twice as often"))


class PreferenceDataConfig(_Config):
    """The preference pairs (a file, and a held-out file or share) and their columns."""

    path: str = Field(SHIPPED_PAIRS[0], description="preference pairs: " + SOURCES)
    eval_path: str | None = Field(SHIPPED_PAIRS[1], description=(
        "held-out pairs; None holds out `eval_fraction` of `path` (seeded)." + SHIPPED_EVAL_NOTE))
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="share of `path` held out when eval_path is None")
    split: str = Field("train", min_length=1, description=SPLIT_DESCRIPTION)
    subset: str | None = Field(None, description=SUBSET_DESCRIPTION)
    format: PairFormat = Field("auto", description=FORMAT_DESCRIPTION + " in chosen and rejected")
    prompt_column: str = Field("prompt", description=(
        "column holding the prompt (a string or messages); not needed when chosen and rejected are whole "
        "conversations, whose shared leading turns are the prompt"))
    chosen_column: str = Field("chosen", description=(
        "column holding the preferred response: a string, one assistant message, or the whole conversation"))
    rejected_column: str = Field("rejected", description="column holding the other response, in the same shape")
    margin_column: str | None = Field(None, description="optional column of per-pair margins: the loss asks for "
                                                        "r_chosen - r_rejected > margin")
    duplicates: Duplicates = Field("drop", description=DUPLICATES_DESCRIPTION + (
        "; drop by default: scraped preference sets repeat pairs, and a repeat would weigh twice"))

    @model_validator(mode="after")
    def _held_out_of_the_users_data(self) -> "PreferenceDataConfig":
        held_out_of_the_users_data(self, SHIPPED_PAIRS)
        return self


class UnpairedDataConfig(_Config):
    """Unpaired examples for KTO: one (prompt, completion, label) per row, label True = desirable. The label must
    be a bool: 0/1 ints are rejected, because an int column is as likely a 1-5 rating as a flag (convert it)."""

    path: str = Field(SHIPPED_UNPAIRED[0], description="unpaired examples: " + SOURCES)
    eval_path: str | None = Field(SHIPPED_UNPAIRED[1], description=(
        "held-out examples; None holds out `eval_fraction` of `path`'s prompts (seeded), each with all its rows."
        + SHIPPED_EVAL_NOTE))
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="share of `path`'s distinct prompts held out "
                                                                 "when eval_path is None (at least 2)")
    split: str = Field("train", min_length=1, description=SPLIT_DESCRIPTION)
    subset: str | None = Field(None, description=SUBSET_DESCRIPTION)
    prompt_column: str = Field("prompt", description="column holding the prompt: a string or a list of messages")
    completion_column: str = Field("completion", description=(
        "column holding the response: a string or a list of one assistant message"))
    label_column: str = Field("label", description="column holding the bool label: true = desirable")
    duplicates: Duplicates = Field("drop", description=DUPLICATES_DESCRIPTION + (
        "; drop by default: a repeated (prompt, completion, label) is a copy, not a second vote"))

    @model_validator(mode="after")
    def _held_out_of_the_users_data(self) -> "UnpairedDataConfig":
        held_out_of_the_users_data(self, SHIPPED_UNPAIRED)
        return self


class SFTDataConfig(_Config):
    """SFT examples and their columns: per row a whole conversation (`messages_column`), else a prompt with its
    completion, else plain text (every token trained)."""

    path: str = Field(SHIPPED_SFT[0], description="SFT examples: " + SOURCES)
    eval_path: str | None = Field(SHIPPED_SFT[1], description=(
        "held-out examples; None holds out `eval_fraction` of `path` (seeded)." + SHIPPED_EVAL_NOTE))
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="share of `path` held out when eval_path is None")
    split: str = Field("train", min_length=1, description=SPLIT_DESCRIPTION)
    subset: str | None = Field(None, description=SUBSET_DESCRIPTION)
    format: ConversationFormat = Field("auto", description=FORMAT_DESCRIPTION + " in the messages column")
    messages_column: str = Field("messages", description=(
        "column holding a whole conversation (messages with at least one assistant turn; only the assistant's "
        "tokens are trained)"))
    prompt_column: str = Field("prompt", description="column holding the prompt of a prompt/completion row")
    completion_column: str = Field("completion", description=(
        "column holding the completion of a prompt/completion row (a string or one assistant message)"))
    text_column: str = Field("text", description="column holding plain text: no chat template, every token trained")
    system_prompt: str | None = Field(None, description=(
        "system message prepended by the chat template to conversations that have no system turn of their own"))
    duplicates: Duplicates = Field("drop", description=DUPLICATES_DESCRIPTION + (
        "; drop by default: a repeated example would weigh twice"))

    @model_validator(mode="after")
    def _held_out_of_the_users_data(self) -> "SFTDataConfig":
        held_out_of_the_users_data(self, SHIPPED_SFT)
        return self
