"""The output folder of a run: where it starts (resume, overwrite, refuse), decided before anything loads and
touching nothing (`plan_output_dir`); what an --overwrite_output_dir replaces is deleted only right before training
(`clear_earlier_run`)."""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


from training.checkpoints import (latest_complete_checkpoint, require_complete_checkpoint,
                         require_same_processes)
from cli.errors import UserInputError
from models.smoke import SMOKE_MODEL_DIR

logger = logging.getLogger(__name__)


RESUME_LATEST = ("true", "latest", "last")
FINAL_DIR = "final"
MERGED_DIR = "merged"
SAMPLES_JSON = "samples.json"  # the sample prompts and answers, which export_gguf.py asks the GGUF again
GGUF_DIR = "gguf"  # export_gguf.py's files, made from final/: stale once final/ is replaced
REPORT_CARD_MD, REPORT_CARD_JSON = "report_card.md", "report_card.json"  # training/report_card.py; export adds GGUF rows


def require_output_dir_named(text) -> None:
    """--output_dir "" (a variable that was never set, in a notebook or a shell script): Path("") is the current
    folder, where the smoke model and the checkpoints would land among the user's own files."""
    if text is None or not str(text).strip():
        raise UserInputError(
            f"--output_dir is empty ({str(text or '')!r}): a run needs a folder of its own for its checkpoints and "
            "model. Give one, e.g. --output_dir outputs/my_run, or leave the flag out for the script's default."
        )


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
    settings: dict = field(default_factory=dict)  # saved_settings.describe: written into each checkpoint


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
