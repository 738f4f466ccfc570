"""What train_qlora.py and train_galore.py share by the design card: the prompt format and SFTTrainer's
formatting function, tokenizer and model loading, and the CUDA and precision checks."""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import transformers
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from cli.arguments import DataArguments, ModelArguments, ReportArguments
from cli.errors import SetupError, UserInputError
from models import hub, smoke
from records import data
from records.data import INPUT_FIELD, INSTRUCTION_FIELD, OUTPUT_FIELD, data_source

logger = logging.getLogger(__name__)

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
# Tokenizer, loss mask and lengths
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


@dataclass
class RunData:
    """What the load step hands on: the records, the tokenizer and its loss mask, and where the model is."""

    records: Any
    eval_records: Any
    tokenizer: Any
    collator: Any
    model_path: str
    lengths: list  # each training record's tokens as trl tokenizes it, uncut: counted once, for every later use


def load_data_and_tokenizer(model_args: ModelArguments, data_args: DataArguments, report_args: ReportArguments,
                            training_args) -> RunData:
    """The records, then the tokenizer (under --smoke the tiny model is built first, its tokenizer trained on the
    records) and the loss mask. Stops where every record is longer than --max_seq_length or every answer is cut
    off, except in a dry run, whose report shows the lengths. Under DDP the main process runs first (it fills the
    data caches and builds the smoke model in the output dir, which other hosts may share); the others then read
    what it wrote."""
    with training_args.main_process_first(local=False, desc="data and tokenizer"):
        return _load_data_and_tokenizer(model_args, data_args, report_args, training_args)


def _load_data_and_tokenizer(model_args, data_args, report_args, training_args) -> RunData:
    records, eval_records = data.load_train_and_eval(data_args, training_args.seed)
    if data_args.completion_only_loss and not response_only_loss(data_args, records):  # refuses --packing with it
        logger.info("Plain-text data has no prompt to mask: the loss covers every token.")
    model_path = model_args.model_name_or_path
    if model_args.smoke:
        # A dry run writes nothing under --output_dir: its tiny model goes to a temporary folder.
        folder = tempfile.mkdtemp(prefix="smoke-dry-run-") if report_args.dry_run else training_args.output_dir
        model_path = smoke.smoke_model(folder, [format_example(record) for record in records],
                                       reuse=training_args.process_index > 0 and not report_args.dry_run)
    tokenizer = load_tokenizer(model_path, model_args.trust_remote_code)
    context = load_config(model_path, model_args.trust_remote_code).max_position_embeddings
    if data_args.max_seq_length > context:
        raise UserInputError(
            f"--max_seq_length {data_args.max_seq_length} is longer than the model's context of {context} tokens "
            f"(max_position_embeddings in {model_path}'s config.json). Use at most {context}."
        )
    collator = completion_only_collator(tokenizer, data_args, records)
    lengths = token_lengths(records, tokenizer) if report_args.dry_run else \
        check_lengths(records, tokenizer, collator, data_args.max_seq_length, data_source(data_args), context)
    return RunData(records, eval_records, tokenizer, collator, model_path, lengths)


def response_only_loss(data_args: DataArguments, records) -> bool:
    """Whether the loss covers the answers only: asked for, and the records have prompts. Refuses trl's --packing
    with it."""
    if not data_args.completion_only_loss or "text" in records.column_names:
        return False
    if data_args.packing:
        raise UserInputError(
            "--packing cannot be combined with the response-only loss: trl 0.8.6 packs records into fixed-length "
            "blocks that cut through prompts and answers, and its response-only collator cannot mask them reliably. "
            "Choose one: --packing with --completion_only_loss false, or no --packing."
        )
    return True


def completion_only_collator(tokenizer, data_args: DataArguments, records):
    """trl's collator that masks everything but the model turns, or None where the whole text trains.

    The templates are Gemma's turn openings; every token after `<start_of_turn>model`
    up to the next `<start_of_turn>user` is learnt, so multi-turn chats learn every answer.
    """
    if not response_only_loss(data_args, records):
        return None
    from trl import DataCollatorForCompletionOnlyLM  # here: exporting a run renders prompts without trl

    return DataCollatorForCompletionOnlyLM(
        response_template=tokenizer.encode(MODEL_TURN_START, add_special_tokens=False),
        instruction_template=tokenizer.encode(USER_TURN.split("{")[0], add_special_tokens=False),
        tokenizer=tokenizer,
    )


def token_ids(records, tokenizer) -> list[list[int]]:
    """Each record as training text, tokenized as trl does (special tokens on), not cut."""
    return tokenizer([format_example(record) for record in records], add_special_tokens=True)["input_ids"]


def token_lengths(records, tokenizer) -> list[int]:
    return [len(ids) for ids in token_ids(records, tokenizer)]


def check_lengths(records, tokenizer, collator, max_seq_length: int, source: str, context: int = 32768) -> list[int]:
    """Stop when every record is longer than --max_seq_length, or every example loses its answer to the cut;
    warn how many will be cut otherwise."""
    ids_list = token_ids(records, tokenizer)
    lengths = [len(ids) for ids in ids_list]
    too_long = sum(length > max_seq_length for length in lengths)
    if too_long == len(lengths):
        # Never suggest more than the model's context: past it the model has no positions for the tokens.
        fix = (f"Raise --max_seq_length (e.g. --max_seq_length {_round_up(min(lengths))}) or shorten the records."
               if _round_up(min(lengths)) <= context else
               f"Shorten the records: even the shortest is past the model's context of {context} tokens.")
        raise UserInputError(
            f"Every record of {source} is longer than --max_seq_length {max_seq_length} tokens (the shortest has "
            f"{min(lengths)}): each would be cut, most answers lost. {fix}"
        )
    if too_long:
        logger.warning(
            "%d of %d records are longer than --max_seq_length %d tokens and will be cut.",
            too_long, len(lengths), max_seq_length,
        )
    if collator is not None:
        check_answers_kept([ids[:max_seq_length] for ids in ids_list], collator, source)
    return lengths


def check_answers_kept(tokenized_ids, collator, source: str) -> None:
    """Every example, cut to --max_seq_length, must keep some answer tokens, or training would see a zero loss."""
    template = list(collator.response_token_ids)
    width = len(template)
    without = 0
    for ids in tokenized_ids:
        # A template that ends the sequence leaves no answer token after it.
        found = any(
            token == template[0] and ids[i : i + width] == template
            for i, token in enumerate(ids[: len(ids) - width])
        )
        if not found:  # the answer was cut off (or there is none): every label would be masked
            without += 1
    if without == len(tokenized_ids):
        raise UserInputError(
            f"In every example of {source} the answer lies past --max_seq_length (or is missing), so the "
            "response-only loss would mask every token and train on nothing. Raise --max_seq_length, shorten the "
            "prompts, or learn the whole text with --completion_only_loss false."
        )
    if without:
        logger.warning(
            "%d of %d examples lose their whole answer to --max_seq_length and will teach nothing.",
            without, len(tokenized_ids),
        )


def _round_up(length: int) -> int:
    return 1 << max(length - 1, 1).bit_length()


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
    """The last name part of every linear layer (q_proj, ...), as LoRA's and GaLore's target flags name them."""
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


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
