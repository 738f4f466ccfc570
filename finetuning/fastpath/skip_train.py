"""Override 12 (`skip_train`): the Trainer's `model.train()` at every step returns at once where every module is in
training mode already.

A step of a few thousand tokens on a fast GPU waits for the CPU, and `model.train()` walks all of the model's modules
(about 2,300 for gemma-3-1b with LoRA). Here it loops over a kept list of them instead; otherwise, and for
`model.train(False)` / `model.eval()`, the class's own method runs, and the list is taken again.

Target: torch `nn.Module.train`; transformers 4.57's Trainer calling `model.train()` every step.
"""
from __future__ import annotations

from typing import Optional

from fastpath.guards import version_ok
from fastpath.patches import Patches

MODULES = "_modules_in_training_check"  # the kept list, in the model's __dict__ (a deep copy gets its own)


def skip_train_when_training(model, patches: Optional[Patches] = None) -> bool:
    if not version_ok("transformers", "model.train() skipped while training"):
        return False

    def train(self, mode: bool = True):
        if mode and all(module.training for module in self.__dict__[MODULES]):
            return self
        result = type(self).train(self, mode)
        self.__dict__[MODULES] = list(self.modules())
        return result

    patches = patches if patches is not None else Patches()
    patches.set(model, MODULES, list(model.modules()))
    patches.set(model, "train", train.__get__(model))
    return True
