"""Training around the Trainer: where a run starts (resume, overwrite, refuse), the guarded train loop, and
saves that leave either the whole model or nothing.

The output dir is decided in two steps. `plan_output_dir` runs with the other checks, before anything loads,
and touches nothing; `clear_earlier_run` deletes what an --overwrite_output_dir replaces, right before training,
once every input has passed.
"""
from __future__ import annotations

import errno
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from transformers import TrainerCallback

import distributed
from checkpoints import (latest_complete_checkpoint, remove_cut_off_checkpoints, require_complete_checkpoint,
                         require_same_processes)
from errors import Interrupted, TrainingFailed, UserInputError
from interruptions import StopOnSigterm, resume_hint
from smoke import SMOKE_MODEL_DIR

logger = logging.getLogger(__name__)

RESUME_LATEST = ("true", "latest", "last")
TIME_BUDGET_EXIT_CODE = 75  # EX_TEMPFAIL: stopped early on purpose, to be resumed
FINAL_DIR = "final"
MERGED_DIR = "merged"
GGUF_DIR = "gguf"  # export_gguf.py's files, made from final/: stale once final/ is replaced


# ---------------------------------------------------------------------------
# Checkpoints and the output dir
# ---------------------------------------------------------------------------


def check_output_dir_writable(output_dir: Path) -> None:
    """--output_dir must be a folder this user can write, or one that can be made: found before anything loads."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserInputError(
            f"--output_dir {output_dir} is a file, not a folder. Choose another --output_dir (a new or existing "
            "folder), or move the file away."
        )
    existing = output_dir.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserInputError(
            f"--output_dir {output_dir}: {existing} is a file, so no folder can be made under it. Choose another "
            "--output_dir."
        )
    # os.access also says no on a read-only file system (EROFS), e.g. Kaggle's /kaggle/input.
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "it" if existing == output_dir.absolute() else f"the folder {existing} it would be made in"
        raise UserInputError(
            f"--output_dir {output_dir} cannot be written: {where} is read-only for this user. Choose an "
            f"--output_dir you can write to (on Kaggle, under /kaggle/working), or make it writable "
            f"(chmod u+w {existing})."
        )


@dataclass
class OutputPlan:
    """Where a run starts: the checkpoint it resumes from, and what of an earlier run it replaces."""

    output_dir: Path
    resume_from: Optional[str] = None
    replaces: list = field(default_factory=list)


def plan_output_dir(training_args, smoke: bool = False) -> OutputPlan:
    """Decide where training starts from; deletes nothing (see clear_earlier_run).

    An output dir that holds an earlier run is refused unless --overwrite_output_dir or
    --resume_from_checkpoint says what to do with it: silently mixing two runs' checkpoints is worse.
    A smoke run's folder holds its tiny base model (SMOKE_MODEL_DIR), and only a smoke run's: a real run
    replaces it together with the rest. So a smoke run replaces or resumes only an earlier smoke run, never a run
    it did not write, and a real run never resumes a smoke run's checkpoint.
    """
    output_dir = Path(training_args.output_dir)
    check_output_dir_writable(output_dir)
    plan = OutputPlan(output_dir)
    earlier = [p.name for p in output_dir.iterdir() if p.name.startswith("checkpoint-") or p.name == FINAL_DIR] \
        if output_dir.is_dir() else []
    smoke_folder = (output_dir / SMOKE_MODEL_DIR).is_dir()
    if smoke and earlier and not smoke_folder:
        raise UserInputError(
            f"--output_dir {output_dir} holds a run that --smoke did not write ({', '.join(sorted(earlier)[:4])}); "
            "a smoke run never replaces or resumes it. Leave out --output_dir (a smoke run has its own folder) or "
            "choose another."
        )
    resume = training_args.resume_from_checkpoint
    if resume is not None and not smoke and smoke_folder:
        raise UserInputError(
            f"--resume_from_checkpoint {resume}: {output_dir} holds a --smoke run (a tiny random model), not a run "
            "of this model. Start a new run in another --output_dir."
        )
    if resume is not None and str(resume).lower() in RESUME_LATEST:
        plan.resume_from = latest_complete_checkpoint(output_dir)
        if plan.resume_from is None:
            raise UserInputError(
                f"--resume_from_checkpoint {resume}: {output_dir} holds no complete "
                "checkpoint to resume from. Check --output_dir, or start a new run without the flag."
            )
        logger.info("Resuming from the latest complete checkpoint, %s", plan.resume_from)
    elif resume is not None:
        require_complete_checkpoint(resume, output_dir)
        plan.resume_from = str(resume)
    if plan.resume_from is not None:
        require_same_processes(plan.resume_from, training_args.world_size, training_args.save_on_each_node)
        return plan
    if not smoke and smoke_folder:
        earlier.append(SMOKE_MODEL_DIR)
    if earlier and not training_args.overwrite_output_dir:
        raise UserInputError(
            f"--output_dir {output_dir} already holds an earlier run ({', '.join(sorted(earlier)[:4])}). "
            "Continue it with --resume_from_checkpoint latest, start over with --overwrite_output_dir, "
            "or choose another --output_dir."
        )
    if output_dir.is_dir() and training_args.overwrite_output_dir:
        # A smoke run keeps the tiny model it has just built; a real run replaces a smoke run's whole folder.
        names = (FINAL_DIR, f".{FINAL_DIR}.partial", MERGED_DIR, GGUF_DIR) + (() if smoke else (SMOKE_MODEL_DIR,))
        plan.replaces = sorted((p for p in output_dir.iterdir() if p.is_dir() and (
            p.name.startswith("checkpoint-") or p.name in names)), key=lambda p: p.name)
    return plan


def clear_earlier_run(plan: OutputPlan) -> None:
    """--overwrite_output_dir: delete the earlier run's checkpoints and models, right before training starts."""
    for path in plan.replaces:
        shutil.rmtree(path)
    if plan.replaces:
        logger.info("--overwrite_output_dir: removed the earlier run's %s", ", ".join(p.name for p in plan.replaces))


# ---------------------------------------------------------------------------
# The guarded train loop
# ---------------------------------------------------------------------------


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
    fixes += ["lower --max_seq_length", "turn on --gradient_checkpointing"]
    last = "."  # --auto_find_batch_size halves --per_device_train_batch_size, which token batches do not use
    if tokens is None:
        last = ("; or let --auto_find_batch_size find the largest batch that fits." if args.world_size == 1 else
                " (--auto_find_batch_size would retry on one process while the others wait).")
    return (f"The GPU ran out of memory ({batch}, gradient checkpointing "
            f"{'on' if args.gradient_checkpointing else 'off'}).\nFix, one at a time: {'; '.join(fixes)}{last}\n")


def train(trainer, output: Optional[OutputPlan] = None, time_budget: Optional[float] = None):
    """trainer.train() with the guards: a NaN loss stops it, an out-of-memory error says which settings to lower,
    Ctrl-C and SIGTERM end in errors.Interrupted with the command that resumes. Returns the Trainer's TrainOutput,
    its train_loss that of the whole run (whole_run_train_loss), resumed or not.

    What an --overwrite_output_dir replaces (`output.replaces`) is deleted here, right before training starts.
    `time_budget` (--time_budget, seconds from the process's start): stop in time to save a checkpoint, then end in
    errors.Interrupted with the command that resumes.
    """
    if output is not None and distributed.writes(trainer.args):
        clear_earlier_run(output)
    distributed.wait_for_everyone(trainer.args)  # no process writes a checkpoint before the earlier run is gone
    resume_from_checkpoint = output.resume_from if output is not None else None
    args = trainer.args
    if resume_from_checkpoint is not None:
        # Checked when the run was planned too; a checkpoint missing its optimizer would resume as another run.
        require_complete_checkpoint(resume_from_checkpoint, args.output_dir)
    sigterm = StopOnSigterm(time_budget)
    added = [StopOnNonFiniteLoss(), LogAtEverySave(), sigterm]  # removed again afterwards: a trainer may train twice
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
        if distributed.writes(args):
            remove_cut_off_checkpoints(args.output_dir)
        raise Interrupted(resume_hint(trainer, "Ctrl-C"), 130) from e
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
    return with_whole_run_train_loss(result, trainer.state.log_history)


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



# ---------------------------------------------------------------------------
# Saving: all or nothing
# ---------------------------------------------------------------------------


def save_final(trainer, tokenizer, initial_adapter: Optional[Path] = None) -> Optional[Path]:
    """Write the trained model (or adapter) and the tokenizer to OUTPUT_DIR/final, all or nothing. Under DDP one
    process writes (distributed.writes); the others get None. `initial_adapter`: an OLoRA adapter as it started,
    against which peft converts the trained one into a plain LoRA adapter for the original base."""
    if not distributed.writes(trainer.args):
        return None

    def write(folder: Path) -> None:
        if initial_adapter is None:
            trainer.save_model(str(folder))
        else:
            trainer.model.save_pretrained(str(folder), path_initial_model_for_weight_conversion=str(initial_adapter))
        tokenizer.save_pretrained(str(folder))

    final = write_atomically(Path(trainer.args.output_dir) / FINAL_DIR, write)
    if initial_adapter is not None:
        shutil.rmtree(initial_adapter, ignore_errors=True)  # a temporary folder, used up by the conversion
    logger.info("Saved to %s", final)
    return final


def merge_adapter(adapter_dir: Path, dtype: torch.dtype) -> Path:
    """OUTPUT_DIR/merged: the adapter merged into a 16-bit base model, loadable without peft (and convertible to
    GGUF). The base is loaded again in 16 bits on the CPU, so the GPU's memory is not needed: merging into the 4-bit
    weights would round the update away and leave a model only bitsandbytes can load."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    merged_model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir, dtype=dtype,
                                                            device_map={"": "cpu"}).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)

    def write(folder: Path) -> None:
        merged_model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    return write_atomically(adapter_dir.parent / MERGED_DIR, write)


def write_atomically(final: Path, write: Callable[[Path], None]) -> Path:
    """Have `write` fill a temporary folder, then rename it to `final`.

    A run cut off while saving (a Colab disconnect, a full disk) leaves no
    half-written model where a user would load one.
    """
    partial = final.parent / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    old = final.parent / f".{final.name}.old"
    try:
        write(partial)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(partial, final)
    except BaseException as e:
        shutil.rmtree(partial, ignore_errors=True)
        if not is_disk_full(e):
            raise
        raise TrainingFailed(
            f"Saving to {final} failed: {e}. Nothing half-written was left there.\n"
            "Free disk space (or choose an --output_dir on a bigger disk), then resume with "
            f"--resume_from_checkpoint {latest_complete_checkpoint(final.parent) or 'latest'}."
        ) from e
    shutil.rmtree(old, ignore_errors=True)
    return final


def is_disk_full(error) -> bool:
    """A full disk, as the savers report it: OSError(ENOSPC), safetensors' SafetensorError
    ('... No space left on device (os error 28)') or torch.save's RuntimeError ('unexpected pos')."""
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        text = str(error)
        if "No space left on device" in text or "os error 28" in text:
            return True
        if type(error) is RuntimeError and ("unexpected pos" in text or "file write failed" in text):
            return True
        error = error.__cause__ or error.__context__
    return False
