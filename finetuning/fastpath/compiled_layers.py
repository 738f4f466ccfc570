"""Override 10 (`compile_layers`): each Gemma 3 decoder layer's forward compiled by torch.compile as one region, in
training mode only; inside it the fused LoRA layer (override 2) runs as plain operations that the compiler traces.

A step of small batches is bound by the CPU's kernel launches: a compiled layer launches a few fused kernels instead.
All layers share the compiled code (torch inlines modules, so a layer's weights are inputs of the graph), and sizes are
symbols from the first compilation (`dynamic=True`). Evaluation and generation, with their caches and changing
shapes, stay eager. The compiler's settings this needs hold while training runs (`compiler_settings`), then go back.

Target: transformers 4.57 `Gemma3DecoderLayer`; torch >= 2.6 (`torch.compiler.is_compiling`, bitsandbytes'
`dequantize_4bit` op with its fake kernel).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch

from fastpath.guards import found, has, version_ok
from fastpath.patches import Patches

try:
    from transformers.models.gemma3.modeling_gemma3 import Gemma3DecoderLayer
except ImportError:
    Gemma3DecoderLayer = None

# Room for the graphs a run can need (up to 8: layer kinds x grad modes x a batch of one row) under torch's limit.
RECOMPILE_LIMIT = 16


def decoder_layers(model) -> list:
    return [module for module in model.modules() if Gemma3DecoderLayer and isinstance(module, Gemma3DecoderLayer)]


def compile_decoder_layers(model, backend="inductor", patches: Optional[Patches] = None) -> int:
    """torch.compile each decoder layer's forward as one region, in training mode only; returns how many."""
    what = "compiled decoder layers"
    if not (found(Gemma3DecoderLayer, "Gemma3DecoderLayer", what) and version_ok("transformers", what)
            and has(torch, ["compile"], what)):
        return 0
    patches = patches if patches is not None else Patches()
    layers = decoder_layers(model)
    for layer in layers:
        compiled = torch.compile(layer.forward, backend=backend, dynamic=True)
        patches.set(layer, "forward", _training_only(compiled, layer.forward).__get__(layer))
    return len(layers)


@contextlib.contextmanager
def compiler_settings() -> Iterator[None]:
    """While training: a layer torch cannot compile (a compiler that fails on this machine) runs eagerly, with
    torch's warning, instead of stopping the run; and room for the graphs the run needs. Restored afterwards."""
    config = torch._dynamo.config
    settings = {"suppress_errors": True}
    if hasattr(config, "recompile_limit"):
        settings["recompile_limit"] = max(config.recompile_limit, RECOMPILE_LIMIT)
    with config.patch(**settings):
        yield


def _training_only(compiled: Callable, stock: Callable) -> Callable:
    def forward(self, *args, **kwargs):
        return (compiled if self.training else stock)(*args, **kwargs)

    return forward
