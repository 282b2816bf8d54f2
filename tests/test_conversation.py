"""Tests for rlhf_core.conversation: the canonical prompt text, validation of messages, and the two shapes of a
preference pair (explicit prompt; implicit prompt = the shared leading turns)."""

import numpy as np
import pytest

from rlhf_core.conversation import (as_messages, conversation, conversation_key, preference_pair, prompt_messages,
                                    prompt_text, reply_messages, reply_text, sft_messages, split_shared_prompt)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "Be brief."}


def test_as_messages_takes_a_string_a_list_or_the_array_parquet_gives_back():
    assert as_messages("hi") == [user("hi")]
    assert as_messages([{"role": "user", "content": "hi", "name": "x"}]) == [user("hi")]  # other keys dropped
    assert as_messages(np.array([user("hi"), assistant("yo")], dtype=object)) == [user("hi"), assistant("yo")]


def test_prompt_text_is_the_single_user_turn_without_the_system_turn():
    assert prompt_text(as_messages("What is 2 + 2?")) == "What is 2 + 2?"
    assert prompt_text([SYSTEM, user("What is 2 + 2?")]) == "What is 2 + 2?"


def test_prompt_text_of_several_turns_names_each_role():
    turns = [SYSTEM, user("Hi"), assistant("Hello"), user("Add 2 and 2")]
    assert prompt_text(turns) == "user: Hi\n\nassistant: Hello\n\nuser: Add 2 and 2"


def test_conversation_key_tells_system_prompts_apart():
    assert conversation_key([user("a")]) == conversation_key(as_messages("a"))
    assert conversation_key([SYSTEM, user("a")]) != conversation_key([user("a")])


@pytest.mark.parametrize(("value", "message"), [
    ([{"content": "hi"}], "message 0: no 'role'"),
    ([user("hi"), {"role": "bot", "content": "x"}], "message 1: unknown role 'bot'; roles: system, user, assistant"),
    ([{"role": "user"}], r"message 0 \(user\): content must be a string, got NoneType None"),
    ([{"role": "user", "content": 5}], r"message 0 \(user\): content must be a string, got int 5"),
    ([], "an empty conversation"),
    ([user("a"), SYSTEM], "message 1: a system turn after the first message"),
    (["hi"], r"message 0: expected an object \{role, content\}, got str 'hi'"),
    ({"role": "user", "content": "hi"}, "expected a list of messages"),
])
def test_bad_conversations_name_the_message(value, message):
    with pytest.raises(ValueError, match=message):
        conversation(value)


def test_prompt_messages_accepts_a_string_or_messages_ending_with_the_user():
    assert prompt_messages("hi") == [user("hi")]
    assert prompt_messages([SYSTEM, user("a"), assistant("b"), user("c")]) == [SYSTEM, user("a"), assistant("b"),
                                                                               user("c")]


@pytest.mark.parametrize(("value", "message"), [
    ([user("a"), assistant("b")], "the last turn is an assistant turn: a prompt ends with the user's turn"),
    ([SYSTEM], "the last turn is a system turn"),
    ("  \n", "expected a non-empty string, got str"),
    (5, r"expected str, got int 5; a prompt is a string or a list of messages"),
    ({"role": "user", "content": "a"}, "expected str, got dict"),
])
def test_bad_prompts(value, message):
    with pytest.raises(ValueError, match=message):
        prompt_messages(value)


def test_replies():
    assert reply_text("yes") == "yes" and reply_text([assistant("yes")]) == "yes"
    assert reply_messages([user("q"), assistant("a")]) == [user("q"), assistant("a")]
    with pytest.raises(ValueError, match="expected one assistant message, got 2 messages"):
        reply_text([user("q"), assistant("a")])
    with pytest.raises(ValueError, match="the last turn is a user turn, not the assistant's reply"):
        reply_messages([user("q")])
    with pytest.raises(ValueError, match=r"message 0 \(assistant\): an empty reply"):
        reply_messages([assistant(" ")])


def test_shared_prompt_of_two_conversations():
    chosen = [SYSTEM, user("a"), assistant("b"), user("c"), assistant("good")]
    rejected = [SYSTEM, user("a"), assistant("b"), user("c"), assistant("bad")]
    assert split_shared_prompt(chosen, rejected) == ([SYSTEM, user("a"), assistant("b"), user("c")], "good", "bad")


def test_identical_conversations_are_a_tie_not_an_error():
    same = [user("a"), assistant("b")]
    assert split_shared_prompt(same, same) == ([user("a")], "b", "b")  # without_ties drops it with a count


@pytest.mark.parametrize(("chosen", "rejected", "message"), [
    ([user("a"), assistant("x")], [user("b"), assistant("y")], "share no leading turns"),
    ([user("a"), assistant("x"), user("c"), assistant("y")], [user("a"), assistant("z"), user("c"), assistant("y")],
     "differ at turn 1 and chosen goes on for 3 turns after it"),
    ([user("a"), assistant("x")], [user("a"), assistant("x"), user("more"), assistant("y")],
     "rejected goes on for 3 turns"),
])
def test_conversations_that_differ_before_their_last_turn(chosen, rejected, message):
    with pytest.raises(ValueError, match=message):
        split_shared_prompt(chosen, rejected)


def test_explicit_pair():
    assert preference_pair("q", "good", [assistant("bad")]) == ([user("q")], "good", "bad")
    with pytest.raises(ValueError, match="no prompt: chosen and rejected are single replies"):
        preference_pair(None, "good", "bad")


def test_implicit_pair_with_an_agreeing_or_a_disagreeing_prompt_column():
    chosen, rejected = [user("q"), assistant("good")], [user("q"), assistant("bad")]
    assert preference_pair(None, chosen, rejected) == ([user("q")], "good", "bad")
    assert preference_pair("q", chosen, rejected) == ([user("q")], "good", "bad")  # UltraFeedback's prompt column
    with_system = [SYSTEM, *chosen], [SYSTEM, *rejected]
    assert preference_pair("q", *with_system) == ([SYSTEM, user("q")], "good", "bad")  # the shared prefix wins
    with pytest.raises(ValueError, match=r"the prompt column \('other'\) differs from the last user turn chosen and "
                                         r"rejected share \('q'\)"):
        preference_pair("other", chosen, rejected)


def test_sft_messages_need_an_assistant_turn():
    assert sft_messages([user("a"), assistant("b"), user("c")]) == [user("a"), assistant("b"), user("c")]
    with pytest.raises(ValueError, match=r"no assistant turn to train on \(roles \['system', 'user'\]\)"):
        sft_messages([SYSTEM, user("a")])
