"""Where a benchmarked step's time and memory go: Trainer callbacks that run_bench.py adds on request.

`run_bench.py --profile_dir DIR`: torch.profiler and cProfile tables over three steps after the warm-up.
`run_bench.py --memory_dir DIR` sets BENCH_MEMORY for each setup (ours and Unsloth's); the callback records the
allocator's history during step `warmup - 1` (after compilation, before the timed steps, so no timed step pays for
the recording) and writes DIR/memory_SETUP.txt: the memory held before the step, the step's peak, and the blocks
alive at that peak grouped by where they were allocated.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

# Frames that say nothing about what a block is for: the allocator's callers inside torch and Python's plumbing.
_PLUMBING = ("/torch/", "/contextlib.py", "/functools.py", "<frozen", "/threading.py", "/_ops.py")


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
                self.profile.__enter__()
                self.python = cProfile.Profile()  # where the Python side of a step spends its time
                self.python.enable()

        def on_step_end(self, args, state, control, **kwargs):
            if self.profile is not None and state.global_step == self.start_step + 3:
                torch.cuda.synchronize()
                self.python.disable()
                self.profile.__exit__(None, None, None)
                import io
                import pstats

                python_stats = io.StringIO()
                pstats.Stats(self.python, stream=python_stats).sort_stats("tottime").print_stats(40)
                self.path.with_suffix(".python.txt").write_text(python_stats.getvalue())
                averages = self.profile.key_averages()
                self.path.write_text(
                    averages.table(sort_by="self_cuda_time_total", row_limit=45)
                    + "\n\n" + averages.table(sort_by="cpu_time_total", row_limit=25)
                )
                self.profile = None

    return Profiler(start_step, path)


def memory_callback(record_step: int, path: Path):
    import torch
    from transformers import TrainerCallback

    class MemoryTrace(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == record_step:
                torch.cuda.synchronize()
                self.before = torch.cuda.memory_allocated()
                torch.cuda.memory._record_memory_history(max_entries=400_000, stacks="python")

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == record_step + 1:
                torch.cuda.synchronize()
                try:
                    snapshot = torch.cuda.memory._snapshot()
                    torch.cuda.memory._record_memory_history(enabled=None)
                    path.write_text(describe_peak(snapshot, self.before))
                except (RuntimeError, KeyError, OSError) as error:  # a diagnosis must not cost the measurement
                    path.write_text(f"no memory report: {type(error).__name__}: {error}\n")

    return MemoryTrace()


def describe_peak(snapshot: dict, before: int, groups: int = 30) -> str:
    """The blocks alive at the highest point of the recorded events, by allocation site, largest first."""
    live, current, peak, at_peak = {}, 0, 0, {}
    for event in (snapshot.get("device_traces") or [[]])[0]:
        action, address, size = event["action"], event["addr"], event["size"]
        if action == "alloc":
            live[address] = event
            current += size
        elif action == "free_completed" and address in live:
            current -= live.pop(address)["size"]
        else:
            continue
        if current > peak:
            peak, at_peak = current, dict(live)
    by_site = defaultdict(lambda: [0, 0, None])
    for event in at_peak.values():
        site = allocation_site(event.get("frames", []))
        by_site[site][0] += event["size"]
        by_site[site][1] += 1
        by_site[site][2] = by_site[site][2] or event.get("frames", [])
    mib = 2**20
    lines = [f"held before the step: {before / mib:,.0f} MiB",
             f"peak within the step: {(before + peak) / mib:,.0f} MiB (+{peak / mib:,.0f} MiB allocated during it, "
             f"{len(at_peak)} blocks)", "", "MiB | blocks | allocated at (innermost frame outside torch; then callers)"]
    for site, (size, count, frames) in sorted(by_site.items(), key=lambda item: -item[1][0])[:groups]:
        callers = " < ".join(_frame(f) for f in _outside_torch(frames)[1:4])
        lines.append(f"{size / mib:8,.1f} | {count:5} | {site}" + (f"  [{callers}]" if callers else ""))
    return "\n".join(lines) + "\n"


def allocation_site(frames: list) -> str:
    outside = _outside_torch(frames)
    return _frame(outside[0]) if outside else (_frame(frames[0]) if frames else "(no stack)")


def _outside_torch(frames: list) -> list:
    # Inductor's generated code lives under torchinductor_*, not /torch/: it stays, as a compiled region's own.
    return [f for f in frames if not any(part in f["filename"] for part in _PLUMBING)
            or "torchinductor" in f["filename"]]


def _frame(frame: dict) -> str:
    return f"{'/'.join(frame['filename'].split('/')[-2:])}:{frame['line']} {frame['name']}"
