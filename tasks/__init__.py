"""Prefect tasks: each reads Parquet (or a checkpoint), calls rlhf_core, and writes Parquet atomically.
Tasks exchange small references (path + sha256), never models or tensors."""

from tasks.paths import configure_environment

configure_environment()
