"""Override 9 (`one_gpu`, a fix): under plain `python` on a machine with several GPUs, the Trainer keeps to one GPU.

Otherwise the Trainer splits each batch across the GPUs with nn.DataParallel, which fails with 4-bit models
("Expected all tensors to be on the same device") and is slower than DDP where it runs. The run's TrainingArguments
get `_n_gpu = 1`, as the Trainer itself sets it for a model spread over several GPUs; once the Trainer is built,
since trl copies the arguments while it builds (`dataclasses.replace`), which would compute it again.

Target: transformers 4.57 `TrainingArguments.n_gpu` (a property reading `_n_gpu`).
"""
from __future__ import annotations

from typing import Optional

from transformers import TrainingArguments

from fastpath.guards import version_ok
from fastpath.patches import Patches


def can_pin_one_gpu() -> bool:
    """Whether the pin below works with the installed transformers (checked before anything loads)."""
    return (version_ok("transformers", "one GPU without a launcher")
            and isinstance(getattr(TrainingArguments, "n_gpu", None), property)
            and "_n_gpu" in TrainingArguments.__dataclass_fields__)


def pin_one_gpu(training_args, patches: Optional[Patches] = None) -> bool:
    """The Trainer's arguments report one GPU; returns whether they do."""
    if not can_pin_one_gpu():
        return False
    training_args.n_gpu  # sets _n_gpu up first, so that it is not computed again over ours
    (patches if patches is not None else Patches()).set(training_args, "_n_gpu", 1)
    return training_args.n_gpu == 1
