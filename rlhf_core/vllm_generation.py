"""Optional vLLM rollout engine (`generation.backend: vllm`), for GPU machines with vLLM installed.

`vllm` is imported inside functions only: importing this module (the config checks do, and so do vLLM's worker
processes, for `CheckpointWeights`) never needs it, so CPU installs are untouched.

It returns the same `generation.Rollouts` as `generation.sample_responses`, cut the same way (EOS kept, `finished`
only on EOS), with three departures:
- the recorded log-probs are vLLM's `processed_logprobs`: those of the distribution each token was drawn from
  (tempered and, with top_p < 1, truncated and renormalised), where generation.py records the tempered distribution
  before truncation. Both equal the trainer's when top_p = 1. What is left (another attention kernel, bf16
  weights) is the mismatch `loss.tis_cap` corrects: min(exp(old_logprobs - sampling_logprobs), cap).
- each row still samples with its own seed (SamplingParams.seed = tasks.rollouts.row_seed), so a response is
  reproducible on one vLLM release and GPU; but its random streams are vLLM's and its kernels are not
  batch-invariant, so responses differ from the transformers backend's and a sharded stage is not byte-identical
  to the unsharded one.
- `generation.batch_size` does not apply: vLLM schedules its own batches (continuous batching, paged KV cache).

Weights. One engine per process (`ENGINES`) lives across iterations. It starts with dummy weights, and every
checkpoint, the first included, is loaded into it in place the way vLLM's RLHF examples do
(examples/offline_inference/rlhf_utils.py): `LLM.collective_rpc` calls a method of a worker extension class
(`CheckpointWeights`, injected with `worker_extension_cls`) that reads the checkpoint's model safetensors and hands
them to the model's `load_weights`. The prefix cache is reset after each load: its KV blocks were computed with the
previous weights. A checkpoint whose config.json differs (another model, a resized vocabulary) gets a new engine.

Versions. Written against the API of vLLM 0.30.0 (vllm/entrypoints/llm.py, vllm/sampling_params.py,
vllm/v1/worker/gpu_worker.py of that release): the newest release whose pins (torch==2.13.0, transformers>=5.10.4)
fit this project's, hence the `vllm>=0.28,<0.31` extra. `logprobs_mode` appeared in 0.10.0 (vLLM PR 21398); releases
before MIN_VLLM are refused. Not run on a GPU in this project's CI (none available): the end-to-end test in
tests/test_vllm_generation.py runs where vLLM and CUDA exist.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch

from rlhf_core.generation import Rollouts
from rlhf_core.lora import is_adapter_folder
from rlhf_core.models import eos_token_ids

MIN_VLLM = "0.10.2"  # logprobs_mode appeared in 0.10.0; ms-swift's GRPO uses processed_logprobs from 0.10.2 on
WORKER_EXTENSION = "rlhf_core.vllm_generation.CheckpointWeights"
# config.json keys that change nothing vLLM allocates: checkpoints differing only in them share an engine
VOLATILE_CONFIG_KEYS = frozenset({"_name_or_path", "transformers_version", "torch_dtype", "dtype", "pad_token_id",
                                  "use_cache"})


def vllm_available() -> bool:
    """vLLM is importable here (found without importing it: importing vllm is slow and probes the platform)."""
    return importlib.util.find_spec("vllm") is not None


def vllm_problem() -> str | None:
    """Why the vLLM backend cannot run in this environment, or None when it can."""
    if not vllm_available():
        return ("vllm is not installed: pip install '.[vllm]' (the rlhf-pipeline[vllm] extra) on a CUDA machine, "
                "or use backend 'transformers'")
    try:
        version = importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:  # a source checkout on sys.path: no version to compare
        return None
    from packaging.version import Version

    if Version(version) < Version(MIN_VLLM):
        return f"vllm {version} is installed; this backend needs vllm>={MIN_VLLM} (logprobs_mode)"
    return None


# ---------------------------------------------------------------- checkpoint files


def architecture_fingerprint(folder: str | Path) -> str:
    """sha256 of a checkpoint's config.json without VOLATILE_CONFIG_KEYS: equal fingerprints, same engine."""
    config = json.loads((Path(folder) / "config.json").read_text())
    kept = {key: value for key, value in config.items() if key not in VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def model_weight_files(folder: str | Path) -> list[str]:
    """Absolute paths of the safetensors files that hold a checkpoint's model weights. Never a bare `*.safetensors`
    glob: optimizer.safetensors (Adam's state) sits beside the weights, and a merged LoRA checkpoint keeps its
    adapter under adapter/."""
    folder = Path(folder).resolve()
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # sharded: the index names the files
        return [str(folder / name) for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (folder / "model.safetensors").is_file():
        return [str(folder / "model.safetensors")]
    if is_adapter_folder(folder):
        raise ValueError(f"{folder} is an adapter-only LoRA checkpoint: the vLLM backend loads full weights; set "
                         "model.lora.save: merged")
    raise ValueError(f"{folder} has no model.safetensors (or index): the vLLM backend loads safetensors weights "
                     "only; re-save the model with save_pretrained")


def checkpoint_eos_ids(folder: str | Path, tokenizer, trust_remote_code: bool = False) -> list[int]:
    """`models.eos_token_ids` of a checkpoint without loading its weights (the engine holds those): the generation
    config transformers would attach to the loaded model, read on its own."""
    from transformers import AutoConfig, GenerationConfig

    try:
        generation_config = GenerationConfig.from_pretrained(folder)
    except OSError:  # no generation_config.json: transformers derives one from config.json, and so do we
        generation_config = GenerationConfig.from_model_config(
            AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code))
    return eos_token_ids(SimpleNamespace(generation_config=generation_config), tokenizer)


# ---------------------------------------------------------------- the engine and its weights


class CheckpointWeights:
    """Mixed into vLLM's GPU worker by `LLM(worker_extension_cls=WORKER_EXTENSION)` and called through
    `LLM.collective_rpc`; runs in the engine's worker process, where `self.model_runner` is vLLM's. Its names must
    not exist on vLLM's Worker (vLLM asserts so), hence the prefix."""

    def rlhf_load_checkpoint(self, files: list[str]) -> list[str]:
        """Copy every tensor of `files` into the live model in place; returns the parameters none of them set."""
        from safetensors import safe_open

        model = self.model_runner.get_model()
        loaded: set[str] = set()
        with torch.no_grad(), _vllm_config_scope(self):
            for file in files:
                with safe_open(file, framework="pt", device="cpu") as handle:
                    # load_weights maps HF names (q/k/v_proj) onto vLLM's fused parameters (qkv_proj) and copies
                    # in place, so CUDA graphs captured on these parameters stay valid
                    done = model.load_weights(weights=((name, handle.get_tensor(name)) for name in handle.keys()))
                loaded.update(done or ())
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if not loaded:  # this model's load_weights reports nothing: no check possible
            return []
        return sorted(name for name, _ in model.named_parameters() if name not in loaded)


def _vllm_config_scope(worker):
    """The config some layers' weight loaders look up, set as vLLM's own reload_weights sets it."""
    from vllm.config import set_current_vllm_config

    return set_current_vllm_config(worker.vllm_config)


@dataclass(frozen=True)
class EngineSpec:
    """What an engine is built for; a checkpoint with an equal spec is loaded into the live engine in place."""

    architecture: str  # architecture_fingerprint of the checkpoint
    dtype: str
    gpu_memory_utilization: float
    trust_remote_code: bool = False
    max_model_len: int | None = None  # None: the model's own limit


def build_engine(spec: EngineSpec, model_dir: str):
    """A vLLM engine for `spec`, with dummy weights (load_checkpoint brings the real ones)."""
    from vllm import LLM

    # the flow process runs threads (Prefect, MLflow) and, after the first update, CUDA: forking it is unsafe
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    limit = {} if spec.max_model_len is None else {"max_model_len": spec.max_model_len}
    return LLM(model=model_dir, dtype=spec.dtype, gpu_memory_utilization=spec.gpu_memory_utilization,
               trust_remote_code=spec.trust_remote_code, seed=0, **limit,
               load_format="dummy",  # the first checkpoint loads like every later one, through load_checkpoint
               skip_tokenizer_init=True,  # prompts arrive as token ids; the stop ids are ours (sampling_kwargs)
               generation_config="vllm",  # no defaults or extra stop ids from generation_config.json
               logprobs_mode="processed_logprobs",  # log-probs of the distribution actually sampled from
               worker_extension_cls=WORKER_EXTENSION)


def load_checkpoint(engine, files: list[str]) -> None:
    """Load a checkpoint's weight files into a live engine (every worker) and drop its stale prefix cache."""
    missing = [name for worker in engine.collective_rpc("rlhf_load_checkpoint", args=(files,)) for name in worker]
    if missing:
        raise RuntimeError(f"the checkpoint left {len(missing)} parameters of vLLM's model unset ({missing[:4]}...): "
                           "its weight names do not match vLLM's implementation of this architecture")
    if engine.reset_prefix_cache() is False:  # cached KV blocks were computed with the previous weights
        raise RuntimeError("vLLM refused to reset its prefix cache after a weight update (requests still running)")


def shutdown_engine(engine) -> None:
    """Stop an engine's core process and free what this process can; vLLM has no public close()."""
    core = getattr(getattr(engine, "llm_engine", None), "engine_core", None)
    if core is not None:
        core.shutdown()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class EngineHolder:
    """The process's live engine, kept between iterations: building one takes tens of seconds and a share of GPU
    memory, a weight load about as long as reading the checkpoint. Hold `lock` while using the engine: shards on
    the thread runner share it (LLM is not thread-safe)."""

    def __init__(self, build: Callable[[EngineSpec, str], Any] = build_engine):
        self.build = build
        self.lock = threading.RLock()
        self.spec: EngineSpec | None = None
        self.engine = None
        self.weights_id: str | None = None  # content hash of the checkpoint the engine holds
        self.builds = self.loads = 0

    def engine_for(self, spec: EngineSpec, model_dir: str, weights_id: str):
        """The engine holding checkpoint `model_dir` (content hash `weights_id`): the live one, loaded in place when
        its weights are older, or a new one when `spec` changed."""
        files = model_weight_files(model_dir)  # a checkpoint vLLM cannot load fails before any engine starts
        if self.engine is not None and self.spec != spec:
            self.close()
        if self.engine is None:
            self.engine = self.build(spec, model_dir)
            self.spec, self.weights_id = spec, None
            self.builds += 1
        if self.weights_id != weights_id:
            self.weights_id = None  # a load that fails half-way leaves weights of no checkpoint
            load_checkpoint(self.engine, files)
            self.weights_id = weights_id
            self.loads += 1
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            shutdown_engine(self.engine)
        self.spec = self.engine = self.weights_id = None


ENGINES = EngineHolder()


# ---------------------------------------------------------------- sampling


def sampling_kwargs(seed: int | None, *, temperature: float, top_p: float, max_new_tokens: int,
                    eos_ids: Sequence[int]) -> dict:
    """SamplingParams of one row: one response from its own seed, the log-prob of the sampled token only
    (logprobs=0), stopping on any of `eos_ids` (the engine has no tokenizer, hence no EOS of its own).
    seed None or temperature 0: greedy, as in generation.sample_responses."""
    greedy = seed is None or temperature == 0
    return dict(n=1, temperature=0.0 if greedy else temperature, top_p=top_p, seed=None if greedy else int(seed),
                max_tokens=max_new_tokens, stop_token_ids=list(eos_ids), logprobs=0, detokenize=False)


def completion_lists(outputs) -> tuple[list[list[int]], list[list[float]], list[str]]:
    """Token ids, sampled-token log-probs and finish reason of each vLLM RequestOutput's single completion."""
    token_ids, token_logprobs, finish_reasons = [], [], []
    for output in outputs:
        completion = output.outputs[0]
        tokens = list(completion.token_ids)
        token_ids.append(tokens)
        # each position maps token id -> Logprob; the sampled token is always among them
        token_logprobs.append([position[token].logprob for position, token in zip(completion.logprobs or [], tokens)])
        finish_reasons.append(completion.finish_reason)
    return token_ids, token_logprobs, finish_reasons


def rollouts_from_completions(prompt_ids: Sequence[Sequence[int]], token_ids: Sequence[Sequence[int]],
                              token_logprobs: Sequence[Sequence[float]], finish_reasons: Sequence[str | None],
                              eos_ids: Sequence[int]) -> Rollouts:
    """`Rollouts` from vLLM's per-row lists, cut as generation.py cuts its own: a response ends at its first EOS and
    keeps it (the policy must learn to stop: EOS stays in the mask), and is `finished` only when it ends on EOS.
    The flag comes from the tokens, not finish_reason: vLLM releases that check the length first report "length"
    for a response whose last allowed token is EOS."""
    if not len(prompt_ids) == len(token_ids) == len(token_logprobs) == len(finish_reasons):
        raise ValueError("prompt_ids, token_ids, token_logprobs and finish_reasons need one entry per row")
    eos = set(eos_ids)
    responses, logprobs, finished = [], [], []
    for row, (tokens, row_logprobs, reason) in enumerate(zip(token_ids, token_logprobs, finish_reasons)):
        if reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM ended row {row} with finish_reason {reason!r} (expected 'stop' or 'length')")
        if len(row_logprobs) != len(tokens):
            raise RuntimeError(f"vLLM returned {len(row_logprobs)} log-probs for the {len(tokens)} tokens of row {row}")
        end = next((i + 1 for i, token in enumerate(tokens) if token in eos), len(tokens))
        ends_on_eos = end > 0 and tokens[end - 1] in eos
        if reason == "stop" and not ends_on_eos:
            raise RuntimeError(f"vLLM stopped row {row} without any of the EOS ids {sorted(eos)}: a stop condition "
                               "this backend did not ask for")
        responses.append(list(tokens[:end]))
        logprobs.append([float(lp) for lp in row_logprobs[:end]])
        finished.append(ends_on_eos)
    return Rollouts([list(p) for p in prompt_ids], responses, logprobs, finished)


def _sampling_params(**kwargs):
    from vllm import SamplingParams

    return SamplingParams(**kwargs)


def sample_responses_vllm(checkpoint_dir: str | Path, weights_id: str, prompt_ids: list[list[int]], *,
                          eos_ids: list[int], max_new_tokens: int, temperature: float, top_p: float,
                          seeds: list[int] | None, dtype: str, gpu_memory_utilization: float,
                          trust_remote_code: bool = False, holder: EngineHolder | None = None) -> Rollouts:
    """`generation.sample_responses` on the process's vLLM engine: one response per prompt, every row in one call.
    seeds: one per prompt (None: greedy). weights_id: the checkpoint's content hash; the engine reloads its weights
    only when it changes."""
    holder = ENGINES if holder is None else holder
    model_dir = str(Path(checkpoint_dir).resolve())
    spec = EngineSpec(architecture_fingerprint(model_dir), dtype, gpu_memory_utilization, trust_remote_code)
    params = [_sampling_params(**sampling_kwargs(seed, temperature=temperature, top_p=top_p,
                                                 max_new_tokens=max_new_tokens, eos_ids=eos_ids))
              for seed in (seeds if seeds is not None else [None] * len(prompt_ids))]
    prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]  # a vllm.inputs.TokensPrompt each
    with holder.lock:
        engine = holder.engine_for(spec, model_dir, weights_id)
        outputs = engine.generate(prompts, params, use_tqdm=False)
    return rollouts_from_completions(prompt_ids, *completion_lists(outputs), eos_ids)
