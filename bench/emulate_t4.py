"""Run a training script as it would run on a 16 GB T4, on a bigger GPU: no bfloat16, memory capped at 15 GiB.

    python bench/emulate_t4.py finetuning/train_galore.py --model_name_or_path ... --max_steps 5

Prints the peak GPU memory the run allocated. The cap is PyTorch's own
(`set_per_process_memory_fraction`): allocating past it raises the same
OutOfMemoryError a T4 would.
"""
from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import torch

T4_USABLE_GIB = 15.0

logger = logging.getLogger(__name__)


def emulate_t4() -> None:
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(T4_USABLE_GIB * 2**30 / total)
    # Everything that asks whether bf16 exists must hear no, as on a T4.
    torch.cuda.is_bf16_supported = lambda including_emulation=True: False
    torch.cuda.get_device_name = lambda device=None: "Tesla T4 (emulated)"
    # The scripts size their default batch from the card's memory (auto_batch.py): a T4's 15 GiB.
    real_properties = torch.cuda.get_device_properties

    class T4Properties:
        def __init__(self, properties):
            self._properties = properties
            self.total_memory, self.name = int(T4_USABLE_GIB * 2**30), "Tesla T4 (emulated)"
            self.major, self.minor = 7, 5

        def __getattr__(self, name):
            return getattr(self._properties, name)

    torch.cuda.get_device_properties = lambda device=None: T4Properties(real_properties(device))
    # Compute capability 7.5: `auto` keeps the layers eager (no compiler for a T4's kernels), as on a real T4.
    torch.cuda.get_device_capability = lambda device=None: (7, 5)


def main(argv: list[str]) -> int:
    script = Path(argv[0]).resolve()
    sys.path.insert(0, str(script.parent))
    spec = importlib.util.spec_from_file_location(script.stem, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[script.stem] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    emulate_t4()
    torch.cuda.reset_peak_memory_stats()
    status = module.command_line.run_cli(module.parse_args, module.main, argv[1:])
    peak = torch.cuda.max_memory_allocated() / 2**30
    logger.info("T4 emulation: %s peak GPU memory allocated %.2f GiB (cap %.1f GiB), exit %d", script.name, peak, T4_USABLE_GIB, status)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
