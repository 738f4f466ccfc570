"""Override 11 (`offload`): gradient checkpointing whose saved layer inputs wait in pinned CPU memory.

Checkpointing keeps one tensor per decoder layer, its input, for the backward pass: 26 x tokens x 1,152 x 2 bytes
for gemma-3-1b (1.8 GiB at 32k tokens a step). Here each input is copied to pinned host memory on a side stream as
the forward pass goes on, and copied back on that stream one layer ahead of the backward pass, so the copies run
beside the compute; the copy back lands in memory of the compute stream, freed in its order. The layer runs in the
forward pass, its output detached, and again with grad in the backward pass (the reentrant scheme), under the same
autocast settings and random state. In the forward pass it runs without grad, or, where the layers are compiled
(`checkpoint_compiled`), with grad, so that both passes run the one compiled training graph.

What the Trainer never does, and this scheme does not support (stock checkpointing does): `torch.autograd.grad` over
the layers' weights (their gradients land in `.grad` only), a second backward pass over the same graph, and
tensors that require grad passed to the layer as keyword arguments.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
import torch.utils.checkpoint
from transformers import TrainerCallback

from fastpath.compiled_layers import Gemma3DecoderLayer, decoder_layers
from fastpath.guards import found, version_ok
from fastpath.patches import Patches

logger = logging.getLogger(__name__)

_copy_streams: dict = {}
_newest: dict = {}  # device -> the newest stash: the one before it is the next the backward pass needs
_anchors: dict = {}


def checkpoint(run: Callable, *args, **kwargs):
    """Stands in for torch.utils.checkpoint.checkpoint as a layer's `_gradient_checkpointing_func`; transformers
    calls it as checkpoint(partial(layer.__call__, **kwargs), hidden_states). Anything else: the stock function."""
    return _checkpoint(run, args, kwargs, forward_with_grad=False)


def checkpoint_compiled(run: Callable, *args, **kwargs):
    """`checkpoint` for compiled layers (override 10): the forward pass runs the layer's training graph too, with
    grad and its output detached, so a layer compiles one graph, not a second one without grad. Its saved
    tensors are freed as the layer returns; the recomputation in the backward pass holds the same ones anyway."""
    return _checkpoint(run, args, kwargs, forward_with_grad=True)


def _checkpoint(run: Callable, args: tuple, kwargs: dict, forward_with_grad: bool):
    keywords = getattr(run, "keywords", {})
    if not torch.is_grad_enabled():
        return run(*args, **kwargs)
    if kwargs or len(args) != 1 or not torch.is_tensor(args[0]) or keywords.get("output_attentions"):
        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)
    hidden = args[0]
    return (OffloadedCheckpoint.apply(run, hidden, _anchor(hidden.device), forward_with_grad),)


def _anchor(device) -> torch.Tensor:
    """An empty tensor that requires grad: the layer's output then has a backward pass even where its input does
    not (the first layer's, from frozen embeddings)."""
    if device not in _anchors:
        _anchors[device] = torch.empty(0, device=device, requires_grad=True)
    return _anchors[device]


class OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, hidden, anchor, with_grad=False):
        ctx.run = run
        ctx.autocast = _autocast_state(hidden.device.type)
        ctx.rng = _rng_state(hidden.device)
        ctx.stash = Stash(hidden)
        # Without grad here (autograd.Function's forward) unless `with_grad`, with grad in backward; as input, a tensor
        # that requires grad exactly when grad is on, so that a compiled layer sees one case per grad mode, not four.
        with torch.set_grad_enabled(with_grad):
            outputs = run(hidden.detach().requires_grad_(with_grad))
        output = outputs[0] if isinstance(outputs, tuple) else outputs
        return output.detach()

    @staticmethod
    def backward(ctx, grad):
        stash, ctx.stash = ctx.stash, None
        hidden = stash.load().detach().requires_grad_(True)
        device = hidden.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
            _set_rng_state(device, ctx.rng)
            with torch.enable_grad(), torch.autocast(device.type, **ctx.autocast):
                outputs = ctx.run(hidden)
        output = outputs[0] if isinstance(outputs, tuple) else outputs
        if output.requires_grad:
            torch.autograd.backward(output, grad)
        return None, hidden.grad if ctx.needs_input_grad[1] else None, None, None


class Stash:
    """One layer input, kept in pinned host memory on a GPU (on the CPU, the tensor itself)."""

    def __init__(self, tensor: torch.Tensor):
        self.device = tensor.device
        self.on_device: Optional[torch.Tensor] = None
        self.previous = _newest.get(self.device)
        if self.previous is not None and self.previous.host is None:
            self.previous = None  # already back for its backward pass
        _newest[self.device] = self
        if self.device.type != "cuda":
            self.host = tensor.detach()
            return
        stream = _copy_stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))  # the input is complete
        with torch.cuda.stream(stream):
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.host.copy_(tensor, non_blocking=True)
        tensor.record_stream(stream)  # its memory is not reused before the copy has read it

    def prefetch(self) -> None:
        if self.on_device is None and self.device.type == "cuda":
            # Allocated in the compute stream's order, so that its memory is reused in that order once freed. A block
            # allocated on the copy stream and used by the compute stream (record_stream) waits, when freed, until the
            # GPU has caught up with the host: several layers' inputs when the host runs ahead (docs/benchmarks.md).
            self.stream = torch.cuda.current_stream(self.device)
            self.on_device = torch.empty(self.host.shape, dtype=self.host.dtype, device=self.device)
            copy = _copy_stream(self.device)
            copy.wait_stream(self.stream)  # the block's last user may still be queued on the compute stream
            with torch.cuda.stream(copy):
                self.on_device.copy_(self.host, non_blocking=True)

    def __del__(self):
        # A prefetch never loaded (a backward pass abandoned: an error, an out-of-memory retry): its block goes back
        # to the compute stream's pool, which must not reuse it before the copy into it is done.
        if getattr(self, "on_device", None) is not None and getattr(self, "stream", None) is not None:
            self.stream.wait_stream(_copy_stream(self.device))

    def load(self) -> torch.Tensor:
        if self.device.type != "cuda":
            tensor, self.host = self.host, None
            return tensor
        self.prefetch()
        torch.cuda.current_stream(self.device).wait_stream(_copy_stream(self.device))
        tensor, self.on_device, self.host = self.on_device, None, None
        if self.previous is not None and self.previous.host is not None:
            self.previous.prefetch()  # the next layer back, while this one recomputes
        self.previous = None
        return tensor


def _copy_stream(device) -> "torch.cuda.Stream":
    if device not in _copy_streams:
        _copy_streams[device] = torch.cuda.Stream(device)
    return _copy_streams[device]


def _autocast_state(device_type: str) -> dict:
    return dict(enabled=torch.is_autocast_enabled(device_type), dtype=torch.get_autocast_dtype(device_type),
                cache_enabled=torch.is_autocast_cache_enabled())


def _rng_state(device):
    cpu = torch.get_rng_state()
    return cpu, torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device, state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)



# ---------------------------------------------------------------------------
# The install: each decoder layer's checkpointing function, once the Trainer has set it
# ---------------------------------------------------------------------------

def offload_target_found(model) -> bool:
    what = "offloaded layer inputs"
    return (found(Gemma3DecoderLayer, "Gemma3DecoderLayer", what) and version_ok("transformers", what)
            and bool(decoder_layers(model)))


class OffloadLayerInputs(TrainerCallback):
    """At the start of train(), once the Trainer has switched checkpointing on (which sets each layer's
    `_gradient_checkpointing_func`), makes `checkpoint` (`checkpoint_compiled` for compiled layers) every decoder
    layer's checkpointing function; `patches` puts the Trainer's back when the run ends."""

    def __init__(self, patches: Patches | None = None, compiled: bool = False):
        self.patches = patches if patches is not None else Patches()
        self.function = checkpoint_compiled if compiled else checkpoint

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        layers = [layer for layer in decoder_layers(model) if getattr(layer, "gradient_checkpointing", False)]
        for layer in layers:
            self.patches.set(layer, "_gradient_checkpointing_func", self.function)
        logger.info("Checkpointed inputs of %d decoder layers go to pinned CPU memory.", len(layers))
