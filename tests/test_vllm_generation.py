"""The optional vLLM backend (rlhf_core/vllm_generation.py). vLLM is not installed here (CPU only): everything but the
engine itself is tested with plain lists, fake engines and fake workers; the last test runs the GRPO flow on a real
engine and is skipped unless vLLM and a CUDA GPU are present."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

import rlhf_core.vllm_generation as vg
from rlhf_core.config import (GenerationConfig, GRPOConfig, LoraConfig, LossConfig, ModelConfig, OptimConfig,
                              RuntimeConfig)
from rlhf_core.generation import _to_rollouts
from rlhf_core.models import eos_token_ids, load_tokenizer

EOS, EOS2 = 2, 9


# ---------------------------------------------------------------- import and config


def test_importing_the_backend_never_imports_vllm(tmp_path):
    # a fake vllm that fails on import: find_spec sees it (vllm_available), only an import would trip it
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text("raise ImportError('vllm was imported')\n")
    code = ("import sys\nimport rlhf_core.vllm_generation as vg, rlhf_core.config, tasks.rollouts\n"
            "print(vg.vllm_available(), 'vllm' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)}, cwd=Path(__file__).parents[1])
    assert result.stdout.split() == ["True", "False"]


@pytest.mark.skipif(vg.vllm_available(), reason="vllm is installed here")
def test_vllm_backend_without_vllm_names_the_field_and_the_install():
    with pytest.raises(ValidationError, match=r"generation\.backend='vllm': vllm is not installed: pip install "
                                              r"'\.\[vllm\]'"):
        GRPOConfig(generation=GenerationConfig(backend="vllm"), runtime=RuntimeConfig(device="cuda"))
    assert GRPOConfig().generation.backend == "transformers"  # the default needs nothing


@pytest.fixture
def vllm_installed(monkeypatch):
    monkeypatch.setattr(vg, "vllm_problem", lambda: None)


@pytest.mark.parametrize("overrides, message", [
    ({"runtime": RuntimeConfig(device="cpu")}, r"CUDA GPUs only, but runtime.device is 'cpu'"),
    ({"model": ModelConfig(lora=LoraConfig(save="adapter"))}, r"model.lora.save is 'adapter'.*save: merged"),
    ({"runtime": RuntimeConfig(device="cuda", num_processes=2)}, r"num_processes=2 is not supported yet"),
])
def test_vllm_backend_refusals(vllm_installed, overrides, message):
    values = {"runtime": RuntimeConfig(device="cuda"), **overrides}
    with pytest.raises(ValidationError, match=message):
        GRPOConfig(generation=GenerationConfig(backend="vllm"), **values)


def test_vllm_backend_accepted_on_cuda_with_merged_lora(vllm_installed):
    config = GRPOConfig(generation=GenerationConfig(backend="vllm", vllm_gpu_memory_utilization=0.5),
                        runtime=RuntimeConfig(device="cuda:0"), model=ModelConfig(lora=LoraConfig(save="merged")),
                        loss=LossConfig(tis_cap=2.0))
    assert config.generation.backend == "vllm" and config.generation.vllm_gpu_memory_utilization == 0.5


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_gpu_memory_share_is_a_fraction(share):
    with pytest.raises(ValidationError):
        GenerationConfig(vllm_gpu_memory_utilization=share)


def test_vllm_problem_reads_the_installed_version(monkeypatch):
    monkeypatch.setattr(vg, "vllm_available", lambda: True)
    monkeypatch.setattr(vg.importlib.metadata, "version", lambda name: "0.9.2")
    assert "needs vllm>=0.10.2" in vg.vllm_problem()
    monkeypatch.setattr(vg.importlib.metadata, "version", lambda name: "0.30.0")
    assert vg.vllm_problem() is None


# ---------------------------------------------------------------- vLLM outputs -> rollout columns


def test_response_keeps_eos_and_is_finished():
    out = vg.rollouts_from_completions([[7, 8]], [[5, 6, EOS]], [[-0.5, -1.0, -0.25]], ["stop"], [EOS])
    assert out.prompt_ids == [[7, 8]] and out.response_ids == [[5, 6, EOS]]
    assert out.sampling_logprobs == [[-0.5, -1.0, -0.25]] and out.finished == [True]


def test_length_cut_response_is_not_finished():
    out = vg.rollouts_from_completions([[7]], [[5, 6, 4]], [[-1.0, -2.0, -3.0]], ["length"], [EOS])
    assert out.response_ids == [[5, 6, 4]] and out.finished == [False]


def test_eos_as_last_allowed_token_counts_as_finished_whatever_the_reason():
    # releases that check max_tokens before stop ids report "length" here; generation.py calls it finished
    out = vg.rollouts_from_completions([[7], [7]], [[5, EOS], [EOS2]], [[-1.0, -2.0], [-0.5]], ["length", "stop"],
                                       [EOS, EOS2])
    assert out.finished == [True, True] and out.response_ids == [[5, EOS], [EOS2]]


def test_conversion_matches_the_transformers_path_cut():
    # generation.py pads finished rows with pad ids after EOS; its cut of the padded matrix must equal ours
    rows = [[5, EOS], [5, 6, 4, 3], [EOS2], [6, 6, 6, EOS]]
    logprobs = [[-float(i + j + 1) for j in range(len(r))] for i, r in enumerate(rows)]
    pad = 0
    tokens = torch.tensor([r + [pad] * (4 - len(r)) for r in rows])
    padded_logprobs = torch.tensor([lp + [0.0] * (4 - len(lp)) for lp in logprobs])
    expected = _to_rollouts([[1]] * 4, tokens, padded_logprobs, {EOS, EOS2})
    reasons = ["stop", "length", "stop", "stop"]
    assert vg.rollouts_from_completions([[1]] * 4, rows, logprobs, reasons, [EOS, EOS2]) == expected


@pytest.mark.parametrize("tokens, logprobs, reason, message", [
    ([5, EOS], [-1.0, -1.0], "abort", "finish_reason 'abort'"),
    ([5, EOS], [-1.0], "stop", "1 log-probs for the 2 tokens"),
    ([5, 6], [-1.0, -1.0], "stop", "without any of the EOS ids"),
])
def test_unexpected_engine_output_is_an_error(tokens, logprobs, reason, message):
    with pytest.raises(RuntimeError, match=message):
        vg.rollouts_from_completions([[1]], [tokens], [logprobs], [reason], [EOS])


def test_completion_lists_pick_the_sampled_tokens_logprob():
    def position(sampled, logprob, other=None):  # a vLLM logprobs position: {token id: Logprob}
        entries = {sampled: SimpleNamespace(logprob=logprob)}
        if other is not None:  # a top-1 token that is not the sampled one
            entries[other] = SimpleNamespace(logprob=-0.01)
        return entries

    completion = SimpleNamespace(token_ids=(5, EOS), logprobs=[position(5, -1.5, other=4), position(EOS, -0.5)],
                                 finish_reason="stop")
    outputs = [SimpleNamespace(outputs=[completion])]
    assert vg.completion_lists(outputs) == ([[5, EOS]], [[-1.5, -0.5]], ["stop"])


def test_sampling_kwargs_per_row_seed_and_greedy():
    sampled = vg.sampling_kwargs(2**62 + 3, temperature=0.7, top_p=0.9, max_new_tokens=16, eos_ids=[EOS, EOS2])
    assert sampled == dict(n=1, temperature=0.7, top_p=0.9, seed=2**62 + 3, max_tokens=16, stop_token_ids=[EOS, EOS2],
                           logprobs=0, detokenize=False)
    for seed, temperature in [(None, 0.7), (11, 0.0)]:  # generation.sample_responses' two greedy cases
        greedy = vg.sampling_kwargs(seed, temperature=temperature, top_p=1.0, max_new_tokens=4, eos_ids=[EOS])
        assert greedy["temperature"] == 0.0 and greedy["seed"] is None


# ---------------------------------------------------------------- checkpoints and the engine's weights


def test_weight_files_never_include_the_optimizer_state(tmp_path):
    for name in ("config.json", "model.safetensors", "optimizer.safetensors"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_text("")
    assert vg.model_weight_files(tmp_path) == [str(tmp_path.resolve() / "model.safetensors")]


def test_weight_files_of_a_sharded_checkpoint_come_from_its_index(tmp_path):
    weight_map = {"a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
                  "c": "model-00001-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert [Path(f).name for f in vg.model_weight_files(tmp_path)] == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


def test_weight_files_refuse_adapter_only_and_bin_checkpoints(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="adapter-only LoRA checkpoint.*save: merged"):
        vg.model_weight_files(tmp_path)
    (tmp_path / "adapter_config.json").unlink()
    (tmp_path / "pytorch_model.bin").write_text("")
    with pytest.raises(ValueError, match="safetensors weights only"):
        vg.model_weight_files(tmp_path)


def test_architecture_fingerprint_ignores_what_vllm_does_not_allocate(tmp_path):
    base = {"model_type": "llama", "hidden_size": 64, "vocab_size": 100, "_name_or_path": "/a",
            "transformers_version": "5.23.0", "dtype": "float32", "pad_token_id": 0}
    fingerprints = []
    for i, config in enumerate([base, {**base, "_name_or_path": "/b", "transformers_version": "5.24.0",
                                       "dtype": "bfloat16", "pad_token_id": 1},
                                {**base, "vocab_size": 101}]):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "config.json").write_text(json.dumps(config))
        fingerprints.append(vg.architecture_fingerprint(tmp_path / str(i)))
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]


def test_checkpoint_eos_ids_equal_those_of_the_loaded_model(tiny_model, tiny_model_dir):
    model, tokenizer = tiny_model
    tokenizer_only = load_tokenizer(tiny_model_dir)[0]
    assert vg.checkpoint_eos_ids(tiny_model_dir, tokenizer_only) == eos_token_ids(model, tokenizer)


class FakeVllmModel(torch.nn.Module):
    """Stands in for a vLLM model: fused q/k/v like vLLM's Llama, load_weights returning the parameters it set."""

    def __init__(self):
        super().__init__()
        self.qkv_proj = torch.nn.Parameter(torch.zeros(3, 2))
        self.norm = torch.nn.Parameter(torch.zeros(2))

    def load_weights(self, weights):
        loaded = set()
        for name, tensor in weights:
            if name.endswith("_proj"):  # q_proj, k_proj, v_proj -> one row of qkv_proj each
                self.qkv_proj.data["qkv".index(name[0])].copy_(tensor)
                loaded.add("qkv_proj")
            else:
                getattr(self, name).data.copy_(tensor)
                loaded.add(name)
        return loaded


def test_worker_extension_loads_checkpoint_files_in_place(tmp_path, monkeypatch):
    monkeypatch.setattr(vg, "_vllm_config_scope", lambda worker: nullcontext())  # no vLLM config to set here
    model = FakeVllmModel()
    worker = SimpleNamespace(model_runner=SimpleNamespace(get_model=lambda: model))
    save_file({"q_proj": torch.tensor([1.0, 2.0]), "k_proj": torch.tensor([3.0, 4.0])}, str(tmp_path / "a.safetensors"))
    save_file({"v_proj": torch.tensor([5.0, 6.0])}, str(tmp_path / "b.safetensors"))
    parameter = model.qkv_proj
    missing = vg.CheckpointWeights.rlhf_load_checkpoint(worker, [str(tmp_path / "a.safetensors"),
                                                                 str(tmp_path / "b.safetensors")])
    assert missing == ["norm"]  # nothing in the files set it: the caller refuses such a checkpoint
    assert model.qkv_proj is parameter  # in place: CUDA graphs captured on it stay valid
    torch.testing.assert_close(model.qkv_proj.data, torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))


class FakeEngine:
    """The parts of vllm.LLM the backend calls."""

    def __init__(self, missing=()):
        self.calls, self.missing, self.shut = [], list(missing), False
        self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(shutdown=self._shutdown))

    def _shutdown(self):
        self.shut = True

    def collective_rpc(self, method, args=()):
        self.calls.append((method, args))
        return [self.missing]  # one worker

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache", ()))
        return True

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append(("generate", (prompts, params)))
        return [SimpleNamespace(outputs=[SimpleNamespace(
            token_ids=[p["prompt_token_ids"][0], EOS], finish_reason="stop",
            logprobs=[{p["prompt_token_ids"][0]: SimpleNamespace(logprob=-1.0)},
                      {EOS: SimpleNamespace(logprob=-2.0)}])])
            for p in prompts]


def checkpoint(folder: Path, vocab_size: int = 100) -> str:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": vocab_size}))
    (folder / "model.safetensors").write_text("")
    return str(folder)


def test_engine_is_kept_and_gets_each_new_checkpoint_in_place(tmp_path):
    built = []
    holder = vg.EngineHolder(build=lambda spec, model_dir: built.append(FakeEngine()) or built[-1])
    first, second = checkpoint(tmp_path / "c0"), checkpoint(tmp_path / "c1")
    spec = vg.EngineSpec(vg.architecture_fingerprint(first), "bfloat16", 0.3)
    engine = holder.engine_for(spec, first, "sha-0")
    assert engine.calls == [("rlhf_load_checkpoint", ([str(Path(first) / "model.safetensors")],)),
                            ("reset_prefix_cache", ())]
    assert holder.engine_for(spec, first, "sha-0") is engine and len(engine.calls) == 2  # same weights: nothing
    assert holder.engine_for(spec, second, "sha-1") is engine  # the next update's checkpoint: same engine
    assert engine.calls[2:] == [("rlhf_load_checkpoint", ([str(Path(second) / "model.safetensors")],)),
                                ("reset_prefix_cache", ())]
    assert (holder.builds, holder.loads) == (1, 2)

    resized = checkpoint(tmp_path / "c2", vocab_size=101)  # another architecture: a new engine, the old one shut
    other = holder.engine_for(vg.EngineSpec(vg.architecture_fingerprint(resized), "bfloat16", 0.3), resized, "sha-2")
    assert other is not engine and engine.shut and (holder.builds, holder.loads) == (2, 3)


def test_a_checkpoint_that_leaves_parameters_unset_is_refused_and_retried(tmp_path):
    holder = vg.EngineHolder(build=lambda spec, model_dir: FakeEngine(missing=["lm_head.weight"]))
    folder = checkpoint(tmp_path / "c0")
    spec = vg.EngineSpec(vg.architecture_fingerprint(folder), "float32", 0.3)
    with pytest.raises(RuntimeError, match=r"left 1 parameters of vLLM's model unset \(\['lm_head.weight'\]"):
        holder.engine_for(spec, folder, "sha-0")
    assert holder.weights_id is None  # half-loaded weights belong to no checkpoint: the next call loads again


def test_sample_responses_vllm_sends_token_ids_and_one_seed_per_row(tmp_path, monkeypatch):
    monkeypatch.setattr(vg, "_sampling_params", lambda **kwargs: kwargs)  # no vllm here: plain dicts
    engine = FakeEngine()
    holder = vg.EngineHolder(build=lambda spec, model_dir: engine)
    folder = checkpoint(tmp_path / "c0")
    out = vg.sample_responses_vllm(folder, "sha-0", [[11, 12], [13]], eos_ids=[EOS], max_new_tokens=5,
                                   temperature=1.0, top_p=1.0, seeds=[101, 102], dtype="bfloat16",
                                   gpu_memory_utilization=0.3, holder=holder)
    prompts, params = engine.calls[-1][1]
    assert prompts == [{"prompt_token_ids": [11, 12]}, {"prompt_token_ids": [13]}]
    assert [p["seed"] for p in params] == [101, 102] and {p["max_tokens"] for p in params} == {5}
    assert out.response_ids == [[11, EOS], [13, EOS]] and out.sampling_logprobs == [[-1.0, -2.0]] * 2
    assert out.finished == [True, True] and out.prompt_ids == [[11, 12], [13]]


def test_rollout_stage_dispatches_to_vllm_with_the_rows_seeds(rlhf_home, tmp_path, tiny_model_dir, monkeypatch):
    import pandas as pd

    import tasks.rollouts
    from tasks.models import resolve_model
    from tasks.refs import publish

    monkeypatch.setattr(vg, "vllm_problem", lambda: None)
    calls = []

    def fake_vllm(checkpoint_dir, weights_id, prompt_ids, *, seeds, eos_ids, **kwargs):
        calls.append((checkpoint_dir, weights_id, seeds, eos_ids, kwargs))
        return vg.rollouts_from_completions(prompt_ids, [[EOS]] * len(prompt_ids), [[-0.5]] * len(prompt_ids),
                                            ["stop"] * len(prompt_ids), eos_ids)

    monkeypatch.setattr(tasks.rollouts, "sample_responses_vllm", fake_vllm)
    prompts = publish(pd.DataFrame({"prompt_id": [4, 9], "prompt": ["1 + 1?", "2 + 2?"]}), "prompts")
    policy = resolve_model.fn(str(tiny_model_dir))
    generation = GenerationConfig(group_size=3, max_new_tokens=6, backend="vllm", dtype="bfloat16")
    runtime = RuntimeConfig(device="cuda")  # never touched: this process loads only the tokenizer
    frame = tasks.rollouts.rollout_frame(policy, prompts, generation, runtime, None, 5, 2, row_range=(2, 5))
    (checkpoint_dir, weights_id, seeds, eos_ids, kwargs), = calls
    assert (checkpoint_dir, weights_id) == (policy.path, policy.sha256)
    assert seeds == [tasks.rollouts.row_seed(5, 2, p, k) for p, k in [(4, 2), (9, 0), (9, 1)]]  # rows 2..4
    assert kwargs["dtype"] == "bfloat16" and kwargs["gpu_memory_utilization"] == 0.3
    assert frame["prompt_id"].tolist() == [4, 9, 9] and frame["sample_index"].tolist() == [2, 0, 1]
    assert frame["response_ids"].tolist() == [[EOS]] * 3 and frame["finished"].tolist() == [True] * 3
    assert frame["response_length"].tolist() == [1, 1, 1]


# ---------------------------------------------------------------- on a GPU with vLLM (skipped elsewhere)


@pytest.fixture
def fresh_engines():
    """The process's engine holder empty before the test and closed after it (the GPU memory goes back)."""
    vg.ENGINES.close()
    vg.ENGINES.builds = vg.ENGINES.loads = 0
    yield vg.ENGINES
    vg.ENGINES.close()


@pytest.mark.slow
@pytest.mark.skipif(not (vg.vllm_available() and torch.cuda.is_available()), reason="needs vllm and a CUDA GPU")
def test_grpo_with_vllm_backend_samples_from_each_updated_policy(prefect_harness, rlhf_home, tokenizer_dir, tmp_path,
                                                                 fresh_engines):
    import mlflow
    import pandas as pd
    from flow_helpers import mlflow_run_of
    from test_flow_grpo import tiny_config

    from flows.grpo import grpo
    from rlhf_core.batch import collate
    from rlhf_core.logprobs import batched_response_logprobs
    from rlhf_core.models import load_causal_lm
    from tiny_models import save_tiny_model

    # head_dim 64: vLLM's float32-capable attention (Triton) needs head sizes >= 32
    start = save_tiny_model(tmp_path / "start", tokenizer_dir, seed=0, hidden_size=256, intermediate_size=512,
                            num_attention_heads=4, num_key_value_heads=2)
    config = tiny_config(start, runtime=RuntimeConfig(device="cuda", dtype="float32"), keep_checkpoints=3,
                         generation=GenerationConfig(group_size=4, max_new_tokens=8, temperature=1.0, backend="vllm",
                                                     vllm_gpu_memory_utilization=0.2),
                         loss=LossConfig(tis_cap=2.0), optim=OptimConfig(lr=3e-2, micro_batch_size=4))
    state = grpo(config, return_state=True)
    final = state.result()
    assert (vg.ENGINES.builds, vg.ENGINES.loads) == (1, 2)  # one engine; the iteration-0 update loaded into it

    run = mlflow_run_of(state.state_details.flow_run_id)
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "rollout/logprob_abs_diff")
    assert [m.step for m in history] == [0, 1] and all(m.value < 1e-2 for m in history)  # sampler ~ trainer

    def trainer_logprobs(folder, rollouts):
        model, tokenizer = load_causal_lm(Path(folder), "cuda", "float32")
        batch = collate(rollouts["prompt_ids"], rollouts["response_ids"], tokenizer.pad_token_id, device="cuda")
        logprobs = batched_response_logprobs(model.eval(), batch, micro_batch_size=8, temperature=1.0).cpu()
        mask = batch["response_mask"].cpu()
        return logprobs[mask], mask

    second = pd.read_parquet(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="data/iter_001/rollouts.parquet"))
    sampled = torch.tensor([lp for row in second["sampling_logprobs"] for lp in row])
    first_update, = [v for v in mlflow.MlflowClient().search_model_versions("name = 'tiny-policy'")
                     if v.tags["iteration"] == "0"]
    updated_checkpoint = rlhf_home / "checkpoints" / first_update.tags["checkpoint_sha256"][:16]
    near = (trainer_logprobs(updated_checkpoint, second)[0] - sampled).abs().mean()
    far = (trainer_logprobs(start, second)[0] - sampled).abs().mean()
    assert near < 1e-2 and far > 10 * near  # iteration 1 sampled from the updated weights, not the start's

    # the final checkpoint, loaded into the same engine, samples with its own log-probs (sampled rather than greedy:
    # a random-init model's near-tied logits would make an exact greedy comparison flaky)
    prompts = [[int(t) for t in ids] for ids in second["prompt_ids"].tolist()[:4]]
    tokenizer = load_tokenizer(Path(final))[0]
    last = vg.sample_responses_vllm(final, "final", prompts, eos_ids=vg.checkpoint_eos_ids(final, tokenizer),
                                    max_new_tokens=8, temperature=1.0, top_p=1.0, seeds=[1, 2, 3, 4],
                                    dtype="float32", gpu_memory_utilization=0.2)
    trainer, _ = trainer_logprobs(final, {"prompt_ids": last.prompt_ids, "response_ids": last.response_ids})
    sampled = torch.tensor([lp for row in last.sampling_logprobs for lp in row])
    assert (trainer - sampled).abs().mean() < 1e-2 and (vg.ENGINES.builds, vg.ENGINES.loads) == (1, 3)
