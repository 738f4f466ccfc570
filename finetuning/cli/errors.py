"""The failures a user can act on. `command_line.run_cli` turns each into one logged message and exit code 2;
anything else is a bug and keeps its traceback. Standard library only: the version check raises these before
torch loads."""
from __future__ import annotations


class UserInputError(ValueError):
    """Something the user gave (a flag, a file, a record) cannot work; the message says how to fix it."""


class SetupError(RuntimeError):
    """The installation or the machine cannot run this; the message says what to install or where to run."""


class TrainingFailed(RuntimeError):
    """Training cannot go on (NaN loss, out of memory, full disk); the message says what to change and what was saved."""


class ExportFailed(RuntimeError):
    """An export did not give a file that answers like the trained model (a converter error, a GGUF that never
    stops); the message says what was found and what to try."""


class Interrupted(RuntimeError):
    """Training was stopped from outside (Ctrl-C, SIGTERM); the message says where and how to resume.

    `exit_code` is the shell's convention for the signal: 130 for Ctrl-C (SIGINT), 143 for SIGTERM.
    """

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
