"""Loading user datasets with validation, so that bad input fails before any training work starts.

Every error names the file, the place (1-based line for JSONL, 0-based row index otherwise) and the field:
a typo on line 40,000 should be a one-line fix, not a crash an hour into generation.

Two readers give the same frame. The columnar one reads the file into Arrow (`pyarrow.json`, Parquet, a saved or
cached `datasets` table, memory-mapped), checks each column with `pyarrow.compute` and finds repeated rows by a
hash per row, so a million-row file never exists as a million Python dicts. When any column holds a value that
may be wrong (or Arrow cannot read the file), the row-by-row reader runs instead: rows as plain Python objects
(json.loads / `to_pylist`), not through pandas, which turns an int column with a null into floats and would hide
which value was wrong; it names the first bad value. The columnar reader only ever accepts what the row-by-row one
accepts, so the messages are the row-by-row reader's whichever runs.

Sources: a file (.jsonl, .json, .parquet), a `datasets.save_to_disk` folder, a folder of data files
(`datasets.load_dataset(folder, split=...)`), or a Hugging Face hub id `org/name` found in the local `datasets`
cache (the pipeline runs offline: HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from rlhf_core.errors import UserInputError

SUPPORTED_FORMATS = (".jsonl, .json, .parquet, or a directory written by datasets.Dataset.save_to_disk or holding "
                     "data files, or a hub id org/name in the local datasets cache")
_CHUNK = 1 << 20  # 1 MiB: hashing streams, so a 50 GB file needs no memory
_SLICE = 1 << 16  # rows of one column made Python objects at once while looking for repeated rows
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".arrow")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# What str.strip() removes (str.isspace; all below U+3001): a string of only these is empty to the row reader
_WHITESPACE = "".join(c for c in map(chr, range(0x3001)) if c.isspace())
_BLANK = "^[" + "".join(f"\\x{{{ord(c):x}}}" for c in _WHITESPACE) + "]*$"  # RE2, for pyarrow.compute


class DatasetError(UserInputError):
    """A user dataset that cannot be used; the message names the file, the line or row, and the field."""


@dataclass(frozen=True)
class Check:
    """A field that is not one Python type (a prompt: a string or a list of messages). `parse(value)` returns the
    value or raises ValueError saying what is wrong; `text`: a column of non-empty strings is valid without a call
    per row (the columnar reader checks it as `str`)."""

    parse: Callable[[Any], Any]
    text: bool = True


# ------------------------------------------------------------------------------------------------------ sources


def is_hub_id(name: str | Path) -> bool:
    """`org/name`: relative, one slash, no data-file suffix (a local path of that shape is looked up first)."""
    return isinstance(name, str) and bool(_HUB_ID.fullmatch(name)) and not name.lower().endswith(_FILE_SUFFIXES)


def hub_cache_dir() -> Path:
    """The `datasets` cache: $HF_DATASETS_CACHE, else the library's default (~/.cache/huggingface/datasets)."""
    import datasets

    return Path(os.environ.get("HF_DATASETS_CACHE") or datasets.config.HF_DATASETS_CACHE).expanduser()


def _hub_folder(name: str) -> Path:
    """Where `load_dataset(name)` keeps a hub data set: <cache>/<org>___<snake_name>/<config>/<version>/<commit>/."""
    from datasets.naming import camelcase_to_snakecase

    org, dataset = name.split("/")
    return hub_cache_dir() / f"{org}___{camelcase_to_snakecase(dataset)}"


@contextmanager
def _quiet_datasets():
    """Silence `datasets`' progress bars and cache notices while it reads for us; errors still raise."""
    import datasets

    verbosity, bars = datasets.logging.get_verbosity(), datasets.is_progress_bar_enabled()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def _arrow(dataset):
    """A `datasets.Dataset`'s rows as one Arrow table (memory-mapped where the dataset is; a selection applied)."""
    return dataset.with_format("arrow")[:]


def _check_cached(name: str, split: str, subset: str | None) -> None:
    if not any(_hub_folder(name).glob("*/*/*/dataset_info.json")):
        raise DatasetError(
            f"{name}: no such file or folder (here or in the project folder), and no data set of that name in the "
            f"local datasets cache {hub_cache_dir()}. The pipeline runs offline: fill the cache once where there is "
            f"network, e.g. HF_HUB_OFFLINE=0 python -c \"import datasets; datasets.load_dataset('{name}'"
            f"{f', {subset!r}' if subset else ''}, split='{split}')\" (HF_DATASETS_CACHE picks the folder)")


def _read_hub(name: str, split: str, subset: str | None):
    import datasets

    _check_cached(name, split, subset)
    try:
        with _quiet_datasets():
            return _arrow(datasets.load_dataset(name, name=subset, split=split, cache_dir=str(hub_cache_dir())))
    except Exception as e:  # an unknown split or subset, several subsets cached, a damaged cache entry
        raise DatasetError(f"{name} (datasets cache {hub_cache_dir()}, split {split!r}, subset {subset!r}): "
                           f"{type(e).__name__}: {e}".replace("\n", " ")) from e


def _read_saved_dataset(path: Path):
    import datasets  # imported here: it is slow to import and only these sources need it

    state = path / "state.json"
    if state.is_file() and json.loads(state.read_text()).get("_data_files") == []:
        # A zero-row Dataset is saved with no shards, and load_from_disk then fails with an IndexError.
        raise DatasetError(f"{path}: contains no rows")
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DatasetError(f"{path}: cannot load saved dataset: {type(e).__name__}: {e}") from e
    if isinstance(loaded, datasets.DatasetDict):
        splits = sorted(loaded)
        example = path / ("train" if "train" in splits or not splits else splits[0])
        raise DatasetError(f"{path}: holds a DatasetDict with splits {splits}; pass one split's path, e.g. {example}")
    return _arrow(loaded)


def _read_folder(path: Path, split: str):
    """A saved dataset, or a folder of data files read by `datasets.load_dataset(folder, split=...)`."""
    import datasets

    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        return _read_saved_dataset(path)
    try:
        with _quiet_datasets():
            return _arrow(datasets.load_dataset(str(path), split=split, cache_dir=str(hub_cache_dir())))
    except (datasets.data_files.EmptyDatasetError, datasets.exceptions.DataFilesNotFoundError):
        raise DatasetError(f"{path}: a directory that is not a saved dataset; supported: {SUPPORTED_FORMATS}") \
            from None
    except Exception as e:
        raise DatasetError(f"{path}: cannot load the data files of this folder (split {split!r}): "
                           f"{type(e).__name__}: {e}".replace("\n", " ")) from e


def _read_table(path: Path | str, split: str, subset: str | None):
    """The Arrow table of a Parquet file, a folder or a hub id; raises DatasetError naming what cannot be read."""
    if isinstance(path, str):
        return _read_hub(path, split, subset)
    if path.is_dir():
        return _read_folder(path, split)
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a corrupt or truncated file
        raise DatasetError(f"{path}: cannot read Parquet: {e}") from e


def _suffix(path: Path | str) -> str | None:
    """A file's suffix, lower-cased; None for a folder or a hub id."""
    return path.suffix.lower() if isinstance(path, Path) and not path.is_dir() else None


def _source(path: str | Path) -> Path | str:
    """A hub id stays a string; anything else is a path that must exist with a supported format."""
    if is_hub_id(path) and not Path(path).exists():
        return str(path)
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: does not exist")
    if not path.is_dir() and path.suffix.lower() not in (".jsonl", ".json", ".parquet"):
        raise DatasetError(f"{path}: unsupported format {path.suffix.lower() or '(no suffix)'!r}; supported: "
                           f"{SUPPORTED_FORMATS}")
    return path


# ------------------------------------------------------------------------------------------- row-by-row reader


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


def _read_records(path: Path | str, split: str, subset: str | None,
                  table=None) -> tuple[list[Any], Callable[[int], str]]:
    """All rows as Python objects, and a function from row index to its place in the file."""
    if _suffix(path) == ".jsonl":
        return _read_jsonl(path)
    if _suffix(path) == ".json":
        return _read_json(path), lambda i: f"row {i}"
    table = _read_table(path, split, subset) if table is None else table
    return table.to_pylist(), lambda i: f"row {i}"


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _type_problem(value: Any, expected: type | Check) -> str | None:
    """Why `value` is not a valid `expected`, or None if it is."""
    if isinstance(expected, Check):
        try:
            expected.parse(value)
        except ValueError as e:
            return str(e)
        return None
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


def _field_name(name: str, columns: Mapping[str, str]) -> str:
    source = columns.get(name, name)
    return f"field {name!r}" + (f" (column {source!r})" if source != name else "")


def _rows_values(path, records, where, fields, required, columns, duplicates):
    """The row-by-row reader: (values per field, where) after the checks, in today's order: objects, repeats,
    then each field over every row."""
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise DatasetError(f"{path} {where(i)}: expected a JSON object, got {type(record).__name__}")
    if duplicates != "keep" and (repeats := _repeated_rows(records)):
        kept = _without_repeats(path, repeats, len(records), where, duplicates)
        records, where = [records[i] for i in kept], (lambda i, _where=where: _where(kept[i]))
    present = dict.fromkeys(key for record in records for key in record)  # ordered union of keys
    out: dict[str, list] = {}
    for name, expected in fields.items():
        source, field = columns.get(name, name), _field_name(name, columns)
        if source not in present:
            if name not in required:
                continue
            raise DatasetError(f"{path}: required {field} not found; columns present: {list(present)}")
        values = [record.get(source) for record in records]
        for i, value in enumerate(values):
            if _is_missing(value):
                if name in required:
                    raise DatasetError(f"{path} {where(i)}: {field} is missing (got {value!r})")
            elif problem := _type_problem(value, expected):
                raise DatasetError(f"{path} {where(i)}: {field}: {problem}")
        out[name] = values
    if not out:  # every field optional, none present
        raise DatasetError(f"{path}: none of {', '.join(_field_name(n, columns) for n in fields)} found; columns "
                           f"present: {list(present)}")
    return out, where


def _repeated_rows(rows: list[dict]) -> list[tuple[int, int]]:
    """(index of a row equal to an earlier one in every field, index of its first occurrence), in file order.
    Rows that differ only in fields a flow does not use (a preference file read for its prompts) are not
    repeats: the file is what the user wrote, and its rows are distinct."""
    return _repeated_rows_of((json.dumps(row, sort_keys=True, default=str) for row in rows), range(len(rows)))


def _repeated_rows_of(keys, indices) -> list[tuple[int, int]]:
    seen: dict[str, int] = {}
    repeats = []
    for i, key in zip(indices, keys):
        if key in seen:
            repeats.append((i, seen[key]))
        else:
            seen[key] = i
    return repeats


def _without_repeats(path, repeats: list[tuple[int, int]], count: int, where, duplicates: str) -> list[int]:
    """The rows kept (`duplicates: drop`, the count printed), or the DatasetError `duplicates: error` asks for."""
    later, earlier = repeats[0]
    if duplicates == "error":
        raise DatasetError(f"{path} {where(later)}: the same row as {where(earlier)} (every field equal); a "
                           "repeated example would weigh twice: remove it, or set the data's `duplicates: drop`")
    examples = ", ".join(f"{where(a)} = {where(b)}" for a, b in repeats[:3])
    print(f"{path}: dropped {len(repeats)} repeated row(s) of {count} ({examples}"
          f"{', ...' if len(repeats) > 3 else ''}); `duplicates: error` refuses them, `keep` keeps them")
    dropped = np.zeros(count, dtype=bool)
    dropped[[a for a, _ in repeats]] = True
    return np.flatnonzero(~dropped).tolist()


# --------------------------------------------------------------------------------------------- columnar reader


class _Columns(NamedTuple):
    """What the columnar reader read: the Arrow table, each row's place, and the row reader's view of some rows
    (`records(indices)`: its Python objects, to compare rows exactly as it does)."""

    table: Any
    where: Callable[[int], str]
    records: Callable[[list[int]], list[dict]]


def _read_columns(path: Path | str, split: str, subset: str | None) -> _Columns | None:
    """The columnar reader's input, or None where it does not apply (a .json list) or cannot read the file (the
    row reader then names the problem)."""
    if _suffix(path) == ".json":
        return None
    if _suffix(path) == ".jsonl":
        return _read_jsonl_columns(path)
    table = _read_table(path, split, subset)
    return _Columns(table, lambda i: f"row {i}", lambda indices: table.take(indices).to_pylist())


def _read_jsonl_columns(path: Path) -> _Columns | None:
    """A JSONL file read by Arrow, or None when Arrow cannot read it or its rows are not one per non-blank line
    (two objects on a line are an error to the row reader)."""
    import pyarrow.json as pj

    lines = _object_lines(path)
    if lines is None:
        return None
    try:
        table = pj.read_json(path, read_options=pj.ReadOptions(block_size=8 << 20))
        table.validate(full=True)  # the JSON reader does not check that strings are UTF-8
        pa.default_memory_pool().release_unused()  # the parser's buffers, so the Python objects reuse them
    except Exception:  # ArrowInvalid, UnicodeDecodeError, ...: the row reader names the line
        return None
    if len(lines) != table.num_rows:
        return None

    def records(indices: list[int]) -> list[dict]:  # json.loads of those lines (1 and 1.0 are one float to Arrow)
        wanted = {int(lines[i]): i for i in indices}
        found = {}
        with path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                if number in wanted:
                    found[wanted[number]] = json.loads(raw.decode("utf-8").removeprefix("\ufeff"))
        return [found[i] for i in indices]

    return _Columns(table, lambda i: f"line {lines[i]}", records)


def _object_lines(path: Path) -> np.ndarray | None:
    """The numbers of the non-blank lines, or None when one of them does not start with `{`. Only such files go
    to Arrow: pyarrow 25's JSON reader kills the process (a segmentation fault) when the first value is `null`."""
    numbers = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            text = raw.strip().removeprefix(b"\xef\xbb\xbf").lstrip() if number == 1 else raw.strip()
            if text:
                if not text.startswith(b"{"):
                    return None
                numbers.append(number)
    return np.asarray(numbers, dtype=np.int64)


def _column_is_valid(column, expected: type | Check, required: bool) -> bool:
    """Whether every value of an Arrow column is valid for `expected`, checked without a Python object per row
    (a list column of a Check is then parsed by the caller); False sends the file to the row reader, which
    names the first bad value."""
    kind = column.type
    if (required and column.null_count) or (pa.types.is_floating(kind) and pc.any(pc.is_nan(column)).as_py()):
        return False  # missing values (NaN is missing too)
    text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
    listed = pa.types.is_list(kind) or pa.types.is_large_list(kind)
    if (expected is str or isinstance(expected, Check)) and text and \
            pc.any(pc.match_substring_regex(column, _BLANK)).as_py():
        return False  # an empty or blank string
    if isinstance(expected, Check):
        return (text and expected.text) or listed
    if expected is str:
        return text
    if expected in (int, float):
        return pa.types.is_integer(kind) or (expected is float and pa.types.is_floating(kind))
    if expected is bool:
        return pa.types.is_boolean(kind)
    if expected is list:
        return listed
    return text or listed or pa.types.is_struct(kind) or pa.types.is_integer(kind) or \
        pa.types.is_floating(kind) or pa.types.is_boolean(kind)  # object: JSON values, not timestamps


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True, default=str)
    return "NaN" if isinstance(value, float) and math.isnan(value) else value  # hash(nan) follows identity


def _row_hashes(table) -> np.ndarray:
    """A 64-bit hash of each row over every column (Python's hash of each value; of its JSON for a nested one),
    one slice of one column at a time: Arrow's own grouping holds ~4x the table in hash tables."""
    hashes = np.zeros(table.num_rows, dtype=np.uint64)
    for column in table.columns:
        for start in range(0, table.num_rows, _SLICE):
            values = column.slice(start, _SLICE).to_pylist()
            part = np.fromiter((hash(_hashable(v)) for v in values), dtype=np.int64, count=len(values))
            hashes[start:start + len(values)] = hashes[start:start + len(values)] * np.uint64(0x100000001B3) ^ \
                part.view(np.uint64)
    return hashes


def _repeated_rows_columnar(columns: _Columns) -> list[tuple[int, int]]:
    """`_repeated_rows` of the columnar reader's table: only rows whose hashes are equal are compared, as the row
    reader compares them (a collision, or 1 and 1.0 in one float column, is no repeat)."""
    hashes = _row_hashes(columns.table)
    order = np.argsort(hashes, kind="stable")  # stable: each run of equal hashes is in file order
    equal = np.flatnonzero(hashes[order][1:] == hashes[order][:-1])
    candidates = np.unique(np.concatenate([order[equal], order[equal + 1]])).tolist()
    rows = columns.records(candidates) if candidates else []
    return _repeated_rows_of([json.dumps(row, sort_keys=True, default=str) for row in rows], candidates)


def _columnar_values(path, read: _Columns, fields, required, columns, duplicates):
    """The columnar reader: (values per field, where), or None when a column may hold a bad value. A list column
    of a Check becomes Python values once (they are the output); every other column only after the checks."""
    table, where = read.table, read.where
    present, parsed = table.column_names, {}
    if not any(columns.get(name, name) in present for name in fields):
        return None
    for name, expected in fields.items():
        source = columns.get(name, name)
        if source not in present:
            if name in required:
                return None
            continue
        column = table[source]
        if not _column_is_valid(column, expected, name in required):
            return None
        if isinstance(expected, Check) and not pa.types.is_string(column.type) \
                and not pa.types.is_large_string(column.type):
            parsed[name] = column.to_pylist()
            if not all(_is_missing(v) or _type_problem(v, expected) is None for v in parsed[name]):
                return None
    if duplicates != "keep" and (repeats := _repeated_rows_columnar(read)):
        kept = _without_repeats(path, repeats, table.num_rows, where, duplicates)
        table, where = table.take(kept), (lambda i, _where=where: _where(kept[i]))
        parsed = {name: [values[i] for i in kept] for name, values in parsed.items()}
    return {name: parsed[name] if name in parsed else table[columns.get(name, name)].to_pylist()
            for name in fields if columns.get(name, name) in present}, where


# ------------------------------------------------------------------------------------------------- load_table


def load_table(
    path: str | Path,
    required: Mapping[str, type | Check],
    columns: Mapping[str, str] | None = None,
    optional: Mapping[str, type | Check] | None = None,
    duplicates: str = "error",
    *,
    split: str = "train",
    subset: str | None = None,
    convert: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    columnar: bool = True,
) -> pd.DataFrame:
    """Load a dataset and validate it; returns the required and present optional columns under their canonical
    names with a fresh RangeIndex. `columns` maps canonical name -> name in the file ({"prompt": "question"}).
    `duplicates`: what to do with a row equal to an earlier one in every field: "error", "drop" (kept once, the
    count and the first few printed) or "keep". `split`, `subset`: of a hub id or a folder of data files
    (`datasets.load_dataset`'s split and name). `convert(row) -> fields` builds each valid row's output fields
    from its fields (the other fields pass through); a ValueError it raises is reported with the row's place.
    `columnar=False` uses the row-by-row reader only (the baseline of bench/data_loading.py). Raises DatasetError
    naming the file, the line/row and the field for the first problem found."""
    columns, optional = dict(columns or {}), dict(optional or {})
    if both := set(required) & set(optional):
        raise ValueError(f"fields both required and optional: {sorted(both)}")
    if unknown := set(columns) - set(required) - set(optional):
        raise ValueError(f"column mapping names unknown fields {sorted(unknown)}; fields: {[*required, *optional]}")
    path = _source(path)
    fields = {**required, **optional}

    read = _read_columns(path, split, subset) if columnar else None
    loaded = _columnar_values(path, read, fields, required, columns, duplicates) \
        if read is not None and read.table.num_rows else None
    if loaded is None:
        records, where = _read_records(path, split, subset, table=None if read is None else read.table)
        if not records:
            raise DatasetError(f"{path}: contains no rows")
        loaded = _rows_values(path, records, where, fields, required, columns, duplicates)
    (values, where), loaded, read = loaded, None, None
    pa.default_memory_pool().release_unused()  # the Arrow table's memory, before the Python objects grow
    for name, expected in fields.items():  # ints were accepted; store one dtype so the column is float64
        if expected is float and name in values:
            values[name] = [math.nan if _is_missing(v) else float(v) for v in values[name]]
    count = len(next(iter(values.values()))) if values else 0
    if convert is not None:
        values = _converted(path, values, where, convert)
    return pd.DataFrame(values, index=pd.RangeIndex(count))


def _converted(path, values: dict[str, list], where, convert) -> dict[str, list]:
    """`values` with the fields `convert` returns for each row (the same fields for every row) replaced or added."""
    names, out = list(values), {}
    for i, row in enumerate(zip(*values.values())):
        try:
            changed = convert(dict(zip(names, row)))
        except ValueError as e:
            raise DatasetError(f"{path} {where(i)}: {e}") from None
        for name, value in changed.items():
            out.setdefault(name, []).append(value)
    return {**values, **out}


def check_prompt_lengths(path: str | Path, prompt_lengths: list[int], max_new_tokens: int, context: int) -> None:
    """Every prompt (as tokenized for generation) leaves room for `max_new_tokens` in the model's `context`
    positions, or this raises naming the first row that does not (0-based, in the file's order)."""
    for row, length in enumerate(prompt_lengths):
        if length + max_new_tokens > context:
            raise DatasetError(f"{path} row {row}: the prompt is {length} tokens; with generation.max_new_tokens "
                               f"{max_new_tokens} it needs {length + max_new_tokens} positions, more than the "
                               f"model's context of {context}: shorten it or lower max_new_tokens")


def dataset_fingerprint(path: str | Path, subset: str | None = None) -> str:
    """sha256 hex of the file's bytes; for a directory, of its files' relative names and bytes in sorted order;
    for a hub id, of the cache folder `load_dataset` reads it from (every split of that subset and version)."""
    if is_hub_id(path) and not Path(path).exists():
        import datasets

        _check_cached(str(path), "train", subset)
        try:
            with _quiet_datasets():
                builder = datasets.load_dataset_builder(str(path), name=subset, cache_dir=str(hub_cache_dir()))
        except Exception as e:
            raise DatasetError(f"{path} (datasets cache {hub_cache_dir()}, subset {subset!r}): "
                               f"{type(e).__name__}: {e}".replace("\n", " ")) from e
        path = builder.cache_dir
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
