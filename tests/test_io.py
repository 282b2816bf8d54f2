"""Atomic, content-addressed Parquet files and folders."""

import errno
import hashlib
import os

import pandas as pd
import pytest

import rlhf_core.io as io_module
from rlhf_core.io import sha256_dir, sha256_file, write_dir, write_parquet


def rollouts_frame(reward=1.0):
    return pd.DataFrame({
        "prompt": ["1 + 1 =", "2 + 2 ="],
        "response_ids": [[17, 2], [19, 5, 2]],  # ragged int lists, as rollouts are stored
        "reward": [reward, 0.0],
        "group_id": [0, 0],
    })


def temp_entries(directory):
    return [p.name for p in directory.iterdir() if p.name.startswith(".tmp-")]


# ---------------------------------------------------------------- write_parquet


def test_parquet_round_trip(tmp_path):
    df = rollouts_frame()
    path, _ = write_parquet(df, tmp_path / "out")
    back = pd.read_parquet(path)
    assert list(back.columns) == list(df.columns)
    assert back["prompt"].tolist() == df["prompt"].tolist()
    assert [list(r) for r in back["response_ids"]] == [[17, 2], [19, 5, 2]]
    assert back["reward"].tolist() == [1.0, 0.0]
    assert back["group_id"].tolist() == [0, 0]
    pd.testing.assert_frame_equal(back.drop(columns="response_ids"), df.drop(columns="response_ids"))


def test_parquet_name_is_content_hash(tmp_path):
    path, digest = write_parquet(rollouts_frame(), tmp_path)
    assert digest == sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert path.name == f"{digest[:16]}.parquet" and path.parent == tmp_path
    assert len(digest) == 64


def test_same_frame_twice_gives_one_file(tmp_path):
    first = write_parquet(rollouts_frame(), tmp_path)
    second = write_parquet(rollouts_frame(), tmp_path)
    assert first == second
    assert sorted(os.listdir(tmp_path)) == [first[0].name]  # one file, no temp left behind


def test_different_frames_give_different_files(tmp_path):
    path_a, digest_a = write_parquet(rollouts_frame(reward=1.0), tmp_path)
    mtime_a = path_a.stat().st_mtime_ns
    path_b, digest_b = write_parquet(rollouts_frame(reward=0.5), tmp_path)
    assert digest_a != digest_b and path_a != path_b
    assert sorted(os.listdir(tmp_path)) == sorted([path_a.name, path_b.name])
    assert temp_entries(tmp_path) == []
    assert path_a.stat().st_mtime_ns == mtime_a  # write-once: the first file was not rewritten
    assert pd.read_parquet(path_a)["reward"].tolist() == [1.0, 0.0]


def test_failed_parquet_write_leaves_nothing(tmp_path, monkeypatch):
    bad = pd.DataFrame({"mixed": [1, "a", object()]})  # pyarrow cannot convert this column
    with pytest.raises(ValueError):
        write_parquet(bad, tmp_path)
    assert os.listdir(tmp_path) == []

    # a failure after the temp file is complete (here: while hashing it) removes the temp file too
    def failing_hash(path):
        assert os.path.basename(path).startswith(".tmp-") and os.path.getsize(path) > 0
        raise OSError("read error")

    monkeypatch.setattr(io_module, "sha256_file", failing_hash)
    with pytest.raises(OSError, match="read error"):
        write_parquet(rollouts_frame(), tmp_path)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- hashes


def test_sha256_file_matches_hashlib_across_chunks(tmp_path):
    path = tmp_path / "blob"
    data = os.urandom((1 << 20) + 123)  # more than one 1 MiB read
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_sha256_dir_tracks_names_and_contents(tmp_path):
    folder = tmp_path / "d"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha")
    (folder / "sub" / "b.txt").write_text("beta")
    digest = sha256_dir(folder)
    assert sha256_dir(folder) == digest  # stable

    os.utime(folder / "a.txt", (0, 0))
    assert sha256_dir(folder) == digest  # timestamps are not content

    (folder / "sub" / "b.txt").write_text("BETA")
    changed_content = sha256_dir(folder)
    assert changed_content != digest

    (folder / "sub" / "b.txt").write_text("beta")
    assert sha256_dir(folder) == digest  # back to the same content, back to the same hash
    (folder / "sub" / "b.txt").rename(folder / "sub" / "c.txt")
    assert sha256_dir(folder) not in (digest, changed_content)

    # the same files in another place hash the same: names are relative to the folder
    other = tmp_path / "elsewhere" / "d2"
    (other / "sub").mkdir(parents=True)
    (other / "a.txt").write_text("alpha")
    (other / "sub" / "b.txt").write_text("beta")
    assert sha256_dir(other) == digest


# ---------------------------------------------------------------- write_dir


def write_files(files):
    def write(tmp):
        for name, text in files.items():
            (tmp / name).write_text(text)

    return write


def test_write_dir_names_folder_by_content(tmp_path):
    folder, digest = write_dir(write_files({"config.json": "{}", "weights": "123"}), tmp_path)
    assert folder.parent == tmp_path and folder.name == digest[:16]
    assert digest == sha256_dir(folder)
    assert (folder / "weights").read_text() == "123"

    again, digest_again = write_dir(write_files({"config.json": "{}", "weights": "123"}), tmp_path)
    assert (again, digest_again) == (folder, digest)
    other, other_digest = write_dir(write_files({"config.json": "{}", "weights": "124"}), tmp_path)
    assert other_digest != digest
    assert sorted(os.listdir(tmp_path)) == sorted([folder.name, other.name])  # no .tmp-* entries


def test_write_dir_failure_leaves_nothing(tmp_path):
    def write(tmp):
        (tmp / "half-written").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_dir(write, tmp_path / "ckpts")
    assert os.listdir(tmp_path / "ckpts") == []  # no final folder, no temp folder


def test_a_full_disk_names_what_was_being_written(tmp_path, monkeypatch, reliability):
    """ENOSPC from pyarrow or from a model's save says neither file nor folder: every atomic writer adds it."""
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", disk_full)
    with pytest.raises(OSError, match=f"writing {tmp_path / 'stage'}: No space left on device") as error:
        write_parquet(rollouts_frame(), tmp_path / "stage")
    assert error.value.errno == errno.ENOSPC and os.listdir(tmp_path / "stage") == []
    with pytest.raises(OSError, match=f"writing {tmp_path / 'ckpts'}: No space left on device"):
        write_dir(lambda tmp: disk_full(), tmp_path / "ckpts")
    with pytest.raises(OSError, match=f"writing {tmp_path / 'out' / 'pairs.parquet'}: No space left"):
        io_module.write_atomically(lambda tmp: disk_full(), tmp_path / "out" / "pairs.parquet")
    reliability.record("silent failure", "the disk fills up while a stage or checkpoint is written",
                       "the error names the file or folder being written; nothing half-written is left")


# ---------------------------------------------------------------- write_atomically


def test_write_atomically_replaces_the_named_file_or_leaves_it_alone(tmp_path):
    target = tmp_path / "new" / "pairs.parquet"
    assert io_module.write_atomically(lambda tmp: tmp.write_text("v1"), target) == target
    io_module.write_atomically(lambda tmp: tmp.write_text("v2"), target)
    assert target.read_text() == "v2"

    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io_module.write_atomically(fail, target)
    assert target.read_text() == "v2" and os.listdir(target.parent) == ["pairs.parquet"]


def test_a_killed_writers_temporaries_are_swept_by_the_next_write_and_live_or_foreign_ones_kept(tmp_path):
    import socket
    import subprocess
    import sys

    from rlhf_core.io import sweep_stale_temps

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    host = socket.gethostname()
    (tmp_path / f".tmp-{host}-{dead_pid}-0123456789ab.parquet").write_bytes(b"PAR1 half a file")
    (tmp_path / f".tmp-{host}-{dead_pid}-ba9876543210").mkdir()  # a half-written checkpoint folder
    kept = [f".tmp-{host}-{os.getpid()}-aaaaaaaaaaaa.parquet",  # a writer still running
            f".tmp-another-host-{dead_pid}-bbbbbbbbbbbb.parquet"]  # another machine's: its pids are not ours
    for name in kept:
        (tmp_path / name).write_bytes(b"")
    path, _ = write_parquet(rollouts_frame(), tmp_path)
    assert sorted(temp_entries(tmp_path)) == sorted(kept)
    assert sorted(os.listdir(tmp_path)) == sorted(kept + [path.name])
    assert sweep_stale_temps(tmp_path) == []


def test_reliability_report_is_spliced_between_the_markers_only():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "update_reliability_report.py"
    spec = importlib.util.spec_from_file_location("update_reliability_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    readme = f"intro\n{module.START}\nold table\n{module.END}\noutro\n"
    assert module.splice(readme, "| new |\n") == f"intro\n{module.START}\n| new |\n{module.END}\noutro\n"
    with pytest.raises(SystemExit, match="no"):
        module.splice("no markers", "| new |")
