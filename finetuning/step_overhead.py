"""What a training step costs on the CPU outside the model's own work (overrides.py, overrides 12-14).

A step of a few thousand tokens on a fast GPU waits for the CPU: each millisecond of Python there is a millisecond
of the step. Three costs that scale with the model's size rather than the batch's, each paid at every step:
- the Trainer's `model.train()` visits all of the model's modules (about 2,300 for gemma-3-1b with LoRA);
- the Trainer's FLOPs count calls `num_parameters()`, which visits every parameter (a 4-bit one through
  bitsandbytes' `__torch_function__`);
- a compiled decoder layer checks about 770 guards before each call, most of them on the module tree, which is the
  same in every call of a run.
"""
from __future__ import annotations

import types
from typing import Callable, Optional, Sequence


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


# Guards on a module attribute's value (a flag, a size, a name, a list's length): kept, since such a value can differ
# between layers (sliding or full attention) or change during a run (peft's `disable_adapter()`, dropout's `p`).
VALUE_GUARDS = frozenset({"CONSTANT_MATCH", "EQUALS_MATCH", "LENGTH_CHECK", "SEQUENCE_LENGTH", "DICT_LENGTH"})


def module_guard_filter(layers: Sequence) -> Optional[Callable]:
    """A torch.compile `guard_filter_fn` for code shared by `layers`, or None where the layers differ in structure.

    Of the guards on module attributes it keeps those on values (VALUE_GUARDS) and drops those on the module tree's
    structure: the types of modules and attributes, which keys and attributes exist, hooks, and the parameters'
    dtypes, shapes and devices. Those are checked here, once, to be the same in every layer, and a run does not change
    them while it trains (forward hooks added to a layer mid-run would be missed). Guards on the layer's inputs and
    on global state (grad mode, autocast) all stay.
    """
    if not _same_structure(layers):
        return None

    def keep(entries) -> list:
        flags = []
        for entry in entries:
            source = getattr(entry.orig_guard, "source", None)
            on_module = getattr(source, "is_unspecialized_nn_module", None)
            flags.append(on_module is None or not on_module() or entry.guard_type in VALUE_GUARDS)
        return flags

    return keep


def _same_structure(layers: Sequence) -> bool:
    """Every layer has the same modules (paths and types) and the same parameters and buffers (names, types, shapes,
    dtypes, devices, requires_grad)."""

    def structure(layer):
        modules = [(path, type(module)) for path, module in layer.named_modules()]
        tensors = [(name, type(t), tuple(t.shape), t.dtype, t.device, t.requires_grad)
                   for name, t in [*layer.named_parameters(), *layer.named_buffers()]]
        return modules, tensors

    first = structure(layers[0]) if layers else None
    return all(structure(layer) == first for layer in layers[1:])
