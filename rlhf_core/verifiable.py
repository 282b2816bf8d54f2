"""The verifiable task the project ships: small integer arithmetic ("What is 7 + 5?" -> 12).

A reward is checkable by program (no reward model), as in RLVR / DeepSeek-R1-Zero's rule-based rewards:
the last number in the response is compared with the known answer. Problems are drawn without replacement
from the finite set of (a, op, b) triples, so an eval split never repeats a train prompt within one call.
"""

import operator
import random
import re
from collections.abc import Callable

# ASCII digits only: `\d` would also match e.g. Arabic-Indic digits, which int() accepts but nobody means.
# The lookbehind stops "5-3" from reading as -3 and "1.25" from yielding a second number "25".
_NUMBER = re.compile(r"(?<![0-9.])(-?)([0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)(?:\.([0-9]+))?")

OPERATIONS: dict[str, Callable[[int, int], int]] = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def extract_final_number(text: str) -> int | None:
    """The last number in `text` as an int: "-12", "1,234" and "12.0" count; "12.5" (not an integer) gives None.
    Also None when `text` contains no number."""
    matches = list(_NUMBER.finditer(text))
    if not matches:
        return None
    sign, integer, fraction = matches[-1].groups()
    if fraction and fraction.strip("0"):
        return None  # the final number is a non-integer: it can't equal an integer answer
    value = int(integer.replace(",", ""))
    return -value if sign else value


def make_arithmetic_problems(
    n: int,
    seed: int,
    *,
    min_value: int = 1,
    max_value: int = 20,
    ops: tuple[str, ...] = ("+", "-"),
    template: str = "What is {a} {op} {b}?",
) -> list[dict]:
    """n distinct problems {"id", "prompt", "answer"} with a, b in [min_value, max_value]; the same seed gives
    the same list. Raises ValueError if n exceeds the number of distinct (a, op, b) triples."""
    unknown = [op for op in ops if op not in OPERATIONS]
    if unknown or not ops or len(set(ops)) != len(ops):
        raise ValueError(f"ops must be distinct and from {sorted(OPERATIONS)}, got {ops!r}")
    if min_value > max_value:
        raise ValueError(f"min_value {min_value} > max_value {max_value}")
    width = max_value - min_value + 1
    total = width * width * len(ops)
    if not 0 <= n <= total:
        raise ValueError(f"n={n}: there are only {total} distinct problems for these values and ops")
    problems = []
    # Sampling indices (not materialised triples) keeps this cheap for wide value ranges.
    for index in random.Random(seed).sample(range(total), n):
        op_index, rest = divmod(index, width * width)
        a, b = (min_value + i for i in divmod(rest, width))
        op = ops[op_index]
        prompt = template.format(a=a, op=op, b=b)
        problems.append({"id": f"{a}{op}{b}", "prompt": prompt, "answer": OPERATIONS[op](a, b)})
    return problems
