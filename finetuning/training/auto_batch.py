"""The batch of a run given no batch flag: packed rows without padding, one micro-batch a step, in a token budget
chosen from the GPU's memory and the data's size; said in one log line, in the dry run too."""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import torch

from training import processes
from cli.arguments import DataArguments
from records.batching import PackedBatches, pack_into_rows
from records.loading import RunData

logger = logging.getLogger(__name__)

# Tokens per GPU a step, by script: (GPUs under LARGE_GPU_GIB of memory, GPUs with LARGE_GPU_GIB or more). Each fits
# its tier with room under T4 emulation and on an H100, and at 32768 a step is bound by the GPU, so more tokens buy
# little for more memory (the peaks and speeds: docs/benchmarks.md).
LARGE_GPU_GIB = 20
TOKEN_BUDGETS = {"QLoRA": (8192, 32768), "GaLore": (4096, 32768)}
# A small data set still gets a learning-rate schedule (warm-up, cosine decay) and a loss curve worth reading.
MIN_STEPS_PER_EPOCH = 32

ALTERNATIVES = ("--max_tokens_per_batch N sets the budget; --per_device_train_batch_size N batches by records "
                "instead.")


def tier_budget(script: str, gpu_gib: float) -> int:
    return TOKEN_BUDGETS[script][gpu_gib >= LARGE_GPU_GIB]


def token_budget(script: str, gpu_gib: float, data_tokens: int, max_seq_length: int, processes: int = 1) -> int:
    """Tokens per GPU a step: the GPU's tier's budget, cut so that `data_tokens` over `processes` GPUs make at least
    MIN_STEPS_PER_EPOCH steps an epoch; whole rows of max_seq_length, and at least one."""
    tier = tier_budget(script, gpu_gib)
    data_cap = data_tokens // (MIN_STEPS_PER_EPOCH * processes)
    return max(max_seq_length, min(tier, data_cap) // max_seq_length * max_seq_length)


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
    GPU (a dry run on a laptop) the budget is that of a GPU under LARGE_GPU_GIB, and the line says both."""
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
        small, large = (token_budget(script, gib, data_tokens, row, processes) for gib in (0, LARGE_GPU_GIB))
        tokens = small
        budgets = (f"{small:,} tokens per step per GPU on any GPU" if small == large else
                   f"{small:,} tokens per step per GPU under {LARGE_GPU_GIB} GiB of memory, {large:,} from "
                   f"{LARGE_GPU_GIB} GiB")
        counts = f"{steps(small)}" if small == large else f"{steps(small)} or {steps(large)}"
        line = (f"packed rows, {budgets} (the data's {data_tokens:,} tokens make {counts} steps an epoch; no GPU "
                f"here: what follows counts {small:,}).")
    else:
        gib, name = gpu
        tokens = token_budget(script, gib, data_tokens, row, processes)
        tier = tier_budget(script, gib)
        which = f"{name}, {gib:.0f} GiB" if processes == 1 else f"{processes} GPUs, the smallest {name} with {gib:.0f} GiB"
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
