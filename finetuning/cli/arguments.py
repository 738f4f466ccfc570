"""The arguments both scripts take: the dataclasses of the toolkit's own flags, the training defaults both scripts
share, and the checks that span several flags. parsing.py turns a command line (or a config file) into them."""
from __future__ import annotations

import importlib.util
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Optional

from transformers import TrainingArguments

from cli.errors import UserInputError
from cli.fast_path_flag import SWITCHES, parse_fast_path

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "google/gemma-3-1b-it"
DATA_FORMATS = ("auto", "alpaca", "chat", "sharegpt", "text")

# Tokens per GPU a step given no batch flag, by script: (GPUs under LARGE_GPU_GIB of memory, GPUs with LARGE_GPU_GIB or
# more); training/auto_batch.py applies them. Each fits its tier with room under T4 emulation and on an H100 for
# gemma-3-270m and -1b, and at 32768 a step is bound by the GPU, so more tokens buy little (docs/benchmarks.md).
LARGE_GPU_GIB = 20
TOKEN_BUDGETS = {"QLoRA": (8192, 32768), "GaLore": (4096, 32768)}
# A small data set still gets a learning-rate schedule (warm-up, cosine decay) and a loss curve worth reading.
MIN_STEPS_PER_EPOCH = 32
BATCH_FLAGS = frozenset({"max_tokens_per_batch", "per_device_train_batch_size", "gradient_accumulation_steps",
                         "packing", "padding_free", "auto_find_batch_size"})  # given none, auto_batch.py chooses


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default=DEFAULT_MODEL,
        metadata={"help": "A hub id or a local folder with a Gemma 3 (config.json + weights): google/gemma-3-270m, "
                  "-1b, -4b, -12b or -27b, -it or -pt. 4b and up are multimodal: text-only training trains their "
                  "language model (docs/usage.md, 'Model sizes')."},
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
    compile_layers: str = field(
        default="auto",
        metadata={"help": "torch.compile each decoder layer: fewer, fused GPU kernels. A run with an empty compile "
                  "cache (a fresh Colab session) waits for the compiler (a first step 33-38 s after loading on one "
                  "H100, timed with a graph for each kind of layer); later runs on the machine, and runs resumed from "
                  "the output folder, read what it compiled. 'auto' (on for packed batches on an NVIDIA GPU of "
                  "compute capability 8.0 or newer), 'yes' or 'no'."},
    )
    offload_activations: str = field(
        default="auto",
        metadata={"help": "Keep each checkpointed layer input in pinned CPU memory until the backward pass: less GPU "
                  "memory. 'auto' (on a GPU, one process, packed batches, checkpointing on), 'yes' or 'no'."},
    )
    fast_path: str = field(
        default="all",
        metadata={"help": "The toolkit's overrides of library internals that make training fast: 'all', 'none' (the "
                  "stock trl/peft/transformers path; four fixes stay on), or a comma list: names turn a switch on, "
                  "-name off, e.g. all,-compile_layers. Switches: " + ", ".join(SWITCHES) + " (docs/architecture.md)."},
    )

    def __post_init__(self):
        parse_fast_path(self.fast_path)  # an unknown switch is refused while parsing
        if not str(self.model_name_or_path).strip():
            raise UserInputError(f"--model_name_or_path is empty ({self.model_name_or_path!r}): give a hub id such as "
                                 f"{DEFAULT_MODEL} or a local model folder, or leave the flag out for {DEFAULT_MODEL}.")
    smoke: bool = field(
        default=False,
        metadata={
            "help": "Run the whole pipeline on the CPU with a tiny random Gemma 3 (no download, under a minute): "
            "load, format, train a few steps, save, reload, generate. Writes to its own folder unless --output_dir "
            "is given on the command line, and never replaces a run it did not write. With --model_name_or_path "
            "naming a multimodal size (google/gemma-3-4b-it, -12b, -27b), the tiny model is of that class, "
            "Gemma3ForConditionalGeneration (a tiny vision tower beside the language model)."
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
        metadata={"help": "Batch by tokens: a micro-batch holds as many records as fit this many tokens, spreading "
                  "a step's fixed cost over many short records (--per_device_train_batch_size is ignored). Default, "
                  f"given no batch flag ({', '.join('--' + f for f in sorted(BATCH_FLAGS))}): packed rows, "
                  f"{TOKEN_BUDGETS['QLoRA'][1]} tokens on a GPU of {LARGE_GPU_GIB} GiB or more, "
                  f"{TOKEN_BUDGETS['QLoRA'][0]} (QLoRA) or {TOKEN_BUDGETS['GaLore'][0]} (GaLore) below; fewer "
                  f"where an epoch would have < {MIN_STEPS_PER_EPOCH} steps or the model's memory estimate says so."},
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
    drop_duplicates: bool = field(
        default=False,
        metadata={"help": "Drop training records that repeat an earlier one, exactly or nearly (the data doctor's "
                  "duplicates, data_report.md); the first of each stays."},
    )
    drop_eval_overlap: bool = field(
        default=False,
        metadata={"help": "Drop evaluation records that are also in the training data, exactly or nearly: they "
                  "make the eval loss and the report card look better than the model is."},
    )
    auto_batch: bool = field(default=False, init=False)  # not a flag: set by parse_arguments, read by auto_batch.py

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
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise UserInputError(f"--max_train_samples must be 1 or more, got {self.max_train_samples}.")
        for flag, what in (("dataset_name", "a data file (.json, .jsonl, .csv, .parquet) or a hub data set id, or "
                                            "leave the flag out to train on the toolkit's default data"),
                           ("eval_file", "a file of evaluation records, or leave the flag out")):
            value = getattr(self, flag)
            if value is not None and not value.strip():  # Path("") is the current folder: ". is a directory"
                raise UserInputError(f"--{flag} is empty ({value!r}): give {what}.")

    @property
    def packs_without_padding(self) -> bool:
        """Batches of packed rows, each record attending only to itself (variable-length attention)."""
        return self.max_tokens_per_batch is not None and self.padding_free


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
    report_card_prompts: int = field(
        default=100,
        metadata={"help": "Prompts of the report card (report_card.md): held-out prompts answered by the base and the "
                  "trained model, scored against the data's answers. From the eval records (--eval_split_ratio, "
                  "--eval_file), else the first training records. 0: no report card."},
    )
    report_card_max_new_tokens: int = field(
        default=256,
        metadata={"help": "Token limit of each report-card answer: an answer that has not ended its turn by then "
                  "counts as not stopping."},
    )
    time_budget: Optional[str] = field(
        default=None,
        metadata={"help": "How long this run may take from its start, e.g. 80m, 1h30m, 45m (free Colab ends a "
                  "session after a few hours), model loading included. Training stops early enough to save a "
                  "checkpoint (a minute is kept for the first one, then the time the last one took, and two of the "
                  "slowest steps), then prints the command that resumes it; the log says at the start what the "
                  "budget leaves for training. A budget of a minute or two trains a step or so per session."},
    )

    def __post_init__(self):
        if self.time_budget is not None:
            self.time_budget_seconds  # refuses a malformed budget while parsing
        if self.num_sample_prompts < 0:
            raise UserInputError(f"--num_sample_prompts must be 0 (no samples) or more, got {self.num_sample_prompts}.")
        if self.sample_max_new_tokens < 1:
            raise UserInputError(
                f"--sample_max_new_tokens must be 1 or more, got {self.sample_max_new_tokens}: each sample answer "
                "needs a token. For no samples at all, give --num_sample_prompts 0.")
        if self.report_card_prompts < 0 or self.report_card_max_new_tokens < 1:
            raise UserInputError(
                f"--report_card_prompts must be 0 (no report card) or more and --report_card_max_new_tokens 1 or "
                f"more, got {self.report_card_prompts} and {self.report_card_max_new_tokens}.")
        if self.report_card_prompts and importlib.util.find_spec("sacrebleu") is None:  # found now, not after training
            raise UserInputError("The report card scores answers with sacrebleu, which is not installed: pip install "
                                 "-r finetuning/requirements.txt, or --report_card_prompts 0 to train without it.")

    @property
    def time_budget_seconds(self) -> Optional[float]:
        if self.time_budget is None:
            return None
        text = self.time_budget.strip().lower().replace(" ", "")
        match = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?:in)?)?(?:(\d+(?:\.\d+)?)s)?", text)
        seconds = (float(match[1] or 0) * 3600 + float(match[2] or 0) * 60 + float(match[3] or 0)) if match else 0
        if not seconds:
            raise UserInputError(
                f"--time_budget {self.time_budget!r} is not a duration: write hours, minutes and seconds like 80m, "
                "1h30m or 90s (a positive time)."
            )
        return seconds


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
    # Under DDP: every trainable weight gets a gradient each step, so DDP need not search the graph for unused ones
    # (the Trainer's default for a peft model), which costs a pass per step and fails with checkpointing.
    ddp_find_unused_parameters=False,
    logging_steps=10,
    # The Trainer's filter logs a NaN step's loss as the running average (0.0 at the first step), which hides
    # exactly what the NaN guard (training.StopOnNonFiniteLoss) looks for.
    logging_nan_inf_filter=False,
    save_strategy="steps",
    save_steps=200,
    save_total_limit=2,
    eval_strategy="no",
    # --report_to trackio keeps its runs on this machine (TRACKIO_DIR); transformers' default would create a
    # Hugging Face Space named "trackio" and upload to it. --trackio_space_id USER/NAME still deploys one.
    trackio_space_id=None,
    project="gemma-finetuning",  # trackio's project (the Trainer's default is "huggingface")
)

# --report_to names whose package is named otherwise
TRACKER_PACKAGES = {"azure_ml": "azureml", "flyte": "flytekit"}

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


def check_arguments(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> None:
    """Reject values and combinations that would only fail (or waste GPU time) later."""
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
    if not training_args.num_train_epochs > 0 or not math.isfinite(training_args.num_train_epochs):
        # With --max_steps (which --smoke sets) the Trainer would train anyway, the epochs ignored.
        raise UserInputError(
            f"--num_train_epochs {training_args.num_train_epochs} asks for no training, and --max_steps "
            f"{training_args.max_steps} (--smoke sets 4 unless given) would train anyway. Give --num_train_epochs "
            "above 0, or leave it out and count the steps with --max_steps.")
    if training_args.save_total_limit is not None and training_args.save_total_limit < 1:
        raise UserInputError(
            f"--save_total_limit {training_args.save_total_limit}: transformers takes 0 or less for no limit and keeps "
            "every checkpoint, filling the disk. Give 1 or more (the last N checkpoints are kept), or leave it out "
            "for this script's 2.")
    limits = [("save_steps", training_args.save_steps if training_args.save_strategy == "steps" else 1),
              ("eval_steps", training_args.eval_steps if training_args.eval_steps is not None else 1),
              ("per_device_eval_batch_size", training_args.per_device_eval_batch_size)]
    for name, value in limits:
        if not value > 0:
            raise UserInputError(f"--{name} must be above 0, got {value}.")
    for name in ("max_grad_norm", "weight_decay"):
        if not getattr(training_args, name) >= 0:
            raise UserInputError(f"--{name} must be 0 or more, got {getattr(training_args, name)}.")
    if not 0 <= training_args.seed < 2 ** 32:
        raise UserInputError(f"--seed must be from 0 to {2 ** 32 - 1} (numpy's range), got {training_args.seed}.")
    if not training_args.save_safetensors:
        raise UserInputError("--save_safetensors false: this toolkit saves and loads weights as safetensors only (a "
                             "pickled .bin can run code when loaded). Leave the flag out.")
    if training_args.save_only_model:
        raise UserInputError("--save_only_model: checkpoints without the optimizer and scheduler state cannot be "
                             "resumed, and resuming is what they are for here. Leave the flag out; OUTPUT_DIR/final "
                             "holds the model alone either way.")
    for name in ("compile_layers", "offload_activations"):
        if getattr(model_args, name) not in ("auto", "yes", "no"):
            raise UserInputError(f"--{name} {getattr(model_args, name)!r}: give auto, yes or no.")
    if model_args.offload_activations == "yes" and not training_args.gradient_checkpointing:
        raise UserInputError("--offload_activations yes moves checkpointed layer inputs, and --gradient_checkpointing "
                             "is off: turn checkpointing on, or leave the offload flag out.")
    if data_args.eval_split_ratio and data_args.eval_file:
        raise UserInputError("Give either --eval_split_ratio or --eval_file, not both.")
    if data_args.max_tokens_per_batch is not None:
        if data_args.packing:
            raise UserInputError("--max_tokens_per_batch and --packing both set the batch shape: choose one.")
        if data_args.max_tokens_per_batch < data_args.max_seq_length:
            raise UserInputError(
                f"--max_tokens_per_batch {data_args.max_tokens_per_batch} must be at least --max_seq_length "
                f"{data_args.max_seq_length}, or the longest records fit no batch."
            )
    if training_args.eval_strategy != "no" and not (data_args.eval_split_ratio or data_args.eval_file):
        raise UserInputError(
            f"--eval_strategy {training_args.eval_strategy.value} needs evaluation records: add --eval_split_ratio "
            "0.05 (hold out 5% of the records) or --eval_file FILE, or set --eval_strategy no."
        )
    if training_args.eval_strategy == "no" and (data_args.eval_split_ratio or data_args.eval_file):
        logger.info("Evaluation data given and --eval_strategy no: evaluating once, after training.")
    missing = [t for t in training_args.report_to if importlib.util.find_spec(TRACKER_PACKAGES.get(t, t)) is None]
    if missing:  # the Trainer would say so only once the model is loaded
        raise UserInputError(f"--report_to {','.join(missing)}: not installed. pip install -r "
                             "finetuning/requirements-tracking.txt (tensorboard, wandb, trackio), or --report_to none.")
