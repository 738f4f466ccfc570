"""Stops from outside and what they leave: Ctrl-C and SIGTERM end in one line with the command that resumes (exit
130 and 143) and leave only complete checkpoints; a checkpoint missing a file is never resumed; an --output_dir that
cannot be written is refused before anything loads; a resumed run reports the whole run's train loss.

The signal tests run the real script as a subprocess (both at once: most of each is imports); the rest call the
scripts in-process.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import transformers
from safetensors.torch import load_file
from transformers import TrainerCallback

from cli import arguments
from records import loading
from cli import errors
from training import processes
from training import interruptions
from training import checkpoints
from training import loop, output_dir
import train_galore
from cli import versions
from conftest import run_cli_once, stop_processes

REPO_ROOT = versions.PROJECT_DIR.parent


def run_argv(save_steps: int = 2) -> list[str]:
    """4 steps, a checkpoint every `save_steps`; a learning rate at which the loss moves from step to step."""
    return ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", str(save_steps), "--seed", "3",
            "--learning_rate", "1e-3", "--num_sample_prompts", "0"]


RUN_ARGV = run_argv()


def smoke_argv(output_dir, *argv) -> list[str]:
    return ["--smoke", "--output_dir", str(output_dir), *map(str, argv)]


def run_galore(argv, callbacks=None):
    return train_galore.main(*train_galore.parse_args([str(a) for a in argv]), callbacks=callbacks)


def through_cli(argv, caplog, callbacks=None) -> tuple[int, str]:
    """The GaLore script's command line as run_cli runs it (conftest.run_cli_once), with callbacks for main()."""
    return run_cli_once(train_galore, argv, caplog, functools.partial(train_galore.main, callbacks=callbacks))


def metrics(output_dir: Path) -> dict:
    return json.loads((output_dir / "metrics.json").read_text())


def logged_losses(output_dir: Path) -> dict:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def cut_after_checkpoint_2(run: Path, tmp_path: Path, name: str) -> Path:
    """The same run as if stopped after checkpoint-2: checkpoint-4, final and the reports never written."""
    cut = tmp_path / name
    shutil.copytree(run, cut)
    for leftover in ("checkpoint-4", "final"):
        shutil.rmtree(cut / leftover)
    for report in ("metrics.json", "trainer_state.json", "loss_curve.png"):
        (cut / report).unlink(missing_ok=True)
    return cut


@pytest.fixture(scope="module")
def whole_runs(tmp_path_factory):
    """whole_runs(logging_steps) -> the output dir of an uninterrupted 4-step GaLore smoke run (built once each)."""
    root, runs = tmp_path_factory.mktemp("whole_runs"), {}

    def get(logging_steps: int) -> Path:
        if logging_steps not in runs:
            out = root / f"logging{logging_steps}"
            run_galore(smoke_argv(out, *RUN_ARGV, "--logging_steps", logging_steps))
            runs[logging_steps] = out
        return runs[logging_steps]

    return get


# --- 1. the whole run's train loss, resumed or not ------------------------------------------------------


@pytest.mark.parametrize("logging_steps", [1, 3], ids=["every step logged", "a log every 3 steps"])
def test_a_resumed_run_reports_the_whole_runs_train_loss(logging_steps, whole_runs, tmp_path):
    whole = whole_runs(logging_steps)
    cut = cut_after_checkpoint_2(whole, tmp_path, "cut")
    trainer = run_galore(smoke_argv(cut, *RUN_ARGV, "--logging_steps", logging_steps,
                                    "--resume_from_checkpoint", "latest"))
    assert trainer.state.global_step == 4
    assert logged_losses(cut) == pytest.approx(logged_losses(whole), abs=1e-4), "not the same run after the resume"
    expected = metrics(whole)["train_loss"]
    assert abs(metrics(cut)["train_loss"] - expected) <= 1e-6, (metrics(cut)["train_loss"], expected)
    # The mean of every step's loss: the Trainer's own figure after a resume counted steps 3-4 only, over 4 steps.
    per_step = logged_losses(whole_runs(1))
    assert list(per_step) == [1, 2, 3, 4]
    assert abs(expected - sum(per_step.values()) / 4) <= (1e-9 if logging_steps == 1 else 1e-4)
    # trainer_state.json's summary says the same.
    summary = [e for e in json.loads((cut / "trainer_state.json").read_text())["log_history"] if "train_loss" in e]
    assert summary[-1]["train_loss"] == metrics(cut)["train_loss"]


def test_whole_run_train_loss_weighs_each_log_by_its_steps():
    history = [{"loss": 2.0, "step": 3}, {"loss": 5.0, "step": 4}, {"eval_loss": 9.0, "step": 4},
               {"train_loss": 1.0, "step": 4}]
    assert loop.whole_run_train_loss(history) == (2.0 * 3 + 5.0) / 4
    assert loop.whole_run_train_loss([{"train_loss": 1.0, "step": 4}]) is None


# --- 2. complete checkpoints ---------------------------------------------------------------------------


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BREAKAGES = {
    "no optimizer.pt": lambda c: (c / "optimizer.pt").unlink(),
    "no scheduler.pt": lambda c: (c / "scheduler.pt").unlink(),
    "optimizer.pt is cut off": lambda c: truncate(c / "optimizer.pt"),
    "model.safetensors is cut off": lambda c: truncate(c / "model.safetensors"),
    "model.safetensors has no readable safetensors header":
        lambda c: (c / "model.safetensors").write_bytes(b"\0" * 100),
    "no weights (model.safetensors or adapter_model.safetensors)": lambda c: (c / "model.safetensors").unlink(),
    "no trainer_state.json": lambda c: (c / "trainer_state.json").unlink(),
    "trainer_state.json is cut off": lambda c: (c / "trainer_state.json").write_text('{"global_step": 4, "log_hi'),
}


@pytest.mark.parametrize("problem", BREAKAGES)
def test_an_incomplete_checkpoint_is_skipped_and_refused(problem, whole_runs, tmp_path, caplog):
    out = tmp_path / "out"
    shutil.copytree(whole_runs(1), out)
    shutil.rmtree(out / "final")
    BREAKAGES[problem](out / "checkpoint-4")
    [found] = checkpoints.checkpoint_problems(out / "checkpoint-4")
    assert found.startswith(problem), found  # a cut-off file also says how many bytes it has
    assert checkpoints.checkpoint_problems(out / "checkpoint-2") == []

    caplog.clear()
    assert checkpoints.latest_complete_checkpoint(out) == str(out / "checkpoint-2")
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(out / "checkpoint-4") in warning and problem in warning

    # Named on the command line: refused before anything loads, naming what is missing and the one to use.
    exit_code, message = through_cli(smoke_argv(out, *RUN_ARGV, "--resume_from_checkpoint", out / "checkpoint-4"),
                                     caplog)
    assert exit_code == 2
    for words in (f"--resume_from_checkpoint {out / 'checkpoint-4'} is not a complete checkpoint", problem,
                  str(out / "checkpoint-2")):
        assert words in message, (words, message)
    assert not (out / "final").exists()


def test_a_resume_never_starts_a_fresh_optimizer(whole_runs, tmp_path, caplog):
    """checkpoint-4 without optimizer.pt: 'latest' takes checkpoint-2, and the run ends as the uninterrupted one."""
    whole = whole_runs(1)
    out = tmp_path / "out"
    shutil.copytree(whole, out)
    shutil.rmtree(out / "final")
    (out / "checkpoint-4" / "optimizer.pt").unlink()
    caplog.set_level(logging.INFO)
    trainer = run_galore(smoke_argv(out, *RUN_ARGV, "--resume_from_checkpoint", "latest"))
    assert f"Skipping {out / 'checkpoint-4'}, which cannot be resumed: no optimizer.pt" in caplog.text
    assert f"Resuming from the latest complete checkpoint, {out / 'checkpoint-2'}" in caplog.text
    assert trainer.state.global_step == 4
    expected = load_file(str(whole / "final" / "model.safetensors"))
    actual = load_file(str(out / "final" / "model.safetensors"))
    for name in expected:
        assert (expected[name] - actual[name]).abs().max().item() <= 1e-6, name
    assert checkpoints.checkpoint_problems(out / "checkpoint-4") == []  # written again, whole


def test_adapter_and_sharded_weights(whole_runs, tmp_path):
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(whole_runs(1) / "checkpoint-2", checkpoint)
    (checkpoint / "model.safetensors").rename(checkpoint / "adapter_model.safetensors")  # a QLoRA checkpoint
    assert checkpoints.checkpoint_problems(checkpoint) == []
    truncate(checkpoint / "adapter_model.safetensors")
    [problem] = checkpoints.checkpoint_problems(checkpoint)
    assert problem.startswith("adapter_model.safetensors is cut off")

    (checkpoint / "adapter_model.safetensors").unlink()
    shutil.copy(whole_runs(1) / "checkpoint-2" / "model.safetensors", checkpoint / "model-00001-of-00002.safetensors")
    names = list(load_file(str(checkpoint / "model-00001-of-00002.safetensors")))
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        names[0]: "model-00001-of-00002.safetensors", names[1]: "model-00002-of-00002.safetensors"}}))
    assert checkpoints.checkpoint_problems(checkpoint) == ["no model-00002-of-00002.safetensors"]


def test_a_checkpoint_that_does_not_exist_is_refused(whole_runs, tmp_path):
    args = transformers.TrainingArguments(output_dir=str(whole_runs(1)), resume_from_checkpoint=str(tmp_path / "nope"),
                                          report_to=[])
    with pytest.raises(errors.UserInputError, match="the folder does not exist. A complete one holds the weights"):
        output_dir.plan_output_dir(args, smoke=True)


# --- 3. an --output_dir that cannot be written ----------------------------------------------------------


def refused_before_loading(output_dir, caplog, monkeypatch) -> str:

    def must_not_load(*args, **kwargs):
        raise AssertionError("the data or the model loaded before the output dir was checked")

    monkeypatch.setattr(loading, "load_data_and_tokenizer", must_not_load)
    exit_code, message = through_cli(smoke_argv(output_dir, "--max_steps", 1), caplog)
    assert exit_code == 2
    return message


def test_output_dir_that_is_a_file(tmp_path, caplog, monkeypatch):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    message = refused_before_loading(target, caplog, monkeypatch)
    assert message.startswith(f"--output_dir {target} is a file, not a folder. Choose another --output_dir")
    assert target.read_text() == "mine"
    message = refused_before_loading(target / "run", caplog, monkeypatch)
    assert f"--output_dir {target / 'run'}: {target} is a file, so no folder can be made under it" in message


@pytest.mark.parametrize("inside", [False, True], ids=["the folder", "a folder to be made in it"])
def test_output_dir_that_cannot_be_written(inside, tmp_path, caplog, monkeypatch):
    if os.geteuid() == 0:
        pytest.skip("root writes to a read-only (0o500) folder anyway")
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        message = refused_before_loading(folder / "run" if inside else folder, caplog, monkeypatch)
    finally:
        folder.chmod(0o700)
    assert "cannot be written" in message and f"chmod u+w {folder}" in message and "Choose an --output_dir" in message


def test_output_dir_on_a_read_only_file_system(tmp_path, caplog, monkeypatch):
    """Kaggle's /kaggle/input: read-only even for root."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a read-only tmpfs")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        message = refused_before_loading(folder / "run", caplog, monkeypatch)
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
    assert message.startswith(f"--output_dir {folder / 'run'} cannot be written: the folder {folder} it would be made "
                              "in is read-only for this user. Choose an --output_dir you can write to")


# --- 4, 5. Ctrl-C and SIGTERM, in-process (exact moments) -----------------------------------------------


class AtStep(TrainerCallback):
    """Runs `action` at the end of step `step` (before the Trainer's log and save of that step)."""

    def __init__(self, step: int, action):
        self.step, self.action = step, action

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.action()


def interrupt():
    raise KeyboardInterrupt


def test_ctrl_c_mid_checkpoint_leaves_no_partial_folder_and_says_how_to_resume(tmp_path, caplog, monkeypatch):
    out = tmp_path / "out"
    original = transformers.Trainer._save_optimizer_and_scheduler

    def save_then_ctrl_c(self, output_dir):
        if self.state.global_step == 2:  # checkpoint-2 has its weights, not yet its optimizer nor trainer_state.json
            raise KeyboardInterrupt
        return original(self, output_dir)

    monkeypatch.setattr(transformers.Trainer, "_save_optimizer_and_scheduler", save_then_ctrl_c)
    argv = smoke_argv(out, *run_argv(save_steps=1))
    exit_code, message = through_cli(argv, caplog)
    assert exit_code == 130
    assert message == ("Training interrupted at step 2 (Ctrl-C; latest checkpoint checkpoint-1); resume with the same "
                       "arguments: add --resume_from_checkpoint latest")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert not (out / "final").exists()

    monkeypatch.undo()
    trainer = run_galore(argv + ["--resume_from_checkpoint", "latest"])
    assert trainer.state.global_step == 4 and (out / "final" / "model.safetensors").is_file()


def test_ctrl_c_before_any_checkpoint(tmp_path, caplog):
    out = tmp_path / "out"
    exit_code, message = through_cli(smoke_argv(out, "--max_steps", 4, "--num_sample_prompts", 0), caplog,
                                     callbacks=[AtStep(2, interrupt)])
    assert exit_code == 130
    assert message == ("Training interrupted at step 2 (Ctrl-C) before any checkpoint was saved; run it again with "
                       "the same arguments to start over")
    assert not list(out.glob("checkpoint-*")) and not (out / "final").exists()


def vmap_cut_off():
    """What torch's vmap raised when Ctrl-C came while transformers built a mask: its own clean-up's error."""
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        raise RuntimeError("!dynamicLayerStack.empty() INTERNAL ASSERT FAILED at DynamicLayer.cpp:220, please report "
                           "a bug to PyTorch.")


def test_ctrl_c_that_a_library_turns_into_its_own_error_is_still_ctrl_c(tmp_path, caplog):
    out = tmp_path / "out"
    exit_code, message = through_cli(smoke_argv(out, "--max_steps", 4, "--num_sample_prompts", 0), caplog,
                                     callbacks=[AtStep(2, vmap_cut_off)])
    assert exit_code == 130 and message.startswith("Training interrupted at step 2 (Ctrl-C)")


@pytest.mark.parametrize("stop", [KeyboardInterrupt, interruptions.Stop], ids=["Ctrl-C", "SIGTERM"])
def test_a_stop_beneath_a_library_error_is_found_and_nothing_else(stop):
    try:
        try:
            raise stop
        except BaseException as inner:
            raise RuntimeError("INTERNAL ASSERT FAILED") from inner
    except RuntimeError as error:
        assert isinstance(interruptions.stop_beneath(error), stop)
    assert interruptions.stop_beneath(ValueError("a bug of ours")) is None


def test_outside_training_a_library_error_over_ctrl_c_is_ctrl_c():
    """While the model or the data loads: the stop, not the library's error and its traceback."""
    with pytest.raises(errors.Interrupted, match=r"Stopped \(Ctrl-C\) before training started") as stopped:
        interruptions.whole_run(vmap_cut_off)()
    assert stopped.value.exit_code == 130
    with pytest.raises(ValueError):
        interruptions.whole_run(lambda: int("x"))()


def test_sigterm_saves_a_checkpoint_at_the_end_of_the_step_and_stops(tmp_path, caplog):
    out = tmp_path / "out"
    received = []

    def outside(signum, frame):  # stands for the handler before training; it also keeps SIGTERM off pytest
        received.append(signum)

    before = signal.signal(signal.SIGTERM, outside)
    try:
        exit_code, message = through_cli(smoke_argv(out, "--max_steps", 4, "--num_sample_prompts", 0), caplog,
                                         callbacks=[AtStep(2, lambda: os.kill(os.getpid(), signal.SIGTERM))])
        restored = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert received == [], "training did not take SIGTERM itself"
    assert restored is outside, "the handler from before training was not put back"
    assert exit_code == 143
    assert message == ("Training interrupted at step 2 (SIGTERM; latest checkpoint checkpoint-2); resume with the same "
                       "arguments: add --resume_from_checkpoint latest")
    assert checkpoints.latest_complete_checkpoint(out) == str(out / "checkpoint-2")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"] and not (out / "final").exists()


def test_resume_command_keeps_the_flags_and_replaces_an_earlier_resume(monkeypatch):
    monkeypatch.setattr(sys.modules["__main__"], "__file__", str(REPO_ROOT / "finetuning" / "train_galore.py"),
                        raising=False)
    monkeypatch.setattr(sys, "orig_argv", ["python", "-u", "finetuning/train_galore.py", "--output_dir", "my run",
                                           "--resume_from_checkpoint", "out/checkpoint-5", "--resume-from-checkpoint=x",
                                           "--max_steps", "9"])
    assert processes.command_line() == ["python", "-u", "finetuning/train_galore.py", "--output_dir", "my run",
                                       "--max_steps", "9"]
    monkeypatch.setattr(sys.modules["__main__"], "__file__", "/usr/lib/python3/site-packages/pytest/__main__.py")
    assert processes.command_line() is None


# --- 4, 5. the real signals, to the real script ---------------------------------------------------------

SIGNAL_ARGV = ["--max_steps", "200", "--num_sample_prompts", "0", "--logging_steps", "1"]
PROCESS_TIMEOUT_S = 180
RESUME_LINE = re.compile(r"Training interrupted at step (\d+) \((\w+(?:-\w)?); latest checkpoint (checkpoint-\d+)\); "
                         r"resume with: (.*)$", re.MULTILINE)


def start(output_dir: Path, save_argv: list[str], log_path: Path) -> subprocess.Popen:
    argv = [sys.executable, "finetuning/train_galore.py", "--smoke", "--output_dir", str(output_dir), *SIGNAL_ARGV,
            *save_argv]
    with log_path.open("wb") as log:
        # A shell without job control starts background jobs with SIGINT ignored: as a terminal would, deliver it.
        return subprocess.Popen(argv, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(condition, process: subprocess.Popen, log_path: Path, what: str) -> None:
    deadline = time.monotonic() + PROCESS_TIMEOUT_S
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{what} never happened; {log_path}:\n{log_path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def signalled(tmp_path_factory) -> dict:
    """{"SIGTERM": ..., "SIGINT": ...}: each a smoke run of 200 steps stopped by that signal once training runs;
    SIGINT's saves a checkpoint every step, so the signal often lands mid-save. Both run at once."""
    root = tmp_path_factory.mktemp("signalled")
    runs = {
        "SIGTERM": dict(save=["--save_strategy", "no"],
                        started=lambda out, log: "'loss':" in log.read_text(errors="replace")),
        "SIGINT": dict(save=["--save_strategy", "steps", "--save_steps", "1"],
                       # Any: --save_total_limit 2 deletes checkpoint-1 two steps later.
                       started=lambda out, log: any(out.glob("checkpoint-*/trainer_state.json"))),
    }
    for name, run in runs.items():
        run["out"], run["log"] = root / name / "out", root / f"{name}.log"
        run["out"].parent.mkdir()
        run["process"] = start(run["out"], run["save"], run["log"])
    try:
        for name, run in runs.items():
            process = run["process"]
            wait_for(lambda: run["started"](run["out"], run["log"]), process, run["log"], f"{name}'s training start")
            process.send_signal(getattr(signal, name))
        for run in runs.values():
            run["process"].wait(timeout=PROCESS_TIMEOUT_S)
            run["output"] = run["log"].read_text(errors="replace")
    finally:
        stop_processes(run["process"] for run in runs.values())
    return runs


def check_the_stop(run: dict, exit_code: int, how: str) -> tuple[Path, list[str]]:
    """The exit code, the one resume line, no traceback, a complete checkpoint, nothing cut off; returns the
    checkpoint and the resume command."""
    output, out = run["output"], run["out"]
    assert run["process"].returncode == exit_code, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    [(step, said_how, checkpoint, command)] = RESUME_LINE.findall(output)
    assert said_how == how
    assert checkpoints.latest_complete_checkpoint(out) == str(out / checkpoint)
    assert int(checkpoint.split("-")[1]) <= int(step) < 200
    cut_off = [p.name for p in out.glob("checkpoint-*") if not (p / "trainer_state.json").is_file()]
    assert not cut_off, f"checkpoint folders cut off mid-save were left: {cut_off}"
    assert not (out / "final").exists()
    command = shlex.split(command)
    assert command[:2] == [sys.executable, "finetuning/train_galore.py"]
    assert command[2:] == ["--smoke", "--output_dir", str(out), *SIGNAL_ARGV, *run["save"],
                           "--resume_from_checkpoint", "latest"]
    return out / checkpoint, command


def test_sigterm_to_the_script_saves_stops_with_143_and_resumes(signalled, caplog):
    checkpoint, command = check_the_stop(signalled["SIGTERM"], 143, "SIGTERM")
    step = int(checkpoint.name.split("-")[1])
    assert f"Training interrupted at step {step} " in signalled["SIGTERM"]["output"], "not the step it stopped at"
    # The printed command, run here: it goes on from the checkpoint to the end.
    caplog.set_level(logging.INFO)
    trainer = run_galore(command[2:])
    assert f"Resuming from the latest complete checkpoint, {checkpoint}" in caplog.text
    assert trainer.state.global_step == 200
    assert (checkpoint.parent / "final" / "model.safetensors").is_file()


def test_ctrl_c_to_the_script_exits_130_with_nothing_cut_off(signalled):
    check_the_stop(signalled["SIGINT"], 130, "Ctrl-C")


# --- --time_budget ---------------------------------------------------------------------------------------------


def test_a_time_budget_stops_in_time_to_save_a_checkpoint_and_says_how_to_resume(tmp_path, caplog, monkeypatch):
    out = tmp_path / "out"
    # 10 minutes from a start 9 min 57 s ago: 3 s left, less than a first checkpoint is assumed to take.
    monkeypatch.setattr(interruptions, "PROCESS_START", time.monotonic() - 597)
    monkeypatch.setattr(interruptions, "FIRST_SAVE_SECONDS", 5.0)
    exit_code, message = through_cli(smoke_argv(out, *RUN_ARGV, "--time_budget", "10m"), caplog)
    assert exit_code == loop.TIME_BUDGET_EXIT_CODE == 75
    assert message == ("Training interrupted at step 1 (--time_budget nearly spent; latest checkpoint checkpoint-1); "
                       "resume with the same arguments: add --resume_from_checkpoint latest")
    assert checkpoints.latest_complete_checkpoint(out) == str(out / "checkpoint-1") and not (out / "final").exists()

    # The next session, with its own budget: the run continues from step 1 and ends.
    monkeypatch.setattr(interruptions, "PROCESS_START", time.monotonic())
    trainer = run_galore(smoke_argv(out, *RUN_ARGV, "--time_budget", "10m", "--resume_from_checkpoint", "latest"))
    assert trainer.state.global_step == 4 and (out / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("text, seconds", [("80m", 4800), ("1h30m", 5400), ("90s", 90), ("2h", 7200),
                                           ("1.5h", 5400), ("45 min", 2700)])
def test_time_budgets_read_as_durations(text, seconds):
    assert arguments.ReportArguments(time_budget=text).time_budget_seconds == seconds


@pytest.mark.parametrize("text", ["80", "80x", "0m", "m", ""])
def test_a_time_budget_that_is_no_duration_is_refused(text):
    with pytest.raises(errors.UserInputError, match="is not a duration: write hours, minutes and seconds like 80m"):
        arguments.ReportArguments(time_budget=text)
