"""Tests for rlhf_core.data and tasks/data.py: every format loads to the same frame through either reader, every bad
input is named precisely, and conversational rows come out in the canonical shape."""

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

from rlhf_core.conversation import prompt_messages
from rlhf_core.data import Check, DatasetError, dataset_fingerprint, load_table

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


@pytest.mark.parametrize("content", ["null", "\ufeffnull\n", "\n  null\n", "null\n{\"prompt\": \"a\"}\n",
                                     '{"prompt": "a"}\nnull\n'])
def test_a_null_line_is_named_not_a_crash(tmp_path, content, reliability):
    """pyarrow 25's JSON reader segfaults on a file whose first value is `null` (found by the fuzz test below):
    such lines never reach it."""
    path = tmp_path / "nulls.jsonl"
    path.write_text(content, encoding="utf-8")
    line = 1 + content.lstrip("\ufeff").split("null")[0].count("\n")
    with pytest.raises(DatasetError, match=rf"nulls.jsonl.*line {line}\b"):
        load_table(path, {"prompt": str})
    reliability.record("bad input", "a JSONL line holding `null` (crashed the process inside pyarrow's reader)",
                       "DatasetError naming the file and the line")


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


# ------------------------------------------------------------------------------- columnar reader vs row reader

PROMPT_CHECK = Check(prompt_messages)
_HI, _YO, _SYSTEM = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "system",
                                                                                                  "content": "s"}
_ROW = st.fixed_dictionaries(  # mostly valid rows, so that both readers' success paths are compared too
    {"prompt": st.one_of(st.sampled_from(["What?", "Why?", "How?", [_HI], [_SYSTEM, _HI], [_HI, _YO, _HI], " ",
                                          "\x1c", "\u3000", None, 3, [_YO], [], [{"role": "user"}],
                                          [{"role": "bot", "content": "x"}]]), st.text(max_size=3)),
     "answer": st.one_of(st.integers(-2, 2), st.sampled_from([None, "4", 1.5, True, [1], {"a": 1}]))},
    optional={"score": st.one_of(st.integers(0, 2), st.floats(allow_infinity=False), st.booleans(), st.none()),
              "x": st.one_of(st.integers(0, 2), st.booleans(), st.just("1"))})
_ROWS = st.lists(_ROW, min_size=1, max_size=5).flatmap(lambda pool: st.lists(st.sampled_from(pool), min_size=1,
                                                                             max_size=8))  # repeats, sometimes


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=_ROWS, duplicates=st.sampled_from(["drop", "error", "keep"]), blank_line=st.booleans())
def test_the_columnar_reader_gives_the_row_readers_frame_or_error(tmp_path_factory, capsys, rows, duplicates,
                                                                  blank_line):
    """Cross-check of the two readers on arbitrary rows: the same frame, or the same message, and the same notice."""
    path = tmp_path_factory.mktemp("cross") / "d.jsonl"
    lines = [json.dumps(r) for r in rows]
    path.write_text("\n".join(lines[:1] + [""] * blank_line + lines[1:]) + "\n", encoding="utf-8")
    outcomes = []
    for columnar in (True, False):
        try:
            df = load_table(path, {"prompt": PROMPT_CHECK, "answer": object}, optional={"score": float, "x": int},
                            duplicates=duplicates, columnar=columnar)
            outcomes.append(("frame", df, capsys.readouterr().out))
        except DatasetError as e:
            outcomes.append(("error", str(e), capsys.readouterr().out))
    (kind, value, out), (row_kind, row_value, row_out) = outcomes
    assert (kind, out) == (row_kind, row_out)
    if kind == "frame":
        pd.testing.assert_frame_equal(value, row_value)
    else:
        assert value == row_value


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "datasets"])
def test_the_columnar_reader_reads_a_clean_file_alone(tmp_path, fmt, monkeypatch):
    import rlhf_core.data

    path = write(tmp_path, fmt, [{**r, "score": float(r["score"])} for r in RECORDS])
    by_rows = load_table(path, REQUIRED, columns=MAPPING, columnar=False)
    monkeypatch.setattr(rlhf_core.data, "_read_records", lambda *a, **k: pytest.fail("the row reader ran"))
    pd.testing.assert_frame_equal(load_table(path, REQUIRED, columns=MAPPING), by_rows)
    pd.testing.assert_frame_equal(by_rows, EXPECTED)


def test_columnar_repeats_are_named_by_line_past_blank_lines(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n{"prompt": "a"}\n\n{"prompt": "b"}\n')
    assert load_table(path, {"prompt": str}, duplicates="drop")["prompt"].tolist() == ["a", "b"]
    assert "dropped 2 repeated row(s) of 4 (line 4 = line 1, line 6 = line 3)" in capsys.readouterr().out


def test_two_objects_on_one_line_are_invalid_json_for_both_readers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a"} {"prompt": "b"}\n')
    with pytest.raises(DatasetError, match=r"d\.jsonl line 1: invalid JSON: Extra data"):
        load_table(path, {"prompt": str})


# ----------------------------------------------------------------------------------------- conversational rows

def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.mark.parametrize(("prompt", "message"), [
    ([{"content": "hi"}], r"field 'prompt': message 0: no 'role'"),
    ([{"role": "human", "content": "hi"}], r"field 'prompt': message 0: unknown role 'human'"),
    ([{"role": "user", "content": ["hi"]}], r"field 'prompt': message 0 \(user\): content must be a string"),
    ([], r"field 'prompt': an empty conversation"),
    ({"role": "user", "content": "hi"}, r"field 'prompt': expected str, got dict"),
    ([user("a"), assistant("b")], r"field 'prompt': the last turn is an assistant turn"),
])
def test_bad_conversational_prompts_name_file_line_and_field(tmp_path, prompt, message):
    from rlhf_core.config import DataConfig
    from tasks.data import read_prompts

    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, {"prompt": prompt}])
    with pytest.raises(DatasetError, match=r"p\.jsonl line 2: " + message):
        read_prompts(DataConfig(path=str(path), extra_columns=[]))


def test_prompts_of_both_shapes_in_one_file(tmp_path):
    from rlhf_core.config import DataConfig
    from tasks.data import read_prompts

    system = {"role": "system", "content": "Answer with a number."}
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1 + 1?", "answer": 2},
                                              {"prompt": [system, user("2 + 2?")], "answer": 4},
                                              {"prompt": [user("1 + 1?"), assistant("2"), user("and 2 + 1?")],
                                               "answer": 3}])
    df = read_prompts(DataConfig(path=str(path), system_prompt="Be brief."))
    assert list(df.columns) == ["prompt_id", "prompt", "prompt_messages", "answer"]
    assert df["prompt"].tolist() == ["1 + 1?", "2 + 2?", "user: 1 + 1?\n\nassistant: 2\n\nuser: and 2 + 1?"]
    # the data's own system turn stays; data.system_prompt is the renderer's to add, never stored
    assert df["prompt_messages"].tolist() == [[user("1 + 1?")], [system, user("2 + 2?")],
                                              [user("1 + 1?"), assistant("2"), user("and 2 + 1?")]]


def test_canonical_columns_round_trip_through_parquet_and_publish(rlhf_home, tmp_path):
    import pyarrow.parquet as pq

    from rlhf_core.config import DataConfig, PreferenceDataConfig, SFTDataConfig
    from rlhf_core.conversation import as_messages
    from tasks.data import load_conversation_dataset, load_preference_dataset, load_prompt_dataset

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": [user("b"), assistant("c"),
                                                                               user("d")]}])
    ref = load_prompt_dataset.fn(DataConfig(path=str(prompts), extra_columns=[]), "sha")
    assert str(pq.read_schema(ref.path).field("prompt_messages").type) == \
        "list<element: struct<role: string, content: string>>"
    back = ref.read()
    assert [as_messages(m) for m in back["prompt_messages"]] == [[user("a")], [user("b"), assistant("c"), user("d")]]
    assert back["prompt_id"].dtype == "int64" and back["prompt"].tolist() == ["a", "user: b\n\nassistant: c\n\nuser: d"]

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": [user(f"q{i}"), assistant("yes")],
                                                    "rejected": [user(f"q{i}"), assistant("no")]} for i in range(4)])
    splits = load_preference_dataset.fn(PreferenceDataConfig(path=str(pairs), eval_path=None, eval_fraction=0.25),
                                        ["sha"], 0)
    train = splits.train.read()
    assert list(train.columns) == ["pair_id", "prompt", "prompt_messages", "chosen", "rejected"]
    assert as_messages(train["prompt_messages"].iloc[0]) == [user(train["prompt"].iloc[0])]

    sft = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [user("a"), assistant("b")]}, {"text": "plain"}])
    splits = load_conversation_dataset.fn(SFTDataConfig(path=str(sft), eval_path=None, eval_fraction=0.5), ["sha"], 0)
    rows = pd.concat([splits.train.read(), splits.eval.read()]).sort_values("example_id")
    assert [as_messages(m) for m in rows["messages"]] == [[user("a"), assistant("b")], []]
    assert [t if isinstance(t, str) else None for t in rows["text"]] == [None, "plain"]  # NaN read back: not a str


def test_conversational_repeats_ties_and_held_out_prompts(tmp_path, capsys):
    from rlhf_core.config import PreferenceDataConfig, UnpairedDataConfig
    from tasks.data import split_examples, split_pairs

    chosen = [{"chosen": [user(f"q{i}"), assistant("yes")], "rejected": [user(f"q{i}"), assistant("no")]}
              for i in range(5)]
    tie = {"chosen": [user("t"), assistant("same")], "rejected": [user("t"), assistant("same")]}
    path = write_jsonl(tmp_path / "pairs.jsonl", [*chosen, chosen[1], tie])
    train, held_out = split_pairs(PreferenceDataConfig(path=str(path), eval_path=None, eval_fraction=0.2), seed=0)
    out = capsys.readouterr().out
    assert "dropped 1 repeated row(s) of 7 (line 6 = line 2)" in out
    assert "dropped 1 pair(s) of 6 whose chosen and rejected responses are the same text (first: row 5)" in out
    assert len(train) + len(held_out) == 5

    system = {"role": "system", "content": "Be kind."}
    rows = [{"prompt": p, "completion": c, "label": c == "good"} for p in ("a", [system, user("a")], "b", "c")
            for c in ("good", "bad")]  # "a" with and without a system turn: two prompts of the same text
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    train, held_out = split_examples(UnpairedDataConfig(path=str(path), eval_path=None, eval_fraction=0.5), seed=0)
    keys = [{json.dumps(m) for m in df["prompt_messages"]} for df in (train, held_out)]
    assert not keys[0] & keys[1] and len(keys[0]) == 2 and len(keys[1]) == 2  # 4 distinct prompts, 2 held out


@pytest.mark.parametrize(("rows", "repeats"), [
    ([{"p": "a", "s": 1}, {"p": "a", "s": 1.0}], 0),  # one float column to Arrow, two rows to json.loads
    ([{"p": "a", "s": float("nan")}, {"p": "a", "s": float("nan")}], 1),  # NaN equals NaN as a row
    ([{"p": "a", "s": [1, {"b": 2}]}, {"p": "a", "s": [1, {"b": 2}]}, {"p": "a", "s": [1, {"b": 3}]}], 1),
])
def test_repeats_are_the_row_readers_in_either_reader(tmp_path, capsys, rows, repeats):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    for columnar in (True, False):
        assert len(load_table(path, {"p": str}, duplicates="drop", columnar=columnar)) == len(rows) - repeats
    assert capsys.readouterr().out.count("dropped") == 2 * bool(repeats)


def test_sft_columns_are_mapped_and_a_row_of_no_shape_is_named(tmp_path):
    from rlhf_core.config import SFTDataConfig
    from tasks.data import read_conversations

    rows = [{"conv": [user("a"), assistant("b")]}, {"q": "c", "a": [assistant("d")]}, {"body": "plain"}]
    data = SFTDataConfig(path=str(write_jsonl(tmp_path / "sft.jsonl", rows)), eval_path=None, messages_column="conv",
                         prompt_column="q", completion_column="a", text_column="body")
    examples = read_conversations(data)
    assert examples["messages"].tolist() == [[user("a"), assistant("b")], [user("c"), assistant("d")], []]
    assert examples["text"].tolist() == [None, None, "plain"]
    write_jsonl(tmp_path / "sft.jsonl", [*rows, {"q": "only a prompt"}])
    with pytest.raises(DatasetError, match=r"sft\.jsonl line 4: no example: a row needs a conversation \(column "
                                           r"'conv'\), a prompt and its completion \(columns 'q', 'a'\)"):
        read_conversations(data)
    write_jsonl(tmp_path / "sft.jsonl", [{"other": 1}])
    with pytest.raises(DatasetError, match=r"sft\.jsonl: none of field 'messages' \(column 'conv'\), .* found; "
                                           r"columns present: \['other'\]"):
        read_conversations(data)
