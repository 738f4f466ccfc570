"""Override 17 (`one_layer_graph`): Gemma 3's two kinds of decoder layer, sliding-window and full attention, run
through one compiled graph instead of one each, so the first step compiles half as much.

What tells the kinds apart is read from each layer: `self_attn.is_sliding`, which picks the local or global
rotary embeddings, and `self_attn.sliding_window` (an int or None), which goes to the attention function. torch.compile
bakes both into the graph. Here each layer's training call is given its own rotary embeddings under both names and
its window as a number in the keyword arguments (`varlen_attention.LAYER_WINDOW`; FULL_WINDOW, wider than any row,
for a full-attention layer), which a graph compiled with `dynamic=True` takes as a symbol; the two attributes read
the same for every layer while the call runs, and are put back after it. The window reaches the kernels through
override 4: flash attention treats a window at least as long as the row as none, and the packed mask built from the
record bounds does too. Where transformers builds the masks (the CPU; SDPA or eager attention), the masks carry each
layer's window.

Installed only on top of compiled layers (override 10), where the attention reads the window from there or from the
masks (SDPA, eager, override 4's function; not flash-attention-2, which reads `sliding_window`); with override 4's
function, on the CPU or a GPU with flash attention only: the memory-efficient kernel of older GPUs has no window, and
whether it serves a sliding layer changes with each batch.

Target: transformers 4.57 `Gemma3DecoderLayer.forward(hidden_states, position_embeddings_global,
position_embeddings_local, ...)` and `Gemma3Attention.is_sliding` / `.sliding_window`.
"""
from __future__ import annotations

import inspect
import logging
from typing import Callable, Optional

from fastpath.compiled_layers import Gemma3DecoderLayer, decoder_layers
from fastpath.guards import found, version_ok
from fastpath.patches import Patches
from fastpath.varlen_attention import LAYER_WINDOW, VARLEN_ATTENTION, flash_kernel

logger = logging.getLogger(__name__)

# A full-attention layer's window: wider than any row, so no token is cut off; within int32 for the kernels.
FULL_WINDOW = 2**30
# The attention functions that take the window from LAYER_WINDOW or from the masks, not from `sliding_window`.
READS_WINDOW = ("sdpa", "eager", VARLEN_ATTENTION)
ROTARY = ("position_embeddings_global", "position_embeddings_local")


def unify_layer_kinds(model, patches: Optional[Patches] = None) -> int:
    """Wrap each decoder layer's (compiled) forward so that every kind calls it alike; returns how many layers."""
    what = "one graph for both kinds of layer"
    if not (found(Gemma3DecoderLayer, "Gemma3DecoderLayer", what) and version_ok("transformers", what)):
        return 0
    parameters = inspect.signature(Gemma3DecoderLayer.forward).parameters
    layers = decoder_layers(model)
    if not layers or not all(name in parameters for name in ROTARY) or not all(
            hasattr(layer.self_attn, "is_sliding") and hasattr(layer.self_attn, "sliding_window") for layer in layers):
        logger.warning("%s: Gemma3DecoderLayer is not the one of transformers 4.57 (its rotary arguments or its "
                       "attention's is_sliding and sliding_window); each kind keeps its own graph.", what)
        return 0
    windows = {layer.self_attn.sliding_window for layer in layers if layer.self_attn.is_sliding}
    if any(window is None or not 0 < window < FULL_WINDOW for window in windows):
        logger.info("%s: the sliding-window layers' windows are %s, not all numbers from 1 to %d; each kind keeps "
                    "its own graph.", what, sorted(windows, key=str), FULL_WINDOW - 1)
        return 0
    implementation = getattr(layers[0].self_attn.config, "_attn_implementation", None)
    if implementation not in READS_WINDOW:
        logger.info("%s: not with %s attention, which reads sliding_window itself; each kind keeps its own graph.",
                    what, implementation)
        return 0
    weight = next(layers[0].parameters())
    if (implementation == VARLEN_ATTENTION and weight.device.type == "cuda"
            and not flash_kernel(weight.device, layers[0].self_attn.head_dim)):
        logger.info("%s: not on this GPU (no flash attention kernel, whose window both kinds would share); each kind "
                    "keeps its own graph.", what)
        return 0
    patches = patches if patches is not None else Patches()
    for layer in layers:
        patches.set(layer, "forward", _as_one_kind(layer, layer.forward).__get__(layer))
    return len(layers)


def _as_one_kind(layer, forward: Callable) -> Callable:
    sliding = bool(layer.self_attn.is_sliding)
    window = layer.self_attn.sliding_window if sliding else FULL_WINDOW
    own = ROTARY[1] if sliding else ROTARY[0]

    def unified(self, *args, **kwargs):
        if not self.training or own not in kwargs or kwargs.get("past_key_values") is not None:
            return forward(*args, **kwargs)  # evaluation and generation: the stock layer, as it was
        attention = self.self_attn
        # The layer reads the local one (is_sliding below); both named, so neither reading can pick the other's.
        kwargs[ROTARY[0]] = kwargs[ROTARY[1]] = kwargs[own]
        kwargs[LAYER_WINDOW] = window
        kept = attention.is_sliding, attention.sliding_window
        attention.is_sliding, attention.sliding_window = True, None
        try:
            return forward(*args, **kwargs)
        finally:
            attention.is_sliding, attention.sliding_window = kept

    return unified
