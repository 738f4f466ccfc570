"""What the bench measures in each setup's child process, for our setups and Unsloth's alike: each optimizer step's
time and real tokens, the time from the process's start to the first step, the graphs torch.compile made after the
second step, and peak memory; summarised into one row."""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

PROCESS_START = time.time()  # a setup's child: its wait before the first step counts from here

# Dense bf16 peak of each GPU (no sparsity), for MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "T4": 65e12}


def measuring_callbacks(warmup: int) -> tuple[list, dict]:
    """Trainer callbacks that time each optimizer step and count its real tokens; the dict fills in as training runs.

    The Trainer counts the tokens itself (`--include_num_input_tokens_seen non_padding`: the attention mask's sum,
    or the non-padding ids of a padding-free batch), so a step's tokens are the growth of its count.
    """
    import torch
    from transformers import TrainerCallback

    import step_diagnostics

    result = {"tokens": [], "step_seconds": [], "gpu_tail_seconds": []}

    def graphs() -> int:  # what torch.compile has compiled so far in this process (torch's own counter)
        return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])

    class Timer(TrainerCallback):
        seen = 0

        def on_train_begin(self, args, state, control, **kwargs):
            result["train_begin_s"] = time.time() - PROCESS_START  # the model loaded, the trainer built

        def on_step_begin(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            queued = time.perf_counter()  # the host has queued the step's last kernel
            torch.cuda.synchronize()
            result["step_seconds"].append(time.perf_counter() - self.start)
            result["gpu_tail_seconds"].append(time.perf_counter() - queued)
            result["tokens"].append(state.num_input_tokens_seen - self.seen)
            self.seen = state.num_input_tokens_seen
            if len(result["step_seconds"]) == 1:  # the first step compiles: its peak is told apart from the rest's
                result["first_step_compile_s"] = compile_timers()
                result["first_step_peak_bytes"] = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                result["start_to_first_step_s"] = time.time() - PROCESS_START
            if len(result["step_seconds"]) == 2:
                result["graphs_after_step_1"] = graphs()
            result["graphs"] = graphs()

    callbacks = [Timer()]
    if os.environ.get("BENCH_PROFILE"):
        callbacks.append(step_diagnostics.profiler_callback(warmup, Path(os.environ["BENCH_PROFILE"])))
    if os.environ.get("BENCH_SKIP_GUARDS"):
        callbacks.append(step_diagnostics.skip_guards_after_first_step())
    if os.environ.get("BENCH_MLP_CHUNKS"):
        callbacks.append(step_diagnostics.mlp_in_token_chunks(int(os.environ["BENCH_MLP_CHUNKS"])))
    if os.environ.get("BENCH_MEMORY"):  # untimed steps only: a timed one would pay for the recording
        steps = sorted({0, warmup - 1})
        callbacks.append(step_diagnostics.memory_callback(steps, Path(os.environ["BENCH_MEMORY"])))
    return callbacks, result


def compile_timers() -> dict:
    """Every timer torch.compile keeps (torch._dynamo.utils.compilation_time_metrics), summed, in seconds: where a
    cold first step's time goes, for our setups and Unsloth's alike."""
    import torch

    metrics = getattr(torch._dynamo.utils, "compilation_time_metrics", {})
    return {name: round(sum(times), 3) for name, times in metrics.items()}


def summarise(result: dict, warmup: int, parameters: int, gpus: int = 1) -> dict:
    """Tokens are the Trainer's count over every process (DDP gathers it); MFU is per GPU."""
    import torch

    steps = result["step_seconds"][warmup:]
    tokens = result["tokens"][warmup:]
    # An epoch's last step holds the rows left over (a short batch): not a sample of training speed. Under DDP an
    # epoch has half the steps, so within a short run it falls in the timed steps where one GPU's does not.
    full = [i for i, n in enumerate(tokens) if n >= 0.9 * statistics.median(tokens)]
    partial_steps = len(tokens) - len(full)
    steps, tokens = [steps[i] for i in full], [tokens[i] for i in full]
    tokens_per_second = sum(tokens) / sum(steps)
    gpu = torch.cuda.get_device_name()
    # Under emulation the arithmetic runs on the bigger GPU: a T4's peak would give a meaningless MFU.
    peak = None if "emulated" in gpu else next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu), None)
    return {
        "tokens_per_second": tokens_per_second,
        "median_step_s": statistics.median(steps),
        "tokens_per_step": sum(tokens) / len(steps),
        "peak_gib": max(result.get("first_step_peak_bytes", 0), torch.cuda.max_memory_allocated()) / 2**30,
        "later_steps_peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "mfu": 6 * parameters * tokens_per_second / gpus / peak if peak else None,
        "gpu": gpu,
        "gpus": gpus,
        "partial_steps_left_out": partial_steps,
        "first_step_s": result["step_seconds"][0],  # compilation, where layers are compiled
        "first_step_compile_s": result.get("first_step_compile_s"),
        "mean_step_s": statistics.mean(steps),
        # From the process's start, and from the trainer's start (the model loaded), to the first step's end.
        "start_to_first_step_s": result.get("start_to_first_step_s"),
        "load_to_first_step_s": result.get("start_to_first_step_s", 0) - result.get("train_begin_s", 0),
        # Graphs torch.compile made after the second step: each a recompilation a steady run should not need.
        "recompilations_after_step_1": result.get("graphs", 0) - result.get("graphs_after_step_1", 0),
        # How long the GPU still ran once the host had queued a step: near 0, the step waits on the host's CPU. What it
        # covers starts at the step's last wait for the GPU, which differs: ours waits in the loss (nonzero()), the
        # Trainer's NaN filter on trl's and Unsloth's losses after the backward pass.
        "gpu_tail_s": statistics.median(result["gpu_tail_seconds"][warmup:]),
    }
