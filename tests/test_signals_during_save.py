"""SIGTERM and Ctrl-C after training and during an export (issue 24), sent as real signals to the real scripts.

SIGTERM during the final save used to end the run at once with exit 143, no message and an empty .final.partial;
Ctrl-C there ended in a KeyboardInterrupt traceback; an export stopped mid-conversion left a .gguf.partial. Now:
SIGTERM lets final/ finish and stops (143), Ctrl-C abandons the save (130); either way one line says what is on disk
and how to go on, no half-written folder is left, and the output folder's lock is released.

The signal must land while a save is half-done: the test-only hook FINETUNING_TEST_PAUSE=STAGE:SECONDS
(training/interruptions.py) pauses there and logs "pausing"; the tests send the signal when that line shows. The
export's conversion runs a fake converter (conftest.fake_llama_cpp) that sleeps, so Ctrl-C lands while the child
process converts. All the processes run at once (most of each is imports).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from conftest import start_script, stop_processes
import train_galore
from training import checkpoints, interruptions, run_lock, saving

TRAIN_FLAGS = ["--num_sample_prompts", "0", "--report_card_prompts", "0", "--save_strategy", "steps",
               "--save_steps", "2"]
PAUSED = "pausing"  # the test hook's log line: the save is half-done


def train_argv(script: str, out: Path, *extra) -> list:
    return [f"finetuning/train_{script}.py", "--smoke", "--output_dir", str(out), *TRAIN_FLAGS, *extra]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, tiny_model_dir, fake_llama_cpp) -> dict:
    """Each case: a script started, a signal sent at its moment, its exit code and output once it ended."""
    root = tmp_path_factory.mktemp("stopped")
    export_runs = {}
    for name in ("export-convert", "export-parity"):
        export_runs[name] = root / name / "run"
        shutil.copytree(tiny_model_dir, export_runs[name] / "final")
    earlier = export_runs["export-parity"] / "gguf"
    earlier.mkdir()
    (earlier / "model-f16.gguf").write_bytes(b"the earlier export")
    export = ["finetuning/export_gguf.py", "--llama_cpp_dir", str(fake_llama_cpp), "--outtypes", "f16"]
    cases = {
        # name: (argv, environment, signal, when it is sent: a log line, or a file that appears)
        "final-SIGTERM": (train_argv("galore", root / "final-SIGTERM"), {"FINETUNING_TEST_PAUSE": "final:4"},
                          signal.SIGTERM, PAUSED),
        "final-SIGINT": (train_argv("galore", root / "final-SIGINT"), {"FINETUNING_TEST_PAUSE": "final:60"},
                         signal.SIGINT, PAUSED),
        "merged-SIGTERM": (train_argv("qlora", root / "merged-SIGTERM", "--merge"),
                           {"FINETUNING_TEST_PAUSE": "merged:60"}, signal.SIGTERM, PAUSED),
        "before-SIGTERM": (train_argv("galore", root / "before-SIGTERM"), {}, signal.SIGTERM, "Environment:"),
        "export-convert": ([*export, "--run_dir", str(export_runs["export-convert"]), "--check_parity", "false"],
                           {"FAKE_CONVERT_SECONDS": "60"}, signal.SIGINT, "fake converter"),
        "export-parity": ([*export, "--run_dir", str(export_runs["export-parity"])],
                          {"FINETUNING_TEST_PAUSE": "parity:60"}, signal.SIGTERM, PAUSED),
    }
    runs = {}
    for name, (argv, env, sent, when) in cases.items():
        log = root / f"{name}.log"
        runs[name] = dict(argv=argv, log=log, signal=sent, when=when, out=Path(argv[argv.index(
            "--run_dir" if "--run_dir" in argv else "--output_dir") + 1]),
            process=start_script(argv, log, env={**env, "PYTHONUNBUFFERED": "1"}))
    try:
        waiting, deadline = dict(runs), time.monotonic() + 240
        while waiting:  # each signalled at its own moment, as soon as it comes
            for name, run in list(waiting.items()):
                if run["when"] == "fake converter":  # the converter's own output is captured: watch for its file
                    ready = (run["out"] / ".gguf.partial" / "model-f16.gguf.converted.partial").exists()
                else:
                    ready = run["when"] in run["log"].read_text(errors="replace")
                if ready:
                    run["process"].send_signal(run["signal"])
                    del waiting[name]
                elif run["process"].poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"{name}: {run['when']!r} never came; {run['log']}:\n"
                                         f"{run['log'].read_text(errors='replace')[-3000:]}")
            time.sleep(0.05)
        for run in runs.values():
            run["process"].wait(timeout=240)
            run["output"] = run["log"].read_text(errors="replace")
    finally:
        stop_processes(run["process"] for run in runs.values())
    return runs


def the_stop(run: dict, exit_code: int) -> str:
    """The exit code, no traceback, the lock released; returns the one error line."""
    output = run["output"]
    assert run["process"].returncode == exit_code, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    [line] = [line for line in output.splitlines() if " ERROR " in line]
    assert not (run["out"] / run_lock.LOCK_NAME).exists(), "the lock was not released on the signal's path"
    return line.split("cli.command_line: ", 1)[1]


def no_partial_folders(out: Path) -> None:
    leftovers = [p.name for p in out.iterdir() if p.name.endswith((".partial", ".old"))]
    assert not leftovers, leftovers


def test_sigterm_during_the_final_save_finishes_it_then_stops(stopped):
    run = stopped["final-SIGTERM"]
    out = run["out"]
    message = the_stop(run, 143)
    assert message == (f"Stopped (SIGTERM) after training to step 4: {out}/final holds the trained model, whole; not "
                       "written: the reports (metrics.json, samples.md, the loss curve). Nothing half-written was "
                       "left.")
    assert "SIGTERM during the save of final: finishing it, then stopping." in run["output"]
    assert checkpoints.safetensors_problem(out / "final" / "model.safetensors") is None
    assert (out / "final" / "tokenizer.json").is_file()
    assert not (out / "metrics.json").exists()
    no_partial_folders(out)


def test_ctrl_c_during_the_final_save_leaves_nothing_half_written_and_the_command_resumes(stopped, tmp_path):
    run = stopped["final-SIGINT"]
    out = run["out"]
    message = the_stop(run, 130)
    match = re.fullmatch(rf"Training ended at step 4, then Ctrl-C stopped the save of the trained model in "
                         rf"{re.escape(str(out))}/final: nothing half-written was left \(latest checkpoint "
                         rf"checkpoint-4\); resume with: (.*)", message)
    assert match, message
    assert not (out / "final").exists()
    no_partial_folders(out)
    command = shlex.split(match[1])
    assert command[:2] == [sys.executable, "finetuning/train_galore.py"]
    assert command[-2:] == ["--resume_from_checkpoint", "latest"]
    # The printed command finishes the run from checkpoint-4, the last step (the Trainer, resumed at its last step,
    # runs one more at a learning rate of 0 before it stops: its own quirk).
    trainer = train_galore.main(*train_galore.parse_args(command[2:]))
    assert trainer.state.global_step >= 4
    assert checkpoints.safetensors_problem(out / "final" / "model.safetensors") is None


def test_sigterm_while_merging_keeps_final_and_leaves_no_merged_folder(stopped):
    run = stopped["merged-SIGTERM"]
    out = run["out"]
    message = the_stop(run, 143)
    assert message == (f"Stopped (SIGTERM) after training to step 4: {out}/final holds the trained model, whole; not "
                       f"written: {out}/merged (the adapter merged into a 16-bit base). Nothing half-written was "
                       "left.")
    assert checkpoints.safetensors_problem(out / "final" / "adapter_model.safetensors") is None
    assert (out / "metrics.json").is_file(), "the reports come before the merge"
    assert not (out / "merged").exists()
    no_partial_folders(out)


def test_sigterm_before_training_says_nothing_was_trained(stopped):
    run = stopped["before-SIGTERM"]
    message = the_stop(run, 143)
    assert message == ("Stopped (SIGTERM) before training started: nothing was trained, and an earlier run in the "
                       "output folder is untouched. Run the same command again to start.")
    assert not (run["out"] / "final").exists() and not list(run["out"].glob("checkpoint-*"))


def test_ctrl_c_during_the_export_conversion_leaves_no_partial_gguf(stopped):
    run = stopped["export-convert"]
    out = run["out"]
    message = the_stop(run, 130)
    assert message == (f"Export stopped (Ctrl-C) while converting to f16: nothing half-written was left in {out}/gguf "
                       "(none was there). Run the same command again to export.")
    assert sorted(p.name for p in out.iterdir()) == ["final"]


def test_sigterm_during_the_parity_check_keeps_the_earlier_export(stopped):
    run = stopped["export-parity"]
    out = run["out"]
    message = the_stop(run, 143)
    assert message == (f"Export stopped (SIGTERM) while checking parity: nothing half-written was left in {out}/gguf "
                       "(the earlier export there is untouched). Run the same command again to export.")
    assert sorted(p.name for p in out.iterdir()) == ["final", "gguf"]
    assert (out / "gguf" / "model-f16.gguf").read_bytes() == b"the earlier export"


@pytest.mark.parametrize("stop_at", ["writing", "between the renames"])
def test_a_save_stopped_midway_keeps_the_earlier_final_whole(stop_at, tmp_path, monkeypatch):
    final = tmp_path / "final"
    final.mkdir()
    (final / "model.safetensors").write_text("earlier")
    replaced = []
    original_replace = os.replace

    def write(folder: Path) -> None:
        folder.mkdir()
        (folder / "model.safetensors").write_text("new")
        if stop_at == "writing":
            raise KeyboardInterrupt

    def replace_then_stop(source, target):
        original_replace(source, target)
        replaced.append(target)
        if len(replaced) == 1:  # the earlier final/ moved aside, the new one not yet in place
            raise KeyboardInterrupt

    if stop_at != "writing":
        monkeypatch.setattr(saving.os, "replace", replace_then_stop)
    with pytest.raises(KeyboardInterrupt):
        saving.write_atomically(final, write)
    monkeypatch.undo()
    assert (final / "model.safetensors").read_text() == "earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_saved_weights_follow_the_umask(finished_runs):
    mask = os.umask(0)
    os.umask(mask)
    for run in finished_runs.values():
        weights = [*run.output_dir.glob("final/*.safetensors"), *run.output_dir.glob("checkpoint-*/*.safetensors")]
        assert weights
        for path in weights:
            assert path.stat().st_mode & 0o777 == 0o666 & ~mask, (path, oct(path.stat().st_mode))
        settings = json.loads((run.output_dir / "checkpoint-4" / "run_settings.json").read_text())
        assert settings["script"] in ("train_qlora.py", "train_galore.py") and settings["smoke"] is True


@pytest.mark.parametrize("stop", [KeyboardInterrupt(), interruptions.Stop("SIGTERM")], ids=["ctrl-c", "sigterm"])
def test_a_stop_while_the_smoke_tokenizer_trains_is_raised_as_itself(tmp_path, stop):
    """SentencePiece would turn it into RuntimeError('INTERNAL: ...'), and the run would end with a traceback."""
    from models import smoke

    def texts():
        yield from ["a line of text to train on"] * 50
        raise stop

    with pytest.raises(type(stop)):
        smoke.train_tokenizer(texts(), 300, tmp_path)
