"""Saves that leave either the whole model or nothing: OUTPUT_DIR/final, the merged 16-bit model, and the
disk-full diagnosis. A stop during them (SIGTERM, Ctrl-C) is interruptions.RunStops': SIGTERM lets final/ finish, Ctrl-C
abandons it; either way no half-written folder is left, and an earlier final/ is kept whole. Saved files follow the
user's umask (safetensors writes its files 0600)."""
from __future__ import annotations

import errno
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

from training import interruptions, processes
from training.checkpoints import (latest_complete_checkpoint)
from cli.errors import TrainingFailed

from training.output_dir import FINAL_DIR, MERGED_DIR

logger = logging.getLogger(__name__)


def save_final(trainer, tokenizer, initial_adapter: Optional[Path] = None) -> Optional[Path]:
    """Write the trained model (or adapter) and the tokenizer to OUTPUT_DIR/final, all or nothing. Under DDP one
    process writes (processes.writes); the others get None. `initial_adapter`: an OLoRA adapter as it started,
    against which peft converts the trained one into a plain LoRA adapter for the original base."""
    if not processes.writes(trainer.args):
        return None

    def write(folder: Path) -> None:
        if initial_adapter is None:
            trainer.save_model(str(folder))
        else:
            with warnings.catch_warnings():
                # peft loads the initial adapter beside the trained one to convert it, and warns about OLoRA beside
                # another adapter, "Consider converting the OLoRA adapter": this is that conversion.
                warnings.filterwarnings("ignore", message="OLoRA changes the base weights")
                trainer.model.save_pretrained(str(folder),
                                              path_initial_model_for_weight_conversion=str(initial_adapter))
        tokenizer.save_pretrained(str(folder))

    with interruptions.writing("final", finish=True):  # SIGTERM waits for the save's end
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

    with interruptions.writing("merged"):
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
        follow_umask(partial)
        interruptions.test_pause(final.name)  # a test's signal lands here, the folder written but not in place
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(partial, final)
    except BaseException as e:
        shutil.rmtree(partial, ignore_errors=True)
        if old.is_dir() and not final.exists():  # stopped between the two renames: the earlier one goes back
            os.replace(old, final)
        if not is_disk_full(e):
            raise
        raise TrainingFailed(
            f"Saving to {final} failed: {e}. Nothing half-written was left there.\n"
            "Free disk space (or choose an --output_dir on a bigger disk), then resume with "
            f"--resume_from_checkpoint {latest_complete_checkpoint(final.parent) or 'latest'}."
        ) from e
    shutil.rmtree(old, ignore_errors=True)
    return final


def follow_umask(folder: Path) -> None:
    """Files as the user's umask makes them (0644 under the usual 022): safetensors writes 0600, unlike every other
    file of a run, so another user or a container's server could not read the weights beside readable configs."""
    mask = os.umask(0)
    os.umask(mask)
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                path.chmod(0o666 & ~mask)
            except OSError:  # not ours to change (a file system without modes): left as written
                pass


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
