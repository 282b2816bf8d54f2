"""Regenerate the shipped arithmetic prompt sets: `python data/make_arithmetic.py`.

Single-step addition/subtraction with operands 1..12, phrased so that SmolLM2-135M-Instruct answers correctly
about half the time at temperature 0.7: hard enough to leave room for GRPO, easy enough that groups of 8
usually contain both correct and wrong answers (a group with equal rewards gives no gradient).
"""

import json
from pathlib import Path

from rlhf_core.verifiable import make_arithmetic_problems

TEMPLATE = "Calculate {a} {op} {b}. Reply with just the number."
HELD_OUT = 40

if __name__ == "__main__":
    problems = make_arithmetic_problems(288, seed=0, min_value=1, max_value=12, ops=("+", "-"), template=TEMPLATE)
    here = Path(__file__).parent
    for name, rows in (("arithmetic_train.jsonl", problems[HELD_OUT:]), ("arithmetic_eval.jsonl", problems[:HELD_OUT])):
        with open(here / name, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        print(f"{name}: {len(rows)} prompts")
