"""Where a benchmarked step's time and memory go: Trainer callbacks that run_bench.py adds on request.

`run_bench.py --profile_dir DIR`: torch.profiler and cProfile tables over three steps after the warm-up (ours and
Unsloth's). The "guards skipped" setup: torch.compile's guards checked only where they tell graphs apart, after the
first step. The "MLP in 2 token chunks" setups: override 14, which the scripts do not switch on yet.
`run_bench.py --memory_dir DIR` sets BENCH_MEMORY for each setup (ours and Unsloth's); the callback records the
allocator's history during the first step (compilation) and step `warmup - 1` (compiled, before the timed steps, so
no timed step pays for the recording) and writes DIR/memory_SETUP.txt: for each, the memory allocated before the
step, the step's peak, and the blocks alive at that peak grouped by where they were allocated.
"""
from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path

# Frames that say nothing about what a block is for: the allocator's callers inside torch and Python's plumbing.
_PLUMBING = ("/torch/", "/contextlib.py", "/functools.py", "<frozen", "/threading.py", "/_ops.py")


def host_cpu() -> str:
    """The host's CPU model: at small token budgets a step waits on the CPU, so figures move with it."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"unknown ({os.cpu_count()} cores)"
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")
    return f"{model} ({os.cpu_count()} cores)"


def profiler_callback(start_step: int, path: Path):
    import torch
    from transformers import TrainerCallback

    class Profiler(TrainerCallback):
        """torch.profiler over three steps after the warm-up: where a step's time goes."""

        def __init__(self, start_step: int, path: Path):
            self.start_step, self.path, self.profile = start_step, path, None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == self.start_step:
                import cProfile

                activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                self.profile = torch.profiler.profile(activities=activities)
                torch.cuda.synchronize()
                self.started = time.perf_counter()
                self.profile.__enter__()
                self.python = cProfile.Profile()  # where the Python side of a step spends its time
                self.python.enable()

        def on_step_end(self, args, state, control, **kwargs):
            if self.profile is not None and state.global_step == self.start_step + 3:
                torch.cuda.synchronize()
                wall = time.perf_counter() - self.started
                self.python.disable()
                self.profile.__exit__(None, None, None)
                import io
                import pstats

                python_stats = io.StringIO()
                pstats.Stats(self.python, stream=python_stats).sort_stats("tottime").print_stats(40)
                self.path.with_suffix(".python.txt").write_text(python_stats.getvalue())
                averages = self.profile.key_averages()
                # Whether the GPU waits on the host: its kernels' time against the steps' wall time.
                busy = sum(event.self_device_time_total for event in averages) / 1e6
                kernels = sum(event.count for event in averages if event.self_device_time_total > 0)
                self.profile.export_chrome_trace(str(self.path.with_suffix(".trace.json.gz")))  # gzipped by torch
                self.path.write_text(
                    f"3 steps: {wall:.3f} s by the wall clock (with the profiler's own cost), GPU kernels busy "
                    f"{busy:.3f} s ({busy / wall:.0%}), about {kernels / 3:,.0f} device events a step\n\n"
                    + averages.table(sort_by="self_cuda_time_total", row_limit=45)
                    + "\n\n" + averages.table(sort_by="cpu_time_total", row_limit=25)
                )
                self.profile = None

    return Profiler(start_step, path)


def skip_guards_after_first_step():
    """torch's `skip_guard_eval_unsafe` stance once the first step has compiled every graph: the compiled layers then
    check only the guards that tell their graphs apart. For measuring what guard evaluation costs, not for training."""
    import torch
    from transformers import TrainerCallback

    class SkipGuards(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)

    return SkipGuards()


def mlp_in_token_chunks(chunks: int):
    """Override 14 (mlp_chunks.chunk_mlp_tokens) at the start of training, before any layer is compiled."""
    from transformers import TrainerCallback

    import mlp_chunks

    class MlpInTokenChunks(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            print(f"MLPs in {chunks} token chunks: {mlp_chunks.chunk_mlp_tokens(model, chunks)}", flush=True)

    return MlpInTokenChunks()


def memory_callback(steps: list[int], path: Path):
    """Records the allocator's history over each of `steps` (indices from 0) and writes one report per step."""
    import torch
    from transformers import TrainerCallback

    class MemoryTrace(TrainerCallback):
        def __init__(self):
            self.reports = []
            rank = os.environ.get("RANK", "0")  # under DDP each process writes its own device's report
            self.path = path if rank == "0" else path.with_name(f"{path.stem}_rank{rank}{path.suffix}")

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step in steps:
                torch.cuda.synchronize()
                self.before = torch.cuda.memory_allocated()
                try:
                    torch.cuda.memory._record_memory_history(max_entries=400_000, stacks="python")
                except Exception as error:  # noqa: BLE001 - a diagnosis must not cost the measurement
                    self.reports.append(f"## step {state.global_step}\nnot recorded: {type(error).__name__}: {error}\n")

        def on_step_end(self, args, state, control, **kwargs):
            step = state.global_step - 1
            if step not in steps:
                return
            torch.cuda.synchronize()
            try:
                snapshot = torch.cuda.memory._snapshot()
                device = torch.cuda.current_device()
                self.reports.append(f"## step {step}\n" + describe_peak(snapshot, self.before, device))
            except Exception as error:  # noqa: BLE001 - a diagnosis must not cost the measurement
                self.reports.append(f"## step {step}\nno report: {type(error).__name__}: {error}\n")
            finally:
                torch.cuda.memory._record_memory_history(enabled=None)  # the timed steps pay nothing
            try:
                self.path.write_text("\n".join(self.reports))
            except OSError as error:
                print(f"memory report not written to {self.path}: {error}", flush=True)

    return MemoryTrace()


def describe_peak(snapshot: dict, before: int, device: int = 0, groups: int = 30) -> str:
    """The blocks allocated at the highest point of the recorded events on `device`, by allocation site, largest first.

    Allocated as torch.cuda.max_memory_allocated counts it, up to rounding (the trace gives requested sizes, the
    counter rounded blocks): a block stops counting when it is freed ("free_requested"), though one used on another
    stream is reusable only once that stream is done with it ("free_completed"); the report gives that held peak too."""
    traces = snapshot.get("device_traces") or []
    events = traces[device] if device < len(traces) else []
    peak, at_peak = _replay(events, "free_requested")
    held_peak, _ = _replay(events, "free_completed")
    by_site = defaultdict(lambda: [0, 0, None])
    for event in at_peak.values():
        site = allocation_site(event.get("frames", []))
        by_site[site][0] += event["size"]
        by_site[site][1] += 1
        by_site[site][2] = by_site[site][2] or event.get("frames", [])
    mib = 2**20
    lines = [f"allocated before the step: {before / mib:,.0f} MiB",
             f"peak within the step: {(before + peak) / mib:,.0f} MiB (+{peak / mib:,.0f} MiB allocated during it, "
             f"{len(at_peak)} blocks); held until other streams are done: {(before + held_peak) / mib:,.0f} MiB",
             "", "MiB | blocks | allocated at (innermost frame outside torch; then callers)"]
    for site, (size, count, frames) in sorted(by_site.items(), key=lambda item: -item[1][0])[:groups]:
        callers = " < ".join(_frame(f) for f in _outside_torch(frames)[1:4])
        lines.append(f"{size / mib:8,.1f} | {count:5} | {site}" + (f"  [{callers}]" if callers else ""))
    return "\n".join(lines) + "\n"


def _replay(events: list, freed_at: str) -> tuple[int, dict]:
    """The most bytes allocated at once during the events (beyond what was there before), and the blocks then."""
    live, current, peak, at_peak = {}, 0, 0, {}
    for event in events:
        action, address = event["action"], event["addr"]
        if action == "alloc":
            live[address] = event
            current += event["size"]
        elif action == freed_at:  # a block from before the recording counts as freed too
            current -= live.pop(address)["size"] if address in live else event["size"]
        else:
            continue
        if current > peak:
            peak, at_peak = current, dict(live)
    return peak, at_peak


def allocation_site(frames: list) -> str:
    outside = _outside_torch(frames)
    return _frame(outside[0]) if outside else (_frame(frames[0]) if frames else "(no stack)")


def _outside_torch(frames: list) -> list:
    # Inductor's generated code lives under torchinductor_*, not /torch/: it stays, as a compiled region's own.
    return [f for f in frames if not any(part in f["filename"] for part in _PLUMBING)
            or "torchinductor" in f["filename"]]


def _frame(frame: dict) -> str:
    return f"{'/'.join(frame['filename'].split('/')[-2:])}:{frame['line']} {frame['name']}"
