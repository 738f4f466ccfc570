"""Check gradient accumulation on this installation: the same records as one batch of N and as N accumulated
micro-batches of 1 must give the same loss and the same update, with packed rows and with padded records
(training/accumulation_check.py says how). About ten seconds on the CPU, with the tiny random Gemma 3 of --smoke.

    python finetuning/check_accumulation.py                       # the toolkit's fast path (--fast_path all)
    python finetuning/check_accumulation.py --fast_path none      # the stock trl/peft/transformers path

Exit code 0 when both agree within the tolerance; 2, with what differs, when not. Run it after upgrading torch,
transformers or trl.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Optional, Sequence

from cli import startup  # noqa: F401  (first: checks the library versions before torch loads)

from cli import command_line, parsing
from cli.errors import TrainingFailed, UserInputError
from cli.fast_path_flag import parse_fast_path
from training import accumulation_check

logger = logging.getLogger(__name__)


@dataclass
class CheckArguments:
    fast_path: str = field(default="all", metadata={"help": "The fast path to check with, as the training scripts' "
                                                            "--fast_path: 'all', 'none' or a comma list."})
    model_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "A local model folder to check with, in float32 (default: the tiny random Gemma 3 of --smoke)."})
    device: str = field(default="cpu", metadata={"help": "cpu, or cuda (the fast path's GPU kernels)."})
    tolerance: float = field(default=accumulation_check.TOLERANCE, metadata={
        "help": "Largest relative difference of the loss and of the gradient that counts as the same."})

    def __post_init__(self):
        parse_fast_path(self.fast_path)
        if self.device not in ("cpu", "cuda"):
            raise UserInputError(f"--device {self.device!r}: give cpu or cuda.")
        if not self.tolerance > 0:
            raise UserInputError(f"--tolerance must be positive, got {self.tolerance}.")


def main(args: CheckArguments) -> list:
    outcomes = accumulation_check.check(args.model_name_or_path, args.fast_path, args.device)
    lines = [outcome.line(args.tolerance) for outcome in outcomes]
    if not all(outcome.passed(args.tolerance) for outcome in outcomes):
        raise TrainingFailed("Gradient accumulation check FAILED (--fast_path " + args.fast_path + "):\n  "
                             + "\n  ".join(lines) + "\nTraining with --gradient_accumulation_steps above 1 would "
                             "weight records unevenly. TROUBLESHOOTING.md, 'Gradient accumulation', says what to do.")
    logger.info("Gradient accumulation check passed (--fast_path %s):\n  %s", args.fast_path, "\n  ".join(lines))
    return outcomes


def parse_args(argv: Sequence[str]) -> tuple:
    return parsing.parse_flags((CheckArguments,), argv)


if __name__ == "__main__":
    sys.exit(command_line.run_cli(parse_args, main))
