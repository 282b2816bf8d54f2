"""Prefect flows: the DAGs of each algorithm, tracked in MLflow."""

import tasks  # noqa: F401  (sets the environment defaults before prefect is imported)
