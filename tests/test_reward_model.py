"""rlhf_core.reward_model: the Bradley-Terry loss by hand, one forward for chosen+rejected vs two, an encoder
(MiniLM, no EOS, text pairs) and a causal-LM backbone (chat template), a few steps that learn a separable set,
the NaN guard; the config; and the reward-model task bodies on real Parquet files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoTokenizer

from rlhf_core.batch import select_rows
from rlhf_core.checkpoint import OPTIMIZER_FILE, trainable_parameters
from rlhf_core.config import (OfflineOptimConfig, PreferenceDataConfig, RewardModelConfig, RuntimeConfig,
                              UnpairedDataConfig)
from rlhf_core.data import DatasetError
from rlhf_core.models import PAD_TOKEN, ModelLoadError
from rlhf_core.reward_model import (DEFAULT_REWARD_BACKBONE, bradley_terry_loss, collate_text_pairs, encode_pairs,
                                    ensure_pad_token, load_reward_model, pair_metrics, resolve_reward_backbone,
                                    reward_model_loss, reward_scores, sequence_rewards, train_reward_model_epoch)
from rlhf_core.update import NonFiniteError, Normalizers

PROMPTS = ["Write a one-sentence review of a quiet seaside hotel.", "Review a new phone.", "Review a cheap diner."]
CHOSEN = ["Lovely rooms and a wonderful view: I would happily stay again.", "Great battery.", "Tasty and friendly!"]
REJECTED = ["Dirty.", "The screen cracked on day one and support never answered my emails.", "Cold food, rude staff."]


@pytest.fixture(scope="session")
def minilm():
    return load_reward_model(resolve_reward_backbone(DEFAULT_REWARD_BACKBONE))


@pytest.fixture(scope="session")
def tiny_rm(tiny_model_dir):
    torch.manual_seed(0)
    return load_reward_model(tiny_model_dir)


# ---------------------------------------------------------------- the loss, by hand


def test_bradley_terry_loss_hand_values():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])  # r_c - r_r = [1, 0]
    loss, _ = bradley_terry_loss(chosen, rejected)
    expected = (math.log(1 + math.exp(-1.0)) + math.log(2.0)) / 2  # -log sigmoid(d) = log(1 + e^-d)
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_bradley_terry_loss_margin_and_centring():
    chosen, rejected, margin = torch.tensor([2.0, 1.0]), torch.tensor([1.0, -1.0]), torch.tensor([1.0, 0.5])
    # r_c - r_r - margin = [0, 1.5]; (r_c + r_r)^2 = [9, 0], mean 4.5
    loss, _ = bradley_terry_loss(chosen, rejected, margin, center_coef=0.1)
    expected = (math.log(2.0) + math.log(1 + math.exp(-1.5))) / 2 + 0.1 * 4.5
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_equal_rewards_give_log_2_and_count_as_wrong():
    rewards = torch.tensor([0.3, -1.2, 5.0])
    loss, metrics = bradley_terry_loss(rewards, rewards.clone())
    assert float(loss) == pytest.approx(math.log(2.0), rel=1e-6)
    assert metrics["reward_model/accuracy"] == 0.0 and metrics["reward_model/margin"] == 0.0


def test_pair_metrics():
    metrics = pair_metrics(torch.tensor([2.0, 0.0, 1.0, -1.0]), torch.tensor([1.0, 1.0, 1.0, -2.0]))
    # margins [1, -1, 0, 1]: two of four strictly positive
    assert metrics == pytest.approx({"reward_model/accuracy": 0.5, "reward_model/margin": 0.25,
                                     "reward_model/chosen_rewards": 0.5, "reward_model/rejected_rewards": 0.25})


def test_bradley_terry_gradient():
    chosen = torch.tensor([0.0, 2.0], requires_grad=True)
    rejected = torch.tensor([0.0, 0.0], requires_grad=True)
    loss, _ = bradley_terry_loss(chosen, rejected)
    loss.backward()
    # d/dr_c mean(-log sigmoid(r_c - r_r)) = -sigmoid(-(r_c - r_r)) / B; d/dr_r is its negative
    expected = -torch.sigmoid(-torch.tensor([0.0, 2.0])) / 2
    torch.testing.assert_close(chosen.grad, expected)
    torch.testing.assert_close(rejected.grad, -expected)


# ---------------------------------------------------------------- backbones and encoding


def test_resolve_reward_backbone(tiny_model_dir, tmp_path):
    assert (resolve_reward_backbone(DEFAULT_REWARD_BACKBONE) / "config.json").is_file()
    assert resolve_reward_backbone(str(tiny_model_dir)) == tiny_model_dir.resolve()
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_reward_backbone(str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_reward_backbone(str(tmp_path))


@pytest.mark.parametrize("backbone", ["minilm", "tiny_rm"])
def test_one_forward_for_chosen_and_rejected_equals_two(backbone, request):
    model, tokenizer = request.getfixturevalue(backbone)
    with torch.no_grad():  # the training step's layout: rows [chosen; rejected], padded together
        together = sequence_rewards(model, encode_pairs(tokenizer, PROMPTS + PROMPTS, CHOSEN + REJECTED, 128))
    chosen = reward_scores(model, tokenizer, PROMPTS, CHOSEN, batch_size=1, max_length=128)
    rejected = reward_scores(model, tokenizer, PROMPTS, REJECTED, batch_size=1, max_length=128)
    torch.testing.assert_close(together, torch.cat([chosen, rejected]), atol=1e-5, rtol=1e-5)


def test_new_score_head_comes_from_its_seed_and_leaves_the_global_generator_alone(tiny_model_dir):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first, _ = load_reward_model(tiny_model_dir, head_seed=7)
    assert torch.equal(torch.get_rng_state(), before)  # nothing else in the process sees a reseeded generator
    torch.manual_seed(456)  # another global state: the same head
    again, _ = load_reward_model(tiny_model_dir, head_seed=7)
    other, _ = load_reward_model(tiny_model_dir, head_seed=8)
    assert torch.equal(first.score.weight, again.score.weight)
    assert not torch.equal(first.score.weight, other.score.weight)


def test_minilm_encodes_text_pairs_and_truncates_the_prompt_first(minilm):
    model, tokenizer = minilm
    assert tokenizer.eos_token_id is None and tokenizer.pad_token == "[PAD]"  # BERT-style: its own pad is kept
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.pad_token_id == 0
    long_prompt = "please review " * 40
    batch = encode_pairs(tokenizer, [long_prompt, "Hi"], ["Great hotel.", "word " * 100], max_length=24)
    ids, types = batch["input_ids"], batch["token_type_ids"]
    assert ids.shape == (2, 24) and batch["attention_mask"].all()
    response = tokenizer("Great hotel.", add_special_tokens=False)["input_ids"]
    assert ids[0, -len(response) - 1:-1].tolist() == response  # [CLS] prompt... [SEP] response [SEP]: kept whole
    assert int((types[1] == 0).sum()) == 3  # a too-long response is cut, leaving [CLS] one-prompt-token [SEP]
    scores = reward_scores(model, tokenizer, PROMPTS, CHOSEN, batch_size=2, max_length=64)
    assert scores.shape == (3,) and torch.isfinite(scores).all()


def test_causal_lm_backbone_scores_with_the_chat_template(tiny_rm, tiny_model_dir):
    model, tokenizer = tiny_rm
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id and model.config.pad_token_id == tokenizer.pad_token_id
    batch = encode_pairs(tokenizer, PROMPTS, CHOSEN, max_length=32)
    full = encode_pairs(tokenizer, PROMPTS[:1], CHOSEN[:1], max_length=1000)["input_ids"][0]
    assert batch["input_ids"].shape[1] == 32 and batch["input_ids"][0].tolist() == full[-32:].tolist()  # end kept
    assert tokenizer.eos_token_id in full.tolist()  # the assistant turn is closed: the score reads a finished reply
    alone = reward_scores(model, tokenizer, PROMPTS[1:2], CHOSEN[1:2], batch_size=1, max_length=128)
    padded = reward_scores(model, tokenizer, PROMPTS, CHOSEN, batch_size=3, max_length=128)  # row 1 is right-padded
    torch.testing.assert_close(padded[1:2], alone, atol=1e-5, rtol=1e-5)


def test_pad_token_for_a_tokenizer_without_eos_or_pad(minilm):
    tokenizer = AutoTokenizer.from_pretrained(resolve_reward_backbone(DEFAULT_REWARD_BACKBONE))
    assert ensure_pad_token(tokenizer) is False and tokenizer.pad_token == "[PAD]"
    tokenizer.pad_token = None
    assert ensure_pad_token(tokenizer) is True and tokenizer.pad_token == PAD_TOKEN


# ---------------------------------------------------------------- training


def separable_pairs(n: int):
    good, bad = ["great", "lovely", "superb", "wonderful"], ["awful", "rude", "broken", "dirty"]
    prompts = [f"Review place number {i}." for i in range(n)]
    return (prompts, [f"It was {good[i % 4]} and {good[(i + 1) % 4]}." for i in range(n)],
            [f"It was {bad[i % 4]} and {bad[(i + 2) % 4]}." for i in range(n)])


def test_a_few_steps_learn_a_separable_set(tiny_model_dir):
    torch.manual_seed(0)
    model, tokenizer = load_reward_model(tiny_model_dir)
    prompts, chosen, rejected = separable_pairs(8)
    held_out = separable_pairs(12)  # pairs 8-11: prompts not trained on

    def score_held_out() -> dict[str, float]:
        rewards = reward_scores(model, tokenizer, held_out[0][8:] * 2, held_out[1][8:] + held_out[2][8:],
                                batch_size=8, max_length=64)
        return pair_metrics(*rewards.chunk(2))

    before = score_held_out()
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=3e-3, weight_decay=0.0)
    history = []
    for epoch in range(3):
        history += train_reward_model_epoch(model, optimizer, tokenizer, prompts, chosen, rejected, None, batch_size=4,
                                            micro_batch_size=2, max_length=64, center_coef=0.01, max_grad_norm=1.0,
                                            seed=epoch)
    assert len(history) == 6 and history[-1]["loss/train"] < history[0]["loss/train"]
    after = score_held_out()
    assert abs(before["reward_model/margin"]) < 0.1  # the random head has no real preference ...
    assert after["reward_model/accuracy"] == 1.0 and after["reward_model/margin"] > 1.0  # ... the trained one has


def test_non_finite_loss_stops_before_the_optimizer_step(tiny_model_dir):
    model, tokenizer = load_reward_model(tiny_model_dir)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    before = [p.detach().clone() for p in trainable_parameters(model)]
    with pytest.raises(NonFiniteError, match="loss"):
        train_reward_model_epoch(model, optimizer, tokenizer, PROMPTS[:2], CHOSEN[:2], REJECTED[:2],
                                 torch.tensor([0.0, float("nan")]), batch_size=2, micro_batch_size=2, max_length=64,
                                 center_coef=0.0, max_grad_norm=1.0, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(before, trainable_parameters(model)))
    assert not optimizer.state  # no step was taken


def test_loss_and_gradient_do_not_depend_on_the_micro_batch_split(tiny_model_dir):
    """Pairs of different lengths: one micro-batch of 3 pairs == 3 micro-batches of 1, and == the mean of
    bradley_terry_losses over the scores of `reward_scores` (an independent path)."""
    torch.manual_seed(0)
    model, tokenizer = load_reward_model(tiny_model_dir)
    margin = torch.tensor([0.0, 0.5, -0.2])
    batch = collate_text_pairs(tokenizer, PROMPTS, CHOSEN, REJECTED, max_length=64, margin=margin)
    norm = Normalizers(num_seqs=3.0, num_tokens=float(batch["response_mask"].sum()))

    def loss_and_grads(splits):
        model.zero_grad()
        total, metrics = 0.0, {}
        for rows in splits:
            loss, parts = reward_model_loss(model, select_rows(batch, torch.tensor(rows)), norm, center_coef=0.1)
            loss.backward()
            total += float(loss.detach())
            metrics = {k: metrics.get(k, 0.0) + float(v) for k, v in parts.items()}
        return total, metrics, [p.grad.clone() for p in trainable_parameters(model)]

    whole, whole_metrics, whole_grads = loss_and_grads([[0, 1, 2]])
    split, split_metrics, split_grads = loss_and_grads([[0], [1], [2]])
    assert split == pytest.approx(whole, abs=1e-5)
    assert split_metrics == pytest.approx(whole_metrics, abs=1e-5)
    for a, b in zip(whole_grads, split_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        chosen = reward_scores(model, tokenizer, PROMPTS, CHOSEN, batch_size=1, max_length=64)
        rejected = reward_scores(model, tokenizer, PROMPTS, REJECTED, batch_size=1, max_length=64)
    expected = bradley_terry_loss(chosen, rejected, margin, center_coef=0.1)[0]
    assert whole == pytest.approx(float(expected), abs=1e-5)
    assert whole_metrics["reward_model/accuracy"] == pytest.approx(float((chosen > rejected).float().mean()))


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("values, field", [
    ({"optim": {"lr": 0.0}}, "optim.lr"),
    ({"optim": {"batch_size": 0}}, "optim.batch_size"),
    ({"center_coef": -0.1}, "center_coef"),
    ({"data": {"eval_fraction": 1.0}}, "data.eval_fraction"),
    ({"data": {"chosen": "x"}}, "data.chosen"),  # unknown key: a typo is an error
    ({"tracking": {"experiment": ""}}, "tracking.experiment"),
])
def test_invalid_reward_model_config_is_rejected_by_name(values, field):
    with pytest.raises(ValidationError) as excinfo:
        RewardModelConfig(**values)
    assert [".".join(str(part) for part in e["loc"]) for e in excinfo.value.errors()] == [field]


def test_reward_model_config_defaults():
    config = RewardModelConfig()
    assert config.model.name_or_path == DEFAULT_REWARD_BACKBONE
    assert config.data.path == "data/preferences/train/pairs.parquet"
    assert (config.tracking.experiment, config.tracking.registered_model) == ("reward-model", "reward-model")


# ---------------------------------------------------------------- task bodies, on real Parquet


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_load_preference_dataset_maps_columns_and_holds_out_pairs(tmp_path, rlhf_home):
    from tasks.data import load_preference_dataset

    rows = [{"q": f"p{i}", "good": f"c{i}", "bad": f"r{i}", "gap": i / 10} for i in range(10)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    data = PreferenceDataConfig(path=str(path), eval_path=None, eval_fraction=0.3, prompt_column="q",
                                chosen_column="good", rejected_column="bad", margin_column="gap")
    splits = load_preference_dataset.fn(data, ["sha"], seed=0)
    train, held_out = splits.train.read(), splits.eval.read()
    assert list(train.columns) == ["pair_id", "prompt", "prompt_messages", "chosen", "rejected", "margin"]
    assert len(train) == 7 and len(held_out) == 3 and not set(train.prompt) & set(held_out.prompt)
    assert held_out.equals(load_preference_dataset.fn(data, ["sha"], seed=0).eval.read())  # seeded
    assert not held_out.equals(load_preference_dataset.fn(data, ["sha"], seed=1).eval.read())
    assert held_out["margin"].tolist() == [float(p[1:]) / 10 for p in held_out.prompt]

    rows[4]["bad"] = ""
    write_jsonl(path, rows)
    with pytest.raises(DatasetError, match=r"pairs.jsonl line 5: field 'rejected' \(column 'bad'\): expected a non-"):
        load_preference_dataset.fn(data, ["sha2"], seed=0)


def test_shipped_preference_sets_are_valid_and_disjoint(rlhf_home):
    """The shipped pairs (reward model, DPO) and unpaired examples (KTO) load with the default configs; no held-out
    prompt is trained on; they were made from the shipped prompt files."""
    from tasks.data import load_preference_dataset, load_unpaired_dataset

    pairs = load_preference_dataset.fn(PreferenceDataConfig(), ["shipped"], seed=0)
    unpaired = load_unpaired_dataset.fn(UnpairedDataConfig(), ["shipped"], seed=0)
    train_prompts = set(pairs.train.read().prompt) | set(unpaired.train.read().prompt)
    eval_prompts = set(pairs.eval.read().prompt) | set(unpaired.eval.read().prompt)
    assert len(pairs.train.read()) >= 200 and len(pairs.eval.read()) >= 150 and len(unpaired.train.read()) >= 500
    assert not train_prompts & eval_prompts
    project = Path(__file__).resolve().parents[1] / "data"
    assert train_prompts <= {json.loads(line)["prompt"] for line in open(project / "review_prompts.jsonl")}
    assert eval_prompts <= {json.loads(line)["prompt"] for line in open(project / "review_prompts_eval.jsonl")}


def test_train_epochs_then_evaluate(tmp_path, rlhf_home, tiny_model_dir, monkeypatch):
    import tasks.reward_model as t
    from tasks.data import load_preference_dataset

    prompts, chosen, rejected = separable_pairs(6)
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": p, "chosen": c, "rejected": r}
                                                 for p, c, r in zip(prompts, chosen, rejected)])
    splits = load_preference_dataset.fn(PreferenceDataConfig(path=str(path), eval_path=str(path)), ["x"], 0)
    backbone = t.resolve_reward_backbone.fn(str(tiny_model_dir))
    import rlhf_core.training as training
    from rlhf_core.config.training import RewardModelUpdateArgs, TrainingSetup

    restored, real_restore = [], training.restore_optimizer
    monkeypatch.setattr(training, "restore_optimizer", lambda opt, path: restored.append(real_restore(opt, path)))

    def args(epoch: int) -> RewardModelUpdateArgs:
        return RewardModelUpdateArgs(epoch=epoch, seed=0, max_length=64, center_coef=0.0, optim=OfflineOptimConfig(
            batch_size=4, micro_batch_size=2, lr=3e-3, max_grad_norm=1.0))

    setup = TrainingSetup(runtime=RuntimeConfig())
    first = t.train_reward_model_epoch.fn(backbone, splits.train, args(0), setup)
    second = t.train_reward_model_epoch.fn(first.checkpoint, splits.train, args(1), setup)
    assert restored == [False, True]  # epoch 1 continues epoch 0's Adam moments
    assert (tmp_path / "rlhf-home" / "checkpoints").is_dir() and first.checkpoint.sha256 != second.checkpoint.sha256
    assert (Path(second.checkpoint.path) / OPTIMIZER_FILE).is_file()
    metrics = second.metrics.read()
    assert len(metrics) == 2 and {"loss/train", "reward_model/accuracy", "reward_model/grad_norm"} <= set(metrics)
    scores = t.evaluate_reward_model.fn(second.checkpoint, splits.eval, batch_size=4, max_length=64,
                                        runtime=RuntimeConfig()).read()
    assert len(scores) == 6 and {"pair_id", "chosen_rewards", "rejected_rewards"} <= set(scores.columns)
    direct = reward_scores(*load_reward_model(second.checkpoint.path), prompts, chosen, batch_size=6, max_length=64)
    torch.testing.assert_close(torch.tensor(scores["chosen_rewards"].to_numpy()), direct)
