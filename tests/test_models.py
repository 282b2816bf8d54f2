import json
import re
import shutil

import pytest
import torch
from transformers import AutoTokenizer

from rlhf_core.models import (PAD_TOKEN, ModelLoadError, check_model_folder, ensure_distinct_pad_token, eos_token_ids,
                              load_causal_lm, parse_dtype, resolve_model_path)


def test_smollm2_pad_becomes_unk_without_new_token(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"  # as shipped
    size = len(tokenizer)
    assert ensure_distinct_pad_token(tokenizer) is False
    assert tokenizer.pad_token == tokenizer.unk_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len(tokenizer) == size


def test_distinct_pad_token_is_left_alone(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.pad_token = "<|im_start|>"
    assert ensure_distinct_pad_token(tokenizer) is False
    assert tokenizer.pad_token == "<|im_start|>"


def test_tokenizer_without_eos_raises(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.eos_token = None
    with pytest.raises(ModelLoadError, match="EOS"):
        ensure_distinct_pad_token(tokenizer)


@pytest.fixture
def no_unk_model_dir(tiny_model_dir, tmp_path):
    """The tiny model with a tokenizer that has no unk token and pad == eos."""
    folder = tmp_path / "no-unk"
    shutil.copytree(tiny_model_dir, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.unk_token = None
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(folder)
    return folder


def test_pad_token_added_and_embeddings_resized(no_unk_model_dir):
    raw = AutoTokenizer.from_pretrained(no_unk_model_dir)
    assert raw.unk_token is None and raw.pad_token_id == raw.eos_token_id
    vocab = len(raw)
    assert ensure_distinct_pad_token(raw) is True and len(raw) == vocab + 1

    model, tokenizer = load_causal_lm(no_unk_model_dir)
    assert tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.pad_token_id == vocab and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == vocab + 1
    assert model.get_output_embeddings().weight.shape[0] == vocab + 1
    assert model.config.pad_token_id == model.generation_config.pad_token_id == vocab
    with torch.no_grad():  # the new id indexes a real embedding row
        logits = model(input_ids=torch.tensor([[tokenizer.pad_token_id, tokenizer.eos_token_id]])).logits
    assert logits.shape == (1, 2, vocab + 1)


def test_load_causal_lm_sets_pad_token_id(tiny_model_dir, tmp_path):
    folder = tmp_path / "stale-pad"
    shutil.copytree(tiny_model_dir, folder)
    for name in ("config.json", "generation_config.json"):  # a checkpoint that still says pad == eos
        config = json.loads((folder / name).read_text())
        config["pad_token_id"] = config["eos_token_id"]
        (folder / name).write_text(json.dumps(config))
    model, tokenizer = load_causal_lm(folder)
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 0
    assert model.config.pad_token_id == model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.padding_side == "left"


def _missing(tmp_path):
    return tmp_path / "does-not-exist"


def _no_config(tmp_path):
    folder = tmp_path / "no-config"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def _no_weights(tmp_path):
    folder = tmp_path / "no-weights"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


@pytest.mark.parametrize("make_folder, reason", [
    (_missing, "does not exist"), (_no_config, "no config.json"), (_no_weights, "no weights")])
def test_bad_model_folder_raises_naming_the_path(tmp_path, make_folder, reason):
    path = make_folder(tmp_path)
    with pytest.raises(ModelLoadError, match=re.escape(str(path))) as error:
        check_model_folder(path)
    assert reason in str(error.value)
    with pytest.raises(ModelLoadError, match=re.escape(str(path))):
        resolve_model_path(str(path), cache_root=tmp_path / "cache")
    with pytest.raises(ModelLoadError, match=re.escape(str(path))):
        load_causal_lm(path)


def test_resolve_model_path_accepts_a_model_folder(tiny_model_dir, tmp_path):
    assert resolve_model_path(str(tiny_model_dir), cache_root=tmp_path) == tiny_model_dir.resolve()
    assert not (tmp_path / "smollm2-135m-instruct").exists()  # a path never triggers the default conversion


def test_eos_token_ids_never_contain_pad(tiny_model_dir):
    model, tokenizer = load_causal_lm(tiny_model_dir)  # a private copy: the generation config is edited below
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert eos_token_ids(model, tokenizer) == [eos]
    model.generation_config.eos_token_id = [eos, pad, 5]
    assert eos_token_ids(model, tokenizer) == sorted({eos, 5})
    model.generation_config.eos_token_id = pad
    assert eos_token_ids(model, tokenizer) == [eos]
    model.generation_config.eos_token_id = None
    assert eos_token_ids(model, tokenizer) == [eos]


def test_parse_dtype():
    assert parse_dtype("bfloat16") is torch.bfloat16
    assert parse_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="float64"):
        parse_dtype("float64")
