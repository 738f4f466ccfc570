"""Export a finished run to GGUF for llama.cpp, Ollama and LM Studio, and check that it answers like the trained
model.

    python finetuning/export_gguf.py --run_dir outputs/qlora            # f16 and q8_0, a Modelfile, a parity report
    python finetuning/export_gguf.py --run_dir outputs/galore --outtypes q8_0

QLoRA's adapter is merged into a 16-bit copy of its base first (RUN_DIR/merged, as --merge writes it); GaLore's
final/ is converted as it is. llama.cpp's own converter writes the files (downloaded once with llama-cpp-python's
source); the parity check answers the run's sample prompts greedily with both models (llama-cpp-python).
Writes RUN_DIR/gguf/: model-<type>.gguf, Modelfile, parity.md and parity.json.
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from cli import startup  # noqa: F401  (first: checks the library versions before torch loads)
import torch

import common
from cli import arguments, command_line
from cli.errors import UserInputError
from export import gguf_files, parity
from records.data import DEFAULT_DATASET_FILE
from training import output_dir, saving
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
    name: Optional[str] = field(default=None, metadata={"help": "The model's name in the GGUF (default: the run "
                                                                "folder's name)."})

    def __post_init__(self):
        self.types = [t.strip() for t in self.outtypes.split(",") if t.strip()]
        unknown = [t for t in self.types if t not in gguf_files.OUTTYPES]
        if unknown or not self.types:
            raise UserInputError(f"--outtypes {self.outtypes!r}: choose from {', '.join(gguf_files.OUTTYPES)}.")
        if self.parity_tokens < 1 or self.max_new_tokens < self.parity_tokens:
            raise UserInputError(f"--parity_tokens must be 1 or more and at most --max_new_tokens "
                                 f"({self.parity_tokens} and {self.max_new_tokens} given).")


def main(args: ExportArguments) -> Path:
    # ===== Check: the run folder, the flags and llama-cpp-python; nothing is written yet =====
    run_dir = Path(args.run_dir).expanduser().resolve()
    source = model_to_convert(run_dir)
    if args.check_parity:
        parity.require_llama_cpp()
    tools = gguf_files.tools_dir(args.llama_cpp_dir)
    name = args.name or run_dir.name
    logger.info("Exporting %s as %s GGUF to %s (llama.cpp tools in %s)", source, ", ".join(args.types),
                run_dir / EXPORT_DIR, tools)

    # ===== Load: QLoRA's adapter merged into a 16-bit base (once; kept as RUN_DIR/merged) =====
    if source.name == output_dir.FINAL_DIR and (source / "adapter_config.json").is_file():
        source = saving.merge_adapter(source, torch.bfloat16)
        logger.info("Merged the adapter into a 16-bit copy of its base: %s", source)

    # ===== Convert: llama.cpp's converter, then the end-of-turn stop token recorded =====
    partial = run_dir / f".{EXPORT_DIR}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    files = [gguf_files.convert(source, partial / f"model-{t}.gguf", t, tools, name) for t in args.types]
    smallest = min(files, key=lambda f: f.stat().st_size)
    gguf_files.write_modelfile(partial, smallest)

    # ===== Check parity: the same prompts, greedy, through both models =====
    if args.check_parity:
        prompts = sample_prompts(run_dir)
        reference = parity.hf_answers(source, prompts, args.max_new_tokens)
        rows, problems = [], {}
        for file in files:
            answers, problems[file.name] = parity.gguf_answers(file, prompts, args.max_new_tokens)
            rows += parity.compare(prompts, file.name, reference, answers, args.parity_tokens)
        report = parity.write_report(partial, rows, problems)
    folder = replace(partial, run_dir / EXPORT_DIR)  # before the verdict: a failed check keeps files and report
    if args.check_parity:
        parity.verdict(rows, problems, folder / report.name)

    # ===== Done: how to run it =====
    logger.info("GGUF export in %s. Ollama: ollama create %s -f %s && ollama run %s. llama.cpp: llama-cli -m %s",
                folder, name.lower(), folder / "Modelfile", name.lower(), folder / smallest.name)
    return folder


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


def replace(partial: Path, folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


def parse_args(argv: Sequence[str]) -> tuple:
    return arguments.parse_flags((ExportArguments,), argv)


if __name__ == "__main__":
    sys.exit(command_line.run_cli(parse_args, main))
