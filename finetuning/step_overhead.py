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

import re
import types
from typing import Callable, Iterable


def skip_train_when_training(model) -> None:
    """`model.train()` returns at once where every module is in training mode already (a list read, not a walk of
    the module tree); otherwise, and for `model.train(False)` / `model.eval()`, the stock method runs."""
    stock = model.train
    modules = list(model.modules())

    def train(self, mode: bool = True):
        if mode and all(module.training for module in modules):
            return self
        return stock(mode)

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


def module_guard_filter(layers: Iterable) -> Callable:
    """A torch.compile `guard_filter_fn` for code shared by `layers`: of the guards on module attributes it keeps only
    those on an attribute whose value differs between the layers (a sliding or a full attention layer) or on the
    training flag; all others hold for every layer and do not change while a run trains. Guards on the layer's inputs
    and on global state stay."""
    kept_names = differing_attributes(layers) | {"training"}

    def keep(entries) -> list:
        flags = []
        for entry in entries:
            source = getattr(entry.orig_guard, "source", None)
            on_module = getattr(source, "is_unspecialized_nn_module", None)
            if on_module is None or not on_module():
                flags.append(True)
            else:
                flags.append(not kept_names.isdisjoint(_names_in(entry.name)))
        return flags

    return keep


def differing_attributes(layers: Iterable) -> set:
    """Names of the plain attributes (bool, int, float, str, None) of the layers' modules whose values are not the
    same in all layers, compared module by module (`self_attn.is_sliding`, `self_attn.sliding_window`, ...)."""
    seen: dict = {}
    for layer in layers:
        for path, module in layer.named_modules():
            for name, value in vars(module).items():
                if value is None or isinstance(value, (bool, int, float, str)):
                    seen.setdefault((path, name), set()).add((type(value), value))
    return {name for (_, name), values in seen.items() if len(values) > 1}


def _names_in(guard_name: str) -> set:
    """The attribute and key names in a guard's source: "L['self']._modules['self_attn'].is_sliding" ->
    {"L", "self", "_modules", "self_attn", "is_sliding"}."""
    return set(re.findall(r"\w+", guard_name))
