"""Shared fixtures. The environment is pointed at a throw-away data folder before any project module (and so
prefect) is imported: tests never touch ~/.rlhf."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="rlhf-tests-"))
os.environ["RLHF_HOME"] = str(_SESSION_HOME)
os.environ["PREFECT_HOME"] = str(_SESSION_HOME / "prefect")
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: threads cost more than they give
os.environ.setdefault("RLHF_CHECK_METRIC_NAMES", "1")  # every logged metric must be in flows/metrics_catalog.py

import pytest  # noqa: E402
import torch  # noqa: E402

# Extracting SmolLM2's tokenizer from the GGUF takes ~5 s: keep one copy across test runs.
TOKENIZER_CACHE = Path(os.environ.get("RLHF_TEST_CACHE", Path.home() / ".cache" / "rlhf-tests")) / "smollm2-tokenizer"


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    """A real tokenizer (SmolLM2's, with its chat template) for tiny random-init models."""
    if not (TOKENIZER_CACHE / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        from rlhf_core.models import smollm2_gguf_path

        gguf = smollm2_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tmp = TOKENIZER_CACHE.with_name(f".tmp-{os.getpid()}")
        tokenizer.save_pretrained(tmp)
        TOKENIZER_CACHE.parent.mkdir(parents=True, exist_ok=True)
        if not TOKENIZER_CACHE.exists():
            tmp.rename(TOKENIZER_CACHE)
        shutil.rmtree(tmp, ignore_errors=True)
    return TOKENIZER_CACHE


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer_dir, tmp_path_factory) -> Path:
    """A ~3 M-parameter random-init Llama with SmolLM2's tokenizer, saved as a Hugging Face folder."""
    from tiny_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny", tokenizer_dir, seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """(model, tokenizer) loaded once; tests that modify the weights must load their own copy."""
    from rlhf_core.models import load_causal_lm

    model, tokenizer = load_causal_lm(tiny_model_dir)
    return model.eval(), tokenizer


@pytest.fixture(scope="session")
def prefect_harness():
    """A real (temporary) Prefect server for the whole session, started only by tests that need one."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture
def rlhf_home(tmp_path, monkeypatch) -> Path:
    """A fresh data folder (artifacts, checkpoints, MLflow store) for one test."""
    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "rlhf-home"))
    return tmp_path / "rlhf-home"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_models_in_memory_across_tests():
    """Each test starts without models another test left in the process's model cache (a test may change the
    weights of a model it loaded)."""
    from tasks.runtime import MODELS

    MODELS.entries.clear()
    yield
    MODELS.entries.clear()


class ReliabilityLog:
    """The faults injected and bad inputs tried by the reliability tests, and what happened. A test records a row
    only after asserting the outcome, so the report lists what the suite verified. With RLHF_RELIABILITY_REPORT
    set, the session writes them as a markdown table there (`make reliability-report` puts it in
    docs/reliability.md)."""

    def __init__(self):
        self.rows: list[tuple[str, str, str, str]] = []

    def record(self, fault: str, case: str, outcome: str, data_lost: str = "none") -> None:
        self.rows.append((fault, case, outcome, data_lost))

    def markdown(self) -> str:
        lines = ["| fault or input | where / what | what happened | data lost |", "|---|---|---|---|"]
        for row in sorted(set(self.rows), key=self.rows.index):
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines) + "\n"


RELIABILITY = ReliabilityLog()


@pytest.fixture(scope="session")
def reliability() -> ReliabilityLog:
    return RELIABILITY


def pytest_sessionfinish(session, exitstatus):
    target = os.environ.get("RLHF_RELIABILITY_REPORT")
    if target and RELIABILITY.rows:
        Path(target).write_text(RELIABILITY.markdown())
    shutil.rmtree(_SESSION_HOME, ignore_errors=True)
