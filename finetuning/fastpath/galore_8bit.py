"""Override 7a (`galore_8bit`, a fix): galore-torch's GaLoreAdamW8bit with its bitsandbytes settings bound by keyword;
and the class the GaLore script builds its optimizer from, with override 7b's step where that is on.

galore-torch 1.0 passes `percentile_clipping=100, block_wise=True` to bitsandbytes' Optimizer2State by position;
bitsandbytes 0.50 reads them as `max_unorm=100, skip_zeros=True`, which holds small projected weights (32-bit states)
almost still. Bound by keyword: no clipping, blockwise 8-bit states, as galore-torch meant.

Target: galore-torch 1.0, bitsandbytes 0.50 (`Optimizer2State(optim_bits=..., is_paged=...)` keywords).
"""
from __future__ import annotations

import functools
import inspect
import logging

import torch

from fastpath.galore_no_sync import step_without_sync
from fastpath.guards import found, version_ok

logger = logging.getLogger(__name__)

try:
    from bitsandbytes.optim.optimizer import Optimizer2State
    from galore_torch import GaLoreAdamW8bit
except ImportError:
    Optimizer2State = GaLoreAdamW8bit = None


def galore_adamw8bit(fix_settings: bool = True, skip_sync: bool = True) -> type:
    """The optimizer class: stock GaLoreAdamW8bit, with its settings bound by keyword (`fix_settings`, where the
    target is the pinned one) and its step without per-weight syncs (`skip_sync`)."""
    if GaLoreAdamW8bit is None:
        raise ImportError("galore_torch.GaLoreAdamW8bit could not be imported: pip install -r finetuning/requirements.txt")
    fix = fix_settings and _settings_fix_applies()
    step = step_without_sync(GaLoreAdamW8bit) if skip_sync else None
    if not fix and step is None:
        return GaLoreAdamW8bit
    return _galore_class(fix, step)


def _settings_fix_applies() -> bool:
    what = "GaLore 8-bit settings by keyword"
    if not (found(Optimizer2State, "bitsandbytes' Optimizer2State", what) and version_ok("galore-torch", what)
            and version_ok("bitsandbytes", what)):
        return False
    if not {"optim_bits", "is_paged"} <= set(inspect.signature(Optimizer2State.__init__).parameters):
        logger.warning("%s: Optimizer2State takes no optim_bits/is_paged keywords; using the stock path.", what)
        return False
    return True


@functools.cache
def _galore_class(fix: bool, step_without_sync_) -> type:
    namespace = {"__doc__": "galore-torch's GaLoreAdamW8bit" + (", settings bound by keyword" if fix else "")
                 + (", no GPU sync per weight" if step_without_sync_ else "") + "."}
    if fix:
        def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, is_paged=False):
            Optimizer2State.__init__(self, "adam", params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                     optim_bits=8, is_paged=is_paged)
        namespace["__init__"] = __init__
    if step_without_sync_:
        @torch.no_grad()
        def step(self, closure=None):
            if self.is_paged:  # paged states are copied asynchronously: the syncs are needed
                return GaLoreAdamW8bit.step(self, closure)
            return step_without_sync_(self, closure)
        namespace["step"] = step
    return type("GaLoreAdamW8bitFixed" if fix else "GaLoreAdamW8bitNoSync", (GaLoreAdamW8bit,), namespace)
