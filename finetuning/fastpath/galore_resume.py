"""Override 8 (`galore_resume`, a fix): GaLore's projector is allowed in the checkpoint the Trainer resumes from.

The Trainer resumes the optimizer with `torch.load(weights_only=True)`, which refuses galore-torch's GaLoreProjector
(plain values and a tensor, kept per weight in the optimizer state). Allowed only while training runs, through
torch's own scoped `safe_globals`.

Target: torch >= 2.5 (`torch.serialization.safe_globals`), galore-torch 1.0 `GaLoreProjector`.
"""
from __future__ import annotations

import contextlib

import torch

from fastpath.guards import found, has

try:
    from galore_torch.galore_projector import GaLoreProjector
except ImportError:
    GaLoreProjector = None


def allow_projector_while_training(stack: contextlib.ExitStack) -> bool:
    """Enter torch's safe_globals([GaLoreProjector]) on `stack`; returns whether it was."""
    what = "GaLore checkpoints resumed"
    if not (found(GaLoreProjector, "GaLoreProjector", what) and has(torch.serialization, ["safe_globals"], what)):
        return False
    stack.enter_context(torch.serialization.safe_globals([GaLoreProjector]))
    return True
