"""What the load step (loading.py) hands on to batching, the reports and the settings."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class RunData:
    """What the load step hands on: the records, the tokenizer and its loss mask, and where the model is."""

    records: Any
    eval_records: Any
    tokenizer: Any
    collator: Any
    model_path: str
    lengths: list  # each training record's tokens as trl tokenizes it, uncut: counted once, for every later use
    data_report: Any = None  # the data doctor's findings (data_doctor.DataReport), written with write_data_report
