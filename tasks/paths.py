"""Where the pipeline keeps its files: one data folder, `$RLHF_HOME` (default `~/.rlhf`), never the CWD."""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def rlhf_home() -> Path:
    return Path(os.environ.get("RLHF_HOME") or Path.home() / ".rlhf").expanduser().resolve()


def artifacts_root() -> Path | str:
    """Where the stages' Parquet files go: `$RLHF_ARTIFACTS_URI` when set (a folder, or an fsspec URI such as
    s3://bucket/prefix that every worker can reach), else `$RLHF_HOME/artifacts`."""
    uri = os.environ.get("RLHF_ARTIFACTS_URI")
    if not uri:
        return rlhf_home() / "artifacts"
    return uri.rstrip("/") if "://" in uri else Path(uri).expanduser().resolve()


def stage_dir(stage: str) -> Path | str:
    """Content-addressed Parquet outputs of one stage."""
    root = artifacts_root()
    return f"{root}/{stage}" if isinstance(root, str) else root / stage


def checkpoints_dir() -> Path:
    return rlhf_home() / "checkpoints"


def models_dir() -> Path:
    """Converted built-in models and models downloaded from the MLflow registry."""
    return rlhf_home() / "models"


_URIS_WE_SET: set[str] = set()


def user_tracking_uri() -> str | None:
    """MLFLOW_TRACKING_URI as the user set it, or None. mlflow.set_tracking_uri copies its argument into that
    variable, so a value we set ourselves (the SQLite fallback) is no user choice; the user's own value is never
    added to that set, so it is kept however often it is resolved."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return uri if uri and uri not in _URIS_WE_SET else None


def sqlite_uri(path: Path, driver: str = "sqlite") -> str:
    """A SQLAlchemy URL of the SQLite file at `path`, whatever characters the folder names hold: SQLAlchemy cuts a
    plain `sqlite:///...` at `?` (and decodes nothing), so such a path becomes a percent-encoded SQLite URI
    (`file:...?uri=true`), which SQLite itself decodes."""
    quoted = urllib.parse.quote(str(path))
    return f"{driver}:///{path}" if quoted == str(path) else f"{driver}:///file:{quoted}?uri=true"


def sqlite_path(uri: str) -> Path:
    """The file of a `sqlite_uri`."""
    body = uri.split(":///", 1)[1]
    return Path(urllib.parse.unquote(body.removeprefix("file:").removesuffix("?uri=true"))) \
        if body.startswith("file:") else Path(body)


def tracking_uri() -> str:
    """The user's MLFLOW_TRACKING_URI if set, else a SQLite store in the data folder: absolute, never MLflow's
    default `./mlflow.db` in whatever the current directory happens to be."""
    if uri := user_tracking_uri():
        return uri
    (rlhf_home() / "mlflow").mkdir(parents=True, exist_ok=True)  # SQLite does not create folders
    return sqlite_uri(rlhf_home() / "mlflow" / "mlflow.db")


def use_tracking_uri() -> str:
    """Point MLflow (tracking and registry) at `tracking_uri()`; returns it."""
    import mlflow  # only the orchestration layers call this; rlhf_core never imports mlflow

    uri = user_tracking_uri()
    ours = uri is None
    if ours:
        uri = tracking_uri()
        _URIS_WE_SET.add(uri)
    mlflow.set_tracking_uri(uri)
    if ours:  # mlflow copies it into MLFLOW_TRACKING_URI: a child process (a worker's run, in another RLHF_HOME)
        os.environ.pop("MLFLOW_TRACKING_URI", None)  # would take it for the user's; it finds its own instead
    if uri.startswith("sqlite:///") and uri not in _STORES_READY:
        _create_sqlite_store(uri)
        _STORES_READY.add(uri)
    return uri


_STORES_READY: set[str] = set()


def _create_sqlite_store(uri: str) -> None:
    """Create (or migrate) the SQLite store under an exclusive file lock: two runs starting at once on a fresh
    data folder would otherwise both run MLflow's schema migrations, and the second fails ("table already
    exists")."""
    import fcntl

    import mlflow

    lock_path = sqlite_path(uri).with_name(".store.lock")
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process is killed
        mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).search_registered_models(max_results=1)
        mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


def resolve_data_path(path: str) -> Path:
    """A relative dataset path is looked up in the current directory first, then in the project folder, so the
    shipped `data/...` defaults work from anywhere."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate.resolve()
    shipped = PROJECT_ROOT / candidate
    return shipped if shipped.exists() else candidate.resolve()


def configure_environment() -> None:
    """Defaults that keep Prefect, MLflow and Hugging Face offline, quiet and inside the data folder.
    Explicit environment variables win. Must run before prefect is imported (tasks/__init__.py does it)."""
    defaults = {
        "PREFECT_HOME": str(rlhf_home() / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        # a tracking server that does not answer fails a call in ~45 s (3 retries, 2-8 s apart, 30 s timeout)
        # instead of MLflow's default 7 retries (4 min 20 s measured)
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    prefect_db = Path(os.environ["PREFECT_HOME"]).expanduser() / "prefect.db"
    if sqlite_uri(prefect_db) != f"sqlite:///{prefect_db}":  # Prefect's own URL would be cut at a `?` in the path
        os.environ.setdefault("PREFECT_SERVER_DATABASE_CONNECTION_URL", sqlite_uri(prefect_db, "sqlite+aiosqlite"))
    # Prefect creates its home without parents and SQLite never creates folders: a fresh machine needs these. An
    # unusable data folder is reported by check_data_folder when a command first uses it, not at import.
    try:
        Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    except OSError:
        pass


def check_data_folder() -> Path:
    """The data folder exists (or can be made) and is writable; else a one-line UserInputError naming RLHF_HOME."""
    from rlhf_core.errors import UserInputError

    home = rlhf_home()
    try:
        home.mkdir(parents=True, exist_ok=True)
        probe = home / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserInputError(f"RLHF_HOME={home}: not a writable folder ({e.strerror or e}); set RLHF_HOME to a "
                             "folder you can write to") from None
    return home
