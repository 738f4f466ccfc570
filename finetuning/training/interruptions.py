"""Stops from outside: SIGTERM (Kaggle, Colab and job schedulers send it before they kill) saves a checkpoint
and stops, and every stop ends with one line saying where it stopped and the command that continues it.

Outside trainer.train() (`RunStops`, installed for main()'s whole life by `whole_run`): a stop while the data or the
model loads says nothing was trained; one during the saves and reports after training says what is on disk (SIGTERM
lets final/ finish; Ctrl-C abandons it, leaving no half-written folder). `test_pause` is a test-only hook
(FINETUNING_TEST_PAUSE) that holds a save or an export half-done, for a test's real signal."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import shlex
import signal
import threading
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from training.checkpoints import latest_complete_checkpoint
from training.processes import command_line

logger = logging.getLogger(__name__)


# When this process started: --time_budget counts from here (model loading included).
PROCESS_START = time.monotonic()
# What a checkpoint is assumed to take before the first one has been timed.
FIRST_SAVE_SECONDS = 60.0


class StopOnSigterm(TrainerCallback):
    """SIGTERM (Kaggle, Colab, job schedulers before they kill), or the end of --time_budget drawing near: save a
    checkpoint at the end of the current step, then stop. Installed for the duration of training.train only
    (`installed`).

    The budget is spent when the time so far, two of the slowest steps and a checkpoint (the last one timed, or
    FIRST_SAVE_SECONDS) would pass it.
    """

    def __init__(self, time_budget: Optional[float] = None):
        self.signalled = False  # set by the handler: a signal handler should do no more than that
        self.stopped_at: Optional[int] = None
        self.processes = None  # under DDP: a CPU (gloo) process group to agree on the step to stop at
        self.time_budget = time_budget
        self.budget_spent = False
        self.slowest_step = self.save_seconds = 0.0
        self.step_started = self.step_ended = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_started = time.monotonic()

    def _budget_nearly_spent(self) -> bool:
        if self.time_budget is None or self.step_started is None:
            return False
        now = time.monotonic()
        self.slowest_step = max(self.slowest_step, now - self.step_started)
        save = self.save_seconds or max(FIRST_SAVE_SECONDS, self.slowest_step)
        return now - PROCESS_START + 2 * self.slowest_step + save > self.time_budget

    def _handle(self, signum, frame):
        self.signalled = True

    @property
    def received(self) -> bool:
        return self.signalled or self.budget_spent

    @contextlib.contextmanager
    def installed(self):
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # The launcher signals every process, but each may see it at another step: stopping at different steps
            # would leave the others waiting in DDP's all-reduce until the launcher kills them, unsaved.
            self.processes = dist.new_group(backend="gloo")
        if threading.current_thread() is not threading.main_thread():
            # Python takes signal handlers in the main thread only (a UI that trains in a worker thread).
            yield
            return
        previous = signal.signal(signal.SIGTERM, self._handle)
        try:
            yield
        finally:
            # None: a handler installed outside Python, which cannot be put back; the default is the nearest.
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

    def _any_process_received(self) -> bool:
        """Whether any process has the signal or has spent the budget (and which): every process asks at the same
        points, on the CPU (no GPU sync), so all stop at one step and give one reason."""
        if self.processes is not None:
            flags = torch.tensor([int(self.signalled), int(self.budget_spent)])
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.processes)
            self.signalled, self.budget_spent = bool(flags[0]), bool(flags[1])
        return self.received

    @property
    def reason(self) -> str:
        return "SIGTERM" if self.signalled else "time budget"

    def on_step_end(self, args, state, control, **kwargs):
        self.step_ended = time.monotonic()
        if not self.received and self._budget_nearly_spent():
            self.budget_spent = True
        if not self._any_process_received():
            return
        if self.stopped_at is None:
            logger.warning("%s: saving checkpoint-%d, then stopping.", self.reason, state.global_step)
            self.stopped_at = state.global_step
        control.should_save = control.should_training_stop = control.should_log = True

    def on_save(self, args, state, control, **kwargs):
        if self.step_ended is not None:
            self.save_seconds = time.monotonic() - self.step_ended
        # The signal came during a save the Trainer had started anyway: that checkpoint is the one to stop at.
        if self._any_process_received():
            self.stopped_at = state.global_step
            control.should_training_stop = True


def resume_hint(trainer, how: str) -> str:
    """The one line an interrupted run ends with: where it stopped and the command that continues it."""
    step = trainer.state.global_step
    checkpoint = latest_complete_checkpoint(trainer.args.output_dir)
    command = command_line()
    if checkpoint is None:
        again = (f"start it over with: {shlex.join(command)}" if command
                 else "run it again with the same arguments to start over")
        return f"Training interrupted at step {step} ({how}) before any checkpoint was saved; {again}"
    if command:
        resume = f"resume with: {shlex.join(command + ['--resume_from_checkpoint', 'latest'])}"
    else:
        resume = "resume with the same arguments: add --resume_from_checkpoint latest"
    return f"Training interrupted at step {step} ({how}; latest checkpoint {Path(checkpoint).name}); {resume}"


# ---------------------------------------------------------------------------
# The whole run: a stop before training, and during the saves after it
# ---------------------------------------------------------------------------

# A test-only hook, read by `test_pause`: "STAGE:SECONDS[,STAGE:SECONDS]" pauses that long at STAGE (final, merged,
# convert, parity), so that a test can send a real signal while a save or an export is half-done. Never set it
# otherwise: it only makes a run slower.
TEST_PAUSE_VARIABLE = "FINETUNING_TEST_PAUSE"


def test_pause(stage: str) -> None:
    """Pause where the test-only FINETUNING_TEST_PAUSE asks (see TEST_PAUSE_VARIABLE); nothing otherwise."""
    for item in os.environ.get(TEST_PAUSE_VARIABLE, "").split(","):
        name, _, seconds = item.partition(":")
        if name.strip() == stage and seconds:
            logger.info("%s: pausing %s s in %s (test hook).", TEST_PAUSE_VARIABLE, seconds, stage)
            deadline = time.monotonic() + float(seconds)
            while time.monotonic() < deadline:
                time.sleep(0.05)


class Stop(BaseException):
    """SIGTERM outside trainer.train(): raised by the handler as Ctrl-C raises KeyboardInterrupt (a BaseException,
    so no library's `except Exception` swallows it)."""


def stop_beneath(error: BaseException) -> Optional[BaseException]:
    """The Ctrl-C (KeyboardInterrupt) or SIGTERM (Stop) that `error` came out of handling, if any: a library whose
    clean-up fails when a stop cuts into it raises its own error instead (torch's vmap, inside transformers' mask
    building: "RuntimeError: !dynamicLayerStack.empty() INTERNAL ASSERT FAILED")."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, (KeyboardInterrupt, Stop)):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


# What each step after training writes, as the stop message names it.
AFTER_TRAINING_STEPS = {
    "final": "the trained model in {out}/final",
    "reports": "the reports (metrics.json, samples.md, the loss curve)",
    "merged": "{out}/merged (the adapter merged into a 16-bit base)",
    "check": "the smoke run's reload check",
}


class RunStops:
    """SIGTERM and Ctrl-C outside trainer.train() (which StopOnSigterm and loop.train handle): before training, a
    stop with nothing saved; after it, during the saves and reports, a stop that says what is on disk. Installed for
    main()'s whole life by `whole_run`.

    During the write of final/ (a `writing` step marked `finish`), SIGTERM waits for the save to end, then stops: a
    scheduler's SIGTERM comes with some seconds of grace, and the trained model is what the run was for. Ctrl-C stops
    at once; write_atomically removes the half-written folder and keeps an earlier final/.
    """

    current: Optional["RunStops"] = None

    def __init__(self):
        self.output_dir: Optional[str] = None  # set when training has ended
        self.step = 0
        self.doing: Optional[str] = None
        self.done: list = []
        self.finishing = 0
        self.pending = False
        self.previous = None

    def _handle(self, signum, frame):
        if self.finishing:
            self.pending = True
            logger.warning("SIGTERM during the save of %s: finishing it, then stopping.", self.doing)
            return
        raise Stop("SIGTERM")

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        RunStops.current = self

    def uninstall(self) -> None:
        if RunStops.current is self:
            RunStops.current = None
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None

    @contextlib.contextmanager
    def writing(self, step: str, finish: bool = False):
        self.doing = step
        self.finishing += finish
        try:
            yield
        finally:
            self.finishing -= finish
        self.done.append(step)
        self.doing = None
        if self.pending and not self.finishing:
            raise Stop("SIGTERM")

    def message(self, how: str) -> str:
        """The one line a stop outside trainer.train() ends with."""
        if self.output_dir is None:
            return (f"Stopped ({how}) before training started: nothing was trained, and an earlier run in the output "
                    "folder is untouched. Run the same command again to start.")
        out = self.output_dir.rstrip("/")
        what = AFTER_TRAINING_STEPS.get(self.doing or "", "the run's last files").format(out=out)
        if "final" not in self.done:
            checkpoint = latest_complete_checkpoint(out)
            command = command_line()
            if checkpoint is None:
                again = (f"start it over with: {shlex.join(command)}" if command
                         else "run it again with the same arguments to start over")
                return (f"Training ended at step {self.step}, then {how} stopped the save of {what}: nothing "
                        f"half-written was left, and no checkpoint holds the training; {again}")
            resume = (f"resume with: {shlex.join(command + ['--resume_from_checkpoint', 'latest'])}" if command
                      else "resume with the same arguments: add --resume_from_checkpoint latest")
            return (f"Training ended at step {self.step}, then {how} stopped the save of {what}: nothing half-written "
                    f"was left (latest checkpoint {Path(checkpoint).name}); {resume}")
        not_written = [AFTER_TRAINING_STEPS[step].format(out=out) for step in ("reports", "merged")
                       if step not in self.done and (step == self.doing or step == "reports")]
        return (f"Stopped ({how}) after training to step {self.step}: {out}/final holds the trained model, whole; "
                f"not written: {'; '.join(not_written) or what}. Nothing half-written was left.")


def after_training(trainer) -> None:
    """loop.train's end: from here a stop says what of the run is on disk."""
    if RunStops.current is not None:
        RunStops.current.output_dir = str(trainer.args.output_dir)
        RunStops.current.step = trainer.state.global_step


@contextlib.contextmanager
def writing(step: str, finish: bool = False):
    """A step after training (AFTER_TRAINING_STEPS), for the stop message; `finish`: SIGTERM waits for its end."""
    stops = RunStops.current
    if stops is None or stops.output_dir is None:
        yield
        return
    with stops.writing(step, finish):
        yield


def whole_run(main):
    """A training script's main(), with SIGTERM and Ctrl-C outside trainer.train() ending in errors.Interrupted
    (exit 143 or 130) with one line that says what is on disk, and the output folder's lock (run_lock) released
    however main() ends."""
    from cli.errors import Interrupted
    from training import run_lock

    @functools.wraps(main)
    def guarded(*args, **kwargs):
        stops = RunStops()
        stops.install()
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt as e:
            raise Interrupted(stops.message("Ctrl-C"), 130) from e
        except Stop as e:
            raise Interrupted(stops.message("SIGTERM"), 143) from e
        except Interrupted:  # said already, by the training loop
            raise
        except Exception as e:
            stop = stop_beneath(e)
            if stop is None:
                raise
            how, code = ("Ctrl-C", 130) if isinstance(stop, KeyboardInterrupt) else ("SIGTERM", 143)
            raise Interrupted(stops.message(how), code) from e
        finally:
            stops.uninstall()
            run_lock.release_all()

    return guarded
