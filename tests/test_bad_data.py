"""Data files as users really have them (issue 11): other encodings, a wrapping object, nulls, a directory, the eval
file, chat turns after a system message, renamed columns beside default ones, and a split that leaves nothing."""
from __future__ import annotations

import codecs
import json
import logging

import pytest

from cli import arguments
from cli import command_line
import common
from records import data
from records import data_files
from cli import errors
import train_qlora

RECORDS = [
    {"instruction": "Say café.", "input": "", "output": "Café!"},
    {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
    {"instruction": "Name a colour.", "input": "", "output": "Bleu."},
]


def load(path, **flags):
    return data.load_records(arguments.DataArguments(dataset_name=str(path), **flags))


def load_with_eval(path, **flags):
    return data.load_train_and_eval(arguments.DataArguments(dataset_name=str(path), **flags), seed=0)


def fails(function, *args, **kwargs) -> str:
    with pytest.raises(errors.UserInputError) as info:
        function(*args, **kwargs)
    return str(info.value)


def contains(message, *words):
    for words_ in words:
        assert words_ in message, (words_, message)


def as_text(records, suffix) -> str:
    if suffix == ".json":
        return json.dumps(records, ensure_ascii=False)
    if suffix == ".jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    # CSV; no record here holds a comma or a quote
    return "instruction,input,output\n" + "".join(f"{r['instruction']},{r['input']},{r['output']}\n" for r in records)


def rows(dataset):
    return [{key: record.get(key) or "" for key in ("instruction", "input", "output")} for record in dataset]


def fails_through_the_script(tmp_path, caplog, *argv) -> str:
    """The script's own command line: exit code 2, one ERROR line, no traceback, no model. Returns the message."""
    out = tmp_path / "out"
    caplog.clear()
    exit_code = command_line.run_cli(train_qlora.parse_args, train_qlora.main,
                                  ["--smoke", "--output_dir", str(out), "--num_sample_prompts", "0", *map(str, argv)])
    errors_ = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert exit_code == 2, caplog.text[-3000:]
    assert len(errors_) == 1, [r.getMessage() for r in errors_]
    assert "Traceback" not in caplog.text
    assert not (out / "final").exists()
    return errors_[0].getMessage()


# --- 1. encodings -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be-bom", "utf-8-sig"])
@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
def test_a_file_with_a_byte_order_mark_is_read(tmp_path, suffix, encoding):
    text = as_text(RECORDS, suffix)
    if encoding == "utf-16-be-bom":  # Python writes UTF-16 little-endian; Mac and Java tools may write big-endian
        raw = codecs.BOM_UTF16_BE + text.encode("utf-16-be")
    else:
        raw = text.encode(encoding)
    path = tmp_path / f"data{suffix}"
    path.write_bytes(raw)
    assert rows(load(path)) == RECORDS  # the accents survive, and no BOM is left in the first field


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
def test_a_windows_1252_file_is_named_with_the_byte_and_the_fix(tmp_path, suffix):
    raw = as_text(RECORDS, suffix).encode("cp1252")
    path = tmp_path / f"data{suffix}"
    path.write_bytes(raw)
    offset = raw.index("é".encode("cp1252"))
    line = raw[:offset].count(b"\n") + 1
    message = fails(load, path)
    contains(message, "--dataset_name", str(path), "is not UTF-8", f"byte offset {offset} (line {line})", "0xe9",
             "'é'", "Save the file as UTF-8")
    assert "An error occurred while generating" not in message


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 5, 7])
def test_the_bad_byte_is_found_across_read_chunks(tmp_path, monkeypatch, chunk_bytes):
    # Tiny chunks: a character cut between two chunks is still UTF-8, and the bad byte's offset counts every chunk
    # before it, wherever the cut falls.
    monkeypatch.setattr(data_files, "CHUNK_BYTES", chunk_bytes)
    good = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS).encode("utf-8")
    path = tmp_path / "data.jsonl"
    path.write_bytes(good)
    assert rows(load(path)) == RECORDS
    raw = good + b'{"instruction": "Na\xefve", "output": "x"}\n'
    path.write_bytes(raw)
    offset = raw.index(b"\xef")
    contains(fails(load, path), f"byte offset {offset} (line 4)", "0xef")


def test_an_odd_utf16_file_names_its_encoding(tmp_path):
    path = tmp_path / "data.json"
    path.write_bytes(json.dumps(RECORDS).encode("utf-16") + b"\x00")  # half a character at the end
    contains(fails(load, path), str(path), "UTF-16-LE byte-order mark", "Save the file as UTF-8")


def test_a_windows_1252_csv_through_the_script(tmp_path, caplog):
    path = tmp_path / "excel.csv"
    path.write_bytes(as_text(RECORDS, ".csv").encode("cp1252"))
    message = fails_through_the_script(tmp_path, caplog, "--dataset_name", path)
    contains(message, str(path), "is not UTF-8", "CSV UTF-8")


# --- 2. one object wrapping the records ---------------------------------------------------------------------------


@pytest.mark.parametrize("indent", [2, None], ids=["pretty", "one-line"])
def test_an_object_with_one_list_field_holds_the_records(tmp_path, caplog, indent):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"version": "1.0", "data": RECORDS}, indent=indent), encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="records.data_files"):
        assert rows(load(path)) == RECORDS
    said = [r.getMessage() for r in caplog.records if "only list field" in r.getMessage()]
    assert len(said) == 1 and "'data'" in said[0] and str(path) in said[0], said


@pytest.mark.parametrize("wrapper, words", [
    ({"name": "mine", "count": 3}, ["keys: name, count", "none of its fields is a list"]),
    ({"train": RECORDS, "test": RECORDS}, ["keys: train, test", "several of its fields are lists (train, test)"]),
])
def test_an_object_without_one_list_field_names_its_keys(tmp_path, wrapper, words):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(wrapper, indent=2), encoding="utf-8")
    contains(fails(load, path), "--dataset_name", str(path), "one JSON object", *words, "JSON list")


@pytest.mark.parametrize("record, indent", [
    ({"instruction": "Say hi.", "output": "Hi!"}, 2),  # one record, pretty-printed
    ({"instruction": "Say hi.", "output": "Hi!", "tags": ["greeting"]}, None),  # a record's own list is no wrapper
    ({"instruction": "Say hi.", "output": "Hi!", "tags": ["greeting"]}, 2),
])
def test_a_file_of_one_record_is_still_one_record(tmp_path, record, indent):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(record, indent=indent), encoding="utf-8")
    assert [r["output"] for r in load(path)] == ["Hi!"]


def test_a_pretty_printed_chat_record_is_one_record(tmp_path):
    record = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(record, indent=2), encoding="utf-8")
    assert load(path)[0]["messages"] == record["messages"]


def test_a_broken_pretty_printed_object_names_its_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('{\n  "data": [\n    {"instruction": "a" "output": "b"}\n  ]\n}\n', encoding="utf-8")
    contains(fails(load, path), str(path), "is not valid JSON: line 3")


# --- 3. null is blank ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["output", "instruction"])
def test_a_null_field_is_skipped_like_a_blank_one(tmp_path, caplog, field):
    records = [RECORDS[0], dict(RECORDS[1], **{field: None}), RECORDS[2], dict(RECORDS[1], **{field: ""})]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="records.data"):
        assert rows(load(path)) == [RECORDS[0], RECORDS[2]]
    contains(caplog.text, "Skipped 2 record(s)", "(the first: record 1)")


def test_an_empty_csv_cell_is_skipped_like_a_blank_answer(tmp_path, caplog):
    path = tmp_path / "data.csv"
    path.write_text("instruction,input,output\nSay hi.,,Hi!\nNo answer.,,\nSay bye.,,Bye!\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="records.data"):
        assert [r["output"] for r in load(path)] == ["Hi!", "Bye!"]
    contains(caplog.text, "Skipped 1 record(s)", "(the first: record 1)")


def test_only_null_answers_is_the_every_record_is_blank_message(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"instruction": "a", "output": null}\n{"instruction": "b", "output": ""}\n', encoding="utf-8")
    contains(fails(load, path), "Every record of", "is blank", "nothing is left to train on")


def test_an_absent_answer_is_still_no_output_field(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', encoding="utf-8")
    contains(fails(load, path), "Record 1 of", "has no 'output' field", "--output_column")


@pytest.mark.parametrize("records", [
    [{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": None}]},
     {"messages": [{"role": "user", "content": "Bye?"}, {"role": "assistant", "content": "Bye."}]}],
    [{"text": None}, {"text": "Once upon a time."}],
], ids=["chat", "text"])
def test_null_chat_answers_and_texts_are_skipped(tmp_path, caplog, records):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="records.data"):
        assert len(load(path)) == 1
    contains(caplog.text, "Skipped 1 record(s)", "(the first: record 0)")


# --- 4. a directory -----------------------------------------------------------------------------------------------


def test_a_directory_is_named_as_one_with_the_files_in_it(tmp_path):
    folder = tmp_path / "my_data"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps(RECORDS[0]) + "\n", encoding="utf-8")
    (folder / "README.md").write_text("notes", encoding="utf-8")
    message = fails(load, folder)
    contains(message, "--dataset_name", str(folder), "is a directory", "it holds train.jsonl", ".parquet")
    assert "does not exist" not in message and "README" not in message


def test_a_directory_through_the_script(tmp_path, caplog):
    (tmp_path / "empty_folder.json").mkdir()  # a data suffix does not make it a file
    message = fails_through_the_script(tmp_path, caplog, "--dataset_name", tmp_path / "empty_folder.json")
    contains(message, "is a directory", "it holds none")


# --- 5. the eval file ---------------------------------------------------------------------------------------------


def _eval_problem(tmp_path, problem):
    path = tmp_path / "eval.json"
    if problem == "missing":
        return path
    if problem == "directory":
        path.mkdir()
    elif problem == "empty":
        path.write_bytes(b"")
    elif problem == "windows-1252":
        path.write_bytes(json.dumps(RECORDS, ensure_ascii=False).encode("cp1252"))
    elif problem == "bad JSON":
        path.write_text('[{"instruction": "a",}]', encoding="utf-8")
    elif problem == "no output":
        path.write_text(json.dumps([{"instruction": "a"}]), encoding="utf-8")
    elif problem == "not a string":
        path.write_text(json.dumps([{"instruction": "a", "output": 5}]), encoding="utf-8")
    return path


@pytest.mark.parametrize("problem, words", [
    ("missing", "does not exist"), ("directory", "is a directory"), ("empty", "is empty"),
    ("windows-1252", "is not UTF-8"), ("bad JSON", "not valid JSON"), ("no output", "no 'output' field"),
    ("not a string", "is a int"),
])
def test_every_eval_file_message_names_eval_file(tmp_path, problem, words):
    train = tmp_path / "train.json"
    train.write_text(json.dumps(RECORDS), encoding="utf-8")
    eval_path = _eval_problem(tmp_path, problem)
    message = fails(load_with_eval, train, eval_file=str(eval_path))
    contains(message, "--eval_file", str(eval_path), words)
    assert "--dataset_name" not in message


def test_a_missing_eval_file_through_the_script(tmp_path, caplog):
    train = tmp_path / "train.json"
    train.write_text(json.dumps(RECORDS), encoding="utf-8")
    message = fails_through_the_script(tmp_path, caplog, "--dataset_name", train, "--eval_file", tmp_path / "nope.json")
    contains(message, "--eval_file", "nope.json", "does not exist")
    assert "--dataset_name" not in message


# --- 6. chat turns are counted in the user's list -----------------------------------------------------------------


@pytest.mark.parametrize("turns, position, role", [
    ([("system", "Be brief."), ("user", "Hi?"), ("user", "Hello?"), ("assistant", "Hi.")], 2, "user"),
    ([("system", "Be brief."), ("assistant", "Hi.")], 1, "assistant"),
    ([("user", "Hi?"), ("user", "Hello?"), ("assistant", "Hi.")], 1, "user"),
])
@pytest.mark.parametrize("shape", ["chat", "sharegpt"])
def test_the_turn_that_breaks_alternation_is_its_index_in_the_file(tmp_path, turns, position, role, shape):
    if shape == "chat":
        record = {"messages": [{"role": r, "content": c} for r, c in turns]}
    else:
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        record = {"conversations": [{"from": names[r], "value": c} for r, c in turns]}
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([record]), encoding="utf-8")
    contains(fails(load, path), "Record 0 of", "must alternate", f"turn {position} is '{role}'")


# --- 7. a column named by a flag wins ----------------------------------------------------------------------------


def turns(question):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": "ok"}]


@pytest.mark.parametrize("record, flags, kept, dropped", [
    ({"instruction": "Q", "response": "A-mapped", "output": "B-default"}, {"output_column": "response"},
     "A-mapped", "B-default"),
    ({"instruction": "Q", "output": "B-default", "response": "A-mapped"}, {"output_column": "response"},
     "A-mapped", "B-default"),
    ({"instruction": "I-default", "question": "Q-mapped", "output": "A"}, {"instruction_column": "question"},
     "Q-mapped", "I-default"),
    ({"instruction": "Q", "context": "C-mapped", "input": "I-default", "output": "A"}, {"input_column": "context"},
     "C-mapped", "I-default"),
    ({"body": "T-mapped", "text": "T-default"}, {"text_column": "body"}, "T-mapped", "T-default"),
    ({"dialog": turns("M-mapped"), "messages": turns("M-default")}, {"messages_column": "dialog"},
     "M-mapped", "M-default"),
    # Swapped columns: each flag still wins.
    ({"instruction": "A-swapped", "output": "Q-swapped"},
     {"instruction_column": "output", "output_column": "instruction"},
     "<start_of_turn>model\nA-swapped", "<start_of_turn>model\nQ-swapped"),
])
def test_a_mapped_column_wins_over_a_default_one(tmp_path, record, flags, kept, dropped):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([record]), encoding="utf-8")
    text = common.format_example(load(path, **flags)[0])
    assert kept in text and dropped not in text, text


def test_a_missing_mapped_column_is_named_by_its_own_name(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"instruction": "Q", "output": "B"}]), encoding="utf-8")
    contains(fails(load, path, output_column="response"), "has no 'response' field", "--output_column")


# --- 8. a split that leaves nothing -------------------------------------------------------------------------------


def _ten_records(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"instruction": f"Q{i}", "output": f"A{i}"} for i in range(10)]), encoding="utf-8")
    return path


def test_a_split_that_leaves_no_training_record(tmp_path):
    message = fails(load_with_eval, _ten_records(tmp_path), eval_split_ratio=0.95)
    contains(message, "--eval_split_ratio 0.95", "holds out 10 of the 10 records", "leaves 0 to train on",
             "--eval_split_ratio 0.9 or less", "--eval_file")


def test_one_record_cannot_be_split(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps([RECORDS[0]]), encoding="utf-8")
    contains(fails(load_with_eval, path, eval_split_ratio=0.5), "holds out 1 of the 1 records", "leaves 0",
             "Add records")


@pytest.mark.parametrize("ratio, train, held_out", [(0.9, 1, 9), (0.01, 9, 1), (0.25, 7, 3)])
def test_the_largest_and_smallest_ratios_leave_records_on_both_sides(tmp_path, ratio, train, held_out):
    records, eval_records = load_with_eval(_ten_records(tmp_path), eval_split_ratio=ratio)
    assert (len(records), len(eval_records)) == (train, held_out)
    assert not set(records["instruction"]) & set(eval_records["instruction"])


def test_a_split_that_leaves_no_training_record_through_the_script(tmp_path, caplog):
    message = fails_through_the_script(tmp_path, caplog, "--dataset_name", _ten_records(tmp_path),
                                       "--eval_split_ratio", "0.95")
    contains(message, "holds out 10 of the 10 records", "leaves 0 to train on")
