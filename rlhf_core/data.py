"""Loading user datasets with validation, so that bad input fails before any training work starts.

Every error names the file, the place (1-based line for JSONL, 0-based row index otherwise) and the field:
a typo on line 40,000 should be a one-line fix, not a crash an hour into generation.
Rows are read as plain Python objects (json.loads / pyarrow `to_pylist`), not through pandas, because pandas
turns an int column with a null into floats and would hide which value was wrong.
"""

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from rlhf_core.errors import UserInputError

SUPPORTED_FORMATS = ".jsonl, .json, .parquet, or a directory written by datasets.Dataset.save_to_disk"
_CHUNK = 1 << 20  # 1 MiB: hashing streams, so a 50 GB file needs no memory


class DatasetError(UserInputError):
    """A user dataset that cannot be used; the message names the file, the line or row, and the field."""


def _read_jsonl(path: Path) -> tuple[list[Any], Callable[[int], str]]:
    records, line_numbers = [], []
    with path.open("rb") as f:  # bytes, so that a bad byte is reported with its line number
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").removeprefix("\ufeff")
            except UnicodeDecodeError as e:
                raise DatasetError(f"{path} line {number}: not valid UTF-8: {e}") from None
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path} line {number}: invalid JSON: {e}") from None
            line_numbers.append(number)
    return records, lambda i: f"line {line_numbers[i]}"


def _read_json(path: Path) -> list[Any]:
    try:
        records = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not valid UTF-8: {e}") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(records, list):
        raise DatasetError(f"{path}: expected a JSON list of objects, got {type(records).__name__}")
    return records


def _read_saved_dataset(path: Path) -> list[Any]:
    import datasets  # imported here: it is slow to import and only this format needs it

    state = path / "state.json"
    if state.is_file() and json.loads(state.read_text()).get("_data_files") == []:
        # A zero-row Dataset is saved with no shards, and load_from_disk then fails with an IndexError.
        raise DatasetError(f"{path}: contains no rows")
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DatasetError(f"{path}: a directory that is not a saved dataset; supported: {SUPPORTED_FORMATS}") from None
    except Exception as e:
        raise DatasetError(f"{path}: cannot load saved dataset: {type(e).__name__}: {e}") from e
    if isinstance(loaded, datasets.DatasetDict):
        splits = sorted(loaded)
        example = path / ("train" if "train" in splits or not splits else splits[0])
        raise DatasetError(f"{path}: holds a DatasetDict with splits {splits}; pass one split's path, e.g. {example}")
    return loaded.data.table.to_pylist()


def _read_records(path: Path) -> tuple[list[Any], Callable[[int], str]]:
    """All rows of the file as Python objects, and a function from row index to its place in the file."""
    if not path.exists():
        raise DatasetError(f"{path}: does not exist")
    suffix = path.suffix.lower()
    if path.is_dir():
        records = _read_saved_dataset(path)
    elif suffix == ".jsonl":
        return _read_jsonl(path)
    elif suffix == ".json":
        records = _read_json(path)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            records = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a corrupt or truncated file
            raise DatasetError(f"{path}: cannot read Parquet: {e}") from e
    else:
        raise DatasetError(f"{path}: unsupported format {suffix or '(no suffix)'!r}; supported: {SUPPORTED_FORMATS}")
    return records, lambda i: f"row {i}"


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _type_problem(value: Any, expected: type) -> str | None:
    """Why `value` is not a valid `expected`, or None if it is."""
    got = f"got {type(value).__name__} {value!r:.80}"
    if isinstance(value, bool) and expected in (int, float):
        return f"expected {expected.__name__}, {got}"  # bool is an int subclass, but True is not a count
    if expected is float and isinstance(value, int):
        return None
    if not isinstance(value, expected):
        return f"expected {expected.__name__}, {got}"
    if expected is str and not value.strip():
        return f"expected a non-empty string, {got}"
    return None


def load_table(
    path: str | Path,
    required: Mapping[str, type],
    columns: Mapping[str, str] | None = None,
    optional: Mapping[str, type] | None = None,
    duplicates: str = "error",
) -> pd.DataFrame:
    """Load a dataset and validate it; returns the required and present optional columns under their canonical
    names with a fresh RangeIndex. `columns` maps canonical name -> name in the file ({"prompt": "question"}).
    `duplicates`: what to do with a row equal to an earlier one in every field: "error", "drop" (kept once, the
    count and the first few printed) or "keep". Raises DatasetError naming the file, the line/row and the field
    for the first problem found."""
    path = Path(path)
    columns, optional = dict(columns or {}), dict(optional or {})
    if both := set(required) & set(optional):
        raise ValueError(f"fields both required and optional: {sorted(both)}")
    if unknown := set(columns) - set(required) - set(optional):
        raise ValueError(f"column mapping names unknown fields {sorted(unknown)}; fields: {[*required, *optional]}")

    records, where = _read_records(path)
    if not records:
        raise DatasetError(f"{path}: contains no rows")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise DatasetError(f"{path} {where(i)}: expected a JSON object, got {type(record).__name__}")
    if duplicates != "keep" and (repeats := _repeated_rows(records)):
        later, earlier = repeats[0]
        if duplicates == "error":
            raise DatasetError(f"{path} {where(later)}: the same row as {where(earlier)} (every field equal); a "
                               "repeated example would weigh twice: remove it, or set the data's `duplicates: drop`")
        examples = ", ".join(f"{where(a)} = {where(b)}" for a, b in repeats[:3])
        print(f"{path}: dropped {len(repeats)} repeated row(s) of {len(records)} ({examples}"
              f"{', ...' if len(repeats) > 3 else ''}); `duplicates: error` refuses them, `keep` keeps them")
        kept = sorted(set(range(len(records))) - {a for a, _ in repeats})
        records, where = [records[i] for i in kept], (lambda i, _where=where: _where(kept[i]))
    present = dict.fromkeys(key for record in records for key in record)  # ordered union of keys

    out: dict[str, list] = {}
    for name, expected in [*required.items(), *optional.items()]:
        source = columns.get(name, name)
        field = f"field {name!r}" + (f" (column {source!r})" if source != name else "")
        if source not in present:
            if name in optional:
                continue
            raise DatasetError(f"{path}: required {field} not found; columns present: {list(present)}")
        values = [record.get(source) for record in records]
        for i, value in enumerate(values):
            if _is_missing(value):
                if name in required:
                    raise DatasetError(f"{path} {where(i)}: {field} is missing (got {value!r})")
            elif problem := _type_problem(value, expected):
                raise DatasetError(f"{path} {where(i)}: {field}: {problem}")
        if expected is float:  # ints were accepted; store one dtype so the column is float64
            values = [math.nan if _is_missing(v) else float(v) for v in values]
        out[name] = values
    return pd.DataFrame(out, index=pd.RangeIndex(len(records)))


def _repeated_rows(rows: list[dict]) -> list[tuple[int, int]]:
    """(index of a row equal to an earlier one in every field, index of its first occurrence), in file order.
    Rows that differ only in fields a flow does not use (a preference file read for its prompts) are not
    repeats: the file is what the user wrote, and its rows are distinct."""
    seen: dict[str, int] = {}
    repeats = []
    for i, row in enumerate(rows):
        key = json.dumps(row, sort_keys=True, default=str)
        if key in seen:
            repeats.append((i, seen[key]))
        else:
            seen[key] = i
    return repeats


def check_prompt_lengths(path: str | Path, prompt_lengths: list[int], max_new_tokens: int, context: int) -> None:
    """Every prompt (as tokenized for generation) leaves room for `max_new_tokens` in the model's `context`
    positions, or this raises naming the first row that does not (0-based, in the file's order)."""
    for row, length in enumerate(prompt_lengths):
        if length + max_new_tokens > context:
            raise DatasetError(f"{path} row {row}: the prompt is {length} tokens; with generation.max_new_tokens "
                               f"{max_new_tokens} it needs {length + max_new_tokens} positions, more than the "
                               f"model's context of {context}: shorten it or lower max_new_tokens")


def dataset_fingerprint(path: str | Path) -> str:
    """sha256 hex of the file's bytes; for a directory, of its files' relative names and bytes in sorted order."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: does not exist")
    files = [path]
    if path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
    digest = hashlib.sha256()
    for file in files:
        if path.is_dir():
            # The name and size delimit each file, so moving bytes between files changes the hash.
            name = file.relative_to(path).as_posix()
            digest.update(f"{name}\0{file.stat().st_size}\0".encode())
        with file.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()
