import math

import pytest
import torch
from tolerance import assert_close_to_reference, float32_floor
from transformers import AutoTokenizer

from rlhf_core.batch import collate
from rlhf_core.chat import chat_prompt_ids
from rlhf_core.generation import pad_sequences, sample_responses, sample_tokens, top_p_filter
from rlhf_core.logprobs import response_logprobs

# probs 0.5, 0.3, 0.15, 0.05: mass before each token (sorted) is 0, 0.5, 0.8, 0.95
PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
LOGPROBS = PROBS.log()


def _kept(logprobs: torch.Tensor, top_p: float) -> list[list[bool]]:
    return torch.isfinite(top_p_filter(logprobs, top_p)).tolist()


@pytest.mark.parametrize("top_p, kept", [
    (0.4, [True, False, False, False]),  # 0.5 alone reaches 0.4
    (0.7, [True, True, False, False]),  # 0.5 < 0.7 <= 0.5 + 0.3
    (0.85, [True, True, True, False]),  # 0.8 < 0.85: the token that crosses top_p is kept
    (0.99, [True, True, True, True]),  # 0.95 < 0.99
    (1.0, [True, True, True, True]),
])
def test_top_p_filter_hand_values(top_p, kept):
    filtered = top_p_filter(LOGPROBS, top_p)
    assert torch.isfinite(filtered).tolist() == [kept]
    keep = torch.tensor([kept])
    torch.testing.assert_close(filtered[keep], LOGPROBS[keep])  # survivors are not renormalised
    assert (filtered[~keep] == float("-inf")).all()


def test_top_p_filter_maps_back_to_vocab_order():
    # row 1 lists the same distribution reversed: the survivors are its last two columns
    logprobs = torch.cat([LOGPROBS, LOGPROBS.flip(-1)])
    assert _kept(logprobs, 0.7) == [[True, True, False, False], [False, False, True, True]]


def test_top_p_filter_always_keeps_one_token():
    logprobs = torch.cat([LOGPROBS, torch.full((1, 4), math.log(0.25))])  # a peaked row and a uniform row
    kept = torch.tensor(_kept(logprobs, 1e-9))
    assert kept.sum(-1).tolist() == [1, 1]
    assert kept[0, 0]


def test_sample_tokens_greedy_is_argmax():
    logprobs = torch.tensor([[0.1, 0.6, 0.3], [0.7, 0.2, 0.1]]).log()
    assert sample_tokens(logprobs, top_p=1.0, generators=None).tolist() == [1, 0]
    assert sample_tokens(logprobs, top_p=0.5, generators=None).tolist() == [1, 0]


def _empirical_frequencies(logprobs: torch.Tensor, top_p: float, n: int = 4000) -> torch.Tensor:
    generators = [torch.Generator().manual_seed(1000 + i) for i in range(n)]
    tokens = sample_tokens(logprobs.expand(n, -1), top_p, generators)
    return torch.bincount(tokens, minlength=logprobs.shape[-1]).float() / n


def test_sample_tokens_matches_probabilities():
    # n = 4000: the standard error of a frequency is <= sqrt(0.25 / 4000) ~ 0.008; tolerance ~ 4 sigma
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    torch.testing.assert_close(_empirical_frequencies(probs.log(), 1.0), probs[0], atol=0.03, rtol=0)


def test_sample_tokens_with_top_p_renormalises_survivors():
    # top_p = 0.7 drops token 2; the rest are drawn in proportion 0.5 : 0.3 = 0.625 : 0.375
    freqs = _empirical_frequencies(torch.tensor([[0.5, 0.3, 0.2]]).log(), 0.7)
    assert freqs[2] == 0
    torch.testing.assert_close(freqs, torch.tensor([0.625, 0.375, 0.0]), atol=0.03, rtol=0)


def test_sample_tokens_is_deterministic_per_seed():
    logprobs = torch.full((3, 50), -math.log(50))
    first = sample_tokens(logprobs, 1.0, [torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    again = sample_tokens(logprobs, 1.0, [torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    assert first.tolist() == again.tolist()


def test_pad_sequences_left_and_right():
    seqs = [[1, 2, 3], [4]]
    ids, mask = pad_sequences(seqs, pad_id=0, side="left")
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.dtype == torch.bool and mask.tolist() == [[True, True, True], [False, False, True]]
    ids, mask = pad_sequences(seqs, pad_id=9, side="right")
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9]]
    assert mask.tolist() == [[True, True, True], [True, False, False]]


def test_chat_prompt_ids_renders_smollm2_template(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    [ids] = chat_prompt_ids(tokenizer, ["What is 2+3?"])
    text = tokenizer.decode(ids)
    assert "<|im_start|>user\nWhat is 2+3?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")

    [ids] = chat_prompt_ids(tokenizer, ["What is 2+3?"], system_prompt="You are a terse calculator.")
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a terse calculator.<|im_end|>")
    assert "SmolLM" not in text  # the template's default system prompt is replaced, not added to

    tokenizer.chat_template = None
    assert chat_prompt_ids(tokenizer, ["What is 2+3?"]) == [tokenizer("What is 2+3?")["input_ids"]]


# ---- sample_responses on the tiny random-init model ----

@pytest.fixture(scope="module")
def prompts(tiny_model) -> list[list[int]]:
    _, tokenizer = tiny_model
    ids = chat_prompt_ids(tokenizer, ["What is 2+3?", "Hi", "Name three colours of the rainbow, please."])
    assert len({len(p) for p in ids}) == 3  # different lengths: the batch is left-padded
    return ids


def _sample(tiny_model, prompt_ids, seeds, *, eos_ids=None, max_new_tokens=8, temperature=1.0, top_p=1.0):
    model, tokenizer = tiny_model
    return sample_responses(model, prompt_ids, eos_ids=eos_ids or [tokenizer.eos_token_id],
                            pad_id=tokenizer.pad_token_id, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p, seeds=seeds)


def _ragged_eos_ids(tiny_model, prompts, seeds) -> tuple[list[int], list[list[int]]]:
    """EOS ids that make row 0 stop after 2 tokens and row 1 after 5, leaving row 2 unfinished after 8,
    found from a run with the real EOS (which the random model does not emit)."""
    free = _sample(tiny_model, prompts, seeds)
    assert free.finished == [False] * 3 and [len(r) for r in free.response_ids] == [8] * 3
    eos_ids = [tiny_model[1].eos_token_id, free.response_ids[0][1], free.response_ids[1][4]]
    for row, stop in zip(free.response_ids, (2, 5, 8)):
        assert not set(row[:stop - 1]) & set(eos_ids)  # no earlier stop in any row
    assert free.response_ids[2][7] not in eos_ids
    return eos_ids, free.response_ids


def test_sample_responses_is_batch_invariant(tiny_model, prompts):
    seeds = [11, 22, 33]
    eos_ids, _ = _ragged_eos_ids(tiny_model, prompts, seeds)  # rows stop at different steps within the batch
    together = _sample(tiny_model, prompts, seeds, eos_ids=eos_ids, top_p=0.95)
    assert [len(r) for r in together.response_ids] == [2, 5, 8]
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        alone = _sample(tiny_model, [prompt], [seed], eos_ids=eos_ids, top_p=0.95)
        assert alone.response_ids[0] == together.response_ids[i]
        assert alone.finished[0] == together.finished[i]
        torch.testing.assert_close(torch.tensor(alone.sampling_logprobs[0]),
                                   torch.tensor(together.sampling_logprobs[i]), atol=1e-5, rtol=0)


def test_finished_rows_leave_the_batch_without_changing_any_row(tiny_model, prompts):
    # 6 rows; EOS = tokens the free run sampled mid-way, so rows leave the batch at different steps
    batch, seeds = prompts * 2, [101, 102, 103, 104, 105, 106]
    free = _sample(tiny_model, batch, seeds, top_p=0.95)  # the real EOS, never emitted: no row leaves
    assert [len(r) for r in free.response_ids] == [8] * 6
    eos_ids = [tiny_model[1].eos_token_id] + [free.response_ids[r][s] for r, s in ((0, 1), (2, 3), (4, 5))]
    lengths = [next((i + 1 for i, t in enumerate(r) if t in eos_ids), 8) for r in free.response_ids]
    assert 8 in lengths and len({n for n in lengths if n < 8}) >= 2  # ragged: several compactions, some rows run on

    stopped = _sample(tiny_model, batch, seeds, eos_ids=eos_ids, top_p=0.95)
    assert stopped.response_ids == [r[:n] for r, n in zip(free.response_ids, lengths)]
    assert stopped.finished == [r[n - 1] in eos_ids for r, n in zip(free.response_ids, lengths)]
    alone = [_sample(tiny_model, [p], [s], eos_ids=eos_ids, top_p=0.95) for p, s in zip(batch, seeds)]
    assert [a.response_ids[0] for a in alone] == stopped.response_ids  # batch of 1: nothing to compact
    assert [a.finished[0] for a in alone] == stopped.finished

    def flat(rollouts) -> torch.Tensor:
        return torch.tensor([lp for row in rollouts for lp in row])

    # the self-difference: the batch without early stop vs its rows alone (other shapes, same decode)
    free_alone = [_sample(tiny_model, [p], [s], top_p=0.95) for p, s in zip(batch, seeds)]
    self_difference = (flat(free.sampling_logprobs) - flat([a.sampling_logprobs[0] for a in free_alone])).abs().max()
    compacted = flat(stopped.sampling_logprobs)
    difference = (compacted - flat([a.sampling_logprobs[0] for a in alone])).abs().max()
    assert_close_to_reference(float(difference), float(self_difference), "compacted batch vs rows alone",
                              floor=float32_floor(compacted))


def test_finished_rows_stop_costing_compute(tiny_model, prompts):
    model, _ = tiny_model
    seeds = [11, 22, 33]
    eos_ids, _ = _ragged_eos_ids(tiny_model, prompts, seeds)  # rows stop after 2, 5 and 8 tokens
    fed = []  # per forward: (input rows, attention-mask rows, KV-cache rows or None)

    def count(_module, _args, kwargs):
        cache = kwargs["past_key_values"]
        fed.append((kwargs["input_ids"].shape[0], kwargs["attention_mask"].shape[0],
                    None if cache is None else cache.layers[0].keys.shape[0]))

    hook = model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        rollouts = _sample(tiny_model, prompts, seeds, eos_ids=eos_ids)
    finally:
        hook.remove()
    lengths = [len(r) for r in rollouts.response_ids]
    assert lengths == [2, 5, 8]
    rows = [n for n, _, _ in fed]
    # forward k samples token k of every row still running: the prompt pass, then one row fewer as each finishes
    assert rows == [3, 3, 2, 2, 2, 1, 1, 1]
    assert sum(rows) == sum(lengths) < len(prompts) * 8  # what the tokens cost, not B x steps
    assert all(mask == n for n, mask, _ in fed) and fed[0][2] is None
    assert [cached for _, _, cached in fed[1:]] == rows[1:]  # the KV cache shrinks with the batch


def test_rows_sharing_a_prompt_share_one_prompt_pass(tiny_model, prompts):
    """A GRPO group: rows with the same prompt run its prompt pass once (3 distinct prompts, not 7 rows), and each
    row samples what it samples alone."""
    from rlhf_core.generation import distinct_prompts

    grouped = [prompts[0]] * 3 + [prompts[1]] * 2 + [prompts[2], prompts[0]]
    unique, row_prompt = distinct_prompts(grouped)
    assert unique == prompts and row_prompt.tolist() == [0, 0, 0, 1, 1, 2, 0]
    model, _ = tiny_model
    prompt_pass = []
    hook = model.register_forward_pre_hook(
        lambda _m, _a, kwargs: prompt_pass.append(kwargs["input_ids"].shape) if not prompt_pass else None,
        with_kwargs=True)
    seeds = list(range(100, 107))
    try:
        together = _sample(tiny_model, grouped, seeds)
    finally:
        hook.remove()
    assert prompt_pass[0][0] == 3
    assert len(set(map(tuple, together.response_ids[:3]))) == 3  # one prompt, three seeds: three samples
    for i, (prompt, seed) in enumerate(zip(grouped, seeds)):
        alone = _sample(tiny_model, [prompt], [seed])
        assert alone.response_ids[0] == together.response_ids[i]
        torch.testing.assert_close(torch.tensor(alone.sampling_logprobs[0]),
                                   torch.tensor(together.sampling_logprobs[i]), atol=1e-5, rtol=0)


def test_sample_responses_seeds_reproduce_and_differ(tiny_model, prompts):
    first = _sample(tiny_model, prompts, [1, 2, 3])
    again = _sample(tiny_model, prompts, [1, 2, 3])
    other = _sample(tiny_model, prompts, [4, 5, 6])
    assert first.response_ids == again.response_ids
    assert first.sampling_logprobs == again.sampling_logprobs
    assert all(a != b for a, b in zip(first.response_ids, other.response_ids))
    assert first.prompt_ids == prompts


def test_sampling_logprobs_match_recomputed_logprobs(tiny_model, prompts):
    # KV-cache decode vs one full forward over [prompt | response]; top_p < 1 must not change the recorded values
    model, tokenizer = tiny_model
    seeds = [7, 8, 9]
    eos_ids, _ = _ragged_eos_ids(tiny_model, prompts, seeds)
    rollouts = _sample(tiny_model, prompts, seeds, eos_ids=eos_ids, temperature=0.7, top_p=0.9)
    batch = collate(rollouts.prompt_ids, rollouts.response_ids, tokenizer.pad_token_id,
                    per_token={"sampling_logprobs": rollouts.sampling_logprobs})
    assert not batch["response_mask"].all()  # ragged responses

    def recomputed(prompt_ids, response_ids) -> torch.Tensor:
        rows = collate(prompt_ids, response_ids, tokenizer.pad_token_id)
        logprobs, _ = response_logprobs(model, rows["prompt_ids"], rows["prompt_mask"], rows["response_ids"],
                                        rows["response_mask"], temperature=0.7)
        return logprobs[rows["response_mask"]]

    together = recomputed(rollouts.prompt_ids, rollouts.response_ids)
    # the self-reference: the same full forward, one unpadded row at a time (other shapes and summation order)
    alone = torch.cat([recomputed([p], [r]) for p, r in zip(rollouts.prompt_ids, rollouts.response_ids)])
    sampled = batch["sampling_logprobs"][batch["response_mask"]]
    assert_close_to_reference(float((together - sampled).abs().max()), float((together - alone).abs().max()),
                              "KV-cache decode vs full forward", floor=float32_floor(together, ulps=32))


def _naive_greedy(model, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Argmax of a full forward over the whole sequence at every step, no cache, no padding."""
    ids = torch.tensor([prompt])
    tokens, logprobs = [], []
    with torch.no_grad():
        for _ in range(steps):
            step_logprobs = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), dim=-1)
            token = int(step_logprobs.argmax())
            tokens.append(token)
            logprobs.append(float(step_logprobs[token]))
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokens, logprobs


def test_greedy_matches_full_forward_argmax(tiny_model, prompts):
    model, _ = tiny_model
    by_none = _sample(tiny_model, prompts, None, max_new_tokens=6)
    by_zero_temperature = _sample(tiny_model, prompts, [1, 2, 3], temperature=0.0, max_new_tokens=6)
    for i, prompt in enumerate(prompts):
        tokens, logprobs = _naive_greedy(model, prompt, 6)
        assert by_none.response_ids[i] == tokens
        assert by_zero_temperature.response_ids[i] == tokens
        # temperature 0 records the untempered log-probs
        torch.testing.assert_close(torch.tensor(by_zero_temperature.sampling_logprobs[i]), torch.tensor(logprobs),
                                   atol=1e-4, rtol=0)


def test_eos_ends_the_response_and_is_kept(tiny_model, prompts):
    # The random-init model repeats one token under greedy decoding, so the token first emitted at step 3 is
    # found from a seeded sampled run instead: its first two draws do not depend on eos_ids.
    free = _sample(tiny_model, prompts[:1], [5])
    tokens = free.response_ids[0]
    assert len(tokens) == 8 and not free.finished[0] and tokens[2] not in tokens[:2]
    eos_ids = [tiny_model[1].eos_token_id, tokens[2]]

    stopped = _sample(tiny_model, prompts[:1], [5], eos_ids=eos_ids)
    assert stopped.response_ids[0] == tokens[:3]  # EOS included
    assert stopped.finished == [True]
    assert len(stopped.sampling_logprobs[0]) == 3
    torch.testing.assert_close(torch.tensor(stopped.sampling_logprobs[0]), torch.tensor(free.sampling_logprobs[0][:3]))

    truncated = _sample(tiny_model, prompts[:1], [5], eos_ids=eos_ids, max_new_tokens=2)
    assert truncated.response_ids[0] == tokens[:2]
    assert truncated.finished == [False]
    assert len(truncated.sampling_logprobs[0]) == 2

    # greedy: making the repeated token EOS stops at step 1
    greedy = _sample(tiny_model, prompts[:1], None)
    first = greedy.response_ids[0][0]
    stopped = _sample(tiny_model, prompts[:1], None, eos_ids=[first])
    assert stopped.response_ids == [[first]] and stopped.finished == [True]


def test_pad_never_inside_a_response(tiny_model, prompts):
    _, tokenizer = tiny_model
    seeds = [11, 22, 33]
    eos_ids, free = _ragged_eos_ids(tiny_model, prompts, seeds)
    rollouts = _sample(tiny_model, prompts, seeds, eos_ids=eos_ids)
    assert rollouts.finished == [True, True, False]
    assert [len(r) for r in rollouts.response_ids] == [2, 5, 8]
    for response, logprobs, expected in zip(rollouts.response_ids, rollouts.sampling_logprobs, free):
        assert tokenizer.pad_token_id not in response
        assert response == expected[:len(response)]  # rows that stopped early are cut, not padded
        assert len(logprobs) == len(response)
