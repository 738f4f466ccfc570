"""Override 7b (`galore_no_sync`, a fix): GaLoreAdamW8bit's step without its `torch.cuda.synchronize()` after every weight.

Every kernel of the step runs on one stream, in order, so nothing needs the wait unless the states are paged; on a
GPU each call drains the queue (about 340 a step for gemma-3-1b), and on the CPU it would fail. Nothing global is
swapped: the step used is a copy of galore-torch's own function whose globals see a `torch` where
`cuda.synchronize` does nothing.

Target: galore-torch 1.0 `GaLoreAdamW8bit.step` (a `torch.no_grad()`-wrapped function calling
`torch.cuda.synchronize()` by that name).
"""
from __future__ import annotations

import functools
import inspect
import logging
import types
from typing import Callable, Optional

import torch

from fastpath.guards import version_ok

logger = logging.getLogger(__name__)


class _Namespace:
    """Stands for a module in a copied function's globals: `overrides` by name, everything else from `module`."""

    def __init__(self, module, **overrides):
        self._module, self._overrides = module, overrides

    def __getattr__(self, name):
        return self._overrides[name] if name in self._overrides else getattr(self._module, name)


def _no_sync(*args, **kwargs) -> None:
    return None


def step_without_sync(stock_class: type) -> Optional[Callable]:
    """A copy of `stock_class.step` whose `torch.cuda.synchronize` does nothing; None (the stock step stays) where
    the step is not the one this was written for."""
    what = "GaLore step without a GPU sync per weight"
    if not version_ok("galore-torch", what):
        return None
    stock = inspect.unwrap(stock_class.step)
    if stock.__closure__ or "torch" not in stock.__globals__ or "synchronize" not in stock.__code__.co_names:
        logger.warning("%s: GaLoreAdamW8bit.step changed; using the stock path.", what)
        return None
    return _copy_without_sync(stock)


@functools.cache  # one copy per step: the optimizer class built on it is cached too
def _copy_without_sync(stock: Callable) -> Callable:
    torch_here = _Namespace(torch, cuda=_Namespace(torch.cuda, synchronize=_no_sync))
    globals_copy = dict(stock.__globals__, torch=torch_here)
    step = types.FunctionType(stock.__code__, globals_copy, stock.__name__, stock.__defaults__)
    return torch.no_grad()(step)
