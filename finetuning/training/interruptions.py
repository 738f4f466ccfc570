"""Stops from outside: SIGTERM (Kaggle, Colab and job schedulers send it before they kill) saves a checkpoint
and stops, and every stop ends with one line saying where it stopped and the command that continues it."""
from __future__ import annotations

import contextlib
import logging
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
