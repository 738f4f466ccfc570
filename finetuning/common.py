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
        default="eager",
        metadata={"help": "Attention kernel: 'eager' (recommended for Gemma 3 training), 'sdpa' or 'flash_attention_2'."},
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

    def __post_init__(self):
        if self.max_seq_length < 16:
            raise UserInputError(
                f"--max_seq_length {self.max_seq_length} is too small: a prompt and an answer need at least "
                "a few dozen tokens. Use 512 to 2048."
            )
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise UserInputError(f"--max_train_samples must be 1 or more, got {self.max_train_samples}.")


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
        if flag in RENAMED_FLAGS:
            raise UserInputError(f"{flag} is not a flag of this toolkit: use {RENAMED_FLAGS[flag]} instead.")
    parser = Parser(dataclass_types)
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
        return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except ValueError as e:
        if isinstance(e, UserInputError):
            raise
        raise UserInputError(f"{e}. Run with --help to list every flag.") from e


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


def load_records(data_args: DataArguments) -> "datasets.Dataset":
    """The training records: the shipped default, a local file, or a hub data set; checked before returning."""
    import datasets

    source = data_args.dataset_name
    if source is None:
        dataset = _load_local_file(DEFAULT_DATASET_FILE)
    elif Path(source).suffix.lower() in DATA_FILE_BUILDERS or Path(source).exists():
        dataset = _load_local_file(Path(source))
    else:
        try:
            dataset = datasets.load_dataset(source, split=data_args.dataset_split)
        except (FileNotFoundError, ConnectionError, ValueError, OSError) as e:
            raise UserInputError(
                f"--dataset_name {source!r} is neither a local file nor a data set that could be loaded from the "
                f"hub ({type(e).__name__}: {e}). Give a path to a .json/.jsonl/.csv/.parquet file, or a hub id "
                "such as yahma/alpaca-cleaned."
            ) from e
    validate_records(dataset, source or str(DEFAULT_DATASET_FILE))
    dataset = drop_empty_records(dataset, source or str(DEFAULT_DATASET_FILE))
    if data_args.max_train_samples is not None:
        dataset = dataset.select(range(min(data_args.max_train_samples, len(dataset))))
    return dataset


def drop_empty_records(dataset: "datasets.Dataset", source: str) -> "datasets.Dataset":
    """Real data sets hold a few records with a blank instruction or answer: skip them, say so, and fail if none are left."""
    keep, skipped = [], []
    for index, record in enumerate(dataset):
        blank = not record[INSTRUCTION_FIELD].strip() or not record[OUTPUT_FIELD].strip()
        (skipped if blank else keep).append(index)
    if not keep:
        raise UserInputError(
            f"Every record of {source} has an empty 'instruction' or 'output': nothing is left to train on."
        )
    if skipped:
        logger.warning(
            "Skipped %d record(s) of %s with an empty 'instruction' or 'output' (the first: record %d).",
            len(skipped), source, skipped[0],
        )
        dataset = dataset.select(keep)
    return dataset


def _load_local_file(path: Path) -> "datasets.Dataset":
    import datasets

    suffix = path.suffix.lower()
    if not path.is_file():
        raise UserInputError(f"--dataset_name: the file {path} does not exist.")
    if suffix not in DATA_FILE_BUILDERS:
        raise UserInputError(
            f"--dataset_name: {path} has the suffix {suffix!r}; give a .json, .jsonl, .csv or .parquet file."
        )
    if path.stat().st_size == 0:
        raise UserInputError(f"--dataset_name: {path} is empty; it needs instruction/input/output records.")
    if suffix in (".json", ".jsonl"):
        # Parsed and checked here rather than by datasets' Arrow reader, whose errors name
        # neither the line nor the field. Columns are named explicitly: from_list takes
        # them from the first record alone, dropping an 'input' that record 0 lacks.
        records = _read_json_records(path)
        validate_records(records, str(path))
        return datasets.Dataset.from_dict(
            {name: [record.get(name) for record in records] for name in (INSTRUCTION_FIELD, INPUT_FIELD, OUTPUT_FIELD)}
        )
    try:
        dataset = datasets.load_dataset(DATA_FILE_BUILDERS[suffix], data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001 - pyarrow and pandas raise many unrelated types for a bad file
        raise UserInputError(f"--dataset_name: {path} could not be read as {suffix[1:]}: {e}") from e
    return dataset


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
    """Every record has a non-empty string instruction and output, and a string (or absent) input."""
    count = 0
    for index, record in enumerate(records):
        count += 1
        for name in (INSTRUCTION_FIELD, OUTPUT_FIELD):
            value = record.get(name)
            if value is None:
                raise UserInputError(
                    f"Record {index} of {source} has no {name!r} field (fields: {sorted(record)}). "
                    "Each record needs 'instruction' and 'output', and may have 'input'."
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
    """The user turn and the opening of the model turn: what generation starts from."""
    return USER_TURN.format(prompt=_prompt_text(record)) + MODEL_TURN_START


def format_record(record: Mapping[str, Any]) -> str:
    """One instruction record as a Gemma chat exchange, without <bos> (the tokenizer adds it)."""
    return USER_TURN.format(prompt=_prompt_text(record)) + MODEL_TURN.format(response=record[OUTPUT_FIELD].strip())


def _prompt_text(record: Mapping[str, Any]) -> str:
    prompt = record[INSTRUCTION_FIELD].strip()
    extra = (record.get(INPUT_FIELD) or "").strip()
    return f"{prompt}\n\n{extra}" if extra else prompt


def formatting_func(examples: Mapping[str, Any]) -> "list[str] | str":
    """SFTTrainer's formatting function, for both ways trl 0.8.6 calls it.

    Unpacked, trl maps over batches and passes a dict of lists: it must get a list
    of strings back. Packed (ConstantLengthDataset), it passes one record and
    expects one string.
    """
    instructions = examples[INSTRUCTION_FIELD]
    if isinstance(instructions, str):
        return format_record(examples)
    inputs = examples.get(INPUT_FIELD) or [None] * len(instructions)
    return [
        format_record({INSTRUCTION_FIELD: i, INPUT_FIELD: x, OUTPUT_FIELD: o})
        for i, x, o in zip(instructions, inputs, examples[OUTPUT_FIELD])
    ]


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


def model_load_error(model_name_or_path: str, error: Exception) -> UserInputError:
    return UserInputError(_model_not_found_message(model_name_or_path, error))


def count_parameters(model: "torch.nn.Module") -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def log_settings(script: str, training_args, precision: Precision, model, extra: Mapping[str, Any]) -> None:
    """One block with what a user needs to know about the run they started."""
    trainable, total = count_parameters(model)
    effective_batch = (
        training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
        * max(1, training_args.world_size)
    )
    lines = [
        f"{script} settings:",
        f"  precision: {precision.name} ({precision.reason})",
        f"  effective batch size: {effective_batch} = {training_args.per_device_train_batch_size} per device"
        f" x {training_args.gradient_accumulation_steps} accumulation x {max(1, training_args.world_size)} device(s)",
        f"  trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)",
        f"  learning rate: {training_args.learning_rate}, optimizer: {extra.get('optimizer', getattr(training_args.optim, 'value', training_args.optim))}",
        f"  gradient checkpointing: {training_args.gradient_checkpointing}",
        f"  output: {training_args.output_dir}",
    ]
    lines += [f"  {k}: {v}" for k, v in extra.items() if k != "optimizer"]
    logger.info("\n".join(lines))


def generate_sample(model, tokenizer, prompt_record: Mapping[str, Any], max_new_tokens: int = 8) -> str:
    """Greedy reply to one prompt; the smoke run's proof that the saved model works."""
    import torch

    inputs = tokenizer(format_prompt(prompt_record), return_tensors="pt").to(model.device)
    with torch.no_grad():
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


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
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
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
    texts = [format_record(record) for record in records]
    return build_random_gemma(Path(output_dir) / "smoke_base_model", texts)


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
    import types

    import torch

    def forward(self, x):
        output = self._norm(x.float()) * (1.0 + self.weight.float())
        return output.to(torch.promote_types(x.dtype, self.weight.dtype))

    changed = 0
    for module in model.modules():
        if type(module).__name__ == "Gemma3RMSNorm":
            module.forward = types.MethodType(forward, module)
            changed += 1
    return changed


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
    return _ChunkedCrossEntropy.apply(
        shift_hidden.index_select(0, kept), weight, shift_labels.index_select(0, kept), softcap, divisor, chunk_tokens
    )


def _make_chunked_cross_entropy():
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
            for start in range(0, hidden.shape[0], chunk_tokens):
                h = hidden[start : start + chunk_tokens].to(compute_dtype)
                target = labels[start : start + chunk_tokens]
                logits = (h @ weight_c.T).float()
                if softcap:
                    capped = torch.tanh(logits / softcap)
                    logits = capped * softcap
                log_normaliser = torch.logsumexp(logits, dim=-1)
                total += (log_normaliser - logits.gather(1, target[:, None]).squeeze(1)).sum()
                if not (need_hidden_grad or need_weight_grad):
                    continue
                # d(loss)/d(logits) = softmax - one_hot, computed in place over the logits.
                grad_logits = logits.sub_(log_normaliser[:, None]).exp_()
                grad_logits[torch.arange(target.shape[0], device=target.device), target] -= 1
                if softcap:
                    grad_logits *= 1 - capped * capped
                grad_logits = grad_logits.to(compute_dtype)
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


class _LazyFunction:
    """Defers building the autograd Function until first use, so importing this module needs no torch."""

    def __init__(self, factory):
        self._factory, self._function = factory, None

    def apply(self, *args):
        if self._function is None:
            self._function = self._factory()
        return self._function.apply(*args)


_ChunkedCrossEntropy = _LazyFunction(_make_chunked_cross_entropy)


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
    """Write the trained model and tokenizer to OUTPUT_DIR/final, all or nothing.

    They go to a temporary folder first, renamed into place once complete: a run cut
    off while saving leaves no half-written model where a user would load one.
    """
    import shutil

    output_dir = Path(trainer.args.output_dir)
    final = output_dir / FINAL_DIR
    partial = output_dir / f".{FINAL_DIR}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        trainer.save_model(str(partial))
        tokenizer.save_pretrained(str(partial))
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise TrainingFailed(
            f"Saving the final model to {final} failed: {e}. Nothing half-written was left there.\n"
            "Free disk space (or choose an --output_dir on a bigger disk), then resume with "
            f"--resume_from_checkpoint {latest_complete_checkpoint(output_dir) or 'latest'}."
        ) from e
    return final


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
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise TrainingFailed(
            f"The disk filled up while saving a checkpoint to {args.output_dir}: {e}.\n"
            "Free space, keep fewer checkpoints (--save_total_limit 1) or save less often (--save_steps), then "
            f"resume with --resume_from_checkpoint {latest_complete_checkpoint(args.output_dir) or 'latest'} "
            "(a checkpoint cut off by the full disk is never taken as the latest)."
        ) from e
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
