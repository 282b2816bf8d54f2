"""Tests for rlhf_core.verifiable: number extraction and the arithmetic problem generator."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_core.verifiable import extract_final_number, make_arithmetic_problems


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7 + 5 = 12", 12),
        ("The answer is 12.", 12),
        ("12? no, 13", 13),
        ("so x = -4", -4),
        ("10 - 3 = 7", 7),
        ("5-3", 3),  # a binary minus is not a sign
        ("total: 1,234 apples", 1234),
        ("it is 12.0", 12),
        ("it is 12.00.", 12),
        ("first 3, then 2.5", None),  # the final number is not an integer
        ("1.25", None),  # not "25" read after the decimal point
        ("no numbers here", None),
        ("", None),
        ("Answer: ٣", None),  # Arabic-Indic digits are not read as numbers
    ],
)
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == expected


_NO_ASCII_DIGITS = st.text(st.characters(blacklist_characters="0123456789"), max_size=40)


@settings(max_examples=200, deadline=None)
@given(prefix=_NO_ASCII_DIGITS, n=st.integers(-(10**12), 10**12), suffix=_NO_ASCII_DIGITS)
def test_extract_final_number_recovers_embedded_integer(prefix, n, suffix):
    assert extract_final_number(f"{prefix} = {n}{suffix}") == n


def test_problems_are_deterministic_for_a_seed():
    first = make_arithmetic_problems(30, seed=7)
    assert first == make_arithmetic_problems(30, seed=7)
    assert first != make_arithmetic_problems(30, seed=8)


def test_problems_have_correct_answers_and_template():
    ops = ("+", "-", "*")
    problems = make_arithmetic_problems(50, seed=0, min_value=2, max_value=9, ops=ops, template="{a}{op}{b}=")
    for p in problems:
        a, op, b = p["prompt"][0], p["prompt"][1], p["prompt"][2]  # single digits: "7*3="
        assert p["prompt"] == f"{a}{op}{b}="
        assert p["answer"] == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert 2 <= int(a) <= 9 and 2 <= int(b) <= 9


def test_default_template():
    (p,) = make_arithmetic_problems(1, seed=3, min_value=4, max_value=4, ops=("-",))
    assert p == {"id": "4-4", "prompt": "What is 4 - 4?", "answer": 0}


def test_problems_exhaust_all_distinct_triples():
    problems = make_arithmetic_problems(8, seed=1, min_value=1, max_value=2)  # 2 * 2 values * 2 ops = 8
    assert sorted(p["prompt"] for p in problems) == sorted(
        f"What is {a} {op} {b}?" for a in (1, 2) for op in ("+", "-") for b in (1, 2)
    )
    assert len({p["id"] for p in problems}) == 8


def test_too_many_problems_raises():
    with pytest.raises(ValueError, match="only 8 distinct problems"):
        make_arithmetic_problems(9, seed=1, min_value=1, max_value=2)


@pytest.mark.parametrize("ops", [("/",), (), ("+", "+")])
def test_bad_ops_raise(ops):
    with pytest.raises(ValueError, match="ops"):
        make_arithmetic_problems(1, seed=0, ops=ops)


def test_min_above_max_raises():
    with pytest.raises(ValueError, match="min_value 5 > max_value 4"):
        make_arithmetic_problems(1, seed=0, min_value=5, max_value=4)
