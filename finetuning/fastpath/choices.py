"""--compile_layers and --offload_activations (overrides 10 and 11): what 'auto' means on this machine for this batch,
said in one log line; a switch that --fast_path turns off leaves its override off whatever the flag.

Measured on an H100 (docs/benchmarks.md, 2026-11-27): compiled layers take most of the CPU time out of a step, which
bounds small batches; 'auto' leaves them off under DDP, where they have not been run yet. Offloading the checkpointed layer inputs cost nothing at 32k tokens a step and gained 27% at 8k
(its forward pass runs the layers without grad), so 'auto' offloads packed batches at every budget where the scheme
is safe (packed: fixed shapes, so the pinned host buffers are reused step after step): one
process (its recomputation runs a backward pass inside the backward pass, which DDP's hooks were not tried with) and
no dropout inside compiled layers (their two graphs would draw different masks).
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import torch

from cli.errors import UserInputError

logger = logging.getLogger(__name__)

COMPILE_FROM_CAPABILITY = (8, 0)  # A100, L4, H100: measured there; a T4 (7.5) keeps the eager kernels


@dataclass(frozen=True)
class SpeedChoices:
    compile_layers: bool
    offload_activations: bool


def choose(model_args, data_args, training_args, dropout: float = 0.0, switches=None) -> SpeedChoices:
    """Resolve 'auto' for both flags; 'yes' and 'no' stand. `switches`: the --fast_path switches that are on (None:
    all); compile_layers or offload off there means off."""
    gpu = torch.cuda.is_available() and not training_args.use_cpu
    capability = torch.cuda.get_device_capability(training_args.device) if gpu else (0, 0)
    packed = bool(data_args.packs_without_padding)  # fixed [rows, row length] shapes: nothing to recompile
    single = training_args.world_size <= 1
    why = {}

    on = (lambda name: True) if switches is None else (lambda name: name in switches)
    compiled = model_args.compile_layers == "yes" and on("compile_layers")
    if compiled and gpu and not importlib.util.find_spec("triton"):
        raise UserInputError("--compile_layers yes: this machine has an NVIDIA GPU but no triton, which torch.compile "
                             "generates GPU kernels with. pip install triton (the version your torch names), or "
                             "--compile_layers no.")
    if not on("compile_layers"):
        why["compile"] = "--fast_path leaves compile_layers off"
    elif model_args.compile_layers == "auto":
        whole = getattr(training_args, "torch_compile", False)  # the Trainer compiles the whole model instead
        compiled = (gpu and capability >= COMPILE_FROM_CAPABILITY and packed and single and not whole
                    and importlib.util.find_spec("triton"))
        version = f"compute capability {capability[0]}.{capability[1]}"
        why["compile"] = (f"auto: packed batches, {version}" if compiled else "auto: " + (
            "no GPU" if not gpu else "batches not packed" if not packed
            else f"{version}, under 8.0" if capability < COMPILE_FROM_CAPABILITY
            else "several processes, not measured yet" if not single
            else "--torch_compile compiles the whole model" if whole else "no triton"))
    offloaded = model_args.offload_activations == "yes" and on("offload")
    if not on("offload"):
        why["offload"] = "--fast_path leaves offload off"
    elif model_args.offload_activations == "auto":
        offloaded = (gpu and training_args.gradient_checkpointing and packed and single
                     and not (compiled and dropout))
        why["offload"] = "auto" if offloaded else "auto: " + (
            "no GPU" if not gpu else "no gradient checkpointing" if not training_args.gradient_checkpointing
            else "batches not packed (shapes that change every step would each hold pinned memory)" if not packed
            else "several processes" if not single else "dropout in compiled layers")
    compile_text = ("compiled" if compiled else "eager") + f" ({why.get('compile', 'as given')})"
    stays = "kept on the GPU" if gpu else "kept in memory"
    offload_text = ("in pinned CPU memory" if offloaded else stays) + f" ({why.get('offload', 'as given')})"
    logger.info("Decoder layers %s; their checkpointed inputs %s. --compile_layers and --offload_activations "
                "(auto, yes, no) set this.", compile_text, offload_text)
    return SpeedChoices(bool(compiled), bool(offloaded))
