"""The load step's data side: the records, then the tokenizer (a smoke run's tiny model built first) and the loss
mask, with each record's length counted once; the checks that stop a run whose records lose every answer to
--max_seq_length."""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from cli.arguments import DataArguments, ModelArguments, ReportArguments
from cli.errors import UserInputError
from common import MODEL_TURN_START, USER_TURN, format_example, load_config, load_tokenizer
from models import shapes, smoke
from records import data, data_doctor
from records.data import data_source
from records.run_data import RunData

logger = logging.getLogger(__name__)


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
        # The tiny model is of the class --model_name_or_path names: google/gemma-3-4b-it, a multimodal one.
        multimodal = shapes.names_multimodal(model_args.model_name_or_path)
        logger.info("--smoke model: a tiny random %s.", "Gemma3ForConditionalGeneration: a tiny vision tower beside a "
                    "language model 64 wide" if multimodal else "Gemma3ForCausalLM, 64 wide")
        model_path = smoke.smoke_model(folder, [format_example(record) for record in records],
                                       multimodal=multimodal,
                                       # A resumed smoke run keeps the base and tokenizer its checkpoint was
                                       # trained on (rebuilt on other data, the tokenizer would be another).
                                       reuse=not report_args.dry_run and (training_args.process_index > 0 or
                                                                          training_args.resume_from_checkpoint
                                                                          is not None))
    tokenizer = load_tokenizer(model_path, model_args.trust_remote_code)
    # get_text_config: a multimodal Gemma 3 keeps its language model's shapes under text_config.
    context = load_config(model_path, model_args.trust_remote_code).get_text_config().max_position_embeddings
    if data_args.max_seq_length > context:
        raise UserInputError(
            f"--max_seq_length {data_args.max_seq_length} is longer than the model's context of {context} tokens "
            f"(max_position_embeddings in {model_path}'s config.json). Use at most {context}."
        )
    collator = completion_only_collator(tokenizer, data_args, records)
    # The data doctor: duplicates, train/eval overlap, the loss mask (dropping what --drop_* asks); data_report.md
    records, eval_records, doctor = data_doctor.examine(records, eval_records, tokenizer, collator, data_args,
                                                        data_source(data_args))
    lengths = doctor.lengths if report_args.dry_run else \
        check_lengths(records, tokenizer, collator, data_args.max_seq_length, data_source(data_args), context)
    loaded = RunData(records, eval_records, tokenizer, collator, model_path, lengths, doctor)
    if training_args.should_save:  # one copy under DDP
        data_doctor.log_report(doctor)
        if report_args.dry_run:  # a dry run writes nothing under --output_dir
            write_data_report(loaded, Path(tempfile.mkdtemp(prefix="data-report-")))
    return loaded


def write_data_report(loaded: RunData, folder: Path) -> None:
    """data_report.md and its histogram; into the output folder only once every check has passed (the scripts write it
    right before training), so a run refused after loading leaves an earlier run's folder as it was."""
    logger.info("Data report: %s", data_doctor.write_report(loaded.data_report, Path(folder)))


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
