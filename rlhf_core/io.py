"""Atomic, content-addressed writes of Parquet tables and folders.

Every output is written under a temporary name in its final directory and renamed into place, so a reader (or a
run resumed after a crash) never sees half a file; the temporary names start with a dot and name the writer's host
and process, so the leftovers of a killed writer are swept by the next write to that directory. Names are the
content's sha256, so outputs are write-once: a second writer of the same content finds it already there, and
different content never overwrites. Parquet
tables may also go to object storage (an fsspec URI), where one PUT of the final key takes the rename's place.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import pandas as pd

from rlhf_core.faults import kill_point

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def sha256_dir(path: str | Path) -> str:
    """Hash of a folder: its files' relative names and contents, in sorted order."""
    digest = hashlib.sha256()
    root = Path(path)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(root)).encode())
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


TEMP_PREFIX = ".tmp-"


def _temp_name(directory: Path, suffix: str = "") -> Path:
    return directory / f"{TEMP_PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}{suffix}"


def process_alive(pid: int) -> bool:
    """Whether a process of this host with this id exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_stale_temps(directory: Path) -> list[Path]:
    """Remove the temporary files and folders that killed writers left in `directory` (a SIGKILL skips every
    clean-up): those of this host whose process is gone. Another host's are left alone, since its processes cannot
    be seen from here. Returns what was removed."""
    host = socket.gethostname()
    removed = []
    for entry in directory.glob(f"{TEMP_PREFIX}*"):
        writer = entry.name[len(TEMP_PREFIX):].rpartition("-")[0]  # "<host>-<pid>"
        writer_host, _, pid = writer.rpartition("-")
        if writer_host == host and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def is_uri(location: str | Path) -> bool:
    """An fsspec URI (s3://bucket/key, gs://..., memory://...) rather than a local path."""
    return "://" in str(location)


def file_exists(location: str | Path) -> bool:
    if not is_uri(location):
        return Path(location).is_file()
    import fsspec

    fs, path = fsspec.core.url_to_fs(str(location))
    return fs.isfile(path)


def copy_file(source: str | Path, destination: str | Path) -> None:
    """Copy a local file or an fsspec URI to a local path."""
    if not is_uri(source):
        shutil.copyfile(source, destination)
        return
    import fsspec

    with fsspec.open(str(source), "rb") as src, open(destination, "wb") as dst:
        shutil.copyfileobj(src, dst, _CHUNK)


def write_parquet_to_uri(df: pd.DataFrame, directory: str) -> tuple[str, str]:
    """`write_parquet` for object storage (an fsspec URI). There is no rename there; one PUT of the final key is
    atomic instead (a reader sees the whole object or none), and the content-addressed key makes a rerun's write
    idempotent. The bytes are those `write_parquet` writes, so the hash is too."""
    import io

    import fsspec

    buffer = io.BytesIO()
    df.to_parquet(buffer, index=False)
    data = buffer.getvalue()
    kill_point("write-parquet")
    digest = hashlib.sha256(data).hexdigest()
    final = f"{directory.rstrip('/')}/{digest[:16]}.parquet"
    fs, path = fsspec.core.url_to_fs(final)
    if not fs.exists(path):
        fs.makedirs(fs._parent(path), exist_ok=True)
        fs.pipe_file(path, data)
    return final, digest


@contextmanager
def naming_the_destination(destination: str | Path) -> Iterator[None]:
    """An OSError while writing (a full disk, a read-only or vanished folder) says which file or folder it was
    writing: "No space left on device" alone does not say whether the data folder or /tmp is full."""
    try:
        yield
    except OSError as e:
        if str(destination) in str(e):
            raise
        raise OSError(e.errno, f"writing {destination}: {e.strerror or e}") from e


def write_parquet(df: pd.DataFrame, directory: str | Path) -> tuple[Path | str, str]:
    """Write `df` to `<directory>/<sha256[:16]>.parquet` atomically. Returns (path, sha256). `directory` may be
    an fsspec URI (`write_parquet_to_uri`)."""
    if is_uri(directory):
        return write_parquet_to_uri(df, str(directory))
    directory = Path(directory)
    with naming_the_destination(directory):
        directory.mkdir(parents=True, exist_ok=True)
        sweep_stale_temps(directory)
    tmp = _temp_name(directory, ".parquet")
    try:
        with naming_the_destination(directory):
            df.to_parquet(tmp, index=False)
        kill_point("write-parquet")
        digest = sha256_file(tmp)
        final = directory / f"{digest[:16]}.parquet"
        if final.exists():
            tmp.unlink()
        else:
            os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final, digest


def _write_folder(write: Callable[[Path], None], directory: Path, name_of: Callable[[Path], str]) -> Path:
    """Call `write(tmp_dir)` in `directory`, then rename the folder to `name_of(tmp_dir)` atomically; a folder
    already there under that name is kept (the same content, or the same thing written by another writer)."""
    with naming_the_destination(directory):
        directory.mkdir(parents=True, exist_ok=True)
        sweep_stale_temps(directory)
    tmp = _temp_name(directory)
    try:
        with naming_the_destination(directory):
            tmp.mkdir()
            write(tmp)
        final = directory / name_of(tmp)
        if not final.exists():
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_dir(write: Callable[[Path], None], directory: str | Path) -> tuple[Path, str]:
    """Call `write(tmp_dir)`, then rename the folder to `<directory>/<sha256[:16]>` atomically."""
    digest = ""

    def content_name(tmp: Path) -> str:
        nonlocal digest
        kill_point("write-dir")
        digest = sha256_dir(tmp)
        return digest[:16]

    return _write_folder(write, Path(directory), content_name), digest


def write_folder_atomically(write: Callable[[Path], None], folder: str | Path) -> Path:
    """Call `write(tmp_dir)` beside `folder`, then rename it to `folder`; a folder already there (another
    writer's, of the same thing) is kept: for folders under a chosen name (a converted or downloaded model)."""
    folder = Path(folder)
    return _write_folder(write, folder.parent, lambda tmp: folder.name)


def write_atomically(write: Callable[[Path], None], path: str | Path) -> Path:
    """Call `write(tmp)` on a temporary name beside `path`, then rename it to `path` (replacing what was there):
    for outputs that live under a chosen name rather than their content hash."""
    path = Path(path)
    tmp = _temp_name(path.parent, path.suffix)
    try:
        with naming_the_destination(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            write(tmp)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
