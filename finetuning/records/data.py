"""The training records: read from a file or the hub, checked, normalised to one of three shapes, and split.

Alpaca records keep instruction/input/output; chat (`messages` of role/content) and
ShareGPT (`conversations` of from/value) become `messages` with user/assistant
roles; plain text stays `text`. Every problem names the file, the record and the fix.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import datasets

from cli.arguments import DataArguments
from records.data_files import (COMPRESSED_JSON, DATA_FILE_BUILDERS, EVAL_FLAG, TRAIN_FLAG, check_local_file,
                                file_suffix, read_json_records, refuse_header_only_csv, text_encoding)
from cli.errors import UserInputError
from common import INPUT_FIELD, INSTRUCTION_FIELD, OUTPUT_FIELD

logger = logging.getLogger(__name__)

DEFAULT_DATASET_FILE = Path(__file__).resolve().parents[1] / "data" / "default_instructions.json"
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
        if data_args.dataset_name and Path(data_args.eval_file).resolve() == Path(data_args.dataset_name).resolve():
            logger.warning(
                "--eval_file %s is the training file itself (--dataset_name): every eval record is trained on, so the "
                "eval loss and perplexity measure memory, not what the model does on records it has not seen. Give "
                "a file of other records, or hold some out with --eval_split_ratio 0.05 instead.", data_args.eval_file)
        eval_args = dataclasses.replace(data_args, dataset_name=data_args.eval_file, max_train_samples=None)
        return records, load_records(eval_args, flag=EVAL_FLAG)
    if data_args.eval_split_ratio:
        ratio, total = data_args.eval_split_ratio, len(records)
        # datasets' own rounding, so the split is the one it would make: any ratio above 0 holds out a record.
        held_out = math.ceil(ratio * total)
        if held_out >= total:
            fix = (
                f"Use --eval_split_ratio {math.floor((total - 1) / total * 100) / 100} or less (typical: 0.05)"
                if total >= 2 else "Add records (a split needs at least 2)"
            )
            raise UserInputError(
                f"--eval_split_ratio {ratio} holds out {held_out} of the {total} records of {data_source(data_args)} "
                f"for evaluation, which leaves {total - held_out} to train on. {fix}, or give the evaluation "
                "records in their own file with --eval_file."
            )
        split = records.train_test_split(test_size=held_out, seed=seed)
        logger.info("Held out %d of %d records for evaluation.", len(split["test"]), len(records))
        return split["train"], split["test"]
    return records, None


def load_records(data_args: DataArguments, flag: str = TRAIN_FLAG) -> "datasets.Dataset":
    """The training records, checked and in one of three shapes the formatting function knows.

    Alpaca records keep instruction/input/output; chat (`messages` of role/content) and
    ShareGPT (`conversations` of from/value) become `messages` with user/assistant roles;
    plain text stays `text`. Column names come from the --*_column flags. `flag` is the flag
    that named the file (--dataset_name, or --eval_file), for the messages.
    """
    # Messages about the eval file must say so: its records are checked by the same code.
    source = data_source(data_args) if flag == TRAIN_FLAG else f"{data_args.dataset_name} ({flag})"
    records = _read_records(data_args, flag, source)
    records = [_rename_columns(record, data_args) for record in records]
    data_format = detect_format(records, data_args.data_format, source)
    check_one_format(records, data_format, data_args, source)
    if data_format == "alpaca":
        validate_records(records, source, _column_names(data_args))
        columns = (INSTRUCTION_FIELD, INPUT_FIELD, OUTPUT_FIELD)
    elif data_format in ("chat", "sharegpt"):
        records = [{"messages": _normalise_conversation(r, i, source, data_format)} for i, r in enumerate(records)]
        columns = ("messages",)
    else:
        for index, record in enumerate(records):
            if "text" not in record:
                raise UserInputError(
                    f"Record {index} of {source} has no {data_args.text_column!r} field (fields: {sorted(record)}). "
                    "Plain-text records need one; --text_column names a column of another name."
                )
            if record["text"] is not None:  # null is blank: drop_empty_records skips it
                _require_string(record["text"], "text", index, source)
        columns = ("text",)
    warn_control_tokens(records, data_format, source)
    records = drop_empty_records(records, source)
    # Columns named explicitly: from_list would take them from the first record alone.
    dataset = datasets.Dataset.from_dict({name: [record.get(name) for record in records] for name in columns})
    if data_args.max_train_samples is not None:
        dataset = dataset.select(range(min(data_args.max_train_samples, len(dataset))))
    logger.info("Data: %d %s records from %s", len(dataset), data_format, source)
    return dataset


def _read_records(data_args: DataArguments, flag: str, source: str) -> list[dict]:
    name = data_args.dataset_name
    record_fields = _record_fields(data_args)
    if name is None:
        return read_json_records(DEFAULT_DATASET_FILE, flag, record_fields)
    path = Path(name)
    if file_suffix(path) in DATA_FILE_BUILDERS or file_suffix(path) in COMPRESSED_JSON or path.exists():
        check_local_file(path, flag)
        suffix = file_suffix(path)
        if suffix in (".json", ".jsonl") + COMPRESSED_JSON:
            # Parsed here rather than by datasets' Arrow reader, whose errors name neither
            # the line nor the field, and which fails on a number among strings.
            return read_json_records(path, flag, record_fields)
        # Checked here: datasets' CSV reader says only "An error occurred while generating the dataset".
        encoding = text_encoding(path, flag) if suffix == ".csv" else None
        if suffix == ".csv":
            refuse_header_only_csv(path, flag, encoding)
        options = {"encoding": encoding} if encoding else {}
        try:
            dataset = datasets.load_dataset(DATA_FILE_BUILDERS[suffix], data_files=str(path), split="train", **options)
        except Exception as e:  # noqa: BLE001 - pyarrow and pandas raise many unrelated types for a bad file
            raise UserInputError(f"{flag}: {path} could not be read as {path.suffix[1:]}: {e}") from e
    else:
        _check_hub_dataset(name, flag)
        try:
            dataset = datasets.load_dataset(name, split=data_args.dataset_split)
        except (FileNotFoundError, ConnectionError, ValueError, OSError) as e:
            raise UserInputError(
                f"{flag} {name!r} is neither a local file nor a data set that could be loaded from the "
                f"hub ({type(e).__name__}: {e}). Give a path to a .json/.jsonl/.csv/.parquet file, or a hub id "
                "such as yahma/alpaca-cleaned."
            ) from e
    if len(dataset) == 0:
        raise UserInputError(f"The data set {source} holds no records.")
    return dataset.to_list()


def _check_hub_dataset(name: str, flag: str) -> None:
    """A hub data set id that cannot be loaded fails at once, not after datasets' half a minute of retries: offline
    (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE, or no connection) and not cached, or not on the hub at all."""
    import huggingface_hub
    from models import hub

    if "/" not in name and not name.replace("-", "").replace("_", "").isalnum():
        return  # not an id: datasets says what it is
    offline = huggingface_hub.constants.HF_HUB_OFFLINE or datasets.config.HF_DATASETS_OFFLINE
    fix = ("Give a path to a .json/.jsonl/.csv/.parquet file, or the id of a data set on huggingface.co, such as "
           "yahma/alpaca-cleaned (check its spelling on its page).")
    if offline or hub.hub_unreachable():
        cached = Path(datasets.config.HF_DATASETS_CACHE)
        if not any(cached.glob(f"{name.replace('/', '___')}*")) and not any(
                Path(huggingface_hub.constants.HF_HUB_CACHE).glob(f"datasets--{name.replace('/', '--')}")):
            why = "the hub is switched off (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set)" if offline else \
                "huggingface.co cannot be reached from this machine"
            raise UserInputError(
                f"{flag} {name!r} is not a local file, and {why}, and it is not in the local cache. Connect this "
                f"machine (or unset the variable), or download the data set elsewhere and give its file. {fix}")
        return
    try:
        huggingface_hub.HfApi().dataset_info(name, timeout=10)
    except huggingface_hub.utils.GatedRepoError:
        return  # it exists: datasets says how to get access
    except huggingface_hub.utils.RepositoryNotFoundError as e:
        raise UserInputError(
            f"{flag} {name!r} is neither a local file nor a data set on the hub (huggingface.co has no data set of "
            f"that id, or it is private: log in with HF_TOKEN). {fix}") from e
    except (huggingface_hub.utils.HfHubHTTPError, OSError, ValueError):
        return  # gated, rate-limited, a malformed id: datasets' own message says which


def _column_names(data_args: DataArguments) -> dict[str, str]:
    """Each field's column in the user's data, as the --*_column flags name it."""
    return {
        INSTRUCTION_FIELD: data_args.instruction_column,
        INPUT_FIELD: data_args.input_column,
        OUTPUT_FIELD: data_args.output_column,
        "messages": data_args.messages_column,
        "text": data_args.text_column,
    }


def _record_fields(data_args: DataArguments) -> frozenset:
    """Field names that mark an object as a record (not a wrapper around a list of records)."""
    return frozenset({*_column_names(data_args), *_column_names(data_args).values(), "conversations"})


def _rename_columns(record: dict, data_args: DataArguments) -> dict:
    """The record with the user's columns under the field names; a column named by a flag wins over a column
    that has the field's default name (`--output_column response` with an `output` column too: response)."""
    mapping = {column: name for name, column in _column_names(data_args).items() if column != name}
    if not mapping:
        return record
    renamed = {key: value for key, value in record.items() if key not in mapping and key not in mapping.values()}
    renamed.update((mapping[key], value) for key, value in record.items() if key in mapping)
    return renamed


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


# The fields that make a record one format's (the first that a record has, in this order, is its format), and how
# messages name each format.
FORMAT_FIELDS = {"chat": ("messages",), "sharegpt": ("conversations",), "alpaca": (INSTRUCTION_FIELD, OUTPUT_FIELD),
                 "text": ("text",)}
FORMAT_NAMES = {"chat": "a chat record (messages)", "sharegpt": "a ShareGPT record (conversations)",
                "alpaca": "an Alpaca record (instruction/input/output)", "text": "a plain-text record (text)"}


def record_format(record: Mapping[str, Any]) -> "str | None":
    """The format a record's own fields show, as detect_format reads the first record's; None for none."""
    return next((name for name, fields in FORMAT_FIELDS.items() if any(f in record for f in fields)), None)


def check_one_format(records: Sequence[Mapping[str, Any]], data_format: str, data_args: DataArguments,
                     source: str) -> None:
    """Every record has the fields of `data_format`; one that is plainly another format's is named, with its format
    and --data_format (a file that changes format part-way, or --data_format chat on Alpaca records)."""
    columns = _column_names(data_args)
    for index, record in enumerate(records):
        if any(field in record for field in FORMAT_FIELDS[data_format]):
            continue
        other = record_format(record)
        if other is None or other == data_format:
            continue  # the checks of the format itself say what is missing
        fields = sorted(columns.get(key, key) for key in record)
        wanted = " or ".join(repr(columns.get(f, f)) for f in FORMAT_FIELDS[data_format])
        if data_args.data_format == "auto":
            raise UserInputError(
                f"Record {index} of {source} is {FORMAT_NAMES[other]} (fields: {fields}), and record 0 is "
                f"{FORMAT_NAMES[data_format]}: --data_format auto takes the format from the first record, and a file "
                f"holds one format. Convert the {other} records to {data_format} (or the other way round), or split "
                "the file by format and train on one."
            )
        raise UserInputError(
            f"Record {index} of {source} has no {wanted} field, which --data_format {data_format} reads: its fields "
            f"({fields}) are those of {FORMAT_NAMES[other]}. Give --data_format {other} (or auto), or name your "
            "column with the matching --*_column flag."
        )


# Gemma's control tokens: written in a record's text, the tokenizer reads each as the token itself.
CONTROL_TOKENS = ("<end_of_turn>", "<start_of_turn>", "<eos>", "<bos>", "<pad>")


def warn_control_tokens(records: Sequence[Mapping[str, Any]], data_format: str, source: str) -> None:
    """Once, where records hold a control token in a prompt or an answer (plain text may carry them on purpose)."""
    if data_format == "text":
        return
    found = []
    for index, record in enumerate(records):
        if "messages" in record:
            texts = [(f"turn {i} ({m['role']})", m["content"]) for i, m in enumerate(record["messages"])]
        else:
            texts = [(name, record.get(name)) for name in (INSTRUCTION_FIELD, INPUT_FIELD, OUTPUT_FIELD)]
        for where, text in texts:
            token = next((t for t in CONTROL_TOKENS if isinstance(text, str) and t in text), None)
            if token:
                found.append((index, where, token))
                break
    if found:
        index, where, token = found[0]
        logger.warning(
            "%d record(s) of %s hold Gemma's control token %s in their text (the first: record %d, its %s). The "
            "tokenizer reads it as the token itself, not as text: inside an answer the model learns to end its turn "
            "there, and at inference what follows is never produced; inside a prompt it breaks the turns the loss "
            "mask follows. Remove it from the data, or write it otherwise (e.g. <end-of-turn>).",
            len(found), source, token, index, where)


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
        content = turn.get(content_key)
        if content is None and content_key in turn:
            content = ""  # null is a blank turn, as "" is; a blank answer is skipped by drop_empty_records
        _require_string(content, f"{key}[{position}].{content_key}", index, source)
        messages.append({"role": roles[turn[role_key]], "content": content})
    first = 0  # where `messages` starts in the user's list, for the messages below
    if messages[0]["role"] == "system":
        system, messages, first = messages[0]["content"].strip(), messages[1:], 1
        if messages and messages[0]["role"] == "user" and system:
            messages[0] = {"role": "user", "content": f"{system}\n\n{messages[0]['content']}"}
    expected = "user"
    for position, message in enumerate(messages, start=first):
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
            blank = any(_is_blank(m["content"]) for m in record["messages"] if m["role"] == "assistant")
        elif "text" in record:
            blank = _is_blank(record["text"])
        else:
            blank = _is_blank(record[INSTRUCTION_FIELD]) or _is_blank(record[OUTPUT_FIELD])
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


def _is_blank(value: Any) -> bool:
    return value is None or not value.strip()


def validate_records(records: Iterable[Mapping[str, Any]], source: str,
                     column_names: Mapping[str, str] | None = None) -> None:
    """Every record has an instruction and output, each a string or null (blank, skipped by drop_empty_records),
    and a string (or absent) input. `column_names` (field -> the user's column) names the columns in messages."""
    columns = column_names or {}
    count = 0
    for index, record in enumerate(records):
        count += 1
        for name in (INSTRUCTION_FIELD, OUTPUT_FIELD):
            if name not in record:
                raise UserInputError(
                    f"Record {index} of {source} has no {columns.get(name, name)!r} field "
                    f"(fields: {sorted(columns.get(key, key) for key in record)}). "
                    "Each record needs 'instruction' and 'output', and may have 'input'; "
                    f"--{name}_column names a column of another name."
                )
            if record[name] is not None:
                _require_string(record[name], name, index, source)
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
