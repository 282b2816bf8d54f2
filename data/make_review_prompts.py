"""The shipped review prompts: `python data/make_review_prompts.py` checks (or, with --write, rewrites) them.

300 short writing prompts ("Write a one-sentence review of a crowded seaside hotel.") from templates x subjects x
descriptors, in a seeded order. `review_prompts_eval.jsonl` holds 40 of them, fixed once (the held-out prompts of
the first preference set) so that held-out numbers stay comparable across versions; `review_prompts.jsonl` holds
the other 260 in the same order. PPO trains on the 260; the preference-data flow turned each file into the
shipped preference set (docs/algorithms/preference-data.md), so no held-out prompt is ever trained on.
"""

import json
import random
import sys
from pathlib import Path

NUM_PROMPTS = 300
SEED = 0
HERE = Path(__file__).parent

TEMPLATES = [
    "Write a one-sentence review of {subject}.",
    "Write a short, one-sentence review of {subject}.",
    "In one sentence, review {subject}.",
    "Give a one-sentence customer review of {subject}.",
]
SUBJECTS = {  # {d}: a descriptor, so that some subjects invite praise and others complaints
    "film": ["{d} science-fiction film", "{d} romantic comedy", "{d} documentary about whales",
             "{d} animated film for children", "{d} horror movie set in a lighthouse"],
    "restaurant": ["{d} Italian restaurant", "{d} sushi bar", "{d} vegan cafe", "{d} roadside diner",
                   "{d} steakhouse"],
    "phone": ["{d} budget smartphone", "{d} flagship phone", "{d} folding phone"],
    "book": ["{d} mystery novel", "{d} cookbook", "{d} biography of a famous scientist",
             "{d} fantasy trilogy"],
    "hotel": ["{d} seaside hotel", "{d} city-centre hotel", "{d} mountain lodge", "{d} airport hotel"],
    "other": ["{d} pair of running shoes", "{d} coffee machine", "{d} theme park", "{d} museum exhibition",
              "{d} video game", "{d} music festival", "{d} pair of headphones", "{d} yoga class"],
}
DESCRIPTORS = ["new", "popular", "much-hyped", "small family-run", "expensive", "cheap", "crowded", "quiet",
               "old-fashioned", "award-winning", "disappointing", "charming", "overpriced", "noisy", "forgettable"]


def article(noun_phrase: str) -> str:
    return ("an " if noun_phrase[0] in "aeiou" else "a ") + noun_phrase


def make_prompts(n: int, seed: int) -> list[str]:
    """`n` distinct prompts in a seeded order."""
    subjects = [s for group in SUBJECTS.values() for s in group]
    every = [t.format(subject=article(s.format(d=d))) for t in TEMPLATES for s in subjects for d in DESCRIPTORS]
    return random.Random(seed).sample(every, n)


def read_prompts(path: Path) -> list[str]:
    return [json.loads(line)["prompt"] for line in path.open()]


def main(write: bool) -> int:
    prompts = make_prompts(NUM_PROMPTS, SEED)
    held_out = set(read_prompts(HERE / "review_prompts_eval.jsonl"))
    train = [p for p in prompts if p not in held_out]
    if not held_out <= set(prompts):
        print("review_prompts_eval.jsonl holds prompts these templates do not make", file=sys.stderr)
        return 1
    if write:
        with open(HERE / "review_prompts.jsonl", "w") as f:
            f.writelines(json.dumps({"prompt": p}) + "\n" for p in train)
    elif read_prompts(HERE / "review_prompts.jsonl") != train:
        print("review_prompts.jsonl differs from the generated prompts (run with --write)", file=sys.stderr)
        return 1
    print(f"{len(train)} training prompts, {len(held_out)} held out")
    return 0


if __name__ == "__main__":
    sys.exit(main("--write" in sys.argv[1:]))
