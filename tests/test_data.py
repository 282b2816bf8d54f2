"""Tests for rlhf_core.data: every format loads to the same frame, and every bad input is named precisely."""

import hashlib
import json
import re

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf_core.data import DatasetError, dataset_fingerprint, load_table

RECORDS = [
    {"question": "What is 1 + 2?", "answer": 3, "score": 0.5, "tags": ["a"], "extra": "dropped"},
    {"question": "What is 5 - 7?", "answer": -2, "score": 1, "tags": [], "extra": "dropped"},
]
REQUIRED = {"prompt": str, "answer": int, "score": float, "tags": list}
MAPPING = {"prompt": "question"}
EXPECTED = pd.DataFrame(
    {
        "prompt": ["What is 1 + 2?", "What is 5 - 7?"],
        "answer": [3, -2],
        "score": [0.5, 1.0],  # the int 1 is accepted for a float field and stored as 1.0
        "tags": [["a"], []],
    }
)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write(tmp_path, fmt, records):
    """Write `records` in format `fmt` under tmp_path and return the path."""
    if fmt == "jsonl":
        return write_jsonl(tmp_path / "data.jsonl", records)
    if fmt == "json":
        path = tmp_path / "data.json"
        path.write_text(json.dumps(records), encoding="utf-8")
        return path
    if fmt == "parquet":
        path = tmp_path / "data.parquet"
        pd.DataFrame(records).to_parquet(path)
        return path
    path = tmp_path / "saved"
    datasets.Dataset.from_list(records).save_to_disk(str(path))
    return path


FORMATS = ["jsonl", "json", "parquet", "datasets"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_loads_to_the_same_frame(tmp_path, fmt):
    records = [{**r, "score": float(r["score"])} for r in RECORDS] if fmt != "jsonl" else RECORDS
    df = load_table(write(tmp_path, fmt, records), REQUIRED, columns=MAPPING)
    pd.testing.assert_frame_equal(df, EXPECTED)
    assert isinstance(df.index, pd.RangeIndex)


def test_datasets_from_dict_folder(tmp_path):
    path = tmp_path / "saved"
    datasets.Dataset.from_dict({"prompt": ["a", "b"], "answer": [1, 2]}).save_to_disk(str(path))
    df = load_table(path, {"prompt": str, "answer": int})
    pd.testing.assert_frame_equal(df, pd.DataFrame({"prompt": ["a", "b"], "answer": [1, 2]}))


def test_optional_columns_present_and_absent(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "answer": 1}, {"prompt": "q"}])
    df = load_table(path, {"prompt": str}, optional={"answer": int, "weight": float})
    assert list(df.columns) == ["prompt", "answer"]  # "weight" is in no row, so it is left out
    assert df["answer"].tolist()[0] == 1 and pd.isna(df["answer"].tolist()[1])


def test_optional_column_is_type_checked(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "answer": "x"}])
    with pytest.raises(DatasetError, match=r"d\.jsonl line 1: field 'answer': expected int, got str 'x'"):
        load_table(path, {"prompt": str}, optional={"answer": int})


def test_mapping_an_unknown_field_raises(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p"}])
    with pytest.raises(ValueError, match="unknown fields \\['promt'\\]"):
        load_table(path, {"prompt": str}, columns={"promt": "question"})


def test_blank_lines_are_skipped_and_lines_still_counted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a"}\n\n   \n{"prompt": 5}\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"d\.jsonl line 4: field 'prompt': expected str, got int 5"):
        load_table(path, {"prompt": str})


def test_invalid_json_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c",}\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"d\.jsonl line 3: invalid JSON: "):
        load_table(path, {"prompt": str})


def test_line_that_is_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a"}, ["prompt", "b"]])
    with pytest.raises(DatasetError, match=r"d\.jsonl line 2: expected a JSON object, got list"):
        load_table(path, {"prompt": str})


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DatasetError, match=r"d\.jsonl line 2: not valid UTF-8"):
        load_table(path, {"prompt": str})


def test_non_utf8_json_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b'[{"prompt": "caf\xe9"}]')
    with pytest.raises(DatasetError, match=r"d\.json: not valid UTF-8"):
        load_table(path, {"prompt": str})


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_required_column_lists_the_columns(tmp_path, fmt):
    path = write(tmp_path, fmt, [{"question": "a", "answer": 1}])
    message = r": required field 'prompt' not found; columns present: \['question', 'answer'\]"
    with pytest.raises(DatasetError, match=re.escape(path.name) + message):
        load_table(path, {"prompt": str, "answer": int})


def test_missing_mapped_column_names_both_names(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a"}])
    with pytest.raises(DatasetError, match=r"d\.jsonl: required field 'prompt' \(column 'question'\) not found"):
        load_table(path, {"prompt": str}, columns={"prompt": "question"})


def test_missing_key_on_one_jsonl_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": 1}, {"prompt": "b"}])
    with pytest.raises(DatasetError, match=r"d\.jsonl line 2: field 'answer' is missing \(got None\)"):
        load_table(path, {"prompt": str, "answer": int})


@pytest.mark.parametrize("fmt", ["json", "parquet", "datasets"])
def test_none_value_names_the_row(tmp_path, fmt):
    path = write(tmp_path, fmt, [{"prompt": "a"}, {"prompt": "b"}, {"prompt": None}])
    with pytest.raises(DatasetError, match=rf"{re.escape(path.name)} row 2: field 'prompt' is missing \(got None\)"):
        load_table(path, {"prompt": str})


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_nan_value_is_missing(tmp_path, fmt):
    records = [{"p": "a", "score": 0.5}, {"p": "b", "score": float("nan")}]
    path = write(tmp_path, fmt, records)
    if fmt == "parquet":  # pandas.to_parquet would store NaN as null; pyarrow keeps a real NaN
        pq.write_table(pa.Table.from_pylist(records), path)
    place = "line 2" if fmt == "jsonl" else "row 1"  # JSONL lines are 1-based, rows 0-based
    with pytest.raises(DatasetError, match=rf"{re.escape(path.name)} {place}: field 'score' is missing \(got nan\)"):
        load_table(path, {"p": str, "score": float})


@pytest.mark.parametrize(
    ("value", "expected", "message"),
    [
        ("12", int, "expected int, got str '12'"),
        (1.5, int, "expected int, got float 1.5"),
        (True, int, "expected int, got bool True"),
        (False, float, "expected float, got bool False"),
        ("", str, "expected a non-empty string, got str ''"),
        ("  \n\t", str, "expected a non-empty string, got str '  \\\\n\\\\t'"),
        (3, str, "expected str, got int 3"),
        ("a", list, "expected list, got str 'a'"),
    ],
)
def test_wrong_type_names_line_and_field(tmp_path, value, expected, message):
    valid = {int: 1, float: 1.0, str: "ok", list: []}[expected]  # line 1 is valid, so line 2 is the one named
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ok", "x": valid}, {"prompt": "ok", "x": value}])
    with pytest.raises(DatasetError, match=rf"d\.jsonl line 2: field 'x': {message}"):
        load_table(path, {"prompt": str, "x": expected})


def test_wrong_type_in_parquet_names_row_and_mapped_column(tmp_path):
    path = tmp_path / "d.parquet"
    pd.DataFrame({"question": ["a", "b", " "]}).to_parquet(path)
    message = r"d\.parquet row 2: field 'prompt' \(column 'question'\): expected a non-empty string"
    with pytest.raises(DatasetError, match=message):
        load_table(path, {"prompt": str}, columns={"prompt": "question"})


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_dataset(tmp_path, fmt):
    if fmt == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("\n\n", encoding="utf-8")
    elif fmt == "parquet":
        path = tmp_path / "d.parquet"
        pd.DataFrame({"prompt": pd.Series([], dtype=str)}).to_parquet(path)
    elif fmt == "datasets":
        path = tmp_path / "saved"
        datasets.Dataset.from_dict({"prompt": []}).save_to_disk(str(path))
    else:
        path = write(tmp_path, fmt, [])
    with pytest.raises(DatasetError, match=rf"{re.escape(path.name)}: contains no rows"):
        load_table(path, {"prompt": str})


def test_json_that_is_not_a_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"prompt": "a"}', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"d\.json: expected a JSON list of objects, got dict"):
        load_table(path, {"prompt": str})


def test_missing_path(tmp_path):
    with pytest.raises(DatasetError, match=r"nope\.jsonl: does not exist"):
        load_table(tmp_path / "nope.jsonl", {"prompt": str})


@pytest.mark.parametrize("name", ["d.csv", "d"])
def test_unsupported_format(tmp_path, name):
    (tmp_path / name).write_text("prompt\na\n", encoding="utf-8")
    message = r": unsupported format .*; supported: \.jsonl, \.json, \.parquet, or a directory"
    with pytest.raises(DatasetError, match=re.escape(name) + message):
        load_table(tmp_path / name, {"prompt": str})


def test_directory_that_is_not_a_saved_dataset(tmp_path):
    with pytest.raises(DatasetError, match="not a saved dataset; supported: .jsonl"):
        load_table(tmp_path, {"prompt": str})


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DatasetError, match=r"d\.parquet: cannot read Parquet"):
        load_table(path, {"prompt": str})


def test_dataset_dict_asks_for_a_split(tmp_path):
    path = tmp_path / "dd"
    split = datasets.Dataset.from_dict({"prompt": ["a"]})
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(path))
    with pytest.raises(DatasetError, match=r"splits \['test', 'train'\]; pass one split's path, e.g. .*dd/train"):
        load_table(path, {"prompt": str})
    pd.testing.assert_frame_equal(load_table(path / "train", {"prompt": str}), pd.DataFrame({"prompt": ["a"]}))


_RECORDS = st.lists(
    st.fixed_dictionaries(
        {"prompt": st.text(min_size=1).filter(str.strip), "answer": st.integers(-(2**63), 2**63 - 1)}
    ),
    min_size=1,
    max_size=8,
    unique_by=lambda r: (r["prompt"], r["answer"]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=_RECORDS)
def test_jsonl_and_parquet_round_trip(tmp_path_factory, records):
    directory = tmp_path_factory.mktemp("roundtrip")
    jsonl = directory / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    parquet = directory / "d.parquet"
    pd.DataFrame(records).to_parquet(parquet)
    expected = pd.DataFrame({"prompt": [r["prompt"] for r in records], "answer": [r["answer"] for r in records]})
    required = {"prompt": str, "answer": int}
    pd.testing.assert_frame_equal(load_table(jsonl, required), expected)
    pd.testing.assert_frame_equal(load_table(parquet, required), expected)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=_RECORDS, data=st.data())
def test_a_repeated_row_is_named_with_the_row_it_repeats(tmp_path_factory, reliability, records, data):
    original = data.draw(st.integers(0, len(records) - 1))
    at = data.draw(st.integers(original + 1, len(records)))
    rows = records[:at] + [records[original]] + records[at:]
    path = tmp_path_factory.mktemp("dup") / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(DatasetError, match=rf"d.jsonl line {at + 1}: the same row as line {original + 1} "):
        load_table(path, {"prompt": str, "answer": int})
    reliability.record("bad input", "a row repeated anywhere in a dataset (hypothesis, 40 cases)",
                       "DatasetError naming both lines")


def test_rows_equal_only_in_fields_not_loaded_are_not_duplicates(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "chosen": "x"}\n{"prompt": "a", "chosen": "y"}\n')
    assert load_table(path, {"prompt": str})["prompt"].tolist() == ["a", "a"]  # a pairs file read for its prompts
    path.write_text('{"prompt": "a", "chosen": "x"}\n{"chosen": "x", "prompt": "a"}\n')
    with pytest.raises(DatasetError, match="line 2: the same row as line 1"):
        load_table(path, {"prompt": str})  # every field equal, whatever their order


def test_repeated_rows_dropped_with_a_count_or_kept_on_request(tmp_path, capsys, reliability):
    path = tmp_path / "d.jsonl"
    rows = ["a", "b", "a", "c", "b", "a"]
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows))
    dropped = load_table(path, {"prompt": str}, duplicates="drop")
    assert dropped["prompt"].tolist() == ["a", "b", "c"] and list(dropped.index) == [0, 1, 2]
    out = capsys.readouterr().out
    assert "dropped 3 repeated row(s) of 6 (line 3 = line 1, line 5 = line 2, line 6 = line 1)" in out
    assert load_table(path, {"prompt": str}, duplicates="keep")["prompt"].tolist() == rows
    # a later error still names the line in the file, not the position after dropping
    path.write_text('{"prompt": "a"}\n{"prompt": "a"}\n{"prompt": 5}\n')
    with pytest.raises(DatasetError, match="line 3: field 'prompt'"):
        load_table(path, {"prompt": str}, duplicates="drop")
    reliability.record("bad input", "a public data set with a few repeated rows (data.duplicates: drop, the default)",
                       "loads, each repeated row dropped once, the count and the first lines printed")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_any_bytes_in_a_jsonl_file_load_or_raise_a_dataset_error_naming_the_file(tmp_path_factory, reliability,
                                                                                 content):
    path = tmp_path_factory.mktemp("fuzz") / "fuzzed.jsonl"
    path.write_bytes(content)
    try:
        df = load_table(path, {"prompt": str})
    except DatasetError as e:
        assert str(path) in str(e)
    else:
        assert len(df) >= 1 and all(isinstance(v, str) for v in df["prompt"])
    reliability.record("bad input", "arbitrary bytes or text as a JSONL dataset (hypothesis, 150 cases)",
                       "loads valid rows, or a DatasetError naming the file; never another exception")


def test_check_prompt_lengths_names_the_first_row_without_room():
    from rlhf_core.data import check_prompt_lengths

    check_prompt_lengths("p.jsonl", [10, 20, 24], max_new_tokens=8, context=32)  # 24 + 8 = 32 fits exactly
    with pytest.raises(DatasetError, match=r"p.jsonl row 1: the prompt is 25 tokens; .* 33 positions, more than "
                                           r"the model's context of 32"):
        check_prompt_lengths("p.jsonl", [10, 25, 40], max_new_tokens=8, context=32)


def test_fingerprint_of_a_file_is_its_sha256(tmp_path):
    path = tmp_path / "d.bin"
    content = bytes(range(256)) * 9000  # > 2 MiB: spans several 1 MiB chunks
    path.write_bytes(content)
    assert dataset_fingerprint(path) == hashlib.sha256(content).hexdigest()
    path.write_bytes(content + b"!")
    assert dataset_fingerprint(path) != hashlib.sha256(content).hexdigest()


def test_fingerprint_of_a_directory(tmp_path):
    for name in ("a", "b"):
        datasets.Dataset.from_dict({"prompt": ["x", "y"]}).save_to_disk(str(tmp_path / name))
        (tmp_path / name / "state.json").write_text("{}")  # drop the per-save random fingerprint
    assert dataset_fingerprint(tmp_path / "a") == dataset_fingerprint(tmp_path / "b")
    (tmp_path / "b" / "extra.txt").write_text("x")
    assert dataset_fingerprint(tmp_path / "a") != dataset_fingerprint(tmp_path / "b")


def test_fingerprint_of_a_directory_depends_on_names(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.txt").write_text("same")
    (tmp_path / "b" / "y.txt").write_text("same")
    assert dataset_fingerprint(tmp_path / "a") != dataset_fingerprint(tmp_path / "b")


def test_fingerprint_of_missing_path(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        dataset_fingerprint(tmp_path / "nope")


def test_shipped_review_prompts_are_what_the_script_makes():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "data" / "make_review_prompts.py"
    spec = importlib.util.spec_from_file_location("make_review_prompts", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(write=False) == 0  # checks only: review_prompts.jsonl is the generated order minus eval
