"""Checkpoints: weights + tokenizer + optimizer state (safetensors), written atomically under a content hash.
Resuming from a checkpoint must continue training exactly as if it had never stopped."""

import os

import pytest
import torch
from safetensors import safe_open

from rlhf_core.checkpoint import OPTIMIZER_FILE, optimizer_tensors, restore_optimizer, save_checkpoint
from rlhf_core.io import sha256_dir
from rlhf_core.models import load_causal_lm

LR = 1e-3


def lm_batch(tokenizer):
    """Two short texts of equal length (no padding needed) for a plain next-token loss."""
    ids = [tokenizer(t)["input_ids"] for t in ["The answer is 42.", "One plus one is two."]]
    width = min(len(i) for i in ids)
    return torch.tensor([i[:width] for i in ids])  # [2, L]


def train_step(model, optimizer, input_ids):
    optimizer.zero_grad(set_to_none=True)
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)


def weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def continuous(tiny_model_dir):
    """Weights after 2 uninterrupted AdamW steps."""
    model, tokenizer = load_causal_lm(tiny_model_dir)
    optimizer = adamw(model)
    input_ids = lm_batch(tokenizer)
    train_step(model, optimizer, input_ids)
    train_step(model, optimizer, input_ids)
    return weights(model)


@pytest.fixture(scope="module")
def one_step_checkpoint(tiny_model_dir, tmp_path_factory):
    """(folder, digest, optimizer) after 1 AdamW step, saved with save_checkpoint."""
    model, tokenizer = load_causal_lm(tiny_model_dir)
    optimizer = adamw(model)
    train_step(model, optimizer, lm_batch(tokenizer))
    folder, digest = save_checkpoint(model, tokenizer, optimizer, tmp_path_factory.mktemp("checkpoints"))
    return folder, digest, optimizer


def test_resume_with_optimizer_state_equals_continuous_training(continuous, one_step_checkpoint):
    folder, _, _ = one_step_checkpoint
    model, tokenizer = load_causal_lm(folder)
    optimizer = adamw(model)
    assert restore_optimizer(optimizer, folder) is True
    train_step(model, optimizer, lm_batch(tokenizer))
    resumed = weights(model)
    assert resumed.keys() == continuous.keys()
    # the same machine, the same kernels, the same order of operations: bit-exact is the claim (across machines it
    # is not; see docs/tolerances.md)
    for name, value in continuous.items():
        assert torch.equal(resumed[name], value), f"{name}: max difference {(resumed[name] - value).abs().max()}"


def test_resume_without_optimizer_state_differs(continuous, one_step_checkpoint):
    """A fresh Adam's first step moves every weight by ~lr: the saved moments are what make resuming exact."""
    folder, _, _ = one_step_checkpoint
    model, tokenizer = load_causal_lm(folder)
    optimizer = adamw(model)  # not restored
    train_step(model, optimizer, lm_batch(tokenizer))
    restarted = weights(model)
    largest = max((restarted[n] - v).abs().max().item() for n, v in continuous.items())
    assert largest > 1e-4


def test_optimizer_file_is_safetensors_and_nothing_is_pickled(one_step_checkpoint):
    folder, _, optimizer = one_step_checkpoint
    files = {p.name for p in folder.iterdir()}
    assert OPTIMIZER_FILE == "optimizer.safetensors" and OPTIMIZER_FILE in files
    assert "model.safetensors" in files and "config.json" in files and "tokenizer.json" in files
    for path in folder.rglob("*"):
        assert path.suffix not in (".bin", ".pt", ".pth", ".pkl", ".pickle"), path
        head = path.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", f"{path.name} looks like a pickle / torch.save archive"
    expected = optimizer_tensors(optimizer)
    with safe_open(str(folder / OPTIMIZER_FILE), framework="pt") as f:
        assert set(f.keys()) == set(expected)
        assert {k.split(".", 1)[1] for k in f.keys()} == {"step", "exp_avg", "exp_avg_sq"}
        for key, value in expected.items():
            assert torch.equal(f.get_tensor(key), value), key


def test_restore_optimizer_without_state_file(tiny_model_dir, tmp_path):
    model, tokenizer = load_causal_lm(tiny_model_dir)
    folder, _ = save_checkpoint(model, tokenizer, None, tmp_path)
    assert not (folder / OPTIMIZER_FILE).exists()
    optimizer = adamw(model)
    assert restore_optimizer(optimizer, folder) is False
    assert len(optimizer.state) == 0


def test_restore_keeps_the_configured_hyper_parameters(one_step_checkpoint):
    folder, _, _ = one_step_checkpoint
    model, _ = load_causal_lm(folder)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5 * LR, weight_decay=0.0)
    restore_optimizer(optimizer, folder)
    assert optimizer.param_groups[0]["lr"] == 5 * LR and optimizer.param_groups[0]["weight_decay"] == 0.0
    assert int(optimizer.state[next(iter(model.parameters()))]["step"]) == 1


def test_folder_is_named_by_content_and_written_once(one_step_checkpoint, tiny_model_dir):
    folder, digest, optimizer = one_step_checkpoint
    root = folder.parent
    assert folder.name == digest[:16] and sha256_dir(folder) == digest
    model, tokenizer = load_causal_lm(folder)
    again, digest_again = save_checkpoint(model, tokenizer, optimizer, root)  # identical content
    assert (again, digest_again) == (folder, digest)
    assert os.listdir(root) == [folder.name]  # one folder, no .tmp-* entries
    other, other_digest = save_checkpoint(model, tokenizer, None, root)  # without the optimizer: other content
    assert other_digest != digest and sorted(os.listdir(root)) == sorted([folder.name, other.name])
