import torch

from rlhf_core.batch import collate, length_sorted, map_micro_batches, response_lists, select_rows, truncate_sequences

PAD = 0
# Three rollouts: prompts of length 2, 1, 3 (P = 3); responses of length 1, 3, 2 (T = 3).
PROMPTS = [[11, 12], [13], [14, 15, 16]]
RESPONSES = [[21], [22, 23, 24], [25, 26]]
OLD_LOGPROBS = [[-0.5], [-1.0, -2.0, -3.0], [-0.25, -0.75]]  # exact in float32
REWARDS = [1.0, 0.0, 0.5]


def _batch() -> dict[str, torch.Tensor]:
    return collate(PROMPTS, RESPONSES, PAD, per_token={"old_logprobs": OLD_LOGPROBS}, per_seq={"rewards": REWARDS})


def test_collate_hand_example():
    batch = _batch()
    assert set(batch) == {"prompt_ids", "prompt_mask", "response_ids", "response_mask", "old_logprobs", "rewards"}
    assert batch["prompt_ids"].tolist() == [[0, 11, 12], [0, 0, 13], [14, 15, 16]]  # left-padded
    assert batch["prompt_mask"].tolist() == [[False, True, True], [False, False, True], [True, True, True]]
    assert batch["response_ids"].tolist() == [[21, 0, 0], [22, 23, 24], [25, 26, 0]]  # right-padded
    assert batch["response_mask"].tolist() == [[True, False, False], [True, True, True], [True, True, False]]
    assert batch["old_logprobs"].tolist() == [[-0.5, 0.0, 0.0], [-1.0, -2.0, -3.0], [-0.25, -0.75, 0.0]]
    assert batch["rewards"].tolist() == [1.0, 0.0, 0.5]
    assert batch["prompt_ids"].dtype == batch["response_ids"].dtype == torch.long
    assert batch["prompt_mask"].dtype == batch["response_mask"].dtype == torch.bool
    assert batch["old_logprobs"].dtype == batch["rewards"].dtype == torch.float32


def test_collate_without_extras():
    batch = collate([[1]], [[2, 3]], pad_id=7)
    assert set(batch) == {"prompt_ids", "prompt_mask", "response_ids", "response_mask"}
    assert batch["response_ids"].tolist() == [[2, 3]]


def test_select_rows_trims_all_padding_columns():
    # rows 0 and 1: the first prompt column and the last response column are padding in both -> dropped
    sub = select_rows(_batch(), torch.tensor([0, 1]))
    assert sub["prompt_ids"].tolist() == [[11, 12], [0, 13]]
    assert sub["prompt_mask"].tolist() == [[True, True], [False, True]]
    assert sub["response_ids"].tolist() == [[21, 0, 0], [22, 23, 24]]  # row 1 fills all 3 columns: none trimmed
    assert sub["rewards"].tolist() == [1.0, 0.0]

    sub = select_rows(_batch(), torch.tensor([2, 0]))  # order follows `rows`
    assert sub["prompt_ids"].tolist() == [[14, 15, 16], [0, 11, 12]]  # row 2's prompt fills all 3 columns
    assert sub["response_ids"].tolist() == [[25, 26], [21, 0]]
    assert sub["response_mask"].tolist() == [[True, True], [True, False]]
    assert sub["old_logprobs"].tolist() == [[-0.25, -0.75], [-0.5, 0.0]]  # trimmed with the response columns
    assert sub["rewards"].tolist() == [0.5, 1.0]

    sub = select_rows(_batch(), torch.tensor([0]))
    assert sub["prompt_ids"].tolist() == [[11, 12]]
    assert sub["response_ids"].tolist() == [[21]]
    assert sub["old_logprobs"].tolist() == [[-0.5]]


def test_select_rows_keeps_tensors_aligned():
    batch = _batch()
    for rows in ([0], [1], [2], [0, 2], [1, 2], [2, 1, 0]):
        sub = select_rows(batch, torch.tensor(rows))
        assert sub["prompt_ids"].shape == sub["prompt_mask"].shape
        assert sub["response_ids"].shape == sub["response_mask"].shape == sub["old_logprobs"].shape
        assert sub["prompt_mask"][:, 0].any() and sub["response_mask"][:, -1].any()  # nothing left to trim
        assert response_lists(sub["response_ids"], sub["response_mask"]) == [
            [float(t) for t in RESPONSES[r]] for r in rows]
        assert response_lists(sub["old_logprobs"], sub["response_mask"]) == [OLD_LOGPROBS[r] for r in rows]
        assert [row[m].tolist() for row, m in zip(sub["prompt_ids"], sub["prompt_mask"])] == [PROMPTS[r] for r in rows]


def test_response_lists_inverts_collate():
    batch = _batch()
    assert response_lists(batch["old_logprobs"], batch["response_mask"]) == OLD_LOGPROBS
    # works on grad-carrying tensors and returns plain floats
    values = batch["old_logprobs"].clone().requires_grad_(True)
    lists = response_lists(values * 2, batch["response_mask"])
    assert lists == [[2 * v for v in row] for row in OLD_LOGPROBS]
    assert all(isinstance(v, float) for row in lists for v in row)


def test_truncate_sequences_leaves_short_sequences_alone():
    assert truncate_sequences([1, 2, 3], [[4, 5], [6]], 5, 2) == ([1, 2, 3], [[4, 5], [6]])
    assert truncate_sequences([1, 2, 3], [[4, 5, 6, 7]], None, 2) == ([1, 2, 3], [[4, 5, 6, 7]])


def test_truncate_sequences_cuts_the_prompt_start_then_the_response_end():
    # 4 + 5 > 6: the prompt keeps its last 2 tokens, both responses their first 6 - 2 = 4
    prompt, responses = truncate_sequences([1, 2, 3, 4], [[5, 6, 7, 8, 9], [10, 11]], 6, 2)
    assert prompt == [3, 4]
    assert responses == [[5, 6, 7, 8], [10, 11]]
    # the prompt cut alone suffices: responses untouched
    assert truncate_sequences([1, 2, 3, 4], [[5, 6, 7]], 6, 3) == ([2, 3, 4], [[5, 6, 7]])
    # every result fits
    for max_length, max_prompt in [(3, 1), (7, 5), (8, 2)]:
        prompt, responses = truncate_sequences(list(range(9)), [list(range(7)), [1]], max_length, max_prompt)
        assert all(len(prompt) + len(r) <= max_length for r in responses)


def test_length_sorted_orders_by_prompt_plus_response_tokens_and_keeps_ties_in_order():
    batch = collate([[1], [1, 2, 3], [1, 2], [1, 2, 3]], [[5, 6], [5], [5, 6, 7, 8], [5, 6, 7]], PAD)
    # lengths: 1+2=3, 3+1=4, 2+4=6, 3+3=6
    assert length_sorted(batch, torch.tensor([3, 2, 1, 0])).tolist() == [0, 1, 3, 2]  # the tie 3, 2 keeps its order
    assert length_sorted(batch, torch.tensor([2, 0])).tolist() == [0, 2]


def test_map_micro_batches_groups_similar_lengths_and_stitches_rows_back_in_place():
    prompts = [[1], [1, 2, 3, 4], [1, 2], [1, 2, 3, 4]]
    responses = [[5, 6, 7, 8], [5], [5, 6], [5, 6, 7, 8]]  # lengths 5, 5, 4, 8
    values = [[float(10 * i + j) for j in range(len(r))] for i, r in enumerate(responses)]
    batch = collate(prompts, responses, PAD, per_token={"values": values})
    widths = []

    def double(micro):
        widths.append(micro["prompt_ids"].shape[1] + micro["response_ids"].shape[1])
        return (micro["values"] * 2,)

    (doubled,) = map_micro_batches(double, batch, micro_batch_size=2)
    assert response_lists(doubled, batch["response_mask"]) == [[2 * v for v in row] for row in values]
    # rows {2, 0} (prompts up to 2, responses up to 4 tokens) then {1, 3} (4 + 4): 2 x 6 + 2 x 8 = 28 positions
    assert widths == [2 + 4, 4 + 4]
    widths.clear()
    (unsorted,) = map_micro_batches(double, batch, micro_batch_size=2, sort_by_length=False)
    assert torch.equal(unsorted, doubled)
    assert widths == [4 + 4, 4 + 4]  # rows {0, 1} then {2, 3}: 32 positions
