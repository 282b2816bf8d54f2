"""Regenerate the shipped SFT sets: `python data/make_sft.py`.

- sft/arithmetic_{train,eval}.jsonl: worked answers to the shipped arithmetic prompts (data/arithmetic_*.jsonl) as
  conversations (`messages`), in the format the `arithmetic_answer` reward checks: the last number of the reply is
  the result ("7 - 9 = -2"). The held-out conversations answer the held-out prompts, so `rlhf sft` reports its
  held-out loss on problems it never trained on, and the held-out reward measures the SFT policy on them too.
- sft/reviews_{train,eval}.jsonl: prompt/completion rows, the preferred (chosen) review of each shipped preference
  pair (data/preferences/*/pairs.parquet): SFT on the preferred responses, the first stage of `rlhf pipeline`.
"""

import json
from pathlib import Path

import pandas as pd

HERE = Path(__file__).parent


def worked_answer(problem_id: str, answer: int) -> str:
    """"7-9", -2 -> "7 - 9 = -2" (the problem ids are "<a><op><b>")."""
    for op in "+-":
        a, sign, b = problem_id.rpartition(op)
        if sign and a:
            return f"{a} {op} {b} = {answer}"
    raise ValueError(f"not an arithmetic problem id: {problem_id!r}")


if __name__ == "__main__":
    for split in ("train", "eval"):
        problems = [json.loads(line) for line in (HERE / f"arithmetic_{split}.jsonl").read_text().splitlines()]
        rows = [{"messages": [{"role": "user", "content": p["prompt"]},
                              {"role": "assistant", "content": worked_answer(p["id"], p["answer"])}]}
                for p in problems]
        out = HERE / "sft" / f"arithmetic_{split}.jsonl"
        out.parent.mkdir(exist_ok=True)
        out.write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"{out}: {len(rows)} conversations")
        pairs = pd.read_parquet(HERE / "preferences" / split / "pairs.parquet")
        out = HERE / "sft" / f"reviews_{split}.jsonl"
        out.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n"
                               for p, c in zip(pairs["prompt"], pairs["chosen"])))
        print(f"{out}: {len(pairs)} prompt/completion rows")
