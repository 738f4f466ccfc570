"""What train_qlora.py and train_galore.py share by the design card: the prompt format and SFTTrainer's
formatting function, tokenizer and model loading, and the CUDA and precision checks. The records themselves are read
by records/, and loaded with the tokenizer by records/loading.py."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import transformers
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from cli.errors import SetupError, UserInputError
from models import hub, shapes

logger = logging.getLogger(__name__)

# An instruction record's fields, as records/data.py normalises every format's records (alpaca-style ones).
INSTRUCTION_FIELD, INPUT_FIELD, OUTPUT_FIELD = "instruction", "input", "output"

# Gemma's chat turns. The tokenizer adds <bos> itself (trl 0.8.6 tokenizes with
# special tokens on), so the text must not carry one: two <bos> hurt the model.
USER_TURN = "<start_of_turn>user\n{prompt}<end_of_turn>\n"
MODEL_TURN_START = "<start_of_turn>model\n"
MODEL_TURN = MODEL_TURN_START + "{response}<end_of_turn>\n"


# ---------------------------------------------------------------------------
# The prompt format
# ---------------------------------------------------------------------------


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
    """Alternating user/assistant turns in Gemma's chat format, without <bos>: the chat template's text (tests check
    it against the tokenizer's), rendered here so the formatting function needs no tokenizer."""
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
    """SFTTrainer's formatting function, for both ways trl 0.8.6 calls it: unpacked, a dict of lists (a batch), for
    a list of strings; packed (ConstantLengthDataset), one record, for one string."""
    first_column = next(iter(examples.values()))
    if not isinstance(first_column, list) or (
        "messages" in examples and (not first_column or isinstance(first_column[0], Mapping))
    ):
        return format_example(examples)
    return [format_example(dict(zip(examples, row))) for row in zip(*examples.values())]


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def load_tokenizer(model_name_or_path: str, trust_remote_code: bool = False) -> transformers.PreTrainedTokenizerBase:
    hub.check_hub_reachable(model_name_or_path)
    folder = Path(model_name_or_path)
    if folder.is_dir() and (folder / "config.json").is_file() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        # transformers would fall back to converting a SentencePiece model and fail with an unrelated ImportError.
        raise UserInputError(
            f"--model_name_or_path {model_name_or_path}: the folder holds a model but no tokenizer "
            f"({' or '.join(TOKENIZER_FILES)}). Copy the tokenizer files of the model it came from (tokenizer.json, "
            "tokenizer_config.json, special_tokens_map.json) into it, or save them with tokenizer.save_pretrained."
        )
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


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


def load_config(model_path: str, trust_remote_code: bool = False) -> transformers.PretrainedConfig:
    """The model's config.json alone: its shapes, before any weight loads."""
    try:
        return AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserInputError(_model_not_found_message(model_path, e)) from e


def empty_model(model_path: str, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model's modules and shapes from its config, with no weights in memory: for checks before it loads."""
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(load_config(model_path, trust_remote_code))


def linear_layer_names(model: torch.nn.Module) -> set:
    """The last name part of every linear layer (q_proj, ...), as LoRA's and GaLore's target flags name them; a
    multimodal Gemma 3's vision tower and projector left out, which text-only training does not train
    (models/shapes.py)."""
    return {name.rsplit(".", 1)[-1] for name, m in shapes.text_linear_layers(model)}


def load_causal_lm(model_path: str, trust_remote_code: bool, **kwargs):
    """AutoModelForCausalLM.from_pretrained for training: safetensors only, and a path that holds no model is a user error."""
    try:
        # Safetensors only: never unpickle weights, a .bin checkpoint can run arbitrary code.
        model = AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=trust_remote_code,
                                                     use_safetensors=True, **kwargs)
    except (OSError, ValueError) as e:  # ValueError: a malformed hub id, or a folder with no config.json
        raise UserInputError(_model_not_found_message(model_path, e)) from e
    model.config.use_cache = False  # the KV cache is useless while training and clashes with checkpointing
    return model


# ---------------------------------------------------------------------------
# CUDA and precision
# ---------------------------------------------------------------------------


def require_cuda(what: str) -> None:
    """Stop before the model loads when there is no CUDA GPU, saying what to do instead."""
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
    torch_dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"


def choose_precision(training_args: transformers.TrainingArguments, on_cpu: bool) -> Precision:
    """bf16 where the GPU has it, fp16 otherwise (T4, V100); fp32 on the CPU. Honour a flag the GPU can run."""
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
