"""Config files given as a script's first argument: YAML or JSON, read strictly (a key given twice, a malformed
line and a non-UTF-8 file are each one message with the fix), turned into flags the command line can override."""
from __future__ import annotations

import codecs
import json
import logging
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from cli.errors import UserInputError

logger = logging.getLogger(__name__)

CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
# Config formats of other tools, not read here: said as such (not "Unknown flag(s): (a value without a flag)").
OTHER_CONFIG_SUFFIXES = (".toml", ".ini", ".cfg", ".conf", ".env", ".txt", ".properties", ".xml")
FORMATS_READ = "YAML (.yaml, .yml) or JSON (.json)"
# Keys naming data files: a relative path in a config file is read from the config file's folder.
RELATIVE_TO_CONFIG = ("dataset_name", "eval_file")
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".gz")


def looks_like_config(arg: str, first: bool = True) -> bool:
    """Whether a command-line word that is no flag's value was meant as a config file: by its suffix, or (the first
    argument) a file or folder that exists."""
    path = Path(arg)
    return path.suffix.lower() in CONFIG_SUFFIXES + OTHER_CONFIG_SUFFIXES or (first and path.exists())


class _DuplicateKey(Exception):
    """A config file's key given twice; read_config_file turns it into the message, with the file's name."""

    def __init__(self, key: str, lines: Sequence[int]):
        super().__init__(key, lines)
        self.key, self.lines = key, list(lines)


def _yaml_loader():
    """yaml's SafeLoader, refusing a key given twice in one mapping (yaml keeps the last one, silently)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_document(self, node):
            self._root = node
            return super().construct_document(node)

        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: dict = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden on purpose
                        continue
                    key = self.construct_object(key_node, deep=True)
                    if not isinstance(key, (str, int, float, bool)):
                        continue  # yaml itself refuses unhashable keys
                    # At the top, learning-rate and learning_rate are the same flag.
                    name = str(key).replace("-", "_") if node is getattr(self, "_root", None) else key
                    line = key_node.start_mark.line + 1
                    if name in seen:
                        raise _DuplicateKey(str(name), [seen[name], line])
                    seen[name] = line
            return super().construct_mapping(node, deep=deep)

    return yaml, StrictLoader


def _json_pairs(pairs: list) -> dict:
    """json's object hook, refusing a key given twice (json keeps the last one, silently)."""
    keys = [key for key, _ in pairs]
    for key in keys:
        if keys.count(key) > 1:
            raise _DuplicateKey(key, [])
    return dict(pairs)


def _decode_config(config_file: Path, raw: bytes) -> str:
    """The file's text: UTF-8, or UTF-8 or UTF-16/32 with a byte-order mark (Windows editors write those)."""
    for bom, encoding in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                          (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
                          (codecs.BOM_UTF16_BE, "utf-16")):
        if raw.startswith(bom):
            break
    else:
        encoding = "utf-8"
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        if encoding != "utf-8":  # a byte-order mark, then bytes that do not follow it
            raise UserInputError(
                f"Config file {config_file} starts with a {encoding.upper()} byte-order mark but is not "
                f"{encoding.upper()} text. Save it as UTF-8 and run again."
            ) from e
        line = raw[: e.start].count(b"\n") + 1
        raise UserInputError(
            f"Config file {config_file} is not UTF-8 text: byte 0x{raw[e.start]:02x} on line {line} is not valid "
            "UTF-8 (the file is probably Latin-1 or Windows-1252). Save it as UTF-8 (in the editor's Save As, "
            "choose the encoding UTF-8) and run again."
        ) from e
    if "\x00" in text:
        raise UserInputError(
            f"Config file {config_file} holds NUL bytes: it is probably UTF-16 without a byte-order mark. "
            "Save it as UTF-8 and run again."
        )
    return text


def read_config_file(config_file: Path) -> dict:
    """A config file's keys (flag names without the dashes) and values; a null value means the flag's default."""
    if config_file.is_dir():
        inside = sorted(p.name for p in config_file.iterdir() if p.suffix.lower() in CONFIG_SUFFIXES)
        raise UserInputError(
            f"Config file {config_file} is a folder: give one {FORMATS_READ} file"
            + (f" (it holds {', '.join(inside[:6])})." if inside else ".")
        )
    if config_file.suffix.lower() in DATA_SUFFIXES[1:]:
        raise UserInputError(
            f"{config_file}: the first argument is read as a config file ({FORMATS_READ}), and this looks like a "
            f"data file: give it with --dataset_name {config_file}."
        )
    if config_file.suffix.lower() not in CONFIG_SUFFIXES:
        raise UserInputError(
            f"Config file {config_file}: {config_file.suffix or 'a file without a suffix'} is not read. A config "
            f"file is {FORMATS_READ}, one `flag_name: value` per line, given first, before any flag; or give its "
            "values as flags."
        )
    if not config_file.is_file():
        raise UserInputError(f"Config file {config_file} does not exist ({FORMATS_READ} files are read, given "
                             "first, before any flag).")
    text = _decode_config(config_file, config_file.read_bytes())
    try:
        if config_file.suffix.lower() == ".json":
            values = json.loads(text, object_pairs_hook=_json_pairs)
        else:
            yaml, loader = _yaml_loader()
            try:
                values = yaml.load(text, Loader=loader)  # a SafeLoader: no Python objects from the file
            except yaml.MarkedYAMLError as e:
                raise UserInputError(_yaml_message(config_file, e)) from e
            except yaml.YAMLError as e:  # a ReaderError (an unprintable character) has no line
                raise UserInputError(
                    f"Config file {config_file} is not valid YAML: {e}. Fix the file, or write it as .json."
                ) from e
    except json.JSONDecodeError as e:
        raise UserInputError(
            f"Config file {config_file} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}. "
            "Fix that spot: JSON needs double quotes around keys and strings, no comma after the last item and "
            "no comments (or write the file as .yaml)."
        ) from e
    except _DuplicateKey as e:
        lines = e.lines or _json_key_lines(text, e.key)
        where = "" if len(lines) < 2 else (f" (lines {lines[0]} and {lines[1]})" if lines[0] != lines[1]
                                           else f" (both on line {lines[0]})")
        raise UserInputError(
            f"Config file {config_file} sets {e.key} twice{where}: only one value can apply. Delete one of them."
        ) from e
    except ImportError as e:
        raise UserInputError(
            f"Config file {config_file} needs PyYAML to be read: pip install pyyaml, or write it as .json."
        ) from e
    except RecursionError as e:
        raise UserInputError(
            f"Config file {config_file} is nested too deeply to read (lists or mappings inside each other about a "
            "thousand levels deep). A config file maps flag names to values: one `lora_r: 16` per line."
        ) from e
    if not isinstance(values, dict):
        raise UserInputError(
            f"Config file {config_file} must hold a mapping of flag names to values: one `lora_r: 16` per line "
            '(in JSON, {"lora_r": 16}).'
        )
    flags: dict = {}
    for key in values:  # learning-rate and learning_rate are the same flag (YAML's loader caught this already)
        name = str(key).replace("-", "_")
        if name in flags:
            raise UserInputError(
                f"Config file {config_file} sets {name} twice ({flags[name]!r} and {key!r} are the same flag): "
                "only one value can apply. Delete one of them."
            )
        flags[name] = key
    values = {name: values[key] for name, key in flags.items()}
    nulls = [key for key, value in values.items() if value is None]
    if nulls:  # as a flag, null would be the text "None" (a data set of that name, looked up on the hub)
        logger.info("Config file %s: %s set to null, so the default applies.", config_file, ", ".join(nulls))
    return {key: value for key, value in values.items() if value is not None}


def resolve_relative_paths(config: dict, config_file: Path) -> dict:
    """A relative data file in a config file is read from the config file's folder, as most tools read it (a file
    beside the config in the current folder is still found); each choice logged with the path read."""
    for key in RELATIVE_TO_CONFIG:
        value = config.get(key)
        if not isinstance(value, str) or not value.strip() or Path(value).expanduser().is_absolute():
            continue
        beside, here = config_file.parent / value, Path(value)
        if beside.exists() and beside.resolve() != here.resolve():
            logger.info("Config file %s: %s %s read as %s (relative to the config file's folder).", config_file, key,
                        value, beside)
            config[key] = str(beside)
        elif not beside.exists() and here.exists():
            logger.info("Config file %s: %s %s is not beside the config file (%s); read from the current folder: %s.",
                        config_file, key, value, beside, here.absolute())
        elif not beside.exists() and Path(value).suffix.lower() in DATA_SUFFIXES:
            logger.warning("Config file %s: %s %s is found neither beside the config file (%s) nor in the current "
                           "folder (%s).", config_file, key, value, beside, here.absolute())
            config[key] = str(beside)  # the message that follows names the path tried
    return config


def _yaml_message(config_file: Path, e) -> str:
    mark = e.problem_mark or e.context_mark
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = e.problem or e.context or "a syntax error"
    context = ""
    if e.context and e.problem and e.context_mark is not None:
        context = f" ({e.context} that starts at line {e.context_mark.line + 1})"
    return (
        f"Config file {config_file} is not valid YAML{where}: {problem}{context}. Fix that spot: close every "
        "[ and {, quote values that hold ': ' or start with a special character, and indent with spaces, not tabs."
    )


def _json_key_lines(text: str, key: str) -> list[int]:
    """Line numbers where `"key":` appears (json's decoder does not tell where a key was)."""
    pattern = re.compile(rf'"{re.escape(key)}"\s*:')
    return [number for number, line in enumerate(text.splitlines(), 1) if pattern.search(line)]


def config_argv(config: Mapping[str, Any]) -> list[str]:
    """A config file's keys as flags, so the command line after it can override them."""
    argv = []
    for key, value in config.items():
        if isinstance(value, (list, tuple)):
            argv += [f"--{key}", *map(str, value)]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv
