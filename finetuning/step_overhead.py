"""What a training step costs on the CPU outside the model's own work (overrides.py, overrides 12-13).

A step of a few thousand tokens on a fast GPU waits for the CPU: each millisecond of Python there is a millisecond
of the step. Two costs that scale with the model's size rather than the batch's, each paid at every step:
- the Trainer's `model.train()` visits all of the model's modules (about 2,300 for gemma-3-1b with LoRA);
- the Trainer's FLOPs count calls `num_parameters()`, which visits every parameter (a 4-bit one through
  bitsandbytes' `__torch_function__`).
"""
from __future__ import annotations

import types


def skip_train_when_training(model) -> None:
    """`model.train()` returns at once where every module is in training mode already (a loop over a kept list of
    the modules, not a walk of the module tree); otherwise, and for `model.train(False)` / `model.eval()`, the class's
    own method runs, and the list is taken again."""

    def train(self, mode: bool = True):
        if mode and all(module.training for module in self.__dict__["_modules_in_training_check"]):
            return self
        result = type(self).train(self, mode)
        self.__dict__["_modules_in_training_check"] = list(self.modules())
        return result

    model.__dict__["_modules_in_training_check"] = list(model.modules())  # a deep copy gets a list of its own
    model.train = types.MethodType(train, model)


def count_parameters_once(causal_lm) -> None:
    """transformers' `floating_point_ops` (6 x tokens x parameters), with the parameter count taken once: the
    Trainer calls it every step, and a model's parameter count does not change while it trains."""
    counts: dict = {}

    def floating_point_ops(self, input_dict, exclude_embeddings: bool = True) -> int:
        if exclude_embeddings not in counts:
            counts[exclude_embeddings] = self.num_parameters(exclude_embeddings=exclude_embeddings)
        return 6 * self.estimate_tokens(input_dict) * counts[exclude_embeddings]

    causal_lm.floating_point_ops = types.MethodType(floating_point_ops, causal_lm)
