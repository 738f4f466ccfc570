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
import logging
import os
import time
from typing import Callable, Iterator, Optional

import torch
from transformers import TrainerCallback

from fastpath.guards import found, has, version_ok
from fastpath.patches import Patches

try:
    from transformers.models.gemma3.modeling_gemma3 import Gemma3DecoderLayer
except ImportError:
    Gemma3DecoderLayer = None

logger = logging.getLogger(__name__)

# Room for the graphs a run can need (up to 8: layer kinds without override 17 x grad modes x a batch of one row).
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
    torch's warning, instead of stopping the run; room for the graphs the run needs; and the layers' Python floats
    taken as constants, which spares dynamo a second analysis of the first frame (it restarts when it cannot turn
    a float into a tensor). Restored afterwards."""
    config = torch._dynamo.config
    settings = {"suppress_errors": True}
    if hasattr(config, "specialize_float"):  # the layers' floats (scales, eps) never change: no traced-again frame
        settings["specialize_float"] = True
    if hasattr(config, "recompile_limit"):
        settings["recompile_limit"] = max(config.recompile_limit, RECOMPILE_LIMIT)
    with config.patch(**settings):
        yield


def _training_only(compiled: Callable, stock: Callable) -> Callable:
    def forward(self, *args, **kwargs):
        return (compiled if self.training else stock)(*args, **kwargs)

    return forward


# ---------------------------------------------------------------------------
# The wait before the first step: said before it starts, and how long it took after
# ---------------------------------------------------------------------------

# torch.compile's own timers (torch._dynamo.utils.compilation_time_metrics): dynamo's frames with everything compiled
# inside them (torch 2.13 compiles a graph's backward there too), the backward graphs, inductor's code generation, and
# the wait for the kernels that inductor builds in worker processes.
_TIMERS = {"total": "_compile.compile_inner", "backward": "compile_fx.<locals>.bw_compiler",
           "generated": "compile_fx_inner", "kernels": "async_compile.wait"}


def compile_seconds() -> dict:
    """Seconds torch.compile has spent in this process so far, by the parts of `_TIMERS`."""
    metrics = getattr(torch._dynamo.utils, "compilation_time_metrics", {})
    return {part: sum(metrics.get(name, ())) for part, name in _TIMERS.items()}


def compile_cache() -> tuple[str, bool]:
    """torch's compile cache folder, and whether it already holds compiled graphs (read only: torch's own
    `cache_dir()` would set an environment variable and make the folder)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:
        return "torch's cache", False
    folder = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir()
    try:
        with os.scandir(os.path.join(folder, "fxgraph")) as graphs:
            return folder, any(graphs)
    except OSError:  # not there yet, or not ours to read: a log line must not stop the run
        return folder, False


# The compiled graphs a run saves in its output folder after the first step (torch's portable cache artifacts): a run
# resumed there, on a fresh Colab session too, reads them instead of compiling from nothing.
SAVED_GRAPHS = "torch_compile_cache.bin"


class CompileWait(TrainerCallback):
    """Says what the first step waits for (compiling the layers) and where torch caches it, then how long it took
    and where the time went, from torch's own timers: a user facing a still progress bar knows why. Loads the graphs
    an earlier run saved in the output folder before the first step, and saves them there after it."""

    def __init__(self, one_graph: bool = False):
        self.began = None
        self.logged = False
        self.graphs = ("one graph for both kinds of layer, sliding-window and full attention (override 17)" if one_graph
                       else "a graph for each kind of layer, sliding-window and full attention")

    def on_step_begin(self, args, state, control, **kwargs):
        if self.began is not None:
            return
        loaded = load_graphs(_saved_graphs(args))
        self.began, self.before = time.perf_counter(), compile_seconds()
        folder, warm = compile_cache()
        logger.info("The first step compiles the decoder layers (%s). torch's compile cache %s %s%s: %s",
                    self.graphs, folder, "holds earlier compilations" if warm else "is empty",
                    f", with the graphs an earlier run saved in {loaded} added" if loaded else "",
                    "a run of the same model reuses what it can." if warm or loaded else "with an empty cache, as on "
                    "a fresh Colab session, the first step came 33-38 s after loading on an H100 with a graph for "
                    "each kind of layer (docs/benchmarks.md); later runs on this machine, and runs resumed from this "
                    "output folder, wait less. --compile_layers no skips it.")

    def on_step_end(self, args, state, control, **kwargs):
        if self.logged or self.began is None:
            return
        self.logged = True
        now = compile_seconds()
        spent = {part: now[part] - self.before[part] for part in now}
        saved = save_graphs(_saved_graphs(args)) if getattr(args, "should_save", False) else None
        logger.info("First step: %.0f s, of which torch.compile %.0f s (by its own timers: backward graphs %.0f s; "
                    "inductor's code generation %.0f s, %.0f s of it waiting for kernel builds). Later steps run the "
                    "compiled layers.%s", time.perf_counter() - self.began, spent["total"], spent["backward"],
                    spent["generated"], spent["kernels"],
                    f" The compiled graphs are saved in {saved}, for a run resumed from this folder." if saved else "")


def _saved_graphs(args) -> Optional[str]:
    folder = getattr(args, "output_dir", None)
    return os.path.join(folder, SAVED_GRAPHS) if folder else None


def load_graphs(path: Optional[str]) -> Optional[str]:
    """Add the compiled graphs saved at `path` to torch's cache; returns `path` where it did."""
    if not path or not os.path.isfile(path) or not hasattr(torch.compiler, "load_cache_artifacts"):
        return None
    try:
        with open(path, "rb") as saved:
            read = torch.compiler.load_cache_artifacts(saved.read())  # None: torch could not read them (it says why)
        why = "" if read is not None else "torch could not read them"
    except Exception as error:  # noqa: BLE001 - another torch's file, or a damaged one: the run compiles instead
        why = f"{type(error).__name__}: {error}"
    if why:
        logger.warning("The compiled graphs in %s were not read (%s); the first step compiles them.", path, why)
        return None
    return path


def save_graphs(path: Optional[str]) -> Optional[str]:
    """Write what torch compiled in this process to `path` (whole or not at all); returns `path` where it did."""
    if not path or not hasattr(torch.compiler, "save_cache_artifacts"):
        return None
    try:
        artifacts = torch.compiler.save_cache_artifacts()
        if not artifacts:
            return None
        partial = path + ".partial"
        with open(partial, "wb") as saved:
            saved.write(artifacts[0])
        os.replace(partial, path)
    except Exception as error:  # noqa: BLE001 - a cache not written must not stop the training
        logger.warning("The compiled graphs were not saved to %s (%s: %s); a resumed run compiles them again.", path,
                       type(error).__name__, error)
        return None
    return path
