"""Loading and checking training records: every supported file type, and errors that say what to fix."""
from __future__ import annotations

import json

import pytest

import common
from cli import arguments
from records import data
from cli import errors

RECORDS = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
    {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
    {"instruction": "Name a color.", "input": "", "output": "Blue."},
]


def load(path=None, **kwargs):
    return data.load_records(arguments.DataArguments(dataset_name=None if path is None else str(path), **kwargs))


def rows(dataset):
    return [{key: record.get(key) or "" for key in ("instruction", "input", "output")} for record in dataset]


# --- file types -------------------------------------------------------------


def test_json_list(write_data):
    assert rows(load(write_data("data.json", RECORDS))) == RECORDS


def test_jsonl(write_data):
    text = "\n".join(json.dumps(r) for r in RECORDS) + "\n\n"  # a trailing blank line is fine
    assert rows(load(write_data("data.jsonl", text))) == RECORDS


def test_csv(tmp_path):
    import pandas as pd

    path = tmp_path / "data.csv"
    pd.DataFrame(RECORDS).to_csv(path, index=False)  # empty inputs become empty cells
    assert rows(load(path)) == RECORDS


def test_parquet(tmp_path):
    import datasets

    path = tmp_path / "data.parquet"
    datasets.Dataset.from_list(RECORDS).to_parquet(str(path))
    assert rows(load(path)) == RECORDS


def test_suffix_is_case_insensitive(write_data):
    assert len(load(write_data("DATA.JSON", RECORDS))) == 3


def test_missing_input_field_is_allowed(write_data):
    records = [{"instruction": "Say hi.", "output": "Hi!"}, {"instruction": "Say bye.", "input": None, "output": "Bye!"}]
    dataset = load(write_data("data.json", records))
    assert [r["output"] for r in dataset] == ["Hi!", "Bye!"]


def test_default_data_set():
    dataset = load()
    assert len(dataset) == 200
    assert {"instruction", "output"} <= set(dataset.column_names)
    data.validate_records(dataset, "default")
    texts = common.formatting_func(dataset[:])
    assert len(texts) == 200 and all(isinstance(t, str) and t for t in texts)
    assert data.DEFAULT_DATASET_FILE.parent.name == "data" and data.DEFAULT_DATASET_FILE.is_file()


def test_max_train_samples_truncates(write_data):
    dataset = load(write_data("data.json", RECORDS), max_train_samples=2)
    assert rows(dataset) == RECORDS[:2]
    assert len(load(write_data("data.json", RECORDS), max_train_samples=50)) == 3
    assert len(load(max_train_samples=7)) == 7


def test_real_alpaca_file(alpaca_path):
    dataset = load(alpaca_path)
    assert 4990 <= len(dataset) <= 5000  # 5,000 records, a few of them blank (skipped)
    with_input = [r for r in dataset.select(range(50)) if r["input"]]
    assert with_input, "some alpaca records carry an input"
    text = common.formatting_func(dict(with_input[0]))
    assert with_input[0]["input"].strip() in text
    assert len(load(alpaca_path, max_train_samples=32)) == 32


# --- errors -----------------------------------------------------------------


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(errors.UserInputError, match="does not exist") as info:
        load(missing)
    assert str(missing) in str(info.value) and "--dataset_name" in str(info.value)


def test_unsupported_suffix(write_data):
    path = write_data("data.txt", "instruction: hi")
    with pytest.raises(errors.UserInputError, match=r"'\.txt'") as info:
        load(path)
    assert ".jsonl" in str(info.value) and ".parquet" in str(info.value)


@pytest.mark.parametrize("name", ["data.json", "data.jsonl", "data.csv"])
def test_empty_file(write_data, name):
    with pytest.raises(errors.UserInputError, match="is empty"):
        load(write_data(name, b""))


def test_empty_list(write_data):
    with pytest.raises(errors.UserInputError, match="holds no records"):
        load(write_data("data.json", []))


def test_malformed_jsonl_line_is_named(write_data):
    lines = [json.dumps(RECORDS[0]), json.dumps(RECORDS[1]), '{"instruction": "x", "output": ', json.dumps(RECORDS[2])]
    with pytest.raises(errors.UserInputError, match=r"line 3 is not valid JSON"):
        load(write_data("data.jsonl", "\n".join(lines)))


def test_malformed_json_list_names_the_line(write_data):
    text = '[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]'
    with pytest.raises(errors.UserInputError, match=r"not valid JSON: line 3"):
        load(write_data("data.json", text))


def test_record_missing_output(write_data):
    records = RECORDS[:2] + [{"instruction": "No answer here.", "input": ""}]
    with pytest.raises(errors.UserInputError, match=r"Record 2 of .*no 'output' field"):
        load(write_data("data.json", records))


def test_record_missing_instruction(write_data):
    records = [{"prompt": "hi", "output": "hello"}]
    with pytest.raises(errors.UserInputError, match=r"Record 0 of .*no 'instruction' field") as info:
        load(write_data("data.json", records))
    assert "prompt" in str(info.value), "the message lists the fields the record does have"


def test_non_string_output(write_data):
    with pytest.raises(errors.UserInputError, match=r"Record 0 of .*'output' field is a int \(5\)"):
        load(write_data("data.json", [{"instruction": "Add 2 and 3.", "output": 5}]))


def test_non_string_input(write_data):
    with pytest.raises(errors.UserInputError, match=r"Record 0 of .*'input' field is a list"):
        load(write_data("data.json", [{"instruction": "Sum these.", "input": [1, 2], "output": "3"}]))


def test_non_string_in_csv(tmp_path):
    path = tmp_path / "numbers.csv"
    path.write_text("instruction,input,output\nAdd 2 and 3.,,5\nAdd 1 and 1.,,2\n")
    with pytest.raises(errors.UserInputError, match=r"Record 0 of .*'output' field is a int"):
        load(path)


@pytest.mark.parametrize("field", ["instruction", "output"])
@pytest.mark.parametrize("value", ["", "   \n"])
def test_blank_record_is_skipped_and_named(write_data, caplog, field, value):
    blank = dict(RECORDS[1], **{field: value})
    with caplog.at_level("WARNING"):
        dataset = load(write_data("data.json", [RECORDS[0], blank, RECORDS[2]]))
    assert rows(dataset) == [RECORDS[0], RECORDS[2]]
    assert "Skipped 1 record" in caplog.text and "record 1" in caplog.text


def test_only_blank_records_is_an_error(write_data):
    records = [{"instruction": " ", "output": "x"}, {"instruction": "y", "output": ""}]
    with pytest.raises(errors.UserInputError, match="is blank"):
        load(write_data("data.json", records))


def test_max_train_samples_counts_kept_records(write_data):
    records = [RECORDS[0], dict(RECORDS[1], output=""), RECORDS[2]]
    assert rows(load(write_data("data.json", records), max_train_samples=2)) == [RECORDS[0], RECORDS[2]]


@pytest.mark.parametrize("record, kind", [("just text", "str"), ([1, 2], "list"), (None, "NoneType")])
def test_record_that_is_not_an_object(write_data, record, kind):
    with pytest.raises(errors.UserInputError, match=rf"record 1 of .* is a {kind}, not an object"):
        load(write_data("data.json", [RECORDS[0], record]))


def test_unreadable_csv(write_data):
    with pytest.raises(errors.UserInputError, match="could not be read as csv"):
        load(write_data("data.csv", 'instruction,output\n"never closed,x\n'))


def test_unreachable_hub_data_set():
    with pytest.raises(errors.UserInputError, match="someone/no-such-data-set-for-tests") as info:
        load("someone/no-such-data-set-for-tests")
    assert ".jsonl" in str(info.value), "the message offers a local file instead"


def test_validate_records_directly():
    data.validate_records(RECORDS, "inline")
    with pytest.raises(errors.UserInputError, match=r"Record 1 of inline: the 'output' field is a float"):
        data.validate_records([RECORDS[0], {"instruction": "x", "output": 1.5}], "inline")
    with pytest.raises(errors.UserInputError, match="holds no records"):
        data.validate_records([], "inline")


# --- known bugs (pass once fixed) -----------------------------------------------


def test_number_among_strings_names_the_record(write_data):
    records = RECORDS[:2] + [{"instruction": "Add 2 and 3.", "input": "", "output": 5}]
    with pytest.raises(errors.UserInputError, match=r"Record 2 of .*'output' field is a int \(5\)"):
        load(write_data("data.json", records))


def test_input_kept_when_first_record_lacks_it(write_data):
    records = [{"instruction": "Say hi.", "output": "Hi!"}, {"instruction": "Translate.", "input": "cat", "output": "chat"}]
    dataset = load(write_data("data.json", records))
    assert dataset[1].get("input") == "cat"
