"""A command line into the scripts' argument dataclasses: a config file first (config_files.py), then flags that
override it; an unknown flag, a flag under an old name or given twice is one message; --help written by help_text.py;
--smoke's presets applied by smoke_flags.py."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from transformers import HfArgumentParser, TrainingArguments

from cli.arguments import BATCH_FLAGS, RENAMED_FLAGS, DataArguments, ModelArguments, ReportArguments
from cli.config_files import (FORMATS_READ, config_argv, looks_like_config, read_config_file,
                               resolve_relative_paths)
from cli.errors import UserInputError
from cli.help_text import HELP_GROUPS, HelpFormatter, write_help, write_small_script_help
from cli.smoke_flags import parse_smoke

logger = logging.getLogger(__name__)


class _Parser(HfArgumentParser):
    def __init__(self, dataclass_types, **kwargs):
        super().__init__(dataclass_types, formatter_class=HelpFormatter, **kwargs)
        self._group_by_dataclass()

    def error(self, message):  # argparse would print the whole usage and raise SystemExit
        raise UserInputError(f"{message}. Run with --help to list every flag.")

    def action_for(self, arg: str) -> Optional[argparse.Action]:
        """The flag's action for a command-line word (`--flag` or `--flag=value`); None for a value."""
        return self._option_string_actions.get(arg.split("=", 1)[0]) if arg.startswith("--") else None

    def _group_by_dataclass(self) -> None:
        """One --help section per dataclass: HfArgumentParser puts all 170 flags in one list."""
        by_dest: dict = {}
        for action in self._optionals._group_actions:
            by_dest.setdefault(action.dest, []).append(action)
        for dtype in self.dataclass_types:
            group = self.add_argument_group(HELP_GROUPS.get(dtype.__name__, dtype.__name__))
            for dataclass_field in dataclasses.fields(dtype):
                for action in by_dest.pop(dataclass_field.name, []):
                    self._optionals._group_actions.remove(action)
                    group._group_actions.append(action)


def parse_arguments(script_arguments: type, defaults: Mapping[str, Any], argv: Sequence[str]) -> tuple:
    """(model, data, report, script, training) arguments from the command line, or a .json/.yaml config file
    given first with flags after it that override it.

    An unknown flag is an error; a flag known under another name says which; a flag given twice on the
    command line is an error (after a config file, a flag overriding one of its keys is not).
    `defaults` are the script's own defaults for TrainingArguments fields.
    """
    argv = [str(arg) for arg in argv]
    config: dict = {}
    config_file = None
    if argv and not argv[0].startswith("-") and looks_like_config(argv[0]):
        config_file = Path(argv[0])
        config, argv = resolve_relative_paths(read_config_file(config_file), config_file), argv[1:]
    for arg in config_argv(config) + argv:
        flag = arg.split("=", 1)[0]
        if flag.startswith("--"):
            flag = "--" + flag[2:].replace("-", "_")  # HfArgumentParser also takes --hub-token
        if flag in RENAMED_FLAGS:
            raise UserInputError(f"{flag} is not a flag of this toolkit: use {RENAMED_FLAGS[flag]} instead.")
    parser = _Parser((ModelArguments, DataArguments, ReportArguments, script_arguments, TrainingArguments),
                     allow_abbrev=False)
    parser.set_defaults(report_to=default_report_to(), **defaults)
    write_help(parser, script_arguments, defaults, RENAMED_FLAGS)
    _refuse_misplaced_config_files(parser, argv, config_file)
    _refuse_repeated_flags(parser, argv)
    # argparse alone, before TrainingArguments checks --bf16 against the machine: --smoke overrides that.
    namespace = parser.parse_known_args(config_argv(config) + argv)[0]
    if namespace.fp16 and namespace.bf16 and not namespace.smoke:  # transformers: "Your setup doesn't support bf16/gpu"
        raise UserInputError("--fp16 and --bf16 are both given, and a run trains in one of them: give one (--fp16 on "
                             "a GPU without bfloat16, such as the T4), or neither and the script picks for the GPU.")
    if namespace.smoke:
        return parse_smoke(parser, lambda args: _parse(parser, args), defaults, config, argv, namespace)
    parsed = _parse(parser, config_argv(config) + argv)
    given = {getattr(parser.action_for(arg), "dest", None) for arg in config_argv(config) + argv}  # and the file's keys
    parsed[1].auto_batch = not given & BATCH_FLAGS  # by name, not value: a flag given at its default is still chosen
    return parsed


def _refuse_misplaced_config_files(parser: _Parser, argv: Sequence[str], config_file: Optional[Path]) -> None:
    """A config file after a flag, or a second one: argparse would call it a value without a flag."""
    for index, arg in enumerate(argv):
        if arg == "--":
            break
        if arg.startswith("-") or not looks_like_config(arg, first=False) or _is_a_flags_value(parser, argv, index):
            continue
        if config_file is not None:
            raise UserInputError(
                f"{arg}: a second config file. One config file is read, the first argument ({config_file}): merge "
                "the two into one file, or give the second one's keys as flags after the first."
            )
        raise UserInputError(
            f"{arg}: a config file goes first, before any flag (python finetuning/{parser.prog} {arg} --max_steps 3); "
            f"flags after it override its keys. One config file is read, {FORMATS_READ}."
        )


def _is_a_flags_value(parser: _Parser, argv: Sequence[str], index: int) -> bool:
    """Whether argv[index] is the value of a flag before it (--dataset_name data.json, --report_to a b)."""
    for back in range(index - 1, -1, -1):
        action = parser.action_for(argv[back])
        if not argv[back].startswith("-"):
            continue  # a value: the flag before it may take several
        if action is None:
            return True  # an unknown flag: refused as such
        if "=" in argv[back] or action.nargs == 0 or action.nargs == "?":
            return False  # a flag whose value is given, or takes none: a bool would take the file as its value
        return back == index - 1 or action.nargs in ("+", "*")
    return False


def _refuse_repeated_flags(parser: _Parser, argv: Sequence[str]) -> None:
    """argparse keeps the last of a flag given twice, silently: one of the two values was a mistake."""
    seen: dict = {}
    for arg in argv:
        if arg == "--":
            break
        action = parser.action_for(arg)
        if action is None or action.dest == "help":
            continue
        flag = arg.split("=", 1)[0]
        if action.dest in seen:  # named without their values, which may be secrets
            first = seen[action.dest]
            spelt = f"{flag} is" if first == flag else f"{first} and {flag} are the same flag,"
            raise UserInputError(
                f"{spelt} given twice on the command line: only one value can apply. Keep one of them "
                "(to override a config file's key, give the flag once, after the file)."
            )
        seen[action.dest] = flag


def _parse(parser, argv: list[str]) -> tuple:
    try:
        *parsed, unknown = parser.parse_args_into_dataclasses(
            args=argv, look_for_args_file=False, return_remaining_strings=True
        )
    except UserInputError:
        raise
    except ValueError as e:
        raise UserInputError(f"{e}. Run with --help to list every flag.") from e
    if unknown:  # named without their values, which may be secrets
        flags = [a.split("=", 1)[0] for a in unknown if a.startswith("-")] or ["(a value without a flag)"]
        raise UserInputError(f"Unknown flag(s): {', '.join(flags)}. Run with --help to list every flag.")
    return tuple(parsed)


def parse_flags(dataclass_types: tuple, argv: Sequence[str], examples: Sequence[tuple] = ()) -> tuple:
    """A small script's own flags (no TrainingArguments), with the training scripts' rules: an unknown or repeated
    flag is an error, and a missing or malformed one is a UserInputError rather than argparse's exit. --help opens
    with the script's docstring and `examples` ((flags, why) pairs)."""
    parser = _Parser(dataclass_types, allow_abbrev=False)
    write_small_script_help(parser, sys.modules.get(dataclass_types[0].__module__), examples)
    argv = [str(arg) for arg in argv]
    _refuse_repeated_flags(parser, argv)
    return _parse(parser, argv)


def default_report_to() -> str:
    """TensorBoard logs where tensorboard is installed (Colab has it), none otherwise."""
    return "tensorboard" if importlib.util.find_spec("tensorboard") is not None else "none"


# ---------------------------------------------------------------------------
# Checks that span several flags: run first in each script's main, before anything loads
# ---------------------------------------------------------------------------
