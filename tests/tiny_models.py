"""Test-only models: a tiny random-init Llama with a real tokenizer (~3 M parameters with SmolLM2's 49k vocabulary)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from rlhf_core.io import write_folder_atomically
from rlhf_core.models import load_tokenizer


def tiny_llama_config(vocab_size: int, **overrides) -> LlamaConfig:
    """A random-init Llama small enough for unit tests (~3 M parameters with a 49k vocabulary)."""
    values = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)
    return LlamaConfig(vocab_size=vocab_size, **{**values, **overrides})


def save_tiny_model(dest: Path, tokenizer_source: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random-init causal LM saved with a real tokenizer, for tests and benchmarks."""
    tokenizer, _ = load_tokenizer(tokenizer_source)
    torch.manual_seed(seed)
    config = tiny_llama_config(len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **overrides)
    model = AutoModelForCausalLM.from_config(config)
    return write_folder_atomically(lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)),
                                   Path(dest))
