"""Stops from outside: SIGTERM (Kaggle, Colab and job schedulers send it before they kill) saves a checkpoint
and stops, and every stop ends with one line saying where it stopped and the command that continues it."""
from __future__ import annotations

import contextlib
import logging
import shlex
import signal
import threading
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from checkpoints import latest_complete_checkpoint
from distributed import command_line

logger = logging.getLogger(__name__)


class StopOnSigterm(TrainerCallback):
    """SIGTERM (Kaggle, Colab, job schedulers before they kill): save a checkpoint at the end of the current step,
    then stop. Installed for the duration of training.train only (`installed`)."""

    def __init__(self):
        self.received = False  # set by the handler: a signal handler should do no more than that
        self.stopped_at: Optional[int] = None
        self.processes = None  # under DDP: a CPU (gloo) process group to agree on the step to stop at

    def _handle(self, signum, frame):
        self.received = True

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
        """Whether any process has the signal; every process asks at the same points (on the CPU, no GPU sync)."""
        if self.processes is None:
            return self.received
        flag = torch.tensor([int(self.received)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.processes)
        self.received = bool(flag.item())
        return self.received

    def on_step_end(self, args, state, control, **kwargs):
        if not self._any_process_received():
            return
        if self.stopped_at is None:
            logger.warning("SIGTERM: saving checkpoint-%d, then stopping.", state.global_step)
            self.stopped_at = state.global_step
        control.should_save = control.should_training_stop = control.should_log = True

    def on_save(self, args, state, control, **kwargs):
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
