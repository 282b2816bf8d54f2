"""The house's layers: rlhf_core is torch + transformers only (importing every module loads neither Prefect nor
MLflow), and tasks never import flows (a stage does not know the DAG that runs it)."""

import pkgutil
import subprocess
import sys

import rlhf_core
import tasks


def imported_packages(package) -> set[str]:
    """The top-level packages loaded by importing every module of `package` (config/ included), in a fresh
    interpreter."""
    modules = [m.name for m in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}.")]
    assert len(modules) >= 15
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(' '.join(sorted({n.split('.')[0] for n in sys.modules})))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(result.stdout.split())


def test_core_imports_neither_prefect_nor_mlflow():
    loaded = imported_packages(rlhf_core)
    assert "torch" in loaded and "rlhf_core" in loaded  # the import did run
    assert loaded & {"prefect", "mlflow", "tasks", "flows"} == set()
    assert "peft" not in loaded  # imported on first use of an adapter: a GPU image without peft runs the rest


def test_tasks_never_import_flows():
    loaded = imported_packages(tasks)
    assert "prefect" in loaded and "tasks" in loaded
    assert "flows" not in loaded


# The math and the algorithms' update loops: pure torch, so they can be read, tested and reused without loading
# transformers, pandas or the orchestration (rlhf_core stays flat: one concept per file, see docs/layout.md).
TORCH_ONLY = ["advantages", "kl", "gae", "policy_losses", "preference_losses", "value_losses", "token_rewards",
              "kl_control", "logprobs", "batch", "update", "metrics", "grpo", "dpo", "kto", "evaluation", "verifiable"]


def test_the_math_imports_with_torch_alone():
    code = ("import importlib, sys\n"
            f"for m in {TORCH_ONLY!r}: importlib.import_module('rlhf_core.' + m)\n"
            "print(' '.join(sorted({n.split('.')[0] for n in sys.modules})))")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True).stdout.split())
    assert "torch" in loaded
    assert loaded & {"transformers", "pandas", "safetensors", "peft", "prefect", "mlflow"} == set()
