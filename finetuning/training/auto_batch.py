"""The batch of a run given no batch flag: packed rows without padding, one micro-batch a step, in a token budget
chosen from the GPU's memory, the model's size and the data's size; said in one log line, in the dry run too."""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import torch

import common
from cli.arguments import LARGE_GPU_GIB, MIN_STEPS_PER_EPOCH, TOKEN_BUDGETS, DataArguments
from models import shapes
from records.batching import PackedBatches, pack_into_rows
from records.run_data import RunData
from training import memory_estimate, processes

logger = logging.getLogger(__name__)

# The budgets given no batch flag (the flag's defaults, in cli/arguments.py, where --help reads them). A bigger model
# gets less where its memory estimate says so (memory_estimate.largest_budget): gemma-3-4b's GaLore 4,096 on 24 GB.

ALTERNATIVES = ("--max_tokens_per_batch N sets the budget; --per_device_train_batch_size N batches by records "
                "instead.")


def tier_budget(script: str, gpu_gib: float) -> int:
    return TOKEN_BUDGETS[script][gpu_gib >= LARGE_GPU_GIB]


def token_budget(script: str, gpu_gib: float, data_tokens: int, max_seq_length: int, processes: int = 1,
                 memory_cap: Optional[int] = None) -> int:
    """Tokens per GPU a step: the GPU's tier's budget (at most `memory_cap`, what the model's memory estimate allows
    on this GPU), cut so that `data_tokens` over `processes` GPUs make at least MIN_STEPS_PER_EPOCH steps an epoch;
    whole rows of max_seq_length, and at least one."""
    tier = min(tier_budget(script, gpu_gib), memory_cap or tier_budget(script, gpu_gib))
    data_cap = data_tokens // (MIN_STEPS_PER_EPOCH * processes)
    return max(max_seq_length, min(tier, data_cap) // max_seq_length * max_seq_length)


# What a dry run without a GPU counts for each tier: a T4 (no bf16), and the smallest usual card of the large tier
# (memory_estimate.CARDS' first two).
REFERENCE_GPUS = tuple((gib, not bf16, name) for name, gib, bf16 in memory_estimate.CARDS[:2])  # (GiB, fp16, name)


def run_estimate(script: str, training_args, model_path: str, fp16: bool) -> Optional[memory_estimate.Estimate]:
    """The memory estimate of this run's model (its config, read without weights) at the scripts' default ranks;
    None for a model whose config the estimate cannot read (not a Gemma-like decoder)."""
    shape = shapes.known_shape(model_path, common.load_config(model_path))
    return None if shape is None else memory_estimate.estimate(
        shape, script, fp16=fp16, checkpointing=bool(training_args.gradient_checkpointing),
        processes=max(1, training_args.world_size))


def memory_cap(est: Optional[memory_estimate.Estimate], gpu_gib: float, row: int) -> Optional[int]:
    """The largest budget the estimate fits on this GPU; one row where none does (settings.check has refused a run
    whose one row does not fit before anything loaded); None without an estimate."""
    return None if est is None else memory_estimate.largest_budget(est, gpu_gib, row) or row


def check_model_fits(script: str, model_args, data_args: DataArguments, training_args, method_args=None) -> None:
    """Before anything loads: a model whose memory estimate at one row of --max_seq_length is past this GPU's memory
    (GaLore on gemma-3-4b on a T4) stops with the estimate and the card it needs (memory_estimate.check_fits). No
    GPU here: nothing to check."""
    gpu = smallest_gpu(training_args)
    if gpu is None:
        return
    ranks = {"lora_rank": method_args.lora_r} if hasattr(method_args, "lora_r") else \
        {"galore_rank": method_args.galore_rank} if hasattr(method_args, "galore_rank") else {}
    shape = shapes.known_shape(model_args.model_name_or_path,
                               common.load_config(model_args.model_name_or_path, model_args.trust_remote_code))
    if shape is None:
        return
    memory_estimate.check_fits(shape, script, bool(training_args.fp16), gpu, data_args.max_seq_length,
                               checkpointing=bool(training_args.gradient_checkpointing),
                               processes=max(1, training_args.world_size), **ranks)


def smallest_gpu(training_args) -> Optional[tuple[float, str]]:
    """(GiB, name) of this process's GPU; under DDP the smallest of all processes' GPUs, so that every process
    chooses the same budget (a different one would give them different step counts). None without a GPU."""
    local = None
    if torch.cuda.is_available() and not training_args.use_cpu:
        properties = torch.cuda.get_device_properties(training_args.device)
        local = (properties.total_memory / 2**30, properties.name)
    found = [gpu for gpu in processes.gather(local, training_args) if gpu is not None]
    return min(found) if found else None


def choose_batch(script: str, data_args: DataArguments, training_args, loaded: RunData) -> tuple:
    """(data, training arguments) for the run: unchanged where a batch flag was given (or under --smoke); otherwise
    packed rows without padding, one micro-batch a step, in token_budget's budget, said in one log line. Without a
    GPU (a dry run on a laptop) the budget is that of a GPU under LARGE_GPU_GIB, and the line says both. A model
    whose memory estimate (memory_estimate.py) allows less than the GPU's tier gets that, and the line says so."""
    if not data_args.auto_batch:
        return data_args, training_args
    row = data_args.max_seq_length
    lengths = [min(length, row) for length in loaded.lengths]
    data_tokens, processes = sum(lengths), max(1, training_args.world_size)
    rows = len(pack_into_rows(lengths, row))

    def steps(tokens: int) -> int:  # as the dry run counts them: optimizer steps per process an epoch
        return len(PackedBatches(rows, tokens // row, processes=processes)) // processes

    gpu = smallest_gpu(training_args)
    if gpu is None:
        estimates = [run_estimate(script, training_args, loaded.model_path, fp16) for _, fp16, _ in REFERENCE_GPUS]
        caps = [memory_cap(est, gib, row) for est, (gib, _, _) in zip(estimates, REFERENCE_GPUS)]
        small, large = (token_budget(script, tier_gib, data_tokens, row, processes, cap)
                        for tier_gib, cap in zip((0, LARGE_GPU_GIB), caps))
        tokens = small
        budgets = (f"{small:,} tokens per step per GPU on any GPU" if small == large else
                   f"{small:,} tokens per step per GPU under {LARGE_GPU_GIB} GiB of memory, {large:,} from "
                   f"{LARGE_GPU_GIB} GiB")
        counts = f"{steps(small)}" if small == large else f"{steps(small)} or {steps(large)}"
        line = (f"packed rows, {budgets} (the data's {data_tokens:,} tokens make {counts} steps an epoch; no GPU "
                f"here: what follows counts {small:,}).")
        capped = [name for (gib, _, name), cap, tier_gib in zip(REFERENCE_GPUS, caps, (0, LARGE_GPU_GIB))
                  if cap is not None and cap < tier_budget(script, tier_gib)]
        if capped:
            line += f" {estimates[0].shape.label}: its memory estimate caps these, on {' and on '.join(capped)}"
            if memory_estimate.largest_budget(estimates[0], REFERENCE_GPUS[0][0], row) is None:
                needed = memory_estimate.card_needed(estimates[0].shape, script, row)
                line += (f"; on {REFERENCE_GPUS[0][2]} not even one row fits: it needs "
                         f"{needed[0] if needed else 'more than one GPU'}")
            line += "."
    else:
        gib, name = gpu
        est = run_estimate(script, training_args, loaded.model_path, bool(training_args.fp16))
        cap = memory_cap(est, gib, row) or tier_budget(script, gib)
        tokens = token_budget(script, gib, data_tokens, row, processes, cap)
        tier = min(tier_budget(script, gib), cap)
        which = f"{name}, {gib:.0f} GiB" if processes == 1 else f"{processes} GPUs, the smallest {name} with {gib:.0f} GiB"
        if cap < tier_budget(script, gib):
            which += f"; {est.shape.label}: at most {cap:,} by its memory estimate, {est.describe(cap)}"
        made = f"the data's {data_tokens:,} tokens make {steps(tokens)} steps an epoch"
        if tokens < max(row, tier // row * row):
            why = f": up to {tier:,}, cut so that {made}"
        elif tokens != tier:
            why = f": {tier:,} in whole rows of --max_seq_length {row}; {made}"
        else:
            why = f"; {made}"
        line = f"packed rows, {tokens:,} tokens per step per GPU ({which}{why})."
    logger.info("No batch flags given: %s %s", line, ALTERNATIVES)
    # Set, not replaced: main's training arguments are check_run's copy, and a replaced copy would set the devices up
    # again.
    training_args.gradient_accumulation_steps = 1
    return dataclasses.replace(data_args, max_tokens_per_batch=tokens, padding_free=True), training_args
