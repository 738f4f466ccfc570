"""One run per output folder (issue 24): a run holds OUTPUT_DIR/.run.lock from before anything loads to its end; a
second run in the folder is refused with one message naming the holder (exit 2, nothing loaded or written); a lock
left by a killed run is taken over; the processes of one torchrun launch share it; a dry run takes none. The
two-runs case runs two real scripts at once; the others hold the lock from a small real process."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import FINETUNING_DIR, fails_cleanly, start_script, wait_for_text
import export_gguf
import train_galore
import train_qlora
from cli import errors
from training import run_lock

HOLD = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {finetuning!r})
    from training import run_lock
    run_lock.take(sys.argv[1])
    print("holding", flush=True)
    time.sleep(120)
""")


@pytest.fixture
def holder(tmp_path):
    """holder(folder, env={}) -> a real process that takes `folder`'s lock (run_lock.take) and keeps it."""
    started = []

    def hold(folder: Path, env: dict | None = None) -> subprocess.Popen:
        log = tmp_path / f"holder{len(started)}.log"
        process = subprocess.Popen([sys.executable, "-c", HOLD.format(finetuning=str(FINETUNING_DIR)), str(folder)],
                                   env={**os.environ, **(env or {})}, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        started.append(process)
        wait_for_text(process, log, "holding", timeout_s=60)
        return process

    yield hold
    for process in started:
        process.kill()
        process.wait()


def smoke_argv(out, *flags):
    return ["--smoke", "--output_dir", str(out), "--num_sample_prompts", "0", "--report_card_prompts", "0", *flags]


def test_two_runs_in_one_folder_the_second_is_refused_and_the_first_is_whole(tmp_path, write_data):
    """Issue 24: a QLoRA and a GaLore smoke run started together in one folder mixed adapter, tokenizer and base."""
    out = tmp_path / "shared"
    other_data = write_data("other.jsonl", "\n".join(json.dumps({"instruction": f"Say {i}.", "input": "",
                                                                 "output": f"{i}."}) for i in range(20)))
    first_log = tmp_path / "first.log"
    # The first run pauses 15 s in its final save (a test hook), so that it holds the folder while the second starts.
    first = start_script(["finetuning/train_galore.py", *smoke_argv(out)], first_log,
                         env={"FINETUNING_TEST_PAUSE": "final:15"})
    try:
        wait_for_text(first, first_log, "Environment:")  # its lock is taken
        lock = json.loads((out / run_lock.LOCK_NAME).read_text())
        assert (lock["pid"], lock["host"]) == (first.pid, socket.gethostname())
        assert "train_galore.py" in lock["command"] and lock["started"]

        second = subprocess.run([sys.executable, "finetuning/train_qlora.py", *smoke_argv(out),
                                 "--dataset_name", str(other_data)], cwd=FINETUNING_DIR.parent, capture_output=True,
                                text=True, timeout=240)
        output = second.stdout + second.stderr
        assert second.returncode == 2, output[-3000:]
        assert "Traceback" not in output
        [error] = [line for line in output.splitlines() if " ERROR " in line]
        for words in (f"--output_dir {out} is in use by another run", f"process {first.pid} on {socket.gethostname()}",
                      "train_galore.py", "choose another folder", str(out / run_lock.LOCK_NAME)):
            assert words in error, (words, error)
        assert "Data:" not in output, "the second run read its data before it was refused"
        first.wait(timeout=240)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, first_log.read_text(errors="replace")[-3000:]
    # The first run's model, whole and its own: GaLore's full model and its tokenizer, no adapter beside it.
    final = sorted(p.name for p in (out / "final").iterdir())
    assert "model.safetensors" in final and "adapter_model.safetensors" not in final
    assert not (out / run_lock.LOCK_NAME).exists(), "the lock was not released at the run's end"


def test_a_live_holder_is_named_and_nothing_loads(holder, tmp_path, caplog, monkeypatch):
    out = tmp_path / "out"
    process = holder(out)
    from records import loading

    monkeypatch.setattr(loading, "load_data_and_tokenizer", lambda *a, **k: pytest.fail("data loaded"))
    message = fails_cleanly(train_qlora, smoke_argv(out), caplog)
    assert f"is in use by another run: process {process.pid} on {socket.gethostname()}" in message
    assert sorted(p.name for p in out.iterdir()) == [run_lock.LOCK_NAME], "the refused run wrote into the folder"
    assert json.loads((out / run_lock.LOCK_NAME).read_text())["pid"] == process.pid, "the holder's lock was touched"


def test_a_stale_lock_of_a_killed_run_is_taken_over_with_a_log_line(holder, tmp_path, caplog):
    out = tmp_path / "out"
    process = holder(out)
    process.kill()  # a kill -9 ends the run without Python's exit: the lock file stays, its flock goes
    process.wait()
    assert (out / run_lock.LOCK_NAME).is_file()
    with caplog.at_level(logging.WARNING, logger="training.run_lock"):
        lock = run_lock.take(out)
    try:
        [line] = [r.getMessage() for r in caplog.records if r.name == "training.run_lock"]
        assert "Taking over" in line and f"process {process.pid}" in line and "no longer running" in line
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not (out / run_lock.LOCK_NAME).exists()


def test_without_file_locks_the_process_id_tells_a_stale_lock(tmp_path, monkeypatch, caplog):
    """A file system without flock (some network and FUSE mounts): the recorded process id is asked instead."""
    monkeypatch.setattr(run_lock, "fcntl", None)
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)
    for pid, refused in ((os.getppid(), True), (dead, False)):
        (out / run_lock.LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(),
                                                          "command": "python x.py", "started": "earlier"}))
        if refused:
            with pytest.raises(errors.UserInputError, match=f"in use by another run: process {pid} "):
                run_lock.take(out)
        else:
            run_lock.take(out).release()


def test_the_processes_of_one_launch_share_the_lock(holder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    launch = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "TORCHELASTIC_RUN_ID": "run-7",
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    holder(out, env=launch)
    for name, value in {**launch, "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    assert run_lock.take(out) is None  # rank 1: the writing process holds it for the launch
    # Another host's writer of the same launch (--save_on_each_node, one shared folder): shares it, does not refuse.
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert run_lock.take(out, save_on_each_node=True) is None
    # Another launch's writer is refused.
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-8")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(errors.UserInputError, match="in use by another run"):
        run_lock.take(out)


def test_a_dry_run_takes_no_lock_and_writes_nothing(holder, tmp_path, caplog):
    out = tmp_path / "out"
    holder(out)
    from cli import command_line

    assert command_line.run_cli(train_qlora.parse_args, train_qlora.main, smoke_argv(out, "--dry_run")) == 0
    assert sorted(p.name for p in out.iterdir()) == [run_lock.LOCK_NAME]


def test_a_run_refused_by_its_data_releases_the_lock(tmp_path, write_data, caplog):
    out = tmp_path / "out"
    data = write_data("bad.jsonl", '{"instruction": "a", "output": 1}\n')
    message = fails_cleanly(train_galore, smoke_argv(out, "--dataset_name", data), caplog)
    assert "'output' field is a int" in message
    assert not out.exists(), "a folder made for the lock alone stays behind"
    assert not run_lock._held


def test_an_export_is_refused_while_a_run_holds_the_folder(holder, finished_model_run, fake_llama_cpp, caplog):
    process = holder(finished_model_run)
    message = fails_cleanly(export_gguf, ["--run_dir", finished_model_run, "--llama_cpp_dir", fake_llama_cpp,
                                          "--check_parity", "false"], caplog)
    assert f"--run_dir {finished_model_run} is in use by another run: process {process.pid}" in message
    assert sorted(p.name for p in finished_model_run.iterdir()) == [run_lock.LOCK_NAME, "final"]


def test_main_called_twice_in_one_process_releases_between(tmp_path):
    """A notebook runs main() again in the same kernel: the first call's lock is gone when it returns."""
    out = tmp_path / "out"
    argv = smoke_argv(out, "--max_steps", "1")
    train_galore.main(*train_galore.parse_args(argv))
    assert not (out / run_lock.LOCK_NAME).exists() and not run_lock._held
    started = time.monotonic()
    train_galore.main(*train_galore.parse_args(argv))  # a smoke run replaces its own earlier one
    assert time.monotonic() - started < 120
