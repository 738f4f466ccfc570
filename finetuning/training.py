"""Training around the Trainer: where a run starts (resume, overwrite, refuse), the guarded train loop, and
saves that leave either the whole model or nothing.

The output dir is decided in two steps. `plan_output_dir` runs with the other checks, before anything loads,
and touches nothing; `clear_earlier_run` deletes what an --overwrite_output_dir replaces, right before training,
once every input has passed.
"""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from transformers import TrainerCallback

from errors import TrainingFailed, UserInputError
from smoke import SMOKE_MODEL_DIR

logger = logging.getLogger(__name__)

RESUME_LATEST = ("true", "latest", "last")
FINAL_DIR = "final"
MERGED_DIR = "merged"


# ---------------------------------------------------------------------------
# Checkpoints and the output dir
# ---------------------------------------------------------------------------


def latest_complete_checkpoint(output_dir) -> Optional[str]:
    """The newest checkpoint-N folder that was written to the end, or None.

    The Trainer writes trainer_state.json after the weights, optimizer, scheduler and
    RNG state, so a folder whose trainer_state.json is missing or unreadable was cut
    off mid-save (a Colab disconnect, a kill) and must not be resumed from.
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    numbered = []
    for checkpoint in folder.glob("checkpoint-*"):
        suffix = checkpoint.name.split("-", 1)[1]
        if checkpoint.is_dir() and suffix.isdigit():
            numbered.append((int(suffix), checkpoint))
    for _, checkpoint in sorted(numbered, reverse=True):
        try:
            json.loads((checkpoint / "trainer_state.json").read_text())
        except (OSError, ValueError):
            logger.warning("Ignoring %s: it was not written to the end.", checkpoint)
            continue
        return str(checkpoint)
    return None




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
        return plan
    if resume is not None:
        if not (Path(resume) / "trainer_state.json").is_file():
            raise UserInputError(
                f"--resume_from_checkpoint {resume} is not a complete checkpoint (no trainer_state.json). "
                f"The latest complete one in {output_dir} is {latest_complete_checkpoint(output_dir)}."
            )
        plan.resume_from = str(resume)
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
        names = (FINAL_DIR, f".{FINAL_DIR}.partial", MERGED_DIR) + (() if smoke else (SMOKE_MODEL_DIR,))
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


def train(trainer, output: Optional[OutputPlan] = None):
    """trainer.train() with the guards: a NaN loss stops it, an out-of-memory error says which settings to lower.

    What an --overwrite_output_dir replaces (`output.replaces`) is deleted here, right before training starts.
    """
    if output is not None:
        clear_earlier_run(output)
    resume_from_checkpoint = output.resume_from if output is not None else None
    trainer.add_callback(StopOnNonFiniteLoss())
    args = trainer.args
    if args.logging_nan_inf_filter:
        # The filter logs a NaN step's loss as the running average (0.0 at the first step): the guard would miss it.
        logger.warning("--logging_nan_inf_filter is turned off: it would hide a NaN loss from the NaN guard.")
        args.logging_nan_inf_filter = False
    try:
        return trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    except torch.OutOfMemoryError as e:
        checkpoint = latest_complete_checkpoint(args.output_dir)
        raise TrainingFailed(
            "The GPU ran out of memory "
            f"(batch {args.per_device_train_batch_size}, gradient checkpointing "
            f"{'on' if args.gradient_checkpointing else 'off'}).\n"
            "Fix, one at a time: halve --per_device_train_batch_size and double --gradient_accumulation_steps "
            "(the same effective batch); lower --max_seq_length; turn on --gradient_checkpointing; or let "
            "--auto_find_batch_size find the largest batch that fits.\n"
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



# ---------------------------------------------------------------------------
# Saving: all or nothing
# ---------------------------------------------------------------------------


def save_final(trainer, tokenizer) -> Path:
    """Write the trained model (or adapter) and the tokenizer to OUTPUT_DIR/final, all or nothing."""

    def write(folder: Path) -> None:
        trainer.save_model(str(folder))
        tokenizer.save_pretrained(str(folder))

    final = write_atomically(Path(trainer.args.output_dir) / FINAL_DIR, write)
    logger.info("Saved to %s", final)
    return final


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
