"""Several processes, one per GPU (torchrun or accelerate launch, PyTorch DDP): which process this is, the writes
that happen on one process only, the command that launches a run on every GPU, and plain `python` on a machine
with several GPUs (one GPU, never nn.DataParallel), and the check that GaLore's projections stay the same on
every process.

Before TrainingArguments set the processes up, the launcher's environment says who this process is (RANK,
WORLD_SIZE, LOCAL_WORLD_SIZE); afterwards the TrainingArguments do (`process_index`, `world_size`, `should_save`).
"""
from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Optional

import torch
from accelerate.utils import gather_object
from transformers import TrainerCallback

from cli.errors import SetupError, TrainingFailed

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------
# Who this process is
# ---------------------------------------------------------------------------


def launched_processes() -> int:
    """How many processes the launcher started (torchrun and accelerate launch set WORLD_SIZE); 1 under plain python."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def writes(training_args) -> bool:
    """Whether this process writes the run's outputs: the Trainer's own rule for checkpoints (the main process, or
    each host's main process under --save_on_each_node), so models, reports and checkpoints land in one place."""
    return bool(training_args.should_save)


def wait_for_everyone(training_args) -> None:
    """A barrier across the processes; nothing with one process."""
    if training_args.world_size > 1:
        training_args.distributed_state.wait_for_everyone()


def gather(value, training_args) -> list:
    """Every process's `value`, in process order; [value] with one process."""
    return gather_object([value]) if training_args.world_size > 1 else [value]


# ---------------------------------------------------------------------------
# The command line, and the one that uses every GPU
# ---------------------------------------------------------------------------


def command_line() -> Optional[list]:
    """The command that started this run, less any --resume_from_checkpoint, with torchrun in front where a launcher
    started it; None when the process is not one of the toolkit's scripts (a notebook, a test, a user's script)."""
    script = getattr(sys.modules.get("__main__"), "__file__", None)
    if script is None or Path(script).resolve().parent != Path(__file__).resolve().parents[1]:
        return None
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])  # orig_argv: as typed, with python
    kept, skip_value = [], False
    for arg in argv:
        flag = arg.split("=", 1)[0].replace("-", "_")
        if skip_value:
            skip_value = False
        elif flag == "__resume_from_checkpoint":
            skip_value = "=" not in arg
        else:
            kept.append(arg)
    if launched_processes() > 1:
        # The launcher started `python -u script ...` in each process: what the user typed began with torchrun.
        kept = torchrun_prefix(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), int(os.environ.get("GROUP_WORLD_SIZE", "1"))) \
            + _from_script(kept)
    return kept


def torchrun_prefix(processes_per_host: int, hosts: int = 1) -> list:
    hosts_flags = [] if hosts <= 1 else ["--nnodes", str(hosts), "--rdzv_backend", "c10d",
                                         "--rdzv_endpoint", "MAIN_HOST:29500"]
    return ["torchrun", *hosts_flags, "--nproc_per_node", str(processes_per_host)]


def _from_script(argv: list) -> list:
    """argv from the script's path on, without the interpreter and its options."""
    for index, arg in enumerate(argv):
        if arg.endswith(".py"):
            return argv[index:]
    return argv


def all_gpus_command(gpus: int, script: str) -> str:
    """The torchrun command that trains this run on every one of this machine's GPUs (`script`: the script's path,
    for when this process was not started from the command line)."""
    argv = command_line()
    if argv:
        return shlex.join(torchrun_prefix(gpus) + _from_script(argv))
    return f"{shlex.join(torchrun_prefix(gpus))} finetuning/{Path(script).name} <your flags>"


# ---------------------------------------------------------------------------
# Plain python on a machine with several GPUs
# ---------------------------------------------------------------------------


def use_one_gpu_without_launcher(training_args, script: str, can_pin_one_gpu: bool) -> None:
    """Plain `python` on a machine with several GPUs: train on the first, and say how to train on all of them.

    The Trainer would otherwise split each batch over the GPUs with nn.DataParallel, which cannot run a 4-bit model
    ("Expected all tensors to be on the same device ... cuda:1 ... cuda:0") and is slower than DDP where it runs.
    `can_pin_one_gpu`: the fast path's one_gpu fix is on and works here (fastpath/one_gpu.py pins the trainer to one
    GPU once it is built); otherwise the run stops with the command instead.
    """
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if training_args.world_size > 1 or gpus < 2 or training_args.use_cpu:
        return
    command = all_gpus_command(gpus, script)
    if not can_pin_one_gpu:
        raise SetupError(
            f"This machine has {gpus} GPUs, and started by plain python the Trainer would split each batch across "
            "them with nn.DataParallel, which fails with 4-bit models. Train on all of them with DDP:\n"
            f"    {command}\nor on one: CUDA_VISIBLE_DEVICES=0 python ..."
        )
    logger.warning("This machine has %d GPUs; started by plain python, this run trains on one (cuda:0). To train on "
                   "all %d (DDP, one process each): %s", gpus, gpus, command)


# ---------------------------------------------------------------------------
# GaLore's projections, the same on every process
# ---------------------------------------------------------------------------


def galore_projections(optimizer) -> list:
    """Every GaLore projection matrix the optimizer holds (none before its first step)."""
    found = []
    for state in getattr(optimizer, "optimizer", optimizer).state.values():
        matrices = getattr(state.get("projector"), "ortho_matrix", None)
        found += [m for m in (matrices if isinstance(matrices, (list, tuple)) else [matrices]) if m is not None]
    return found


def projection_checksum(matrices) -> list[float]:
    """Two sums over the projection matrices: equal on two processes only if their projections are."""
    total = torch.zeros(2, dtype=torch.float64)
    for matrix in matrices:
        total += torch.stack([matrix.double().sum(), matrix.double().abs().sum()]).cpu()
    return total.tolist()


class GaloreProjectionsAgree(TrainerCallback):
    """Under DDP, after each projection update: every process holds the same GaLore projections, or training stops.

    Each process computes its projections (an SVD) from the same all-reduced gradient; DDP keeps the gradients in
    step but not the optimizer, so a process whose SVD came out otherwise (another GPU model) would silently train
    a different model. GaLore replaces a projection matrix when it updates it, so a step where the matrices are new
    objects is an update step, on every process alike (the same gradients, the same skipped fp16 steps).
    """

    def __init__(self):
        self.checked: tuple = ()

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if args.world_size == 1:
            return
        matrices = galore_projections(optimizer)
        current = tuple(id(m) for m in matrices)  # the matrices last checked are alive: a new one has a new id
        if not matrices or current == self.checked:
            return
        self.checked = current
        checksums = gather(projection_checksum(matrices), args)
        if any(not torch.allclose(torch.tensor(c), torch.tensor(checksums[0]), rtol=1e-6, atol=0) for c in checksums):
            raise TrainingFailed(
                f"GaLore's projections differ between the {args.world_size} processes after step {state.global_step} "
                f"(checksums {checksums}): each GPU would train a different model. Run on GPUs of one model, or on "
                "one GPU."
            )
        logger.info("GaLore projections identical on all %d processes after step %d (checksum %.9e, %.9e).",
                    args.world_size, state.global_step, *checksums[0])
