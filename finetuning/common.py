"""What train_qlora.py and train_galore.py share.

Version and hardware checks, the arguments both scripts take, data loading and
checking, the prompt format, tokenizer and model loading, and the tiny model the
``--smoke`` runs train. Importing this module is cheap (no torch, no
transformers): the scripts call :func:`check_versions` before those load, so a
wrong version ends in one clear message instead of an ImportError deep inside trl.
"""
from __future__ import annotations

import dataclasses
import errno
import functools
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional, Sequence

if TYPE_CHECKING:  # heavy imports stay lazy: see the module docstring
    import datasets
    import torch
    import transformers

logger = logging.getLogger("finetuning")

PROJECT_DIR = Path(__file__).resolve().parent
REQUIREMENTS_FILE = PROJECT_DIR / "requirements.txt"
DEFAULT_DATASET_FILE = PROJECT_DIR / "data" / "default_instructions.json"
DEFAULT_MODEL = "google/gemma-3-1b-it"


class UserInputError(ValueError):
    """Something the user gave (a flag, a file, a record) cannot work; the message says how to fix it."""


class SetupError(RuntimeError):
    """The installation or the machine cannot run this; the message says what to install or where to run."""


# ---------------------------------------------------------------------------
# Versions
# ---------------------------------------------------------------------------

# Packages whose version decides whether the scripts work at all. Each of these
# pairings was run; the rest of requirements.txt only keeps installs reproducible.
# trl 0.8.6 is the user's fixed choice; it passes `tokenizer=` to Trainer, which
# transformers 5 removed, and Gemma 3 needs transformers >= 4.50, so 4.57 (the
# last 4.x) is the newest transformers that runs it.
CHECKED_PACKAGES = (
    "trl",
    "transformers",
    "peft",
    "accelerate",
    "datasets",
    "tokenizers",
    "huggingface-hub",
    "safetensors",
    "rich",
    "bitsandbytes",
    "galore-torch",
)


def read_pins(requirements_file: Path = REQUIREMENTS_FILE) -> dict[str, str]:
    """The exact `name==version` pins of requirements.txt, names normalised."""
    pins = {}
    for line in requirements_file.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[_normalise(name)] = version.strip()
    return pins


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _installed_version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def check_versions(
    packages: Sequence[str] = CHECKED_PACKAGES,
    installed: Optional[Mapping[str, Optional[str]]] = None,
    pins: Optional[Mapping[str, str]] = None,
) -> None:
    """Stop with one message listing every package whose installed version is not the pinned one.

    `installed` maps a name to its version (None: not installed); it defaults to
    what importlib.metadata finds, and exists so tests can plant versions.
    """
    pins = read_pins() if pins is None else pins
    problems = []
    for name in packages:
        wanted = pins[_normalise(name)]
        found = installed.get(name) if installed is not None else _installed_version(name)
        if found != wanted:
            problems.append((name, found, wanted))
    if _installed_version("torch") is None and installed is None:
        problems.append(("torch", None, ">=2.4 (Colab ships one; elsewhere see pytorch.org)"))
    if not problems:
        return
    lines = [
        f"  {name}: found {found or 'not installed'}, need {wanted}" for name, found, wanted in problems
    ]
    fix = " ".join(f"{name}=={wanted}" for name, _, wanted in problems if not wanted.startswith(">="))
    raise SetupError(
        "These packages do not match the versions this toolkit was tested with:\n"
        + "\n".join(lines)
        + f"\nFix: pip install -r {_display_path(REQUIREMENTS_FILE)}"
        + (f"\n  (or just: pip install {fix})" if fix else "")
        + "\nThen restart the Python runtime (on Colab: Runtime > Restart session)."
    )


def _display_path(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------
# Arguments both scripts take
# ---------------------------------------------------------------------------


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default=DEFAULT_MODEL,
        metadata={"help": "A hub id or a local folder with a causal LM (config.json + weights)."},
    )
    attn_implementation: str = field(
        default="sdpa",
        metadata={"help": "Attention kernel: 'sdpa' (PyTorch's fused attention; Gemma 3 has no attention softcapping "
                  "that would need 'eager'), 'eager' or 'flash_attention_2'."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run Python code shipped with the model. Off: Gemma needs none, and it runs anything."},
    )
    smoke: bool = field(
        default=False,
        metadata={
            "help": "Run the whole pipeline on the CPU with a tiny random Gemma 3 (no download, under a minute): "
            "load, format, train a few steps, save, reload, generate."
        },
    )


@dataclass
class DataArguments:
    dataset_name: Optional[str] = field(
        default=None,
        metadata={
            "help": "A hub data set id, or a local .json/.jsonl/.csv/.parquet file of instruction/input/output "
            "records. Default: the small data set shipped with the toolkit."
        },
    )
    dataset_split: str = field(default="train", metadata={"help": "Which split of a hub data set to train on."})
    max_seq_length: int = field(
        default=1024, metadata={"help": "Longest training sequence in tokens; longer ones are cut."}
    )
    max_train_samples: Optional[int] = field(
        default=None, metadata={"help": "Train on the first N records only (for quick tries)."}
    )
    data_format: str = field(
        default="auto",
        metadata={"help": "alpaca (instruction/input/output), chat (messages), sharegpt (conversations), text, "
                  "or auto: told by the first record's fields."},
    )
    instruction_column: str = field(default="instruction", metadata={"help": "Column holding the instruction."})
    input_column: str = field(default="input", metadata={"help": "Column holding the optional input."})
    output_column: str = field(default="output", metadata={"help": "Column holding the answer."})
    messages_column: str = field(default="messages", metadata={"help": "Column holding chat messages."})
    text_column: str = field(default="text", metadata={"help": "Column holding plain training text."})
    completion_only_loss: bool = field(
        default=True,
        metadata={"help": "Learn from the answers only (prompt tokens masked out of the loss). "
                  "Off: learn the prompts too. Plain-text data has no prompt and always trains on everything."},
    )
    packing: bool = field(
        default=False,
        metadata={"help": "Pack several records into each --max_seq_length block (trl's ConstantLengthDataset). "
                  "Needs --completion_only_loss false, and packed records attend to each other."},
    )
    max_tokens_per_batch: Optional[int] = field(
        default=None,
        metadata={"help": "Batch by tokens instead of records: each micro-batch holds as many records as fit this "
                  "many tokens. A step's fixed cost is then spread over many short records; "
                  "--per_device_train_batch_size is ignored for training."},
    )
    padding_free: bool = field(
        default=True,
        metadata={"help": "With --max_tokens_per_batch: pack records into rows of --max_seq_length tokens with no "
                  "padding between them, each record attending only to itself (position ids restart per record). "
                  "False: batches of records of similar length, padded."},
    )
    eval_split_ratio: float = field(
        default=0.0, metadata={"help": "Hold out this share of the records (e.g. 0.05) to measure eval loss and perplexity."}
    )
    eval_file: Optional[str] = field(
        default=None, metadata={"help": "A separate file of evaluation records (same formats as --dataset_name)."}
    )

    def __post_init__(self):
        if self.max_seq_length < 16:
            raise UserInputError(
                f"--max_seq_length {self.max_seq_length} is too small: a prompt and an answer need at least "
                "a few dozen tokens. Use 512 to 2048."
            )
        if self.data_format not in DATA_FORMATS:
            raise UserInputError(f"--data_format {self.data_format!r} is not one of {', '.join(DATA_FORMATS)}.")
        if not 0 <= self.eval_split_ratio < 1:
            raise UserInputError(f"--eval_split_ratio must be in [0, 1), got {self.eval_split_ratio}. Typical: 0.05.")
        if self.eval_split_ratio and self.eval_file:
            raise UserInputError("Give either --eval_split_ratio or --eval_file, not both.")
        if self.max_tokens_per_batch is not None and self.max_tokens_per_batch < self.max_seq_length:
            raise UserInputError(
                f"--max_tokens_per_batch {self.max_tokens_per_batch} must be at least --max_seq_length "
                f"{self.max_seq_length}, or the longest records fit no batch."
            )
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise UserInputError(f"--max_train_samples must be 1 or more, got {self.max_train_samples}.")


@dataclass
class ReportArguments:
    dry_run: bool = field(
        default=False,
        metadata={"help": "Load and format the data, show two examples with the masked part marked, token-length "
                  "statistics and the effective batch size; load no model weights, train nothing."},
    )
    num_sample_prompts: int = field(
        default=3, metadata={"help": "Prompts answered before and after training, written to samples.md (0: none)."}
    )
    sample_max_new_tokens: int = field(default=64, metadata={"help": "Length of each sample answer, in tokens."})


# Flags users bring from older tutorials; transformers 4.46 renamed or removed them.
RENAMED_FLAGS = {
    "--evaluation_strategy": "--eval_strategy",
    "--max_seq_len": "--max_seq_length",
    "--model_name": "--model_name_or_path",
    "--dataset": "--dataset_name",
    "--no_cuda": "--use_cpu",
    # A token on the command line ends up in shell history, notebooks and training_args.bin.
    "--hub_token": "the HF_TOKEN environment variable (or a Colab secret named HF_TOKEN)",
}


def parse_arguments(dataclass_types: Sequence[type], argv: Sequence[str], defaults: Mapping[str, Any]):
    """Parse the command line (or a single .json/.yaml config file) into the dataclasses.

    An unknown flag is an error; a flag known under another name says which.
    `defaults` are the script's own defaults for TrainingArguments fields.
    """
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message):  # argparse would print the whole usage and raise SystemExit
            raise UserInputError(f"{message}. Run with --help to list every flag.")

    argv = list(argv)
    if len(argv) >= 1 and argv[0].endswith((".json", ".yaml", ".yml")) and not argv[0].startswith("-"):
        config_file = Path(argv[0])
        if not config_file.is_file():
            raise UserInputError(f"Config file {config_file} does not exist.")
        argv = _config_file_to_argv(config_file) + argv[1:]
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag.startswith("--"):
            flag = "--" + flag[2:].replace("-", "_")  # HfArgumentParser also takes --hub-token
        if flag in RENAMED_FLAGS:
            raise UserInputError(f"{flag} is not a flag of this toolkit: use {RENAMED_FLAGS[flag]} instead.")
    parser = Parser(dataclass_types, allow_abbrev=False)
    parser.set_defaults(**defaults)
    parsed = _parse(parser, argv)
    if any(getattr(values, "smoke", False) for values in parsed):
        # A smoke run's own defaults (a few CPU steps on a slice of the data);
        # flags the user gave still win.
        parser.set_defaults(**SMOKE_DEFAULTS, output_dir=f"{defaults['output_dir']}-smoke")
        parsed = _parse(parser, argv)
    return parsed


def _parse(parser, argv: list[str]):
    try:
        *parsed, unknown = parser.parse_args_into_dataclasses(
            args=argv, look_for_args_file=False, return_remaining_strings=True
        )
    except ValueError as e:
        if isinstance(e, UserInputError):
            raise
        raise UserInputError(f"{e}. Run with --help to list every flag.") from e
    if unknown:  # named without their values, which may be secrets
        flags = [a.split("=", 1)[0] for a in unknown if a.startswith("-")] or ["(a value without a flag)"]
        raise UserInputError(f"Unknown flag(s): {', '.join(flags)}. Run with --help to list every flag.")
    return tuple(parsed)


def _config_file_to_argv(config_file: Path) -> list[str]:
    """A config file's keys become flags, so the command line after it can override them."""
    text = config_file.read_text()
    try:
        if config_file.suffix == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except (ValueError, ImportError) as e:  # yaml.YAMLError subclasses ValueError-free Exception
        raise UserInputError(f"Config file {config_file} could not be read: {e}") from e
    if not isinstance(values, dict):
        raise UserInputError(f"Config file {config_file} must hold a mapping of flag names to values.")
    argv = []
    for key, value in values.items():
        if isinstance(value, (list, tuple)):
            argv += [f"--{key}", *map(str, value)]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def check_training_arguments(training_args: "transformers.TrainingArguments") -> None:
    """Reject settings that would only fail (or waste GPU time) later."""
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        value = getattr(training_args, name)
        if value < 1:
            raise UserInputError(f"--{name} must be 1 or more, got {value}.")
    if not training_args.learning_rate > 0 or not math.isfinite(training_args.learning_rate):
        raise UserInputError(
            f"--learning_rate must be a positive number, got {training_args.learning_rate}. "
            "Typical: 2e-4 for QLoRA, 1e-5 for GaLore."
        )
    if training_args.max_steps == 0 or (training_args.max_steps < 0 and training_args.num_train_epochs <= 0):
        raise UserInputError("Nothing to train: set --max_steps to 1 or more, or --num_train_epochs above 0.")


# ---------------------------------------------------------------------------
# Hardware and precision
# ---------------------------------------------------------------------------


def require_cuda(what: str) -> None:
    """Stop before the model loads when there is no CUDA GPU, saying what to do instead."""
    import torch

    if torch.cuda.is_available():
        return
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found = "an Apple GPU (MPS), which bitsandbytes' 4-bit layers and 8-bit optimizers do not support"
    else:
        found = "no GPU that PyTorch can use"
    raise SetupError(
        f"{what} needs an NVIDIA GPU with CUDA, and this machine has {found} "
        f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}).\n"
        "Fix: run on a CUDA GPU, such as Google Colab (Runtime > Change runtime type > T4 GPU).\n"
        "To check the whole pipeline on this machine first, add --smoke (a tiny model on the CPU, under a minute)."
    )


@dataclass
class Precision:
    bf16: bool
    fp16: bool
    torch_dtype: "torch.dtype"
    reason: str

    @property
    def name(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"


def choose_precision(training_args: "transformers.TrainingArguments", on_cpu: bool) -> Precision:
    """bf16 where the GPU has it, fp16 otherwise (T4, V100); fp32 on the CPU. Honour a flag the GPU can run."""
    import torch

    if on_cpu:
        return Precision(False, False, torch.float32, "running on the CPU, where half precision is slow")
    bf16_supported = torch.cuda.is_bf16_supported(including_emulation=False)
    gpu = torch.cuda.get_device_name()
    if training_args.bf16 and not bf16_supported:
        raise UserInputError(
            f"--bf16 was asked for, but the {gpu} has no bfloat16 support. Remove --bf16: "
            "fp16 is chosen automatically on this GPU."
        )
    if training_args.fp16 and not training_args.bf16:
        return Precision(False, True, torch.float16, "--fp16 was given")
    if bf16_supported:
        return Precision(True, False, torch.bfloat16, f"the {gpu} supports bfloat16 (same range as fp32, no overflow)")
    return Precision(False, True, torch.float16, f"the {gpu} has no bfloat16, so float16 with loss scaling")


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------

INSTRUCTION_FIELD, INPUT_FIELD, OUTPUT_FIELD = "instruction", "input", "output"
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}

# Gemma's chat turns. The tokenizer adds <bos> itself (trl 0.8.6 tokenizes with
# special tokens on), so the text must not carry one: two <bos> hurt the model.
USER_TURN = "<start_of_turn>user\n{prompt}<end_of_turn>\n"
MODEL_TURN_START = "<start_of_turn>model\n"
MODEL_TURN = MODEL_TURN_START + "{response}<end_of_turn>\n"


DATA_FORMATS = ("auto", "alpaca", "chat", "sharegpt", "text")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "system": "system"}
CHAT_ROLES = {"user": "user", "assistant": "assistant", "model": "assistant", "system": "system"}


def load_records(data_args: DataArguments) -> "datasets.Dataset":
    """The training records, checked and in one of three shapes the formatting function knows.

    Alpaca records keep instruction/input/output; chat (`messages` of role/content) and
    ShareGPT (`conversations` of from/value) become `messages` with user/assistant roles;
    plain text stays `text`. Column names come from the --*_column flags.
    """
    import datasets

    source = data_args.dataset_name or str(DEFAULT_DATASET_FILE)
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
    import datasets

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


def format_prompt(record: Mapping[str, Any]) -> str:
    """What generation starts from: the conversation up to the last answer, and the opening of the model turn."""
    if "messages" in record:
        messages = list(record["messages"])
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        return render_messages(messages) + MODEL_TURN_START
    if "text" in record:
        return record["text"][: max(1, len(record["text"]) // 2)]
    return USER_TURN.format(prompt=_prompt_text(record)) + MODEL_TURN_START


def format_record(record: Mapping[str, Any]) -> str:
    """One instruction record as a Gemma chat exchange, without <bos> (the tokenizer adds it)."""
    return USER_TURN.format(prompt=_prompt_text(record)) + MODEL_TURN.format(response=record[OUTPUT_FIELD].strip())


def _prompt_text(record: Mapping[str, Any]) -> str:
    prompt = record[INSTRUCTION_FIELD].strip()
    extra = (record.get(INPUT_FIELD) or "").strip()
    return f"{prompt}\n\n{extra}" if extra else prompt


def render_messages(messages: Sequence[Mapping[str, str]]) -> str:
    """A conversation of alternating user/assistant turns in Gemma's chat format, without <bos>.

    The same text as Gemma's chat template (tests check it against the tokenizer's);
    rendered here so the formatting function needs no tokenizer.
    """
    turns = []
    for message in messages:
        role = "model" if message["role"] == "assistant" else message["role"]
        turns.append(f"<start_of_turn>{role}\n{message['content'].strip()}<end_of_turn>\n")
    return "".join(turns)


def format_example(record: Mapping[str, Any]) -> str:
    """One record of any of the three shapes load_records makes, as training text."""
    if "messages" in record:
        return render_messages(record["messages"])
    if "text" in record:
        return record["text"].removeprefix("<bos>")  # the tokenizer adds <bos> itself
    return format_record(record)


def formatting_func(examples: Mapping[str, Any]) -> "list[str] | str":
    """SFTTrainer's formatting function, for both ways trl 0.8.6 calls it.

    Unpacked, trl maps over batches and passes a dict of lists: it must get a list
    of strings back. Packed (ConstantLengthDataset), it passes one record and
    expects one string.
    """
    first_column = next(iter(examples.values()))
    if not isinstance(first_column, list) or (
        "messages" in examples and (not first_column or isinstance(first_column[0], Mapping))
    ):
        return format_example(examples)
    return [format_example(dict(zip(examples, row))) for row in zip(*examples.values())]


# ---------------------------------------------------------------------------
# Tokenizer and model
# ---------------------------------------------------------------------------


def load_tokenizer(model_name_or_path: str, trust_remote_code: bool = False) -> "transformers.PreTrainedTokenizerBase":
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # ValueError: a malformed hub id, or a folder with no config.json
        raise UserInputError(_model_not_found_message(model_name_or_path, e)) from e
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # trl 0.8.6 would set pad = eos; the collator then masks every EOS out of
        # the labels and the model never learns to stop.
        raise UserInputError(
            f"The tokenizer of {model_name_or_path} has no padding token distinct from its end token. "
            "Gemma tokenizers have <pad>; use a Gemma model, or add a pad token to the tokenizer."
        )
    tokenizer.padding_side = "right"
    return tokenizer


def _model_not_found_message(model_name_or_path: str, error: Exception) -> str:
    if Path(model_name_or_path).exists() or model_name_or_path.startswith((".", "/")):
        return (
            f"--model_name_or_path {model_name_or_path!r}: no model could be read there ({error}). "
            "Point it at a folder that holds config.json and the weights."
        )
    return (
        f"--model_name_or_path {model_name_or_path!r} could not be loaded ({error}).\n"
        "Gemma models are gated on the Hugging Face hub: accept the license on the model's page, then give this "
        "session your token (on Colab: add a secret named HF_TOKEN; elsewhere: export HF_TOKEN=... or run "
        "`huggingface-cli login`). Check the spelling, and that this machine can reach huggingface.co."
    )


def load_causal_lm(model_path: str, trust_remote_code: bool, **kwargs):
    """AutoModelForCausalLM.from_pretrained for training: safetensors only, and a path that holds no model is a user error."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_path,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,  # never unpickle weights: a .bin checkpoint can run arbitrary code
            **kwargs,
        )
    except (OSError, ValueError) as e:  # ValueError: a malformed hub id, or a folder with no config.json
        raise UserInputError(_model_not_found_message(model_path, e)) from e
    model.config.use_cache = False  # the KV cache is useless while training and clashes with checkpointing
    if kwargs.get("attn_implementation") == "sdpa":
        import torch

        # PyTorch >= 2.5 picks cuDNN's attention on Hopper, which builds a plan per batch shape on the CPU: about
        # 18 ms a call on an H100, nearly doubling a QLoRA step (bench/RESULTS.md). The flash and memory-efficient
        # kernels need no plan.
        torch.backends.cuda.enable_cudnn_sdp(False)
    return model


def count_parameters(model: "torch.nn.Module") -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def log_settings(script: str, run: "Run", model, extra: Mapping[str, Any]) -> None:
    """One block with what a user needs to know about the run they started."""
    training_args, precision = run.training_args, run.precision
    trainable, total = count_parameters(model)
    devices, accumulation = max(1, training_args.world_size), training_args.gradient_accumulation_steps
    tokens = run.data_args.max_tokens_per_batch
    if tokens is None:
        batch = training_args.per_device_train_batch_size
        effective = f"{batch * accumulation * devices} records = {batch} per device"
    else:
        how = "packed without padding" if run.data_args.padding_free else "padded, similar lengths together"
        effective = f"{tokens * accumulation * devices:,} tokens = {tokens:,} per device ({how})"
    lines = [
        f"{script} settings:",
        f"  precision: {precision.name} ({precision.reason})",
        f"  effective batch: {effective} x {accumulation} accumulation x {devices} device(s)",
        f"  trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)",
        f"  learning rate: {training_args.learning_rate}, optimizer: {extra.get('optimizer', getattr(training_args.optim, 'value', training_args.optim))}",
        f"  gradient checkpointing: {training_args.gradient_checkpointing}",
        f"  output: {training_args.output_dir}",
    ]
    lines += [f"  {k}: {v}" for k, v in extra.items() if k != "optimizer"]
    logger.info("\n".join(lines))


def setup_logging() -> None:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )
    import transformers

    transformers.utils.logging.set_verbosity_warning()


def run_cli(main: Callable[[Sequence[str]], Any], argv: Optional[Sequence[str]] = None) -> int:
    """Run a script's main(); a problem the user can fix is one message and exit code 2, not a traceback."""
    setup_logging()
    try:
        main(sys.argv[1:] if argv is None else argv)
    except (UserInputError, SetupError, TrainingFailed) as e:
        logger.error("%s", e)
        return 2
    return 0


# ---------------------------------------------------------------------------
# The tiny model of --smoke and the tests
# ---------------------------------------------------------------------------

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
# Gemma's chat format for the tiny tokenizer: user and model turns, a system message
# folded into the first user turn, roles that must alternate.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set prefix = messages[0]['content'] | trim + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def build_random_gemma(
    directory: Path,
    texts: Iterable[str],
    vocab_size: int = 1024,
    config_file: Optional[Path] = None,
    seed: int = 0,
) -> Path:
    """Write a tokenizer trained on `texts` and a randomly initialised Gemma 3 to `directory`.

    Without `config_file`, a 2-layer Gemma 3 a few hundred kB in size (the smoke
    runs and tests); with one (such as the real gemma-3-1b config.json), a model of
    those shapes, for measuring real cost. The tokenizer has Gemma's special-token
    ids (<pad>=0, <eos>=1, <bos>=2) and chat turns, so the real loading,
    formatting and training code runs on it unchanged.
    """
    import torch
    from transformers import AutoConfig, Gemma3ForCausalLM, Gemma3TextConfig

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts, vocab_size)
    tokenizer.save_pretrained(directory)
    if config_file is None:
        config = Gemma3TextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            max_position_embeddings=2048,
            sliding_window=64,
        )
    else:
        config = AutoConfig.from_pretrained(Path(config_file).parent)
        if config.vocab_size < len(tokenizer):
            raise UserInputError(f"The tokenizer ({len(tokenizer)} tokens) does not fit {config_file}'s vocabulary.")
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config)
    model.save_pretrained(directory)
    return directory


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> "transformers.PreTrainedTokenizerFast":
    """A byte-level BPE tokenizer trained on the spot, shaped like Gemma's (ids, special tokens, chat template)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", SPECIAL_TOKENS.index("<bos>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        model_max_length=32768,
        chat_template=GEMMA_CHAT_TEMPLATE,
        model_input_names=["input_ids", "attention_mask"],  # as Gemma's; no token_type_ids
    )


def smoke_model(output_dir: Path, records: "datasets.Dataset") -> Path:
    """Build the tiny model for a smoke run, with its tokenizer trained on the run's own data."""
    texts = [format_example(record) for record in records]
    return build_random_gemma(Path(output_dir) / "smoke_base_model", texts)


# Training defaults both scripts share; each script adds its own. Every one can be overridden by its flag.
SHARED_TRAINING_DEFAULTS = dict(
    lr_scheduler_type="cosine",
    warmup_ratio=0.03,
    num_train_epochs=1,
    # Batches of similar lengths: real instruction data is short and uneven, and padding is wasted compute.
    group_by_length=True,
    gradient_checkpointing=True,
    # Non-reentrant checkpointing works with frozen 4-bit inputs without enable_input_require_grads tricks.
    gradient_checkpointing_kwargs={"use_reentrant": False},
    logging_steps=10,
    save_strategy="steps",
    save_steps=200,
    save_total_limit=2,
    eval_strategy="no",
)

SMOKE_DEFAULTS = dict(
    max_steps=4,
    per_device_train_batch_size=2,
    gradient_accumulation_steps=1,
    logging_steps=1,
    save_strategy="no",
    gradient_checkpointing=False,
    max_train_samples=64,
    max_seq_length=256,
    overwrite_output_dir=True,  # a smoke run is a check: the next one replaces it
    sample_max_new_tokens=8,
)


def apply_smoke_settings(training_args):
    """A smoke run trains on the CPU in fp32, whatever GPU flags came with it."""
    return dataclasses.replace(training_args, use_cpu=True, bf16=False, fp16=False, report_to=[])


def environment_summary() -> str:
    versions = {name: _installed_version(name) for name in ("torch", *CHECKED_PACKAGES)}
    return ", ".join(f"{k} {v}" for k, v in versions.items() if v) + f", python {sys.version.split()[0]}"


def use_colab_token() -> None:
    """On Colab, hand a secret named HF_TOKEN to huggingface_hub through the environment; never log it."""
    if os.environ.get("HF_TOKEN"):
        return
    try:
        from google.colab import userdata
    except ImportError:
        return
    try:
        token = userdata.get("HF_TOKEN")
    except (userdata.SecretNotFoundError, userdata.NotebookAccessError):
        logger.info("No Colab secret HF_TOKEN (or no access to it): gated models such as Gemma will not load.")
        return
    os.environ["HF_TOKEN"] = token
    logger.info("Using the Colab secret HF_TOKEN for the Hugging Face hub.")


# ---------------------------------------------------------------------------
# Numerics and memory on the GPU: fp16 without overflow, a loss without the full logits
# ---------------------------------------------------------------------------


def keep_residual_stream_in_fp32(model: "torch.nn.Module") -> int:
    """Make Gemma's RMSNorms return float32 when their weights are float32 (fp16 training). Returns how many changed.

    Gemma 3's residual stream grows past float16's 65,504 (transformers issue
    36822). Under fp16 autocast the linear layers return float16, and Gemma3RMSNorm
    casts its output back to its input's dtype, so the post-attention and post-MLP
    norms hand float16 overflow (inf, then NaN) to the residual add. Returning
    float32 keeps the residual stream in float32; the matrix products stay float16.
    """
    import speed

    return speed.fuse_rms_norms(model, fp32_residual=True)


def use_chunked_loss(causal_lm: "torch.nn.Module", chunk_tokens: Optional[int] = None) -> bool:
    """Compute the training loss from the hidden states in chunks, never holding the full logits.

    Gemma's 262,144-token vocabulary makes the logits the largest tensor of a step
    (1 GiB in fp32 per 1,024 tokens, and cross_entropy keeps several copies). The
    chunked loss also skips positions whose label is masked (padding). Returns
    False, leaving the model as it was, where the output layer is not a plain
    Linear (a quantized one, say).
    """
    import torch
    from transformers.modeling_outputs import CausalLMOutputWithPast

    lm_head = causal_lm.get_output_embeddings()
    if type(lm_head) is not torch.nn.Linear or lm_head.bias is not None:
        logger.warning("Output layer is %s, not a plain Linear: using the stock loss.", type(lm_head).__name__)
        return False
    stock_forward = causal_lm.forward
    softcap = getattr(causal_lm.config, "final_logit_softcapping", None)

    def forward(input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None, **kwargs):
        if labels is None or kwargs.get("logits_to_keep") or kwargs.get("return_dict") is False:
            return stock_forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        outputs = causal_lm.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        loss = chunked_causal_lm_loss(
            outputs.last_hidden_state, lm_head.weight, labels, softcap, num_items_in_batch, chunk_tokens
        )
        return CausalLMOutputWithPast(loss=loss, past_key_values=outputs.past_key_values)

    causal_lm.forward = forward
    return True


def chunked_causal_lm_loss(hidden, weight, labels, softcap=None, num_items_in_batch=None, chunk_tokens=None):
    """Next-token cross-entropy of `hidden @ weight.T`, the same value as transformers' ForCausalLMLoss.

    The mean over unmasked tokens, or the sum divided by `num_items_in_batch` (the
    Trainer's count over all accumulated micro-batches) when given.
    """
    import torch

    shift_hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(hidden.device)
    kept = (shift_labels != -100).nonzero().squeeze(1)
    if num_items_in_batch is None:
        divisor = max(int(kept.numel()), 1)
    else:
        divisor = num_items_in_batch.item() if torch.is_tensor(num_items_in_batch) else num_items_in_batch
    if chunk_tokens is None:
        chunk_tokens = max(64, 2**29 // (4 * weight.shape[0]))  # about 512 MiB of fp32 logits a chunk
    return _chunked_cross_entropy().apply(
        shift_hidden.index_select(0, kept), weight, shift_labels.index_select(0, kept), softcap, divisor, chunk_tokens
    )


@functools.cache  # built on first use, so importing this module needs no torch
def _chunked_cross_entropy():
    import torch

    class ChunkedCrossEntropy(torch.autograd.Function):
        """Loss and its gradients in one pass over vocabulary chunks, as fused linear cross-entropy kernels do.

        The gradients are computed in the forward pass, chunk by chunk, so no chunk
        of logits has to be kept or recomputed for the backward pass.
        """

        @staticmethod
        def forward(ctx, hidden, weight, labels, softcap, divisor, chunk_tokens):
            need_hidden_grad, need_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            # Under autocast the matrix products run in its dtype, as nn.Linear's would.
            if torch.is_autocast_enabled(hidden.device.type):
                compute_dtype = torch.get_autocast_dtype(hidden.device.type)
            else:
                compute_dtype = hidden.dtype
            weight_c = weight.to(compute_dtype)
            grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            # A target's probability can underflow float32 only past a loss of 87 for that token.
            tiny = torch.finfo(torch.float32).tiny
            for start in range(0, hidden.shape[0], chunk_tokens):
                h = hidden[start : start + chunk_tokens].to(compute_dtype)
                target = labels[start : start + chunk_tokens]
                logits = h @ weight_c.T
                if softcap:
                    capped = torch.tanh(logits.float() / softcap)
                    logits = capped * softcap
                # One fused pass from the 16-bit logits to float32 probabilities: the loss (-log p of the
                # target) and its gradient (p - one_hot) both come from it, where log-sum-exp, subtract and
                # exp would each read and write the whole float32 chunk.
                probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
                rows = torch.arange(target.shape[0], device=target.device)
                total -= probs[rows, target].clamp_min(tiny).log().sum()
                if not (need_hidden_grad or need_weight_grad):
                    continue
                probs[rows, target] -= 1
                if softcap:
                    probs *= 1 - capped * capped
                grad_logits = probs.to(compute_dtype)
                if need_hidden_grad:
                    grad_hidden[start : start + chunk_tokens] = grad_logits @ weight_c
                if need_weight_grad:
                    grad_weight += grad_logits.T @ h
            ctx.divisor = divisor
            ctx.save_for_backward(
                grad_hidden if need_hidden_grad else None,
                grad_weight.to(weight.dtype) if need_weight_grad else None,
            )
            return total / divisor

        @staticmethod
        def backward(ctx, grad_output):
            grad_hidden, grad_weight = ctx.saved_tensors
            scale = grad_output / ctx.divisor
            return (
                grad_hidden * scale.to(grad_hidden.dtype) if grad_hidden is not None else None,
                grad_weight * scale.to(grad_weight.dtype) if grad_weight is not None else None,
                None,
                None,
                None,
                None,
            )

    return ChunkedCrossEntropy




# ---------------------------------------------------------------------------
# Training guards: a NaN loss or an out-of-memory error ends with what to change
# ---------------------------------------------------------------------------


class TrainingFailed(RuntimeError):
    """Training cannot go on (NaN loss, out of memory); the message says what to change and what was saved."""


def latest_complete_checkpoint(output_dir) -> Optional[str]:
    """The newest checkpoint-N folder that was written to the end, or None.

    The Trainer writes trainer_state.json after the weights, optimizer, scheduler and
    RNG state, so a folder whose trainer_state.json is missing or unreadable was cut
    off mid-save (a Colab disconnect, a kill) and must not be resumed from.
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    numbered = []
    for checkpoint in folder.glob("checkpoint-*"):
        suffix = checkpoint.name.split("-", 1)[1]
        if checkpoint.is_dir() and suffix.isdigit():
            numbered.append((int(suffix), checkpoint))
    for _, checkpoint in sorted(numbered, reverse=True):
        try:
            json.loads((checkpoint / "trainer_state.json").read_text())
        except (OSError, ValueError):
            logger.warning("Ignoring %s: it was not written to the end.", checkpoint)
            continue
        return str(checkpoint)
    return None


RESUME_LATEST = ("true", "latest", "last")
FINAL_DIR = "final"


def prepare_output_dir(training_args) -> Optional[str]:
    """Decide where training starts from, before anything heavy loads; returns the checkpoint to resume from, if any.

    An output directory that holds an earlier run is refused unless --overwrite_output_dir or
    --resume_from_checkpoint says what to do with it: silently mixing two runs' checkpoints is worse.
    """
    output_dir = Path(training_args.output_dir)
    resume = training_args.resume_from_checkpoint
    if resume is not None and str(resume).lower() in RESUME_LATEST:
        resume = latest_complete_checkpoint(output_dir)
        if resume is None:
            raise UserInputError(
                f"--resume_from_checkpoint {training_args.resume_from_checkpoint}: {output_dir} holds no complete "
                "checkpoint to resume from. Check --output_dir, or start a new run without the flag."
            )
        logger.info("Resuming from the latest complete checkpoint, %s", resume)
    elif resume is not None:
        if not (Path(resume) / "trainer_state.json").is_file():
            raise UserInputError(
                f"--resume_from_checkpoint {resume} is not a complete checkpoint (no trainer_state.json). "
                f"The latest complete one in {output_dir} is {latest_complete_checkpoint(output_dir)}."
            )
    elif output_dir.is_dir() and training_args.overwrite_output_dir:
        import shutil

        earlier = [p for p in output_dir.iterdir() if p.is_dir() and (
            p.name.startswith("checkpoint-") or p.name in (FINAL_DIR, f".{FINAL_DIR}.partial", "merged"))]
        for path in earlier:
            shutil.rmtree(path)
        if earlier:
            logger.info("--overwrite_output_dir: removed the earlier run's %s", ", ".join(sorted(p.name for p in earlier)))
    elif output_dir.is_dir() and not training_args.overwrite_output_dir:
        earlier = [p.name for p in output_dir.iterdir() if p.name.startswith("checkpoint-") or p.name == FINAL_DIR]
        if earlier:
            raise UserInputError(
                f"--output_dir {output_dir} already holds an earlier run ({', '.join(sorted(earlier)[:4])}). "
                "Continue it with --resume_from_checkpoint latest, start over with --overwrite_output_dir, "
                "or choose another --output_dir."
            )
    return str(resume) if resume is not None else None


def save_final(trainer, tokenizer) -> Path:
    """Write the trained model (or adapter) and the tokenizer to OUTPUT_DIR/final, all or nothing."""

    def write(folder: Path) -> None:
        trainer.save_model(str(folder))
        tokenizer.save_pretrained(str(folder))

    return write_atomically(Path(trainer.args.output_dir) / FINAL_DIR, write)


def write_atomically(final: Path, write: Callable[[Path], None]) -> Path:
    """Have `write` fill a temporary folder, then rename it to `final`.

    A run cut off while saving (a Colab disconnect, a full disk) leaves no
    half-written model where a user would load one.
    """
    import shutil

    partial = final.parent / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    old = final.parent / f".{final.name}.old"
    try:
        write(partial)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(partial, final)
    except BaseException as e:
        shutil.rmtree(partial, ignore_errors=True)
        if not is_disk_full(e):
            raise
        raise TrainingFailed(
            f"Saving to {final} failed: {e}. Nothing half-written was left there.\n"
            "Free disk space (or choose an --output_dir on a bigger disk), then resume with "
            f"--resume_from_checkpoint {latest_complete_checkpoint(final.parent) or 'latest'}."
        ) from e
    shutil.rmtree(old, ignore_errors=True)
    return final


def is_disk_full(error) -> bool:
    """A full disk, as the savers report it: OSError(ENOSPC), safetensors' SafetensorError
    ('... No space left on device (os error 28)') or torch.save's RuntimeError ('unexpected pos')."""
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        text = str(error)
        if "No space left on device" in text or "os error 28" in text:
            return True
        if type(error) is RuntimeError and ("unexpected pos" in text or "file write failed" in text):
            return True
        error = error.__cause__ or error.__context__
    return False


def _make_stop_on_nonfinite_loss():
    from transformers import TrainerCallback

    class StopOnNonFiniteLoss(TrainerCallback):
        """Stop at the first logged NaN/inf loss instead of burning GPU hours on a run that learns nothing."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            grad_norm = (logs or {}).get("grad_norm")
            # With fp16 the loss scaler skips steps whose gradients overflow, and lowers its
            # scale: an inf grad_norm there is routine. Elsewhere it means the weights are ruined.
            if grad_norm is not None and not math.isfinite(grad_norm) and not args.fp16:
                loss = grad_norm if loss is None or math.isfinite(loss) else loss
            if loss is None or math.isfinite(loss):
                return
            checkpoint = latest_complete_checkpoint(args.output_dir)
            raise TrainingFailed(
                f"The training loss became {loss} at step {state.global_step}: the model's numbers overflowed or "
                "diverged, and every step from here on would be wasted.\n"
                "Fix, in order: lower --learning_rate (by 2-10x); keep --max_grad_norm at 1.0 or below; on a GPU "
                "without bfloat16 (T4, V100) keep the default fp16 path (do not load the model in float16 yourself); "
                "check the data for very long or garbled records.\n"
                + (f"The last good checkpoint is {checkpoint}." if checkpoint else "No checkpoint was saved yet.")
            )

    return StopOnNonFiniteLoss


def train(trainer, resume_from_checkpoint=None):
    """trainer.train() with the guards: a NaN loss stops it, an out-of-memory error says which settings to lower."""
    import torch

    trainer.add_callback(_make_stop_on_nonfinite_loss()())
    args = trainer.args
    # The Trainer's default filter logs a NaN step's loss as the running average (0.0 on
    # the first step), which hides exactly what the guard looks for.
    args.logging_nan_inf_filter = False
    try:
        return trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    except torch.OutOfMemoryError as e:
        checkpoint = latest_complete_checkpoint(args.output_dir)
        raise TrainingFailed(
            "The GPU ran out of memory "
            f"(batch {args.per_device_train_batch_size}, gradient checkpointing "
            f"{'on' if args.gradient_checkpointing else 'off'}).\n"
            "Fix, one at a time: halve --per_device_train_batch_size and double --gradient_accumulation_steps "
            "(the same effective batch); lower --max_seq_length; turn on --gradient_checkpointing; or let "
            "--auto_find_batch_size find the largest batch that fits.\n"
            + (
                f"Resume with --resume_from_checkpoint {checkpoint}"
                if checkpoint
                else "No checkpoint was saved yet; the run starts over."
            )
        ) from e
    except Exception as e:
        if not is_disk_full(e):
            raise
        raise TrainingFailed(
            f"The disk filled up while saving a checkpoint to {args.output_dir}: {e}.\n"
            "Free space, keep fewer checkpoints (--save_total_limit 1) or save less often (--save_steps), then "
            f"resume with --resume_from_checkpoint {latest_complete_checkpoint(args.output_dir) or 'latest'} "
            "(a checkpoint cut off by the full disk is never taken as the latest)."
        ) from e


# ---------------------------------------------------------------------------
# Data preparation around SFTTrainer: eval split, response-only loss, length checks
# ---------------------------------------------------------------------------


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


def is_plain_text(records) -> bool:
    return "text" in records.column_names


def completion_only_collator(tokenizer, data_args: DataArguments, records):
    """trl's collator that masks everything but the model turns, or None where the whole text trains.

    The templates are Gemma's turn openings; every token after `<start_of_turn>model`
    up to the next `<start_of_turn>user` is learnt, so multi-turn chats learn every answer.
    """
    from trl import DataCollatorForCompletionOnlyLM

    if not data_args.completion_only_loss or is_plain_text(records):
        if data_args.completion_only_loss:
            logger.info("Plain-text data has no prompt to mask: the loss covers every token.")
        return None
    if data_args.packing:
        raise UserInputError(
            "--packing cannot be combined with the response-only loss: trl 0.8.6 packs records into fixed-length "
            "blocks that cut through prompts and answers, and its response-only collator cannot mask them reliably. "
            "Choose one: --packing with --completion_only_loss false, or no --packing."
        )
    return DataCollatorForCompletionOnlyLM(
        response_template=tokenizer.encode(MODEL_TURN_START, add_special_tokens=False),
        instruction_template=tokenizer.encode(USER_TURN.split("{")[0], add_special_tokens=False),
        tokenizer=tokenizer,
    )


def token_lengths(records, tokenizer) -> list[int]:
    texts = [format_example(record) for record in records]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]


def check_lengths(records, tokenizer, max_seq_length: int, source: str) -> list[int]:
    """Stop when every record is longer than --max_seq_length; warn how many will be cut otherwise."""
    lengths = token_lengths(records, tokenizer)
    too_long = sum(length > max_seq_length for length in lengths)
    if too_long == len(lengths):
        raise UserInputError(
            f"Every record of {source} is longer than --max_seq_length {max_seq_length} tokens (the shortest has "
            f"{min(lengths)}): each would be cut, most answers lost. Raise --max_seq_length "
            f"(e.g. --max_seq_length {_round_up(min(lengths))}) or shorten the records."
        )
    if too_long:
        logger.warning(
            "%d of %d records are longer than --max_seq_length %d tokens and will be cut.",
            too_long, len(lengths), max_seq_length,
        )
    return lengths


def _round_up(length: int) -> int:
    return 1 << max(length - 1, 1).bit_length()


def check_trainable_labels(tokenized, collator, source: str) -> None:
    """After tokenization: every example must keep some answer tokens, or training would see a zero loss."""
    if collator is None:
        return
    template = list(collator.response_token_ids)
    width = len(template)
    without = 0
    for ids in tokenized["input_ids"]:
        # A template that ends the sequence leaves no answer token after it.
        found = any(
            token == template[0] and ids[i : i + width] == template
            for i, token in enumerate(ids[: len(ids) - width])
        )
        if not found:  # the answer was cut off (or there is none): every label would be masked
            without += 1
    if without == len(tokenized):
        raise UserInputError(
            f"In every example of {source} the answer lies past --max_seq_length (or is missing), so the "
            "response-only loss would mask every token and train on nothing. Raise --max_seq_length, shorten the "
            "prompts, or learn the whole text with --completion_only_loss false."
        )
    if without:
        logger.warning(
            "%d of %d examples lose their whole answer to --max_seq_length and will teach nothing.",
            without, len(tokenized),
        )


def dry_run_report(records, tokenizer, collator, data_args: DataArguments, training_args) -> dict:
    """What training would see, without loading the model: logged, and returned for tests."""
    import statistics

    lengths = token_lengths(records, tokenizer)
    ordered = sorted(lengths)
    stats = {
        "records": len(lengths),
        "min": ordered[0],
        "median": int(statistics.median(ordered)),
        "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "max": ordered[-1],
        "longer_than_max_seq_length": sum(length > data_args.max_seq_length for length in lengths),
        "effective_batch_size": training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
        * max(1, training_args.world_size),
    }
    batching = f"Effective batch size: {stats['effective_batch_size']}."
    if data_args.max_tokens_per_batch and data_args.padding_free:
        import speed

        # The same packing training will do; longer records count as cut to one row, as training cuts them.
        row_tokens = data_args.max_seq_length
        rows = speed.pack_into_rows(lengths, row_tokens)
        fill = speed.row_fill(lengths, rows, row_tokens)
        micro_batches = math.ceil(len(rows) / max(1, data_args.max_tokens_per_batch // row_tokens))
        stats["optimizer_steps_per_epoch"] = math.ceil(micro_batches / training_args.gradient_accumulation_steps)
        batching = (
            f"Packed without padding: {len(rows)} rows of {row_tokens} tokens ({100 * fill:.1f}% real tokens), "
            f"{data_args.max_tokens_per_batch:,} tokens a micro-batch: {stats['optimizer_steps_per_epoch']} optimizer "
            f"steps per epoch at accumulation {training_args.gradient_accumulation_steps}."
        )
    examples = [render_with_mask(record, tokenizer, collator, data_args.max_seq_length) for record in records.select(range(min(2, len(records))))]
    logger.info(
        "Dry run (no model loaded):\n%s\n"
        "Token lengths: min %d, median %d, 95th percentile %d, max %d; %d of %d records longer than "
        "--max_seq_length %d.\n%s",
        "\n".join(f"--- example {i} ({'⟦masked⟧ = not learnt' if collator else 'every token learnt'}) ---\n{text}"
                  for i, text in enumerate(examples)),
        stats["min"], stats["median"], stats["p95"], stats["max"], stats["longer_than_max_seq_length"],
        stats["records"], data_args.max_seq_length, batching,
    )
    return {**stats, "examples": examples}


def render_with_mask(record, tokenizer, collator, max_seq_length: int) -> str:
    """The example as the model sees it, with the tokens left out of the loss inside ⟦ ⟧."""
    ids = tokenizer(format_example(record), truncation=True, max_length=max_seq_length)["input_ids"]
    if collator is None:
        return tokenizer.decode(ids)
    labels = collator([{"input_ids": ids}])["labels"][0].tolist()
    pieces, run, masked = [], [], None
    for token, label in zip(ids, labels):
        is_masked = label == -100
        if masked is not None and is_masked != masked:
            pieces.append((masked, run))
            run = []
        run.append(token)
        masked = is_masked
    pieces.append((masked, run))
    return "".join(f"⟦{tokenizer.decode(run)}⟧" if is_masked else tokenizer.decode(run) for is_masked, run in pieces)


# ---------------------------------------------------------------------------
# Results to look at: samples, metrics, the loss curve
# ---------------------------------------------------------------------------


def generate_samples(model, tokenizer, records, count: int, max_new_tokens: int) -> list[dict]:
    """Greedy answers to the first `count` prompts: written to samples.md before and after training."""
    import torch

    was_training = model.training
    model.eval()
    samples = []
    for record in records.select(range(min(count, len(records)))):
        prompt = format_prompt(record)
        inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
        with torch.no_grad():
            output = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
            )
        answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        samples.append({"prompt": prompt, "answer": answer})
    model.train(was_training)
    return samples


def check_saved_model(load, final: Path, run: "Run", what: str) -> None:
    """The smoke run's last step: what was saved loads back and generates."""
    import torch

    reloaded = load(final, dtype=torch.float32)
    sample = generate_samples(reloaded, run.tokenizer, run.records, 1, run.report_args.sample_max_new_tokens)[0]
    logger.info("Smoke run passed: the saved %s loads and generates: %r", what, sample["answer"])


def write_reports(trainer, eval_records, samples_before: list[dict], samples_after: list[dict]) -> dict:
    """metrics.json, loss_curve.png and samples.md in the output directory; returns the metrics."""
    output_dir = Path(trainer.args.output_dir)
    metrics = {key: value for key, value in trainer.state.log_history[-1].items() if key.startswith("train_")}
    if eval_records is not None:
        evaluation = trainer.evaluate()
        metrics.update(evaluation)
        metrics["eval_perplexity"] = math.exp(min(evaluation["eval_loss"], 50.0))
        logger.info("Eval loss %.4f, perplexity %.2f", evaluation["eval_loss"], metrics["eval_perplexity"])
    metrics["global_step"] = trainer.state.global_step
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_loss_curve(trainer.state.log_history, output_dir / "loss_curve.png")
    if samples_after:
        lines = ["# Samples: the same prompts before and after training (greedy decoding)\n"]
        for index, (before, after) in enumerate(zip(samples_before, samples_after)):
            lines += [
                f"## Prompt {index}\n", "```", before["prompt"].rstrip(), "```\n",
                "**Before:**\n", "```", before["answer"], "```\n", "**After:**\n", "```", after["answer"], "```\n",
            ]
        (output_dir / "samples.md").write_text("\n".join(lines))
    return metrics


def plot_loss_curve(log_history: Sequence[Mapping[str, Any]], path: Path) -> bool:
    """Train (and eval) loss against the step, as a PNG; False where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on Colab's workers or in CI
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: no loss_curve.png (pip install matplotlib).")
        return False
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evaluation = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    figure, axes = plt.subplots(figsize=(7, 4))
    if train:
        axes.plot(*zip(*train), label="train loss")
    if evaluation:
        axes.plot(*zip(*evaluation), "o-", label="eval loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def default_report_to() -> str:
    """TensorBoard logs where tensorboard is installed (Colab has it), none otherwise."""
    from importlib.util import find_spec

    return "tensorboard" if find_spec("tensorboard") is not None else "none"


# ---------------------------------------------------------------------------
# The steps both scripts take around their own model and optimizer
# ---------------------------------------------------------------------------


@dataclass
class Run:
    """Everything a script has settled before its model loads."""

    model_args: ModelArguments
    data_args: DataArguments
    report_args: ReportArguments
    training_args: Any
    script_args: Any
    precision: Precision
    resume_from: Optional[str]
    records: Any
    eval_records: Any
    model_path: str
    tokenizer: Any
    collator: Any


def prepare_run(script_arguments: type, argv: Sequence[str], defaults: Mapping[str, Any], gpu_feature: str) -> Run:
    """Parse and check every input, load data and tokenizer: all that can fail before the model costs anything."""
    from transformers import TrainingArguments

    model_args, data_args, report_args, script_args, training_args = parse_arguments(
        (ModelArguments, DataArguments, ReportArguments, script_arguments, TrainingArguments),
        argv,
        {"report_to": default_report_to(), **defaults},
    )
    check_training_arguments(training_args)
    if model_args.smoke:
        training_args = apply_smoke_settings(training_args)
    elif not report_args.dry_run:
        require_cuda(gpu_feature)
    resume_from = None if report_args.dry_run else prepare_output_dir(training_args)
    use_colab_token()
    precision = choose_precision(training_args, on_cpu=model_args.smoke or report_args.dry_run)
    training_args = dataclasses.replace(training_args, bf16=precision.bf16, fp16=precision.fp16)
    if training_args.eval_strategy == "no" and (data_args.eval_split_ratio or data_args.eval_file):
        logger.info("Evaluation data given and --eval_strategy no: evaluating once, after training.")
    logger.info("Environment: %s", environment_summary())

    # Data first: a bad record should not cost a model download.
    records, eval_records = load_train_and_eval(data_args, training_args.seed)
    model_path = model_args.model_name_or_path
    if model_args.smoke:
        model_path = str(smoke_model(Path(training_args.output_dir).resolve(), records))
    tokenizer = load_tokenizer(model_path, model_args.trust_remote_code)
    collator = completion_only_collator(tokenizer, data_args, records)
    source = data_args.dataset_name or str(DEFAULT_DATASET_FILE)
    if report_args.dry_run:
        dry_run_report(records, tokenizer, collator, data_args, training_args)
    else:
        check_lengths(records, tokenizer, data_args.max_seq_length, source)
    return Run(model_args, data_args, report_args, training_args, script_args, precision, resume_from, records,
               eval_records, model_path, tokenizer, collator)


def sft_inputs(run: Run) -> dict:
    """SFTTrainer's data arguments, the same for both scripts."""
    return dict(
        args=run.training_args,
        train_dataset=run.records,
        eval_dataset=run.eval_records,
        tokenizer=run.tokenizer,
        formatting_func=formatting_func,
        max_seq_length=run.data_args.max_seq_length,
        packing=run.data_args.packing,
        data_collator=run.collator,
    )


def prepare_numerics(model, precision: Precision) -> None:
    """The chunked loss; fused RMSNorms, keeping the residual stream in fp32 where training runs in fp16."""
    import speed

    use_chunked_loss(model)
    speed.fuse_rms_norms(model, fp32_residual=precision.fp16)


def train_and_save(trainer, run: Run) -> Path:
    """Samples before, training with the guards, the final save, samples after, metrics and the loss curve."""
    source = run.data_args.dataset_name or str(DEFAULT_DATASET_FILE)
    if not run.data_args.packing:
        check_trainable_labels(trainer.train_dataset, run.collator, source)
    count, length = run.report_args.num_sample_prompts, run.report_args.sample_max_new_tokens
    sample_records = run.eval_records if run.eval_records is not None else run.records
    before = generate_samples(trainer.model, run.tokenizer, sample_records, count, length) if count else []
    train(trainer, run.resume_from)
    final = save_final(trainer, run.tokenizer)
    after = generate_samples(trainer.model, run.tokenizer, sample_records, count, length) if count else []
    write_reports(trainer, run.eval_records, before, after)
    logger.info("Saved to %s; metrics.json, loss_curve.png and samples.md in %s", final, trainer.args.output_dir)
    return final


# ---------------------------------------------------------------------------
# Batching by tokens
# ---------------------------------------------------------------------------


class TokenBudgetBatchSampler:
    """Batches of records of similar length, each within a budget of padded tokens.

    Every training step costs the GPU a fixed amount of launch overhead (about 0.7 s
    for gemma-3-1b on an H100, bench/RESULTS.md) whatever its size; short
    instruction records in fixed-size batches leave it idle. The batches are formed
    once (a seeded shuffle, then length-sorted windows cut greedily to the budget),
    so their count is exact for the scheduler; only their order changes per epoch.
    The fullest batch comes first, so an out-of-memory error shows at step 1.
    """

    def __init__(self, lengths: Sequence[int], max_tokens: int, seed: int = 0, window: int = 1024):
        import random

        order = list(range(len(lengths)))
        random.Random(seed).shuffle(order)
        self.batches = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: lengths[i], reverse=True)
            batch, longest = [], 0
            for index in chunk:
                if batch and max(longest, lengths[index]) * (len(batch) + 1) > max_tokens:
                    self.batches.append(batch)
                    batch, longest = [], 0
                batch.append(index)
                longest = max(longest, lengths[index])
            if batch:
                self.batches.append(batch)
        self.padded_tokens = [max(lengths[i] for i in b) * len(b) for b in self.batches]
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        import random

        order = list(range(len(self.batches)))
        random.Random(self.seed * 1000003 + self.epoch).shuffle(order)
        fullest = max(order, key=lambda i: self.padded_tokens[i])
        order.remove(fullest)
        for index in [fullest, *order]:
            yield self.batches[index]


def trainer_class(run: "Run"):
    """SFTTrainer, or a subclass that batches by tokens when --max_tokens_per_batch is given."""
    from trl import SFTTrainer

    max_tokens = run.data_args.max_tokens_per_batch
    if max_tokens is None:
        logger.info(
            "Batches of %d records, each padded to the longest. On short records, --max_tokens_per_batch 8192 "
            "(packed, no padding) trains many times faster: README.md, 'Speed'.", run.training_args.per_device_train_batch_size,
        )
        return SFTTrainer
    if run.data_args.packing:
        raise UserInputError("--max_tokens_per_batch and --packing both set the batch shape: choose one.")
    row_tokens = run.data_args.max_seq_length

    class TokenBudgetSFTTrainer(SFTTrainer):
        def get_train_dataloader(self):
            from torch.utils.data import DataLoader

            dataset = self._remove_unused_columns(self.train_dataset, description="training")
            lengths = [len(ids) for ids in dataset["input_ids"]]
            if run.data_args.padding_free:
                import speed

                features = dataset.to_list()
                rows = speed.pack_into_rows(lengths, row_tokens)
                data = speed.packed_rows(features, speed.record_labels(features, run.collator), rows)
                sampler = speed.PackedBatches(len(data), max(1, max_tokens // row_tokens), self.args.seed)
                collate = speed.pad_rows(self.tokenizer.pad_token_id, row_tokens)
                speed.use_varlen_attention()
                logger.info(
                    "Padding-free batches: %d records packed into %d rows of %d tokens (%.1f%% filled), "
                    "%d rows a batch.", len(lengths), len(rows), row_tokens,
                    100 * speed.row_fill(lengths, rows, row_tokens), sampler.rows_per_batch,
                )
            else:
                data, collate = dataset, self.data_collator
                sampler = TokenBudgetBatchSampler(lengths, max_tokens, self.args.seed)
                logger.info(
                    "Batching by tokens: %d batches of up to %d padded tokens (mean %.1f records a batch).",
                    len(sampler), max_tokens, len(dataset) / len(sampler),
                )
            loader = DataLoader(
                data, batch_sampler=sampler, collate_fn=collate,
                num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory,
            )
            return self.accelerator.prepare(loader)

    return TokenBudgetSFTTrainer
