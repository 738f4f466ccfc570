"""The guarded train loop around trainer.train(): a NaN loss stops it, an out-of-memory error says what to lower,
Ctrl-C, SIGTERM and --time_budget end with the command that resumes, and the whole run's train loss is reported
however often it was resumed."""
from __future__ import annotations

import logging
import math
import time
from typing import Optional

import torch
from transformers import TrainerCallback

from training import processes
from training.output_dir import OutputPlan, clear_earlier_run
from training.saving import is_disk_full
from training.checkpoints import (latest_complete_checkpoint, remove_cut_off_checkpoints, require_complete_checkpoint)
from cli.errors import Interrupted, TrainingFailed
from training import interruptions
from training.interruptions import StopOnSigterm, after_training, resume_hint, stop_beneath
from training.saved_settings import SaveRunSettings

logger = logging.getLogger(__name__)


TIME_BUDGET_EXIT_CODE = 75  # EX_TEMPFAIL: stopped early on purpose, to be resumed
class StopOnNonFiniteLoss(TrainerCallback):
    """Stop at the first logged NaN/inf loss instead of burning GPU hours on a run that learns nothing."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        grad_norm = (logs or {}).get("grad_norm")
        # With fp16 the loss scaler skips steps whose gradients overflow, and lowers its
        # scale: an inf grad_norm there is routine. Elsewhere it means the weights are ruined.
        if grad_norm is not None and not math.isfinite(grad_norm) and not args.fp16:
            loss = grad_norm if loss is None or math.isfinite(loss) else loss
        if loss is None or math.isfinite(loss):
            return
        checkpoint = latest_complete_checkpoint(args.output_dir)
        raise TrainingFailed(
            f"The training loss became {loss} at step {state.global_step}: the model's numbers overflowed or "
            "diverged, and every step from here on would be wasted.\n"
            "Fix, in order: lower --learning_rate (by 2-10x); keep --max_grad_norm at 1.0 or below; on a GPU "
            "without bfloat16 (T4, V100) keep the default fp16 path (do not load the model in float16 yourself); "
            "check the data for very long or garbled records.\n"
            + (f"The last good checkpoint is {checkpoint}." if checkpoint else "No checkpoint was saved yet.")
        )


class LogAtEverySave(TrainerCallback):
    """Log the loss at every checkpoint and at the last step, besides every --logging_steps.

    Each logged loss is the mean over the steps since the one before, and a resumed Trainer starts a new sum at its
    checkpoint: so the logs kept in every checkpoint cover each step of a run once, whatever --logging_steps, and the
    whole run's train loss (whole_run_train_loss) is the same however often it was stopped and resumed.
    """

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save or control.should_training_stop:
            control.should_log = True

    on_epoch_end = on_step_end


def whole_run_train_loss(log_history) -> Optional[float]:
    """The mean training loss over every step of the run, including the steps before any resume.

    The Trainer's own train_loss sums only the steps of the process that ran last (and divides by all steps).
    Each logged loss is the mean since the log before, so it counts once for each of its steps. With LogAtEverySave
    the logs cover every step, so this is the mean of every step's loss, up to the 4 decimals the Trainer rounds
    each logged loss to: exact (to those decimals) with --logging_steps 1; with more steps per log, each log's
    rounding counts for all its steps (still within 5e-5). A checkpoint written without that callback, between two
    logs, leaves the steps after its last log out: this is then the mean over the logged steps.
    """
    total, steps, previous = 0.0, 0, 0
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            span = entry["step"] - previous
            if span > 0:
                total += entry["loss"] * span
                steps += span
            previous = entry["step"]
    return total / steps if steps else None


def _out_of_memory_advice(trainer) -> str:
    """What ran out of memory, and what to lower, one at a time."""
    args, tokens = trainer.args, getattr(trainer, "max_tokens", None)  # batching.TokenBudgetSFTTrainer's budget
    if tokens is None:
        batch, fixes = f"batch {args.per_device_train_batch_size}", [
            "halve --per_device_train_batch_size and double --gradient_accumulation_steps (the same effective batch)"]
    else:
        half = tokens // 2 // trainer.row_tokens * trainer.row_tokens  # whole rows of --max_seq_length, as trained
        batch = f"{tokens:,} tokens a batch"
        fixes = [f"set --max_tokens_per_batch {half} --gradient_accumulation_steps "
                 f"{2 * args.gradient_accumulation_steps} (the same tokens a step)"] if half >= trainer.row_tokens else []
    # trl 0.8.6 switches checkpointing on in the 4-bit model itself and off in the arguments it hands the Trainer.
    checkpointing = args.gradient_checkpointing or getattr(trainer.model, "is_gradient_checkpointing", False)
    fixes += ["lower --max_seq_length"] + ([] if checkpointing else ["turn on --gradient_checkpointing"])
    last = "."  # --auto_find_batch_size halves --per_device_train_batch_size, which token batches do not use
    if tokens is None:
        last = ("; or let --auto_find_batch_size find the largest batch that fits." if args.world_size == 1 else
                " (--auto_find_batch_size would retry on one process while the others wait).")
    return (f"The GPU ran out of memory ({batch}, gradient checkpointing "
            f"{'on' if checkpointing else 'off'}).\nFix, one at a time: {'; '.join(fixes)}{last}\n")


def _ctrl_c(trainer) -> Interrupted:
    """What Ctrl-C during training ends in, once the checkpoint it cut off is gone."""
    if processes.writes(trainer.args):
        remove_cut_off_checkpoints(trainer.args.output_dir)
    return Interrupted(resume_hint(trainer, "Ctrl-C"), 130)


def train(trainer, output: Optional[OutputPlan] = None, time_budget: Optional[float] = None):
    """trainer.train() with the guards: a NaN loss stops it, an out-of-memory error says which settings to lower,
    Ctrl-C and SIGTERM end in errors.Interrupted with the command that resumes. Returns the Trainer's TrainOutput,
    its train_loss that of the whole run (whole_run_train_loss), resumed or not.

    What an --overwrite_output_dir replaces (`output.replaces`) is deleted here, right before training starts.
    `time_budget` (--time_budget, seconds from the process's start): stop in time to save a checkpoint, then end in
    errors.Interrupted with the command that resumes.
    """
    if output is not None and processes.writes(trainer.args):
        clear_earlier_run(output)
    processes.wait_for_everyone(trainer.args)  # no process writes a checkpoint before the earlier run is gone
    resume_from_checkpoint = output.resume_from if output is not None else None
    args = trainer.args
    if resume_from_checkpoint is not None:
        # Checked when the run was planned too; a checkpoint missing its optimizer would resume as another run.
        require_complete_checkpoint(resume_from_checkpoint, args.output_dir)
    sigterm = StopOnSigterm(time_budget)
    if time_budget is not None:
        log_time_budget(time_budget)
    added = [StopOnNonFiniteLoss(), LogAtEverySave(), sigterm]  # removed again afterwards: a trainer may train twice
    if output is not None and output.settings:
        added.append(SaveRunSettings(output.settings))  # run_settings.json in each checkpoint, for a resume's check
    for callback in added:
        trainer.add_callback(callback)
    if args.logging_nan_inf_filter:
        # The filter logs a NaN step's loss as the running average (0.0 at the first step): the guard would miss it.
        logger.warning("--logging_nan_inf_filter is turned off: it would hide a NaN loss from the NaN guard.")
        args.logging_nan_inf_filter = False
    try:
        with sigterm.installed():
            result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    except KeyboardInterrupt as e:
        raise _ctrl_c(trainer) from e
    except torch.OutOfMemoryError as e:
        checkpoint = latest_complete_checkpoint(args.output_dir)
        raise TrainingFailed(
            _out_of_memory_advice(trainer)
            + (
                f"Resume with --resume_from_checkpoint {checkpoint}"
                if checkpoint
                else "No checkpoint was saved yet; the run starts over."
            )
        ) from e
    except Exception as e:
        if isinstance(stop_beneath(e), KeyboardInterrupt):  # a library's own error, raised as Ctrl-C cut into it
            raise _ctrl_c(trainer) from e
        if not is_disk_full(e):
            raise
        raise TrainingFailed(
            f"The disk filled up while saving a checkpoint to {args.output_dir}: {e}.\n"
            "Free space, keep fewer checkpoints (--save_total_limit 1) or save less often (--save_steps), then "
            f"resume with --resume_from_checkpoint {latest_complete_checkpoint(args.output_dir) or 'latest'} "
            "(a checkpoint cut off by the full disk is never taken as the latest)."
        ) from e
    finally:
        for callback in added:
            trainer.remove_callback(callback)
    if sigterm.stopped_at is not None:
        if sigterm.signalled:
            raise Interrupted(resume_hint(trainer, "SIGTERM"), 143)
        raise Interrupted(resume_hint(trainer, "--time_budget nearly spent"), TIME_BUDGET_EXIT_CODE)
    if sigterm.signalled:
        # It came after the last step's end: training is done and no checkpoint holds its end; the final save will.
        logger.warning("SIGTERM came after the last training step: finishing the run (saving the final model).")
    after_training(trainer)  # from here a stop (SIGTERM, Ctrl-C) says what of the run is on disk
    return with_whole_run_train_loss(result, trainer.state.log_history)


def log_time_budget(time_budget: float) -> None:
    """--time_budget at the start of training: what loading has spent, what a checkpoint is kept, what is left."""
    spent = time.monotonic() - interruptions.PROCESS_START
    left = time_budget - spent - interruptions.FIRST_SAVE_SECONDS
    line = (f"--time_budget {_duration(time_budget)}: {_duration(spent)} spent loading, "
            f"{_duration(interruptions.FIRST_SAVE_SECONDS)} kept for the first checkpoint (then the time the last "
            f"one took) and two of the slowest steps")
    if left <= 0:
        logger.warning("%s: that leaves no time to train, so the run stops after its first step. Give a longer "
                       "budget to train more than a step per session.", line)
    else:
        logger.info("%s: about %s left for training.", line, _duration(left))


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return "".join(f"{value}{unit}" for value, unit in ((hours, "h"), (minutes, "m"), (seconds, "s")) if value) or "0s"


def with_whole_run_train_loss(result, log_history):
    """The Trainer's TrainOutput, with the train_loss of the whole run in it and in the log's last summary."""
    loss = whole_run_train_loss(log_history)
    if loss is None:
        return result
    for entry in reversed(log_history):
        if "train_loss" in entry:  # the Trainer's summary of this process, kept in trainer_state.json
            entry["train_loss"] = loss
            break
    return result._replace(training_loss=loss, metrics={**result.metrics, "train_loss": loss})
