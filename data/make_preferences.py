"""Regenerate the shipped preference sets: `python data/make_preferences.py` (a few minutes on 2 CPU cores).

Writes
- `review_prompts.jsonl` / `review_prompts_eval.jsonl`: 300 short writing prompts ("Write a one-sentence review
  of a crowded seaside hotel."), from templates x subjects x descriptors, seeded; the prompts of the held-out pairs
  (40) go to the eval file, so PPO trains on prompts the reward model's evaluation never saw (260);
- `preferences_train.jsonl` / `preferences_eval.jsonl`: for every prompt, two responses sampled from the built-in
  policy (SmolLM2-135M-Instruct, temperature 1.0, at most 48 new tokens, one seed per response), judged by VADER's
  compound score; chosen = the more positive one. Pairs whose scores differ by less than `MIN_GAP` are dropped
  (the judge has no real preference there). The first `HELD_OUT` pairs, in the seeded prompt order, are the eval
  set: each prompt gives at most one pair, so no eval prompt appears in train.
  Shipped: 216 of the 300 prompts gave a pair: 176 train, 40 eval (about 3 minutes on 2 cores).

This is an AI-feedback set with a rule-based judge: a reward model trained on it learns "more positive review",
which a VADER-based reward (`vader_sentiment`) can check independently.
"""

import json
import random
from pathlib import Path

import torch
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from rlhf_core.generation import chat_prompt_ids, sample_responses
from rlhf_core.models import DEFAULT_MODEL, eos_token_ids, load_causal_lm, resolve_model_path

NUM_PROMPTS = 300
HELD_OUT = 40
MIN_GAP = 0.2
MAX_NEW_TOKENS = 48
TEMPERATURE = 1.0
BATCH_SIZE = 30
SEED = 0

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
    rng = random.Random(seed)
    return rng.sample(every, n)


def sample_two(prompts: list[str], seed: int) -> list[tuple[str, str]]:
    """Two responses per prompt from the built-in policy; response k of prompt i uses seed (seed, i, k)."""
    torch.set_num_threads(2)
    model, tokenizer = load_causal_lm(resolve_model_path(DEFAULT_MODEL, Path.home() / ".rlhf" / "models"))
    model.eval()
    prompt_ids = [ids for ids in chat_prompt_ids(tokenizer, prompts) for _ in range(2)]
    seeds = [seed * 1_000_000 + i * 2 + k for i in range(len(prompts)) for k in range(2)]
    responses = []
    for start in range(0, len(prompt_ids), BATCH_SIZE):
        rows = slice(start, start + BATCH_SIZE)
        result = sample_responses(model, prompt_ids[rows], eos_ids=eos_token_ids(model, tokenizer),
                                  pad_id=tokenizer.pad_token_id, max_new_tokens=MAX_NEW_TOKENS,
                                  temperature=TEMPERATURE, top_p=1.0, seeds=seeds[rows])
        responses += [r.strip() for r in tokenizer.batch_decode(result.response_ids, skip_special_tokens=True)]
        print(f"sampled {len(responses)}/{len(prompt_ids)} responses", flush=True)
    return list(zip(responses[0::2], responses[1::2]))


def judge(prompts: list[str], samples: list[tuple[str, str]]) -> list[dict]:
    """One pair per prompt where VADER prefers one response by at least MIN_GAP."""
    vader = SentimentIntensityAnalyzer()
    pairs = []
    for prompt, (a, b) in zip(prompts, samples):
        if not a or not b:
            continue
        score_a, score_b = (vader.polarity_scores(text)["compound"] for text in (a, b))
        if abs(score_a - score_b) < MIN_GAP:
            continue
        (chosen, chosen_score), (rejected, rejected_score) = sorted([(a, score_a), (b, score_b)],
                                                                    key=lambda x: -x[1])
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "chosen_score": chosen_score,
                      "rejected_score": rejected_score, "judge": "vader"})
    return pairs


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    print(f"{path.name}: {len(rows)} rows")


if __name__ == "__main__":
    here = Path(__file__).parent
    prompts = make_prompts(NUM_PROMPTS, SEED)
    pairs = judge(prompts, sample_two(prompts, SEED))
    write_jsonl(here / "preferences_eval.jsonl", pairs[:HELD_OUT])
    write_jsonl(here / "preferences_train.jsonl", pairs[HELD_OUT:])
    held_out = {pair["prompt"] for pair in pairs[:HELD_OUT]}
    write_jsonl(here / "review_prompts.jsonl", [{"prompt": p} for p in prompts if p not in held_out])
    write_jsonl(here / "review_prompts_eval.jsonl", [{"prompt": p} for p in prompts if p in held_out])
