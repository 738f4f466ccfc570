"""The GaLore 8-bit optimizer with galore-torch's bitsandbytes settings bound by keyword (overrides 7-8 in the table
of overrides.py, which holds the checks that each override's target is the pinned one)."""
from __future__ import annotations

import functools
import inspect
import logging

import torch

from overrides import _found, _has, _version_ok

logger = logging.getLogger(__name__)

try:
    from bitsandbytes.optim.optimizer import Optimizer2State
    from galore_torch import GaLoreAdamW8bit
    from galore_torch.galore_projector import GaLoreProjector
except ImportError:
    Optimizer2State = GaLoreAdamW8bit = GaLoreProjector = None



def galore_adamw8bit() -> type:
    """GaLoreAdamW8bitFixed where galore-torch and bitsandbytes are the pinned ones, else stock GaLoreAdamW8bit;
    and GaLore's projector allowed in checkpoints (override 8)."""
    if GaLoreAdamW8bit is None:
        raise ImportError("galore_torch.GaLoreAdamW8bit could not be imported: pip install -r finetuning/requirements.txt")
    if _found(GaLoreProjector, "GaLoreProjector", "GaLore checkpoints") and _has(
            torch.serialization, ["add_safe_globals"], "GaLore checkpoints"):
        # The optimizer state keeps a GaLoreProjector per weight (plain values and a tensor).
        torch.serialization.add_safe_globals([GaLoreProjector])
    what = "GaLore 8-bit settings by keyword"
    if not (_found(Optimizer2State, "bitsandbytes' Optimizer2State", what) and _version_ok("galore-torch", what)
            and _version_ok("bitsandbytes", what)):
        return GaLoreAdamW8bit
    if not {"optim_bits", "is_paged"} <= set(inspect.signature(Optimizer2State.__init__).parameters):
        logger.warning("%s: Optimizer2State takes no optim_bits/is_paged keywords; using the stock path.", what)
        return GaLoreAdamW8bit
    return _galore_fixed(GaLoreAdamW8bit, Optimizer2State)


@functools.cache
def _galore_fixed(stock: type, optimizer_2_state: type) -> type:
    class GaLoreAdamW8bitFixed(stock):
        """galore-torch's GaLoreAdamW8bit with its bitsandbytes settings bound by keyword.

        galore-torch 1.0 passes `percentile_clipping=100, block_wise=True` by position; bitsandbytes 0.50 reads them
        as `max_unorm=100, skip_zeros=True`, which holds small projected weights (32-bit states) almost still.
        Bound by keyword: no clipping, blockwise 8-bit states, as galore-torch meant.
        """

        def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, is_paged=False):
            optimizer_2_state.__init__(
                self, "adam", params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, optim_bits=8,
                is_paged=is_paged,
            )

        @torch.no_grad()
        def step(self, closure=None):
            if self.is_paged:
                return super().step(closure)
            # galore-torch calls torch.cuda.synchronize() after every weight's update. Every kernel of the step
            # runs on one stream, in order, so nothing needs it unless the states are paged; on a GPU each call
            # drains the queue (about 340 a step for gemma-3-1b), and on the CPU it would fail.
            synchronize = torch.cuda.synchronize
            torch.cuda.synchronize = lambda *args, **kwargs: None
            try:
                return super().step(closure)
            finally:
                torch.cuda.synchronize = synchronize

    return GaLoreAdamW8bitFixed
