"""Reading data files as text: the encoding (UTF-8, or what a byte-order mark says), compressed and binary data told
from text (.json.gz and .jsonl.gz are read as they are), and the shapes a JSON file comes in (a list, JSON Lines, one
record, or an object whose one list field holds the records), read strictly: a key given twice in a record, or
nesting too deep to read, is one message. data.py checks and normalises what these return."""
from __future__ import annotations

import codecs
import gzip
import json
import logging
import zlib
from pathlib import Path

from cli.errors import UserInputError

logger = logging.getLogger(__name__)

DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
TRAIN_FLAG, EVAL_FLAG = "--dataset_name", "--eval_file"
# (byte-order mark, codec that checks the bytes after it, codec that reads the file and drops it). UTF-32 LE first:
# its mark starts with UTF-16 LE's.
BYTE_ORDER_MARKS = (
    (codecs.BOM_UTF32_LE, "utf-32-le", "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32-be", "utf-32"),
    (codecs.BOM_UTF8, "utf-8", "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16-be", "utf-16"),
)
CHUNK_BYTES = 1 << 20
COMPRESSED_JSON = (".json.gz", ".jsonl.gz")  # read through gzip: the common way to ship JSON Lines
# What a file that is not text starts with: (magic bytes, what it is, the fix)
BINARY_FORMATS = (
    (b"\x1f\x8b", "gzip-compressed data", "unpack it (gunzip -c FILE > records.jsonl), or name it .json.gz or "
                                         ".jsonl.gz, which are read as they are"),
    (b"PK\x03\x04", "a zip archive", "unpack it (unzip FILE) and give the .json/.jsonl/.csv file inside"),
    (b"BZh", "bzip2-compressed data", "unpack it (bunzip2 -k FILE)"),
    (b"\xfd7zXZ\x00", "xz-compressed data", "unpack it (unxz -k FILE)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed data", "unpack it (unzstd FILE)"),
    (b"PAR1", "a Parquet file", "name it .parquet, which is read as it is"),
    (b"SQLite format 3\x00", "an SQLite database", "export its records as JSON Lines or CSV"),
)


def file_suffix(path: Path) -> str:
    """The suffix that says how the file is read: .json.gz and .jsonl.gz whole, else the last one."""
    name = path.name.lower()
    return next((suffix for suffix in COMPRESSED_JSON if name.endswith(suffix)), path.suffix.lower())


def open_bytes(path: Path):
    """The file's bytes, unpacked where it is .json.gz or .jsonl.gz."""
    return gzip.open(path, "rb") if file_suffix(path) in COMPRESSED_JSON else path.open("rb")


def check_not_binary(path: Path, flag: str) -> None:
    """Compressed or binary bytes under a text suffix are said as such, not taken for text in another encoding."""
    with path.open("rb") as file:
        head = file.read(4096)
    compressed_suffix = file_suffix(path) in COMPRESSED_JSON
    for magic, what, fix in BINARY_FORMATS:
        if head.startswith(magic) and not (compressed_suffix and magic == b"\x1f\x8b"):
            raise UserInputError(f"{flag}: {path} holds {what}, not {file_suffix(path)[1:]} text: "
                                 f"{fix.replace('FILE', str(path))}.")
    if compressed_suffix and not head.startswith(b"\x1f\x8b"):
        raise UserInputError(f"{flag}: {path} is named {file_suffix(path)} but is not gzip-compressed. Name it for "
                             f"what it holds ({file_suffix(path)[:-3]} for plain text).")
    if not compressed_suffix and b"\x00" in head and not any(head.startswith(m[0]) for m in BYTE_ORDER_MARKS):
        raise UserInputError(
            f"{flag}: {path} holds NUL bytes, so it is binary data, not {file_suffix(path)[1:]} text (or UTF-16 text "
            "without a byte-order mark: save it as UTF-8). Give a .json, .jsonl, .csv or .parquet file of records."
        )


def check_local_file(path: Path, flag: str) -> None:
    suffix = file_suffix(path)
    if path.is_dir():
        found = sorted(p.name for p in path.iterdir() if p.is_file() and p.suffix.lower() in DATA_FILE_BUILDERS)
        inside = f"it holds {', '.join(found[:5])}{' ...' if len(found) > 5 else ''}" if found else "it holds none"
        raise UserInputError(
            f"{flag}: {path} is a directory, not a data file. Give the path of one .json, .jsonl, .csv or .parquet "
            f"file ({inside})."
        )
    if not path.is_file():
        raise UserInputError(f"{flag}: the file {path} does not exist.")
    if suffix not in DATA_FILE_BUILDERS and suffix not in COMPRESSED_JSON:
        compressed = suffix in (".gz", ".zip", ".bz2", ".xz", ".zst", ".7z", ".tar", ".tgz")
        raise UserInputError(
            f"{flag}: {path} has the suffix {suffix!r}; give a .json, .jsonl, .csv or .parquet file"
            + (" (compressed, only .json.gz and .jsonl.gz are read: unpack the others first)." if compressed else ".")
        )
    if path.stat().st_size == 0:
        raise UserInputError(f"{flag}: {path} is empty; it needs instruction/input/output records.")
    if suffix != ".parquet":
        check_not_binary(path, flag)


def text_encoding(path: Path, flag: str) -> str:
    """The codec that reads the file: UTF-8, or the UTF-8/16/32 its byte-order mark names. Any other bytes that are
    not UTF-8 (Latin-1, Windows-1252, as Excel and older Windows tools save) are an error naming the first bad byte."""
    try:
        return _text_encoding(path, flag)
    except (OSError, EOFError, zlib.error) as e:  # gzip: a cut or damaged archive
        if file_suffix(path) not in COMPRESSED_JSON:
            raise
        raise UserInputError(f"{flag}: {path} cannot be unpacked ({e}): the gzip file is cut off or damaged. "
                             "Compress it again, or give the plain .jsonl file.") from e


def _text_encoding(path: Path, flag: str) -> str:
    with open_bytes(path) as file:
        head = file.read(4)
        mark, check_codec, codec = next((m for m in BYTE_ORDER_MARKS if head.startswith(m[0])), (b"", "utf-8", "utf-8"))
        file.seek(len(mark))
        decoder = codecs.getincrementaldecoder(check_codec)()
        offset, line = len(mark), 1  # of the chunk about to be read
        while True:
            chunk = file.read(CHUNK_BYTES)
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the last chunk, before `offset`
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                at = offset - pending + e.start
                bad_line = line + chunk[:max(0, e.start - pending)].count(b"\n")
                file.seek(at)
                raise UserInputError(_not_unicode_message(path, flag, check_codec, at, bad_line, file.read(1))) from e
            if not chunk:
                return codec
            offset += len(chunk)
            line += chunk.count(b"\n")


def _not_unicode_message(path: Path, flag: str, codec: str, at: int, line: int, byte: bytes) -> str:
    if codec != "utf-8":  # a UTF-16/32 mark, then bytes that are not: lines are not counted in those
        return (f"{flag}: {path} starts with a {codec.upper()} byte-order mark but is not valid {codec.upper()} at "
                f"byte offset {at}. Save the file as UTF-8.")
    try:
        meaning = f" ({byte.decode('cp1252')!r} in Windows-1252/Latin-1, the usual cause)"
    except UnicodeDecodeError:  # undefined in cp1252: some other legacy encoding
        meaning = ""
    return (
        f"{flag}: {path} is not UTF-8 text: byte offset {at} (line {line}) holds 0x{byte.hex()}{meaning}. "
        f"Save the file as UTF-8 (Excel: Save As > 'CSV UTF-8'; an editor: save with encoding UTF-8; or "
        f"`iconv -f cp1252 -t utf-8 {path} > {path.with_stem(path.stem + '-utf8')}`). UTF-16 with a byte-order "
        "mark is read too."
    )


class _KeyGivenTwice(dict):
    """A JSON object with a key given twice (json keeps the last value, silently); `twice` names the key."""

    twice = ""


def _pairs(pairs: list) -> dict:
    """json's object hook: an object that gives a key twice is marked (_KeyGivenTwice), to be refused by record."""
    value = dict(pairs)
    if len(value) == len(pairs):
        return value
    seen: set = set()
    marked = _KeyGivenTwice(value)
    marked.twice = next(key for key, _ in pairs if key in seen or seen.add(key))
    return marked


def _key_given_twice(value) -> str:
    """The first key given twice in any object within `value` ("" for none); a walk without recursion."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, _KeyGivenTwice):
            return item.twice
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return ""


def _loads(text: str, path: Path, flag: str, where: str = ""):
    """json.loads with keys given twice marked, and nesting too deep to read as one message."""
    try:
        return json.loads(text, object_pairs_hook=_pairs)
    except RecursionError as e:
        raise UserInputError(
            f"{flag}: {path}{where} is nested too deeply to read: arrays or objects inside each other about "
            "a thousand levels deep or more. A record is one object of text fields (chat records: a list of turns); "
            "check the program that wrote the file."
        ) from e


def _refuse_keys_given_twice(records: list, path: Path, flag: str, lines: list) -> None:
    for index, record in enumerate(records):
        key = _key_given_twice(record)
        if key:
            where = f" (line {lines[index]})" if lines else ""
            raise UserInputError(
                f"{flag}: record {index} of {path}{where} gives the key {key!r} twice: JSON keeps the last value and "
                "drops the other without a word, so one of them was never going to be trained on. Delete one of them."
            )


def read_json_records(path: Path, flag: str = TRAIN_FLAG, record_fields: frozenset = frozenset()) -> list[dict]:
    encoding = text_encoding(path, flag)
    with open_bytes(path) as file:
        text = file.read().decode(encoding)
    stripped = text.strip()
    lines: list = []  # each record's line, for JSON Lines
    if stripped.startswith("["):
        try:
            records = _loads(text, path, flag)
        except json.JSONDecodeError as e:
            raise UserInputError(f"{flag}: {path} is not valid JSON: line {e.lineno}: {e.msg}.") from e
    else:
        records = _json_object_records(text, path, flag, record_fields)
    if records is None:  # JSON Lines
        records = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(_loads(line, path, flag, f" line {line_number}"))
            except json.JSONDecodeError as e:
                raise UserInputError(f"{flag}: {path} line {line_number} is not valid JSON: {e.msg}.") from e
            lines.append(line_number)
    if isinstance(records, list):
        _refuse_keys_given_twice(records, path, flag, lines)
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise UserInputError(
                f"{flag}: record {index} of {path} is a {type(record).__name__}, not an object with "
                "instruction/input/output fields."
            )
    if not records:
        raise UserInputError(f"{flag}: {path} holds no records.")
    return records


def _json_object_records(text: str, path: Path, flag: str, record_fields: frozenset) -> list | None:
    """The records of a file that is one JSON object: a record, or an object whose one list field holds the
    records (`{"data": [...]}`). None where the file is JSON Lines (or not JSON: the line loop names the line)."""
    stripped = text.strip()
    if not stripped.startswith("{"):
        return None
    try:
        value = _loads(text, path, flag)
    except json.JSONDecodeError as e:
        first_line = stripped.splitlines()[0]
        try:
            json.loads(first_line)
        except json.JSONDecodeError:  # the first line is no whole object: one pretty-printed value, broken
            if first_line != stripped and path.suffix.lower() == ".json":
                raise UserInputError(f"{flag}: {path} is not valid JSON: line {e.lineno}: {e.msg}.") from e
        return None
    # {"data": [...]}: the one list field (not a record's own, like messages) holds the records. Beside a record's
    # fields (a one-record file), only a list of objects is taken for the records: a record may carry a list of tags.
    lists = [key for key, field in value.items() if isinstance(field, list) and key not in record_fields]
    record_like = bool(record_fields & set(value))
    if len(lists) == 1 and (not record_like or _holds_objects(value[lists[0]])):
        logger.info("%s: %s is one JSON object; reading its records from its only list field, %r.",
                    flag, path, lists[0])
        return value[lists[0]]
    if record_like or "\n" not in stripped:  # one record, pretty-printed or one JSON Lines line
        return [value]
    which = f"several of its fields are lists ({', '.join(lists)})" if lists else "none of its fields is a list"
    raise UserInputError(
        f"{flag}: {path} holds one JSON object (keys: {', '.join(list(value)[:20])}) rather than a list of "
        f"records, and {which}, so no field can be taken for the records. Save the records as a JSON list "
        "([{...}, {...}]), one per line (JSON Lines), or as an object with a single list field ({\"data\": [...]})."
    )


def _holds_objects(items: list) -> bool:
    return bool(items) and all(isinstance(item, dict) for item in items)


def refuse_header_only_csv(path: Path, flag: str, encoding: str) -> None:
    """A CSV file with its header and no row: datasets says only 'Instruction "train" corresponds to no data!'."""
    with path.open(encoding=encoding, newline="") as file:
        lines = [line for line in (file.readline(), file.readline(), file.readline()) if line.strip()]
    if len(lines) == 1:
        raise UserInputError(
            f"{flag}: {path} has a header line ({lines[0].strip()[:80]}) and no records under it. Add one row per "
            "record below the header, or check that the right file was given."
        )
