"""A script run from the command line: logging set up once (one copy of the log under DDP), then its parser and its
main(), with a problem the user can fix turned into one logged message and exit code 2, not a traceback."""
from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable, Optional, Sequence

import datasets
import transformers

from cli.errors import ExportFailed, Interrupted, SetupError, TrainingFailed, UserInputError

logger = logging.getLogger(__name__)


def setup_logging() -> None:
    # Under DDP the other processes log errors only: one copy of the run's log and warnings, not one per GPU.
    # Rank 0 or no launcher (torchrun and accelerate launch set RANK): known before any process group exists.
    main_process = int(os.environ.get("RANK", "0") or 0) == 0
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
        level=logging.INFO if main_process else logging.ERROR,
    )
    if not main_process:
        datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_warning()


def run_cli(parse: Callable[[Sequence[str]], tuple], main: Callable[..., Any], argv: Optional[Sequence[str]] = None) -> int:
    """Parse, then run a script's main(); a problem the user can fix is one message and exit code 2, not a traceback."""
    setup_logging()
    try:
        main(*parse(sys.argv[1:] if argv is None else list(argv)))
    except (UserInputError, SetupError, TrainingFailed, ExportFailed) as e:
        logger.error("%s", e)
        return 2
    except Interrupted as e:
        logger.error("%s", e)
        return e.exit_code
    return 0
