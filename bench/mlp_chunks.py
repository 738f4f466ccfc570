"""Bench only: an MLP's forward over its tokens in pieces (once override 14): fewer of its largest tensors alive at
once. It cost speed and left the run's peak (docs/benchmarks.md), so it left the product for the bench.

The MLP works token by token, so the answer is the one of the whole; each piece runs the stock forward.
"""
from __future__ import annotations

import inspect
import logging
import types
from typing import Callable

import torch

from fastpath.guards import found, version_ok

logger = logging.getLogger(__name__)

try:
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MLP
except ImportError:
    Gemma3MLP = None


def chunk_mlp_tokens(model, chunks: int) -> int:
    """Each Gemma3MLP's stock forward over its tokens in `chunks` pieces (the same answer: the MLP works token by
    token); returns how many. Measured by the bench's 'MLP in 2 token chunks' rows."""
    what = "MLP in token chunks"
    if chunks < 2 or not (found(Gemma3MLP, "Gemma3MLP", what) and version_ok("transformers", what)):
        return 0
    if list(inspect.signature(Gemma3MLP.forward).parameters) != ["self", "x"]:
        logger.warning("%s: Gemma3MLP.forward's arguments changed; using the stock path.", what)
        return 0
    mlps = [module for module in model.modules() if isinstance(module, Gemma3MLP)]
    for module in mlps:
        run_in_pieces(module, Gemma3MLP.forward, chunks)
    return len(mlps)


def run_in_pieces(module, stock: Callable, chunks: int) -> None:
    """Makes `module.forward` run `stock` over its tokens in `chunks` pieces while training."""

    def forward(self, x):
        rows = x.reshape(-1, x.shape[-1])  # tokens as rows: each piece contiguous, with no copy of its own
        if not self.training or rows.shape[0] < 2 * chunks:  # decoding, tiny batches: pieces of 0 or 1 token
            return stock(self, x)
        # Bounds by floor division: a compiled layer's graph holds for every token count (tensor_split guards on
        # the count's remainder, compiling again for each).
        bounds = [rows.shape[0] * i // chunks for i in range(chunks + 1)]
        pieces = [stock(self, rows[start:end]) for start, end in zip(bounds, bounds[1:])]
        return torch.cat(pieces).view(*x.shape[:-1], -1)

    module.forward = types.MethodType(forward, module)
