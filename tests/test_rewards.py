"""Tests for rlhf_core.rewards: the built-ins on hand-written responses, the weighted sum, import-path
resolution and the checks that name a broken reward function and its first bad row."""

import sys
import textwrap
import uuid

import numpy as np
import pytest

from rlhf_core.config import RewardSpec
from rlhf_core.errors import UserInputError
from rlhf_core.rewards import (REWARD_FUNCTIONS, RewardError, check_reward_columns, compute_rewards,
                               resolve_reward_function, reward_source_fingerprint)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Write a module with a unique name under tmp_path (on sys.path) and return its name."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # a rewrite must be re-read from source
    names = []

    def write(source: str, name: str | None = None) -> str:
        name = name or f"user_rewards_{uuid.uuid4().hex}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        sys.modules.pop(name, None)
        names.append(name)
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)


def rewards_of(name, responses, **columns):
    return list(REWARD_FUNCTIONS[name](["q"] * len(responses), responses, **columns))


def test_builtins_are_registered():
    assert set(REWARD_FUNCTIONS) == {"arithmetic_answer", "answer_format", "response_length", "vader_sentiment",
                                     "overlong_penalty"}


def test_overlong_penalty_by_hand_and_as_dapo_writes_it():
    """L_max = 10, L_cache = 4: 0 up to 6 tokens, then -1/4 per token, -1 at 10 (and beyond, clamped)."""
    lengths = [1, 6, 7, 8, 9, 10, 12]
    got = rewards_of("overlong_penalty", ["r"] * len(lengths), response_length=lengths, max_new_tokens=10,
                     buffer_tokens=4)
    assert got == [0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0]

    def dapo_eq_13(n, l_max, l_cache):  # the paper's three cases
        if n <= l_max - l_cache:
            return 0.0
        if n <= l_max:
            return ((l_max - l_cache) - n) / l_cache
        return -1.0

    lengths = list(range(0, 40))
    assert rewards_of("overlong_penalty", ["r"] * 40, response_length=lengths, max_new_tokens=32,
                      buffer_tokens=8) == [dapo_eq_13(n, 32, 8) for n in lengths]
    with pytest.raises(ValueError, match="buffer_tokens"):
        rewards_of("overlong_penalty", ["r"], response_length=[3], max_new_tokens=4, buffer_tokens=5)


def test_options_reach_the_function_and_count_as_its_arguments():
    total, _ = compute_rewards([("overlong_penalty", 2.0)], ["q"] * 2, ["a", "b"], {"response_length": [2, 4]},
                               options={"overlong_penalty": {"max_new_tokens": 4, "buffer_tokens": 2}})
    assert total.tolist() == [0.0, -2.0]
    check_reward_columns("overlong_penalty", [], {"max_new_tokens": 4, "buffer_tokens": 2})
    with pytest.raises(UserInputError, match=r"needs the argument\(s\) \['buffer_tokens'\]"):
        check_reward_columns("overlong_penalty", [], {"max_new_tokens": 4})
    with pytest.raises(ValueError, match="options are keyword arguments of a reward function"):
        RewardSpec(model="some/folder", options={"x": 1})


def test_arithmetic_answer():
    responses = ["7 + 5 = 12", "The answer is 12.", "12? no, 13", "no idea", "1,200", "12.0", "-3", "Answer: 12.5"]
    answers = [12, "12", 12, 12, "1,200", 12, "-3", 12]
    assert rewards_of("arithmetic_answer", responses, answer=answers) == [1, 1, 0, 0, 1, 1, 1, 0]


def test_arithmetic_answer_ignores_other_columns():
    assert rewards_of("arithmetic_answer", ["= 4"], answer=[4], id=["x"]) == [1.0]


def test_arithmetic_answer_rejects_a_non_integer_answer():
    with pytest.raises(ValueError, match="row 1: answer 'twelve' is not an integer"):
        rewards_of("arithmetic_answer", ["12", "12"], answer=[12, "twelve"])


def test_answer_format():
    responses = [
        "7 + 5 = 12\nAnswer: 12",
        "work\nanswer:  -3.  \n\n",  # case, spaces, final period and trailing blank lines are allowed
        "ANSWER:1,234",
        "Answer: 12\nThanks!",  # not the last line
        "The Answer: 12",  # the line must be only the answer
        "Answer: twelve",
        "Answer: 12..",
    ]
    assert rewards_of("answer_format", responses) == [1, 1, 1, 0, 0, 0, 0]


def test_response_length():
    assert rewards_of("response_length", ["one two  three\nfour", "", "x " * 150]) == [-0.04, 0.0, -1.5]


def test_vader_sentiment():
    # VADER's compound score: +0.85 / -0.66 for these two reviews (its README values), 0 for neutral or empty text
    rewards = rewards_of("vader_sentiment", ["This movie was great, I loved it!", "Terrible, boring film.",
                                             "The phone is black.", ""])
    assert rewards == pytest.approx([0.8516, -0.6597, 0.0, 0.0], abs=1e-4)
    assert all(-1.0 <= r <= 1.0 for r in rewards_of("vader_sentiment", ["BEST!!! :) " * 20, "worst :( " * 20]))


def test_compute_rewards_weighted_sum():
    responses = ["7 + 5 = 12\nAnswer: 12", "I think 13"]
    total, per_function = compute_rewards(
        [("arithmetic_answer", 1.0), ("answer_format", 0.5), ("response_length", 2.0)],
        prompts=["What is 7 + 5?"] * 2,
        responses=responses,
        columns={"answer": [12, 12], "id": ["a", "b"]},
    )
    # row 0: correct (1), formatted (1), 7 words (-0.07); row 1: wrong (0), unformatted (0), 3 words (-0.03)
    np.testing.assert_allclose(total, [1.0 + 0.5 * 1.0 + 2.0 * -0.07, 0.0 + 0.0 + 2.0 * -0.03])
    assert total.dtype == np.float64
    np.testing.assert_array_equal(per_function["arithmetic_answer"], [1.0, 0.0])
    np.testing.assert_array_equal(per_function["answer_format"], [1.0, 0.0])
    np.testing.assert_allclose(per_function["response_length"], [-0.07, -0.03])


def test_compute_rewards_duplicate_names():
    with pytest.raises(ValueError, match="each once"):
        compute_rewards([("response_length", 1.0), ("response_length", 2.0)], ["q"], ["r"], {})


def test_compute_rewards_length_mismatch():
    with pytest.raises(ValueError, match=r"2 responses but lengths \{'answer': 1\}"):
        compute_rewards([("arithmetic_answer", 1.0)], ["q", "q"], ["1", "2"], {"answer": [1]})


def test_import_path_resolution(user_module):
    name = user_module(
        """
        def shout(prompts, responses, **columns):
            return [float(r.isupper()) for r in responses]
        """
    )
    fn = resolve_reward_function(f"{name}:shout")
    assert fn(["q", "q"], ["HI", "hi"]) == [1.0, 0.0]
    total, _ = compute_rewards([(f"{name}:shout", 3.0)], ["q", "q"], ["HI", "hi"], {"answer": [1, 2]})
    np.testing.assert_array_equal(total, [3.0, 0.0])


def test_import_path_to_a_method(user_module):
    name = user_module(
        """
        class Scorers:
            @staticmethod
            def ones(prompts, responses, **columns):
                return [1.0] * len(responses)
        """
    )
    assert resolve_reward_function(f"{name}:Scorers.ones")([], ["a"]) == [1.0]


def test_unknown_builtin_lists_builtins():
    with pytest.raises(ValueError, match=r"unknown reward function 'nope'.*'answer_format', 'arithmetic_answer'"):
        resolve_reward_function("nope")


@pytest.mark.parametrize("path", ["a:b:c", "module:", ":fn", "bad-name:fn", "pkg.:fn", "pkg:fn()"])
def test_malformed_import_path(path):
    with pytest.raises(ValueError, match="malformed import path"):
        resolve_reward_function(path)


def test_module_that_fails_to_import(user_module):
    name = user_module("raise RuntimeError('boom at import time')\n")
    with pytest.raises(ValueError, match=f"cannot import '{name}': RuntimeError: boom at import time") as info:
        resolve_reward_function(f"{name}:fn")
    assert isinstance(info.value.__cause__, RuntimeError)


def test_module_that_does_not_exist():
    with pytest.raises(UserInputError, match="no module named 'no_such_module_xyz' .*current directory"):
        resolve_reward_function("no_such_module_xyz:fn")


def test_module_whose_own_import_is_missing(user_module):
    name = user_module("import no_such_dependency_xyz\n")
    with pytest.raises(UserInputError, match=f"cannot import '{name}': ModuleNotFoundError: .*no_such_dependency_xyz"):
        resolve_reward_function(f"{name}:fn")


def test_missing_attribute(user_module):
    name = user_module("def fn(prompts, responses, **columns):\n    return []\n")
    with pytest.raises(ValueError, match=f"'{name}' has no attribute 'fnn'"):
        resolve_reward_function(f"{name}:fnn")


def test_attribute_not_callable(user_module):
    name = user_module("THRESHOLD = 3\n")
    with pytest.raises(ValueError, match="'THRESHOLD' is a int, not callable"):
        resolve_reward_function(f"{name}:THRESHOLD")


BROKEN = """
import math

def raises(prompts, responses, **columns):
    return {}["missing key"]

def nan_at_row_2(prompts, responses, **columns):
    return [0.0, 1.0, math.nan, math.nan]

def inf_at_row_1(prompts, responses, **columns):
    return [0.0, -math.inf, 0.0, 0.0]

def too_short(prompts, responses, **columns):
    return [1.0]

def text_at_row_3(prompts, responses, **columns):
    return [1.0, 1.0, 1.0, "1.0"]

def a_string(prompts, responses, **columns):
    return "1111"

def numpy_array(prompts, responses, **columns):
    import numpy as np
    return np.arange(len(responses), dtype=np.float32)
"""


def run_broken(user_module, function):
    name = user_module(BROKEN)
    spec = f"{name}:{function}"
    return spec, lambda: compute_rewards([(spec, 1.0)], ["q"] * 4, ["r"] * 4, {})


def test_function_that_raises(user_module):
    spec, run = run_broken(user_module, "raises")
    with pytest.raises(RewardError, match=f"reward function '{spec}' raised KeyError: 'missing key'") as info:
        run()
    assert isinstance(info.value.__cause__, KeyError)


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("nan_at_row_2", "row 2 is NaN"),
        ("inf_at_row_1", "row 1 is inf"),
        ("too_short", r"returned 1 values for 4 rows \(wrong length\)"),
        ("text_at_row_3", "row 3 is not a number: '1.0'"),
        ("a_string", "returned str, not a sequence of floats"),
    ],
)
def test_bad_outputs_name_function_and_row(user_module, function, message):
    spec, run = run_broken(user_module, function)
    with pytest.raises(RewardError, match=f"reward function '{spec}'.*{message}"):
        run()


def test_numpy_output_is_accepted(user_module):
    _, run = run_broken(user_module, "numpy_array")
    total, _ = run()
    np.testing.assert_array_equal(total, [0.0, 1.0, 2.0, 3.0])


def test_missing_column_is_a_reward_error():
    with pytest.raises(RewardError, match="'arithmetic_answer' raised TypeError: .*'answer'"):
        compute_rewards([("arithmetic_answer", 1.0)], ["q"], ["12"], {})


def test_source_fingerprint_follows_the_source(user_module):
    source = "def score(prompts, responses, **columns):\n    return [{}] * len(responses)\n"
    name = user_module(source.format("1.0"))
    before = reward_source_fingerprint(f"{name}:score")
    assert reward_source_fingerprint(f"{name}:score") == before  # stable while nothing changes
    user_module(source.format("2.25"), name=name)  # the user edits the function (the size changes too,
    # so linecache sees the edit even where the file system's mtime is coarse)
    assert reward_source_fingerprint(f"{name}:score") != before
    user_module(source.format("1.0"), name=name)
    assert reward_source_fingerprint(f"{name}:score") == before


def test_source_fingerprint_of_builtins_differ():
    prints = {reward_source_fingerprint(name) for name in REWARD_FUNCTIONS}
    assert len(prints) == len(REWARD_FUNCTIONS)
    assert all(len(p) == 16 for p in prints)


def test_source_fingerprint_without_source_uses_the_qualified_name():
    # math.fabs is written in C: inspect.getsource raises, so the name stands in for the source
    fabs, floor = reward_source_fingerprint("math:fabs"), reward_source_fingerprint("math:floor")
    assert fabs != floor and len(fabs) == 16


def test_the_scoring_stage_gives_functions_the_response_lengths_and_the_options():
    import pandas as pd

    from rlhf_core.config import RuntimeConfig
    from tasks.scoring import RewardSources, reward_values

    spec = RewardSpec(function="overlong_penalty", options={"max_new_tokens": 8, "buffer_tokens": 4})
    rollouts = pd.DataFrame({"prompt": ["q"] * 3, "response": ["a", "b", "c"], "response_length": [3, 6, 8]})
    sources = RewardSources(specs=[spec], fingerprints=[None], models=[None])
    assert reward_values(rollouts, sources, RuntimeConfig(), batch_size=4)["overlong_penalty"].tolist() == [
        0.0, -0.5, -1.0]
