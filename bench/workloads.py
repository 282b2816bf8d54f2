"""The fixed workloads: model shapes and batch shapes, random-init weights and random token ids.

Speed does not depend on what the weights or the tokens say, so nothing is loaded from disk: a model is built from
its config in a second and every run of a workload sees the same shapes. Generation never stops early (no EOS id),
so every response has exactly `response_len` tokens.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

SMOL = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
            intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)  # SmolLM2-135M


@dataclass(frozen=True)
class Workload:
    name: str
    model: dict
    prompts: int = 8          # GRPO/PPO prompts per step, DPO pairs / KTO examples / RM pairs per step
    samples: int = 4          # GRPO/PPO responses per prompt
    prompt_len: int = 32
    response_len: int = 64
    micro_batch_size: int = 8


WORKLOADS = {
    "smol": Workload("smol", SMOL),
    "small": Workload("small", {**SMOL, "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                                "num_key_value_heads": 2, "intermediate_size": 688}),
    # seconds per step on a CPU: for checking a script end to end (bench/gpu_check.py --dry), not for numbers
    "tiny": Workload("tiny", {**SMOL, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                              "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 512},
                     prompts=2, samples=2, prompt_len=8, response_len=8, micro_batch_size=2),
}
PAD_ID = 0


def llama_config(workload: Workload, **extra) -> LlamaConfig:
    return LlamaConfig(**workload.model, max_position_embeddings=2048, pad_token_id=PAD_ID, bos_token_id=1,
                       eos_token_id=2, attn_implementation="sdpa", **extra)


def causal_lm(workload: Workload, device: str, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(workload)).to(device).eval()


def random_model_folder(workload: Workload, home: Path, tokenizer_dir: Path) -> Path:
    """A random-init causal LM of the workload's shape (seed 0) saved with SmolLM2's tokenizer under `home`, for
    the flow benchmarks."""
    from rlhf_core.models import load_tokenizer

    tokenizer, _ = load_tokenizer(tokenizer_dir)
    folder = home / f"{workload.name}-random"
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config(workload)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sequence_classifier(workload: Workload, device: str, seed: int = 0) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(llama_config(workload, num_labels=1)).to(device).eval()


def token_rows(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """`count` rows of `length` random ids, never the pad, BOS or EOS id."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (count, length), generator=generator).tolist()


def body_params(model: torch.nn.Module) -> int:
    """Parameters that take part in a matmul at every position: all but the embedding table and the LM head."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = {id(embedding)} | ({id(head.weight)} if head is not None else set())
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def forward_flops(model: torch.nn.Module, config: LlamaConfig, rows: int, seq_len: int, scored_len: int) -> float:
    """Model FLOPs of one forward pass over `rows` sequences of `seq_len` tokens of which the last `scored_len` go
    through the LM head (log-probs are only taken on responses): 2 FLOPs per weight per token (Kaplan et al.
    2020) plus causal attention's scores and weighted sums (2 matmuls of hidden x seq_len / 2 per token and
    layer, 2 FLOPs each)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_flops = 2 * head.weight.numel() * scored_len if head is not None else 0
    attention = 2 * config.num_hidden_layers * config.hidden_size * seq_len  # per token
    return float(rows * (seq_len * (2 * body_params(model) + attention) + head_flops))


def train_flops(model: torch.nn.Module, config: LlamaConfig, rows: int, seq_len: int, scored_len: int) -> float:
    """Forward + backward (the backward costs two forwards). Recomputation is not counted: this is the useful
    work, the numerator of model-FLOP utilisation."""
    return 3 * forward_flops(model, config, rows, seq_len, scored_len)


@contextlib.contextmanager
def scratch_data_folder(*unset: str):
    """(fresh RLHF_HOME, this machine's converted SmolLM2 folder for its tokenizer) for a flow benchmark; the
    folder (checkpoints, registry: GBs for smol) is deleted afterwards. `unset`: environment variables that would
    point the run elsewhere (PREFECT_API_URL, MLFLOW_TRACKING_URI). Call before importing `tasks`, which binds
    Prefect to the data folder."""
    from rlhf_core.models import DEFAULT_MODEL, resolve_model_path

    user_home = Path(os.environ.get("RLHF_HOME") or Path.home() / ".rlhf").expanduser()
    tokenizer_dir = resolve_model_path(DEFAULT_MODEL, user_home / "models")
    home = Path(tempfile.mkdtemp(prefix="rlhf-bench-"))
    os.environ["RLHF_HOME"] = str(home)
    for name in unset:
        os.environ.pop(name, None)
    try:
        yield home, tokenizer_dir
    finally:
        shutil.rmtree(home, ignore_errors=True)
