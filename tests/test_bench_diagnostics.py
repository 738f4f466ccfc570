"""The bench's memory report: the peak it finds in a recorded allocator history and what it says was alive there."""


import step_diagnostics

MIB = 2**20


def _frames(*sites):
    return [{"filename": "/usr/lib/python3/site-packages/torch/_tensor.py", "line": 1, "name": "plumbing"},
            *({"filename": f"/repo/finetuning/{file}", "line": line, "name": name} for file, line, name in sites)]


def _event(action, address, mib, *sites):
    return {"action": action, "addr": address, "size": mib * MIB, "frames": _frames(*sites)}


def test_peak_is_where_most_is_allocated_and_held_blocks_are_told_apart():
    loss = ("fused.py", 62, "forward")
    layer = ("offload.py", 40, "unpack")
    trace = [
        _event("alloc", 1, 100, loss, ("training.py", 9, "step")),
        _event("alloc", 2, 100, loss, ("training.py", 9, "step")),
        _event("free_requested", 1, 100, loss),  # no longer allocated, still held: another stream may use it
        _event("alloc", 3, 30, layer),  # 130 MiB allocated, 230 held
        _event("free_completed", 1, 100, loss),
        _event("free_requested", 2, 100, loss),
        _event("free_completed", 2, 100, loss),
        _event("alloc", 4, 250, layer),  # the peak: 280 MiB
    ]
    report = step_diagnostics.describe_peak({"device_traces": [trace]}, before=1000 * MIB)

    assert "peak within the step: 1,280 MiB (+280 MiB allocated during it, 2 blocks)" in report
    assert "held until other streams are done: 1,280 MiB" in report
    rows = [line for line in report.splitlines() if "|" in line and "MiB |" not in line]
    assert len(rows) == 1 and "offload.py:40 unpack" in rows[0] and "280.0" in rows[0]
    assert "torch/_tensor.py" not in report


def test_blocks_another_stream_holds_count_in_the_held_peak_only():
    loss = ("fused.py", 62, "forward")
    trace = [
        _event("alloc", 1, 100, loss, ("training.py", 9, "step")),
        _event("alloc", 2, 100, loss, ("training.py", 9, "step")),
        _event("free_requested", 1, 100, loss),
        _event("alloc", 3, 30, ("offload.py", 40, "unpack")),
        _event("free_completed", 1, 100, loss),
    ]
    report = step_diagnostics.describe_peak({"device_traces": [trace]}, before=1000 * MIB)

    assert "peak within the step: 1,200 MiB (+200 MiB allocated during it, 2 blocks)" in report
    assert "held until other streams are done: 1,230 MiB" in report
    rows = [line for line in report.splitlines() if "|" in line and "MiB |" not in line]
    assert len(rows) == 1 and "fused.py:62 forward" in rows[0] and "training.py:9 step" in rows[0]


def test_a_block_from_before_the_recording_freed_during_it_lowers_the_count():
    trace = [
        _event("free_requested", 7, 500, ("training.py", 3, "old")),  # allocated before recording began
        _event("free_completed", 7, 500, ("training.py", 3, "old")),
        _event("alloc", 1, 300, ("fused.py", 62, "forward")),
    ]
    report = step_diagnostics.describe_peak({"device_traces": [[], trace]}, before=1000 * MIB, device=1)

    assert "peak within the step: 1,000 MiB (+0 MiB allocated during it, 0 blocks)" in report
