"""rlhf_core is torch + transformers only: importing every module loads neither Prefect nor MLflow."""

import pkgutil
import subprocess
import sys

import rlhf_core


def test_core_imports_neither_prefect_nor_mlflow():
    modules = [f"rlhf_core.{m.name}" for m in pkgutil.iter_modules(rlhf_core.__path__)]
    assert len(modules) >= 15
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted({n.split('.')[0] for n in sys.modules} & {'prefect', 'mlflow'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
