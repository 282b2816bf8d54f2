"""What the flows resolve before any work (prompts, reward sources, data files' hashes): a bad input fails here,
not an hour in."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

from rlhf_core.config import DataConfig, KLConfig, ModelConfig, RewardSpec, RuntimeConfig
from rlhf_core.data import check_prompt_lengths
from rlhf_core.errors import UserInputError
from rlhf_core.chat import chat_prompt_ids
from rlhf_core.models import load_tokenizer, model_config
from rlhf_core.model_files import REGISTRY_PREFIX, check_causal_lm, check_reward_model
from rlhf_core.rewards import check_reward_columns, reward_source_fingerprint
from tasks.data import chat_prompts, dataset_fingerprints, load_prompt_dataset
from tasks.models import RegisteredModelMissing, registered_version, resolve_model, resolve_start_model
from tasks.paths import resolve_data_path
from tasks.refs import ArtifactRef, CheckpointRef
from tasks.scoring import RewardSources
from tasks.runtime import check_device
from tasks.ray_cluster import check_ray
from tasks.sharding import check_task_runner


class OnlineInputs(NamedTuple):
    rewards: RewardSources  # the reward specs, their functions' hashes and their resolved models
    dataset: ArtifactRef  # the validated prompts
    policy: CheckpointRef  # the initial policy


def resolve_rewards(rewards: list[RewardSpec], extra_columns: list[str]) -> RewardSources:
    """The reward sources with their functions' source hashes and their resolved reward models: every function
    imports and every model resolves, or this raises naming it."""
    models = [resolve_model(r.model or r.judge) if r.model or r.judge else None for r in rewards]
    for spec, model in zip(rewards, models):
        if spec.model:
            check_reward_model(Path(model.path), spec.allow_new_head)
        elif spec.judge:
            check_causal_lm(Path(model.path), f"the judge {spec.judge}")
        else:
            check_reward_columns(spec.function, extra_columns, spec.options)
    return RewardSources(specs=rewards,
                         fingerprints=[reward_source_fingerprint(r.function) if r.function else None for r in rewards],
                         models=models, extra_columns=extra_columns)


def held_out_tags(fingerprints: list[str], data) -> dict[str, str]:
    """MLflow tags for a training file that is its own held-out file (same content): a warning in the log too,
    since its held-out scores then measure memorisation, not generalisation. fingerprints:
    `tasks.data.dataset_fingerprints(data)`."""
    if data.eval_path is None or fingerprints[0] != fingerprints[1]:
        return {}
    print(f"warning: data.eval_path {data.eval_path} holds the same data as data.path {data.path}: the held-out "
          "scores measure the training data (set eval_path: null to hold out part of it)")
    return {"warning.eval_is_train": "data.eval_path has the same content as data.path"}


def check_num_prompts(wanted: int | None, available: int, path: str, field: str = "num_prompts") -> None:
    """Every flow asks for at most as many prompts as its file has: a sample of more would repeat prompts (with
    the same responses, as a row's sampling seed follows its prompt)."""
    if wanted is not None and wanted > available:
        raise UserInputError(f"{field}={wanted} exceeds the {available} prompts of {path}: lower it or add prompts")


def check_output_folder(name: str | None) -> None:
    """A folder the flow will write its result into is a folder (or can be made one) and writable."""
    if name is None:
        return
    folder = Path(name).expanduser().resolve()
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UserInputError(f"output_dir {name}: {existing} is a file, not a folder")
    if existing is not None and not os.access(existing, os.W_OK):
        raise UserInputError(f"output_dir {name}: {existing} is not writable")


def lineage_tags(model: ModelConfig, start: CheckpointRef, data_paths: list[str | None],
                 fingerprints: list[str]) -> dict[str, str]:
    """What a flow's model versions started from, as MLflow tags: the model (a registry alias pinned to its
    version, so the chain back to the base model can be followed version by version) and the data files, each
    with its content hash."""
    name = model.name_or_path
    if name.startswith(REGISTRY_PREFIX) and "@" in name:
        try:
            version = registered_version(name)
            name = f"{REGISTRY_PREFIX}{version.name}/{version.version}"
        except RegisteredModelMissing:  # started from model.fallback instead
            name = model.fallback or name
    paths = [p for p in data_paths if p is not None]
    return {"lineage.start_model": name, "lineage.start_model_sha256": start.sha256,
            "lineage.data": ", ".join(paths), "lineage.data_sha256": ", ".join(fingerprints)}


def resolve_prompts(data: DataConfig) -> ArtifactRef:
    """The validated prompt dataset, cached on the file's content hash."""
    return load_prompt_dataset(data, dataset_fingerprints(data)[0])


def resolve_run_seed(config, scheduled_start: datetime | None):
    """`config` with `seed: run-date` replaced by the run's scheduled date as YYYYMMDD (today outside a run);
    every stage then sees an int and the MLflow params record the seed actually used."""
    if config.seed != "run-date":
        return config
    seed = int((scheduled_start or datetime.now(timezone.utc)).strftime("%Y%m%d"))
    print(f"seed: run-date -> {seed}")
    return config.model_copy(update={"seed": seed})


def check_runtime(runtime: RuntimeConfig) -> None:
    """The device exists on this machine, and a sharded run's task runner and a Ray launcher are installed."""
    check_device(runtime)
    check_task_runner(runtime)
    check_ray(runtime)


def resolve_online_inputs(config) -> OnlineInputs:
    """Every reward function imports, every reward model and the policy resolve, the dataset is valid and every
    prompt leaves room for the responses in the policy's context. The runtime can run here."""
    check_runtime(config.runtime)
    inputs = OnlineInputs(resolve_rewards(config.rewards, config.data.extra_columns),
                          dataset=resolve_prompts(config.data),
                          policy=resolve_start_model(config.model))
    check_num_prompts(config.prompts_per_iteration, inputs.dataset.rows, config.data.path, "prompts_per_iteration")
    check_prompts_fit(inputs.dataset, inputs.policy, config.data, config.generation.max_new_tokens)
    return inputs


def resolve_kl_reference(kl: KLConfig, policy: CheckpointRef) -> CheckpointRef | None:
    """What the KL term is measured to: nothing (kl.coef 0), the start model, or a teacher (kl.reference) whose
    vocabulary is the policy's: per-token log-probs of two tokenizers cannot be compared."""
    if kl.coef == 0:
        return None
    if kl.reference is None:
        return policy
    teacher = resolve_model(kl.reference)
    check_causal_lm(Path(teacher.path), "kl.reference")
    student_vocab, teacher_vocab = (load_tokenizer(Path(m.path))[0].get_vocab() for m in (policy, teacher))
    if student_vocab != teacher_vocab:
        raise UserInputError(f"kl.reference {kl.reference}: its tokenizer is not the policy's ({len(teacher_vocab)} "
                             f"vs {len(student_vocab)} tokens, or other ids): per-token log-probs cannot be compared")
    return teacher


def check_prompts_fit(dataset: ArtifactRef, policy: CheckpointRef, data: DataConfig, max_new_tokens: int) -> None:
    """Each prompt, rendered with the chat template as the rollout stage will, plus max_new_tokens fits in the
    policy's context; else a DatasetError names the row."""
    check_prompt_list_fits(chat_prompts(dataset.read()), Path(policy.path), data, max_new_tokens)


def check_prompt_list_fits(prompts: list, model_path: Path, data: DataConfig, max_new_tokens: int) -> None:
    tokenizer, _ = load_tokenizer(model_path)
    if data.system_prompt and not getattr(tokenizer, "chat_template", None):
        raise UserInputError(f"data.system_prompt is set, but the tokenizer of {model_path} has no chat template to "
                             "put it in (it would be dropped): remove it, or use a model with a chat template")
    context = getattr(model_config(model_path), "max_position_embeddings", None)
    if context is None:  # architectures without a fixed context have nothing to check
        return
    lengths = [len(ids) for ids in chat_prompt_ids(tokenizer, prompts, data.system_prompt)]
    check_prompt_lengths(resolve_data_path(data.path), lengths, max_new_tokens, context)
