"""The training records: read from a file or the hub, checked, normalised to one of three shapes, and split.

Alpaca records keep instruction/input/output; chat (`messages` of role/content) and
ShareGPT (`conversations` of from/value) become `messages` with user/assistant
roles; plain text stays `text`. Every problem names the file, the record and the fix.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import datasets

from arguments import DataArguments
from errors import UserInputError

logger = logging.getLogger(__name__)

DEFAULT_DATASET_FILE = Path(__file__).resolve().parent / "data" / "default_instructions.json"
INSTRUCTION_FIELD, INPUT_FIELD, OUTPUT_FIELD = "instruction", "input", "output"
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "system": "system"}
CHAT_ROLES = {"user": "user", "assistant": "assistant", "model": "assistant", "system": "system"}


def data_source(data_args: DataArguments) -> str:
    """How messages name the training data."""
    return data_args.dataset_name or str(DEFAULT_DATASET_FILE)


def load_train_and_eval(data_args: DataArguments, seed: int):
    """The training records and, where asked for, the evaluation records (a held-out share or a file)."""
    records = load_records(data_args)
    if data_args.eval_file:
        eval_args = dataclasses.replace(data_args, dataset_name=data_args.eval_file, max_train_samples=None)
        return records, load_records(eval_args)
    if data_args.eval_split_ratio:
        if len(records) < 2:
            raise UserInputError("--eval_split_ratio needs at least 2 records to split.")
        split = records.train_test_split(test_size=data_args.eval_split_ratio, seed=seed)
        logger.info("Held out %d of %d records for evaluation.", len(split["test"]), len(records))
        return split["train"], split["test"]
    return records, None



def load_records(data_args: DataArguments) -> "datasets.Dataset":
    """The training records, checked and in one of three shapes the formatting function knows.

    Alpaca records keep instruction/input/output; chat (`messages` of role/content) and
    ShareGPT (`conversations` of from/value) become `messages` with user/assistant roles;
    plain text stays `text`. Column names come from the --*_column flags.
    """
    source = data_source(data_args)
    records = _read_records(data_args)
    records = [_rename_columns(record, data_args) for record in records]
    data_format = detect_format(records, data_args.data_format, source)
    if data_format == "alpaca":
        validate_records(records, source)
        columns = (INSTRUCTION_FIELD, INPUT_FIELD, OUTPUT_FIELD)
    elif data_format in ("chat", "sharegpt"):
        records = [{"messages": _normalise_conversation(r, i, source, data_format)} for i, r in enumerate(records)]
        columns = ("messages",)
    else:
        for index, record in enumerate(records):
            _require_string(record.get("text"), "text", index, source)
        columns = ("text",)
    records = drop_empty_records(records, source)
    # Columns named explicitly: from_list would take them from the first record alone.
    dataset = datasets.Dataset.from_dict({name: [record.get(name) for record in records] for name in columns})
    if data_args.max_train_samples is not None:
        dataset = dataset.select(range(min(data_args.max_train_samples, len(dataset))))
    logger.info("Data: %d %s records from %s", len(dataset), data_format, source)
    return dataset


def _read_records(data_args: DataArguments) -> list[dict]:
    source = data_args.dataset_name
    if source is None:
        return _read_json_records(DEFAULT_DATASET_FILE)
    path = Path(source)
    if path.suffix.lower() in DATA_FILE_BUILDERS or path.exists():
        _check_local_file(path)
        if path.suffix.lower() in (".json", ".jsonl"):
            # Parsed here rather than by datasets' Arrow reader, whose errors name neither
            # the line nor the field, and which fails on a number among strings.
            return _read_json_records(path)
        try:
            dataset = datasets.load_dataset(DATA_FILE_BUILDERS[path.suffix.lower()], data_files=str(path), split="train")
        except Exception as e:  # noqa: BLE001 - pyarrow and pandas raise many unrelated types for a bad file
            raise UserInputError(f"--dataset_name: {path} could not be read as {path.suffix[1:]}: {e}") from e
    else:
        try:
            dataset = datasets.load_dataset(source, split=data_args.dataset_split)
        except (FileNotFoundError, ConnectionError, ValueError, OSError) as e:
            raise UserInputError(
                f"--dataset_name {source!r} is neither a local file nor a data set that could be loaded from the "
                f"hub ({type(e).__name__}: {e}). Give a path to a .json/.jsonl/.csv/.parquet file, or a hub id "
                "such as yahma/alpaca-cleaned."
            ) from e
    if len(dataset) == 0:
        raise UserInputError(f"The data set {source} holds no records.")
    return dataset.to_list()


def _rename_columns(record: dict, data_args: DataArguments) -> dict:
    mapping = {
        data_args.instruction_column: INSTRUCTION_FIELD,
        data_args.input_column: INPUT_FIELD,
        data_args.output_column: OUTPUT_FIELD,
        data_args.messages_column: "messages",
        data_args.text_column: "text",
    }
    return {mapping.get(key, key): value for key, value in record.items()}


def detect_format(records: Sequence[Mapping[str, Any]], requested: str, source: str) -> str:
    """The data format: the one asked for, or the one the first record's fields show."""
    if not records:
        raise UserInputError(f"The data set {source} holds no records.")
    if requested != "auto":
        return requested
    fields = set(records[0])
    if "messages" in fields:
        return "chat"
    if "conversations" in fields:
        return "sharegpt"
    if INSTRUCTION_FIELD in fields or OUTPUT_FIELD in fields:
        return "alpaca"
    if "text" in fields:
        return "text"
    raise UserInputError(
        f"Record 0 of {source} has the fields {sorted(fields)}, which match no known format. Use "
        "instruction/input/output (Alpaca), messages (chat), conversations (ShareGPT) or text; or name your "
        "columns with --instruction_column, --input_column, --output_column, --messages_column or --text_column."
    )


def _normalise_conversation(record: Mapping[str, Any], index: int, source: str, data_format: str) -> list[dict]:
    """user/assistant turns, alternating and starting with the user; a system message folded into the first user turn."""
    key, role_key, content_key, roles = (
        ("conversations", "from", "value", SHAREGPT_ROLES)
        if data_format == "sharegpt"
        else ("messages", "role", "content", CHAT_ROLES)
    )
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        raise UserInputError(f"Record {index} of {source}: {key!r} must be a non-empty list of turns, got {turns!r:.80}.")
    messages = []
    for position, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or turn.get(role_key) not in roles:
            raise UserInputError(
                f"Record {index} of {source}: turn {position} of {key!r} needs {role_key!r} set to one of "
                f"{sorted(roles)}, got {turn!r:.80}."
            )
        _require_string(turn.get(content_key), f"{key}[{position}].{content_key}", index, source)
        messages.append({"role": roles[turn[role_key]], "content": turn[content_key]})
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"].strip(), messages[1:]
        if messages and messages[0]["role"] == "user" and system:
            messages[0] = {"role": "user", "content": f"{system}\n\n{messages[0]['content']}"}
    expected = "user"
    for position, message in enumerate(messages):
        if message["role"] != expected:
            raise UserInputError(
                f"Record {index} of {source}: turns must alternate user/assistant starting with the user (after an "
                f"optional system message); turn {position} is {message['role']!r}. Gemma's chat format has no other order."
            )
        expected = "assistant" if expected == "user" else "user"
    if not any(message["role"] == "assistant" for message in messages):
        raise UserInputError(f"Record {index} of {source}: the conversation has no assistant turn to learn from.")
    return messages


def drop_empty_records(records: list[dict], source: str) -> list[dict]:
    """Real data sets hold a few records with a blank instruction or answer: skip them, say so, and fail if none are left."""
    keep, skipped = [], []
    for index, record in enumerate(records):
        if "messages" in record:
            blank = any(not m["content"].strip() for m in record["messages"] if m["role"] == "assistant")
        elif "text" in record:
            blank = not record["text"].strip()
        else:
            blank = not record[INSTRUCTION_FIELD].strip() or not record[OUTPUT_FIELD].strip()
        if blank:
            skipped.append(index)
        else:
            keep.append(record)
    if not keep:
        raise UserInputError(f"Every record of {source} is blank (no instruction, answer or text): nothing is left to train on.")
    if skipped:
        logger.warning(
            "Skipped %d record(s) of %s with a blank instruction, answer or text (the first: record %d).",
            len(skipped), source, skipped[0],
        )
    return keep


def _check_local_file(path: Path) -> None:
    suffix = path.suffix.lower()
    if not path.is_file():
        raise UserInputError(f"--dataset_name: the file {path} does not exist.")
    if suffix not in DATA_FILE_BUILDERS:
        raise UserInputError(
            f"--dataset_name: {path} has the suffix {suffix!r}; give a .json, .jsonl, .csv or .parquet file."
        )
    if path.stat().st_size == 0:
        raise UserInputError(f"--dataset_name: {path} is empty; it needs instruction/input/output records.")


def _read_json_records(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserInputError(f"--dataset_name: {path} is not valid JSON: line {e.lineno}: {e.msg}.") from e
    else:  # JSON Lines
        records = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserInputError(f"--dataset_name: {path} line {line_number} is not valid JSON: {e.msg}.") from e
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise UserInputError(
                f"--dataset_name: record {index} of {path} is a {type(record).__name__}, not an object with "
                "instruction/input/output fields."
            )
    if not records:
        raise UserInputError(f"--dataset_name: {path} holds no records.")
    return records


def validate_records(records: Iterable[Mapping[str, Any]], source: str) -> None:
    """Every record has a string instruction and output, and a string (or absent) input."""
    count = 0
    for index, record in enumerate(records):
        count += 1
        for name in (INSTRUCTION_FIELD, OUTPUT_FIELD):
            value = record.get(name)
            if value is None:
                raise UserInputError(
                    f"Record {index} of {source} has no {name!r} field (fields: {sorted(record)}). "
                    "Each record needs 'instruction' and 'output', and may have 'input'; "
                    f"--{name}_column names a column of another name."
                )
            _require_string(value, name, index, source)
        if record.get(INPUT_FIELD) is not None:
            _require_string(record[INPUT_FIELD], INPUT_FIELD, index, source)
    if count == 0:
        raise UserInputError(f"The data set {source} holds no records.")


def _require_string(value: Any, name: str, index: int, source: str) -> None:
    if not isinstance(value, str):
        raise UserInputError(
            f"Record {index} of {source}: the {name!r} field is a {type(value).__name__} ({value!r:.60}), "
            "not a string. Convert it to text in your data file."
        )
