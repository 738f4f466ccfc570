"""Override 15 (`kbit_embeddings`): the 16-bit embeddings skip the float32 round trip of trl's k-bit preparation.

trl 0.8.6's SFTTrainer, given a 4-bit model and a LoRA config, calls peft's `prepare_model_for_kbit_training`, which
casts every 16-bit parameter to float32, then (under bf16) `peft_module_casting_to_bf16`, which casts the embeddings
back. Each cast holds both copies: for Gemma's 262,144 x hidden embedding that is 3x its bf16 size at once (1.7 GiB
for gemma-3-1b), the peak of a whole run at small token budgets. Here the embeddings are hidden from the first cast,
so the second has nothing to undo: they end in bf16, as before, as the same tensor.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from typing import Callable, Iterator

import torch

from fastpath.guards import found, has, version_ok

logger = logging.getLogger(__name__)

try:
    import trl.trainer.sft_trainer as sft_trainer
except ImportError:
    sft_trainer = None
# What SFTTrainer.__init__ calls by these names, in its module: the preparation replaced here, and the cast back
# that makes the end state the stock one.
TRL_NAMES = ("prepare_model_for_kbit_training", "peft_module_casting_to_bf16")


@contextlib.contextmanager
def embeddings_stay_16bit(bf16: bool) -> Iterator[bool]:
    """While SFTTrainer is built: its k-bit preparation leaves bf16 embeddings as they are. Only under bf16, where trl
    casts them back anyway (elsewhere they stay float32, as stock). Yields whether the override is in place."""
    what = "16-bit embeddings through trl's k-bit preparation"
    if not (bf16 and found(sft_trainer, "trl.trainer.sft_trainer", what) and version_ok("trl", what)
            and version_ok("peft", what)
            and has(sft_trainer, TRL_NAMES, what)):
        yield False
        return
    missing = [name for name in TRL_NAMES if name not in sft_trainer.SFTTrainer.__init__.__code__.co_names]
    if missing:
        logger.warning("%s: SFTTrainer.__init__ no longer calls %s; using the stock path.", what, missing)
        yield False
        return
    stock = sft_trainer.prepare_model_for_kbit_training
    sft_trainer.prepare_model_for_kbit_training = _skipping_embeddings(stock)
    try:
        yield True
    finally:
        sft_trainer.prepare_model_for_kbit_training = stock


# The modules trl's peft_module_casting_to_bf16 casts back to bf16 (by name; "norm" ones it keeps in float32).
CAST_BACK_NAMES = ("lm_head", "embed_tokens", "wte", "wpe")


def _skipping_embeddings(stock: Callable) -> Callable:
    @functools.wraps(stock)
    def prepare(model, *args, **kwargs):
        # trl casts the embeddings back to bf16 for 4-bit models only; an 8-bit one keeps them in float32.
        if not getattr(model, "is_loaded_in_4bit", False):
            return stock(model, *args, **kwargs)
        hidden = {}  # id of the Parameter (tied embeddings are one) -> (it, its bf16 data)
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if (any(part in name for part in CAST_BACK_NAMES) and "norm" not in name
                    and type(weight) is torch.nn.Parameter and weight.dtype == torch.bfloat16  # not Params4bit
                    and id(weight) not in hidden):
                hidden[id(weight)] = weight, weight.data
                weight.data = weight.data.new_empty(0)  # what peft casts to float32: nothing
        try:
            return stock(model, *args, **kwargs)
        finally:
            # Stock, trl's module.to(bf16) would also cast these modules' buffers (Gemma's embed_scale): they load
            # in bf16 already (tests/test_model_loading.py compares every buffer's dtype with the stock path's).
            for weight, data in hidden.values():
                weight.data = data
    return prepare
