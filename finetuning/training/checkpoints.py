"""Checkpoints: which checkpoint-N folder a run can resume from (weights that load, optimizer, scheduler and
trainer state all present), and the clean-up of folders a stop cut off mid-save."""
from __future__ import annotations

import json
import logging
import shutil
import zipfile
from pathlib import Path
from typing import Optional

from cli.errors import UserInputError

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors")
SHARDED_WEIGHTS_INDEX = "model.safetensors.index.json"
COMPLETE_CHECKPOINT = "the weights (model.safetensors or adapter_model.safetensors), optimizer.pt, scheduler.pt and " \
                      "trainer_state.json"


def checkpoint_problems(checkpoint) -> list[str]:
    """What keeps `checkpoint` from being resumed as it was saved; [] for a complete checkpoint.

    Complete: readable weights, optimizer.pt, scheduler.pt and trainer_state.json. The Trainer resumes from a folder
    without optimizer.pt or scheduler.pt with a fresh optimizer and schedule, without a word: a different run.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        return ["the folder does not exist"]
    problems = _weights_problems(checkpoint)
    for name in ("optimizer.pt", "scheduler.pt"):
        path = checkpoint / name
        if not path.is_file():
            problems.append(f"no {name}")
        elif not zipfile.is_zipfile(path):  # torch.save writes a zip whose directory is at the end: a cut file has none
            problems.append(f"{name} is cut off")
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except FileNotFoundError:
        problems.append("no trainer_state.json")
    except OSError as e:
        problems.append(f"trainer_state.json cannot be read ({e.strerror})")
    except ValueError:
        problems.append("trainer_state.json is cut off")
    return problems


def _weights_problems(checkpoint: Path) -> list[str]:
    index = checkpoint / SHARDED_WEIGHTS_INDEX
    if index.is_file():  # a model over save_pretrained's shard size: every shard the index names
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return [f"{SHARDED_WEIGHTS_INDEX} is cut off"]
        return [problem for shard in shards if (problem := safetensors_problem(checkpoint / shard))]
    present = [checkpoint / name for name in WEIGHT_FILES if (checkpoint / name).is_file()]
    if not present:
        return [f"no weights ({' or '.join(WEIGHT_FILES)})"]
    return [problem for path in present if (problem := safetensors_problem(path))]


def safetensors_problem(path: Path) -> Optional[str]:
    """None if the safetensors file's header parses and the file is as long as the header says; else what is wrong.

    Reads the header only (8 bytes of length, then JSON), not the weights.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as file:
            length = int.from_bytes(file.read(8), "little")
            if size < 8 or length > size - 8:
                return f"{path.name} is cut off ({size:,} bytes)"
            header = json.loads(file.read(length))
        end = max((int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"),
                  default=0)
    except FileNotFoundError:
        return f"no {path.name}"
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return f"{path.name} has no readable safetensors header"
    except OSError as e:
        return f"{path.name} cannot be read ({e.strerror})"
    if size < 8 + length + end:
        return f"{path.name} is cut off ({size:,} of {8 + length + end:,} bytes)"
    return None


def latest_complete_checkpoint(output_dir) -> Optional[str]:
    """The newest complete checkpoint-N folder (see checkpoint_problems), or None.

    A run cut off mid-save (a Colab disconnect, a kill, a full disk) leaves a folder without some of its files, or
    with a file cut short: it is skipped, with a warning, for the one before it.
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
        problems = checkpoint_problems(checkpoint)
        if problems:
            logger.warning("Skipping %s, which cannot be resumed: %s.", checkpoint, "; ".join(problems))
            continue
        return str(checkpoint)
    return None


def require_complete_checkpoint(checkpoint, output_dir) -> None:
    """--resume_from_checkpoint PATH: refuse a checkpoint that would resume as another run (checkpoint_problems)."""
    if Path(checkpoint).is_file():  # a file of a checkpoint (its weights, its trainer_state.json), or another file
        folder = Path(checkpoint).parent
        suggestion = (f"give the folder that holds it: --resume_from_checkpoint {folder}"
                      if folder.name.startswith("checkpoint-") else "give a checkpoint-N folder")
        raise UserInputError(
            f"--resume_from_checkpoint {checkpoint} is a file, not a checkpoint folder: {suggestion}, or "
            "--resume_from_checkpoint latest for the newest complete one in --output_dir."
        )
    problems = checkpoint_problems(checkpoint)
    if not problems:
        return
    latest = latest_complete_checkpoint(output_dir)
    raise UserInputError(
        f"--resume_from_checkpoint {checkpoint} is not a complete checkpoint: {'; '.join(problems)}. "
        f"A complete one holds {COMPLETE_CHECKPOINT}. "
        + (f"The latest complete one in {output_dir} is {latest}: resume from it, or with --resume_from_checkpoint "
           "latest." if latest else f"{output_dir} holds none: start a new run without the flag.")
    )


def require_same_processes(checkpoint, processes: int, each_node_saves: bool = False) -> None:
    """A checkpoint resumes with as many processes as wrote it (one random-state file each: rng_state.pth alone, or
    rng_state_N.pth under DDP); with another count the Trainer skips a wrong number of batches, silently. Under
    --save_on_each_node a host's folder holds its own processes' files only, so only a count too large is known."""
    numbered = [int(p.stem.rsplit("_", 1)[1]) for p in Path(checkpoint).glob("rng_state_*.pth")
                if p.stem.rsplit("_", 1)[1].isdigit()]
    if not numbered and not (Path(checkpoint) / "rng_state.pth").is_file():
        return  # written without random states (another tool): nothing to compare
    wrote = max(numbered) + 1 if numbered else 1
    if wrote == processes or (each_node_saves and numbered and wrote < processes):
        return
    raise UserInputError(
        f"--resume_from_checkpoint: {Path(checkpoint).name} was written by {wrote} process(es) and this run has "
        f"{processes}; resumed so, it would continue from another point of the data. Resume with as many GPUs as "
        f"it was written with (" + ("plain python" if wrote == 1 else f"torchrun --nproc_per_node {wrote}")
        + "), or start a new run in another --output_dir."
    )


def remove_cut_off_checkpoints(output_dir) -> None:
    """After Ctrl-C: a checkpoint-N folder without trainer_state.json (written last) was cut off mid-save, or
    mid-deletion by --save_total_limit; it can never be resumed, only fill the disk."""
    for checkpoint in Path(output_dir).glob("checkpoint-*"):
        if checkpoint.is_dir() and checkpoint.name.split("-", 1)[1].isdigit() \
                and not (checkpoint / "trainer_state.json").is_file():
            shutil.rmtree(checkpoint, ignore_errors=True)
            logger.info("Removed %s: its save was cut off.", checkpoint)
