"""Library messages that tell a user nothing they can act on, silenced at their source, each for its message only.

| message | from | why it tells the user nothing |
|---|---|---|
| `Failed to load CPU gemm_4bit_forward from kernels-community ... pip install kernels` | bitsandbytes 0.50, at import on CPUs with AVX512-BF16 | an optional CPU kernel; bitsandbytes falls back to its own |
| `` `tokenizer` is deprecated and will be removed in version 5.0.0 for `SFTTrainer.__init__` `` | trl 0.8.6 calling transformers 4.57's Trainer | trl is pinned by design; the user passes no tokenizer |
| `The tokenizer has new PAD/BOS/EOS tokens that differ from the model config ...` | transformers 4.57's Trainer | Gemma's config lists two end tokens (<eos>, <end_of_turn>); the Trainer keeps both for generation |
| `mtime may not be reliable on this filesystem, falling back to numerical ordering` | transformers 4.57's checkpoint rotation | numerical order is the right order for checkpoint-N |
| `* Run finished. Uploading logs to Trackio (please wait...)` (printed) | trackio 0.20's `finish`, for a local run | nothing is uploaded: the run's logs are written to this machine's store; replaced by a line that says so (`correct_trackio_finish_line`) |

Every other warning still shows. tests/test_end_to_end.py checks that a smoke run's output holds none of these.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings

LOGGED = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",
    "transformers.trainer": "The tokenizer has new PAD/BOS/EOS tokens",
}
WARNED = (
    (r"`tokenizer` is deprecated and will be removed in version 5\.0\.0 for `SFTTrainer\.__init__`", FutureWarning),
    (r"mtime may not be reliable on this filesystem", UserWarning),
)


class _Drop(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def silence() -> None:
    """Install the filters; before bitsandbytes is imported, so its import-time message is caught too."""
    for logger_name, start in LOGGED.items():
        logging.getLogger(logger_name).addFilter(_Drop(start))
    for message, category in WARNED:
        warnings.filterwarnings("ignore", message=message, category=category)


TRACKIO_LOCAL_FINISH = "* Run finished. Uploading logs to Trackio (please wait...)"


class _ReplacePrintedLine:
    """sys.stdout, with one printed line (print writes it, then "\n") replaced by a log line."""

    def __init__(self, stream, line: str, replacement: str):
        self._stream, self._line, self._replacement = stream, line, replacement
        self._newline_pending = False

    def write(self, text: str) -> int:
        if text.startswith(self._line):
            self._newline_pending = text == self._line
            logging.getLogger("cli.noise").info("%s", self._replacement)
            return len(text)
        if self._newline_pending and text == "\n":
            self._newline_pending = False
            return len(text)
        self._newline_pending = False
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def correct_trackio_finish_line() -> None:
    """A local trackio run (no --trackio_space_id) ends printing that it uploads its logs, and uploads nothing: the
    line is replaced by one that says where the logs are. Installed once, on this process's stdout."""
    if isinstance(sys.stdout, _ReplacePrintedLine):
        return
    store = os.environ.get("TRACKIO_DIR") or "trackio's store on this machine (~/.cache/huggingface/trackio)"
    sys.stdout = _ReplacePrintedLine(sys.stdout, TRACKIO_LOCAL_FINISH,
                                     f"trackio: the run's metrics are kept in {store}, not uploaded; `trackio show` "
                                     "opens the dashboard.")
