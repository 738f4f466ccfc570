"""Export a finished run to GGUF for llama.cpp, Ollama and LM Studio, and check that it answers like the trained
model.

    python finetuning/export_gguf.py --run_dir outputs/qlora            # f16 and q8_0, a Modelfile, a parity report
    python finetuning/export_gguf.py --run_dir outputs/galore --outtypes q8_0

QLoRA's adapter is merged into a 16-bit copy of its base first (RUN_DIR/merged, as --merge writes it); GaLore's
final/ is converted as it is. llama.cpp's own converter writes the files (downloaded once with llama-cpp-python's
source); the parity check answers the run's sample prompts greedily with both models (llama-cpp-python).
Writes RUN_DIR/gguf/: model-<type>.gguf, Modelfile, parity.md and parity.json; and adds each GGUF's row to the run's
report card (RUN_DIR/report_card.md: base -> trained -> exported, on the card's first --report_card_prompts prompts).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import shlex
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from cli import startup  # noqa: F401  (first: checks the library versions before torch loads)
import torch

import common
from cli import command_line, parsing
from cli.errors import Interrupted, UserInputError
from export import gguf_files, parity
from models import hub
from records.data import DEFAULT_DATASET_FILE
from training import interruptions, run_lock
from training import output_dir, report_card, saving
from training.output_dir import SAMPLES_JSON

logger = logging.getLogger(__name__)

EXPORT_DIR = output_dir.GGUF_DIR
PROMPTS_WITHOUT_SAMPLES = 3  # from the default instructions, where the run wrote no samples.json


@dataclass
class ExportArguments:
    run_dir: str = field(metadata={"help": "A finished run's --output_dir (with final/ in it)."})
    outtypes: str = field(default="f16,q8_0", metadata={
        "help": f"Comma-separated GGUF types, of {', '.join(gguf_files.OUTTYPES)}. q8_0 is half f16's size and "
                "answers nearly alike; the Modelfile uses the smallest."})
    check_parity: bool = field(default=True, metadata={
        "help": "Answer the run's sample prompts with the trained model and each GGUF and compare (needs "
                "llama-cpp-python: finetuning/requirements-export.txt)."})
    parity_tokens: int = field(default=16, metadata={"help": "How many first answer tokens must agree."})
    max_new_tokens: int = field(default=64, metadata={"help": "Token limit of each parity answer: a model that has "
                                                              "not stopped by then counts as not stopping."})
    llama_cpp_dir: Optional[str] = field(default=None, metadata={
        "help": "llama.cpp's source folder (convert_hf_to_gguf.py, gguf-py/); by default downloaded once to "
                "~/.cache/gemma-finetuning."})
    name: Optional[str] = field(default=None, metadata={
        "help": "The model's name in the GGUF and in the `ollama create` command: letters, digits, '.', '_' and '-', "
                "with an optional NAMESPACE/ and :TAG. Default: the run folder's name, made to fit."})
    report_card_prompts: int = field(default=20, metadata={
        "help": "Add each GGUF's row to the run's report_card.md: the card's first N prompts answered through "
                "llama.cpp on the CPU (0: none). Needs the parity check's llama-cpp-python."})

    def __post_init__(self):
        self.types = [t.strip() for t in self.outtypes.split(",") if t.strip()]
        unknown = [t for t in self.types if t not in gguf_files.OUTTYPES]
        if unknown or not self.types:
            raise UserInputError(f"--outtypes {self.outtypes!r}: choose from {', '.join(gguf_files.OUTTYPES)}.")
        if self.report_card_prompts < 0:
            raise UserInputError(f"--report_card_prompts must be 0 or more, got {self.report_card_prompts}.")
        if self.parity_tokens < 1 or self.max_new_tokens < self.parity_tokens:
            raise UserInputError(f"--parity_tokens must be 1 or more and at most --max_new_tokens "
                                 f"({self.parity_tokens} and {self.max_new_tokens} given).")
        if self.name is not None and not OLLAMA_NAME.fullmatch(self.name):
            raise UserInputError(
                f"--name {self.name!r} cannot name an Ollama model: use letters, digits, '.', '_' and '-' (no spaces), "
                f"with an optional NAMESPACE/ in front and :TAG behind, e.g. --name {ollama_name(self.name)}."
            )


# Ollama's model names: [namespace/]model[:tag], each part of letters, digits, '.', '_' and '-'.
OLLAMA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?(:[A-Za-z0-9][A-Za-z0-9._-]*)?")


def ollama_name(text: str) -> str:
    """`text` made into a name Ollama takes: every run of other characters becomes one '-'."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")
    return name or "gemma-finetuned"


def stops_cleanly(main):
    """export's main(), with Ctrl-C and SIGTERM (which raises interruptions.Stop here, as Ctrl-C raises
    KeyboardInterrupt) ending in one line and exit 130 or 143: subprocess.run kills the converter or llama.cpp child,
    the half-written RUN_DIR/.gguf.partial is removed, and the run folder's lock (run_lock) released."""

    @functools.wraps(main)
    def guarded(args: ExportArguments) -> Path:
        main_thread = threading.current_thread() is threading.main_thread()

        def stop(signum, frame):
            raise interruptions.Stop("SIGTERM")

        previous = signal.signal(signal.SIGTERM, stop) if main_thread else None
        _doing[0] = "checking the run"
        try:
            return main(args)
        except (KeyboardInterrupt, interruptions.Stop) as e:
            how, code = ("Ctrl-C", 130) if isinstance(e, KeyboardInterrupt) else ("SIGTERM", 143)
            run_dir = Path(args.run_dir).expanduser().resolve()
            shutil.rmtree(run_dir / f".{EXPORT_DIR}.partial", ignore_errors=True)
            earlier = "the earlier export there is untouched" if (run_dir / EXPORT_DIR).is_dir() else "none was there"
            raise Interrupted(f"Export stopped ({how}) while {_doing[0]}: nothing half-written was left in "
                              f"{run_dir / EXPORT_DIR} ({earlier}). Run the same command again to export.", code) from e
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
            run_lock.release_all()

    return guarded


_doing = ["checking the run"]  # what the export is doing, for the message of a stop


@stops_cleanly  # Ctrl-C/SIGTERM: one line, no .gguf.partial left; the run folder's lock released
def main(args: ExportArguments) -> Path:
    # ===== Check: the run folder, the destination, the flags and llama-cpp-python; nothing is written yet =====
    hub.check_cache_variables()  # XDG_CACHE_HOME holds the downloaded converter
    run_dir = Path(args.run_dir).expanduser().resolve()
    source = model_to_convert(run_dir)
    check_destination(run_dir)
    if args.check_parity:
        parity.require_llama_cpp()
    tools = gguf_files.tools_dir(args.llama_cpp_dir)
    name = args.name or ollama_name(run_dir.name)
    run_lock.take(run_dir, what="--run_dir")  # a training or another export in the folder is refused
    logger.info("Exporting %s as %s GGUF to %s (llama.cpp tools in %s)", source, ", ".join(args.types),
                run_dir / EXPORT_DIR, tools)

    # ===== Load: QLoRA's adapter merged into a 16-bit base (once; kept as RUN_DIR/merged) =====
    if source.name == output_dir.FINAL_DIR and (source / "adapter_config.json").is_file():
        _doing[0] = f"merging the adapter into {run_dir / output_dir.MERGED_DIR}"
        source = saving.merge_adapter(source, torch.bfloat16)
        logger.info("Merged the adapter into a 16-bit copy of its base: %s", source)

    # ===== Convert: llama.cpp's converter, then the end-of-turn stop token recorded =====
    partial = run_dir / f".{EXPORT_DIR}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    _doing[0] = f"converting to {', '.join(args.types)}"
    interruptions.test_pause("convert")  # a test's signal lands here
    files = [gguf_files.convert(source, partial / f"model-{t}.gguf", t, tools, name) for t in args.types]
    gguf_files.log_vision_part(source, tools)  # gemma-3-4b: the GGUF is its language model; images need an mmproj
    smallest = min(files, key=lambda f: f.stat().st_size)
    gguf_files.write_modelfile(partial, smallest)

    # ===== Check parity: the same prompts, greedy, through both models =====
    if args.check_parity:
        _doing[0] = "checking parity"
        interruptions.test_pause("parity")
        prompts = sample_prompts(run_dir)
        reference = parity.hf_answers(source, prompts, args.max_new_tokens)
        rows, problems = [], {}
        for file in files:
            answers, problems[file.name] = parity.gguf_answers(file, prompts, args.max_new_tokens)
            rows += parity.compare(prompts, file.name, reference, answers, args.parity_tokens)
        report = parity.write_report(partial, rows, problems)
        _doing[0] = "adding the GGUFs' rows to the report card"
        add_to_report_card(run_dir, files, args.report_card_prompts)  # base -> trained -> exported
    _doing[0] = f"moving the export into {run_dir / EXPORT_DIR}"
    folder = replace(partial, run_dir / EXPORT_DIR)  # before the verdict: a failed check keeps files and report
    if args.check_parity:
        parity.verdict(rows, problems, folder / report.name)

    # ===== Done: how to run it =====
    logger.info("GGUF export in %s. Ollama: ollama create %s -f %s && ollama run %s. llama.cpp: llama-cli -m %s",
                folder, name.lower(), shlex.quote(str(folder / "Modelfile")), name.lower(),
                shlex.quote(str(folder / smallest.name)))
    return folder


def check_destination(run_dir: Path) -> None:
    """RUN_DIR/gguf must be a folder or not exist, and RUN_DIR writable: found before minutes of merging and
    converting."""
    destination = run_dir / EXPORT_DIR
    if destination.exists() and not destination.is_dir():
        raise UserInputError(
            f"--run_dir {run_dir}: {destination} is a file, and the export writes a folder of that name (the GGUF "
            f"files, the Modelfile and the parity report). Move or rename the file (mv {shlex.quote(str(destination))} "
            f"{shlex.quote(str(destination))}.bak), then run the export again."
        )
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise UserInputError(f"--run_dir {run_dir} cannot be written by this user, and the export writes into it "
                             f"({destination}). Make it writable (chmod u+w {shlex.quote(str(run_dir))}) or copy the "
                             "run somewhere you can write.")


def model_to_convert(run_dir: Path) -> Path:
    """The run's merged model where there is one, else its final/ (GaLore's model, or QLoRA's adapter)."""
    final, merged = run_dir / output_dir.FINAL_DIR, run_dir / output_dir.MERGED_DIR
    if not final.is_dir():
        raise UserInputError(
            f"--run_dir {run_dir}: no {output_dir.FINAL_DIR}/ folder there. Give the --output_dir of a finished "
            "training run (a run stopped early saves checkpoints only: resume it to the end first).")
    if (merged / "config.json").is_file():
        return merged
    if (final / "config.json").is_file() or (final / "adapter_config.json").is_file():
        return final
    raise UserInputError(f"--run_dir {run_dir}: {final} holds neither a model (config.json) nor an adapter "
                         "(adapter_config.json).")


def sample_prompts(run_dir: Path) -> list[str]:
    """The prompts of the run's samples.md (samples.json), else the first few default instructions."""
    samples = run_dir / SAMPLES_JSON
    if samples.is_file():
        prompts = [sample["prompt"] for sample in json.loads(samples.read_text())]
        if prompts:
            return prompts
    records = json.loads(DEFAULT_DATASET_FILE.read_text())[:PROMPTS_WITHOUT_SAMPLES]
    return [common.format_prompt(record) for record in records]


def add_to_report_card(run_dir: Path, files: Sequence[Path], prompts: int) -> None:
    """Each GGUF's row in the run's report card, on its first `prompts` prompts, through the parity check's child
    process; nothing where the run wrote no card."""
    card = report_card.load(run_dir)
    if card is None or not prompts or not card["items"]:
        if prompts:
            logger.info("No %s in %s (a run trained with --report_card_prompts 0, or before the report card "
                        "existed): no GGUF rows.", output_dir.REPORT_CARD_JSON, run_dir)
        return
    chosen = [item["prompt"] for item in card["items"][:prompts]]
    exported = {}
    for file in files:
        started = time.perf_counter()
        answers, _ = parity.gguf_answers(file, chosen, card["max_new_tokens"])
        exported[file.name] = {"answers": [card_answer(a) for a in answers], "seconds": time.perf_counter() - started}
    path = report_card.add_exported(run_dir, card, exported)
    logger.info("Report card: %s", "; ".join(f"{row['model']} stops {100 * row['stop_rate']:.0f}%, chrF "
                                               f"{row['chrf']:.1f}" for row in card["export"]["rows"]) + f". {path}")


def card_answer(answer) -> dict:
    """A GGUF's answer (gguf_run.Answer) as the report card keeps one: the stop token not counted."""
    ids = answer.ids[:-1] if answer.stopped_at else answer.ids
    return {"text": answer.text.strip(), "tokens": len(ids), "stopped_at": answer.stopped_at,
            "repetition": report_card.repetition(ids)}


def replace(partial: Path, folder: Path) -> Path:
    """The new export in place of the earlier one. GGUF files of other types than this export's are kept (an export
    of q8_0 after one of f16 keeps the f16 file); the rest is replaced, and the log says what."""
    if folder.is_dir():
        new = {p.name for p in partial.iterdir()}
        kept = sorted(p.name for p in folder.glob("model-*.gguf") if p.name not in new)
        replaced = sorted(p.name for p in folder.iterdir() if p.name not in kept)
        for name in kept:
            os.replace(folder / name, partial / name)
        if kept or replaced:
            logger.info("Re-export into %s: replaced %s%s.", folder, ", ".join(replaced) or "nothing",
                        f"; kept {', '.join(kept)} from the earlier export (parity.md covers this export's files "
                        "only)" if kept else "")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


HELP_EXAMPLES = (
    ("--run_dir outputs/qlora", "f16 and q8_0 files, a Modelfile and a parity report in outputs/qlora/gguf"),
    ("--run_dir outputs/galore --outtypes q8_0 --name my-model", "one file, named my-model for Ollama"),
    ("--run_dir outputs/qlora --check_parity false", "without llama-cpp-python: no parity check"),
)


def parse_args(argv: Sequence[str]) -> tuple:
    return parsing.parse_flags((ExportArguments,), argv, HELP_EXAMPLES)


if __name__ == "__main__":
    sys.exit(command_line.run_cli(parse_args, main))
