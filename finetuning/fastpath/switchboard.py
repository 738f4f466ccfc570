"""The fast path's switchboard: which overrides are on (--fast_path), and the named points of a run where they go in.

    fast = FastPath(switches, speed, fp16=..., padding_free=..., keep_dequantized_weight=...)
    with fast.building_trainer(bf16):        # 15, while the QLoRA script builds its SFTTrainer
        trainer = ...
    optimizer_class = fast.galore_class()     # 7a-7b (the GaLore script)
    with fast.installed(trainer):             # 1-6, 8-13, 16-17 on the trainer's model while it trains; one log line
        trainer.train()
    # here everything they changed is back as it was

Each override's module holds its guard: where its target is not what it was written for, it leaves the stock path and
logs one line. Settings of torch that are process-wide (cuDNN attention, the compiler's) and names registered with
transformers are put back when `installed` ends; so are the model's patched methods and config.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Iterator

from fastpath import (chunked_loss, compiled_layers, cudnn_attention, flops_once, galore_8bit, galore_resume,
                      kbit_embeddings, lora_4bit, offload, one_gpu, one_layer_graph, rms_norm, skip_train,
                      trainable_grads, varlen_attention)
from fastpath.choices import SpeedChoices
from fastpath.patches import Patches
from cli.fast_path_flag import SWITCHES

logger = logging.getLogger(__name__)

@dataclass
class FastPath:
    """The run's fast-path settings, resolved once, and the installs at the run's named points."""

    switches: frozenset
    method: str = "QLoRA"  # or "GaLore": which script's overrides apply
    speed: SpeedChoices = field(default_factory=lambda: SpeedChoices(False, False))
    fp16: bool = False
    padding_free: bool = False
    keep_dequantized_weight: bool = False
    text: str = "all"  # as the user gave it, for the log
    done: dict = field(default_factory=dict)  # switch -> what it did, for the log line

    def _off(self, name: str) -> bool:
        if name in self.switches:
            return False
        self.done[name] = "off"
        return True

    # ----- named point: while the QLoRA script builds its SFTTrainer (15) -----

    @contextlib.contextmanager
    def building_trainer(self, bf16: bool) -> Iterator[None]:
        if self._off("kbit_embeddings"):
            yield
            return
        with kbit_embeddings.embeddings_stay_16bit(bf16) as installed:
            self.done["kbit_embeddings"] = "on" if installed else "stock (" + ("not bf16" if not bf16 else "guard") + ")"
            yield

    # ----- named point: the GaLore script's optimizer class (7a, 7b) -----

    def galore_class(self) -> type:
        fix, skip_sync = not self._off("galore_8bit"), not self._off("galore_no_sync")
        chosen = galore_8bit.galore_adamw8bit(fix_settings=fix, skip_sync=skip_sync)
        if fix:
            self.done["galore_8bit"] = "on" if "__init__" in vars(chosen) else "stock (guard)"
        if skip_sync:
            self.done["galore_no_sync"] = "on" if "step" in vars(chosen) else "stock (guard)"
        return chosen

    # ----- named point: the trainer is built; everything else, for as long as the run trains -----

    @contextlib.contextmanager
    def installed(self, trainer) -> Iterator[dict]:
        """Overrides 1-6, 8-13, 16 and 17 on the trainer's model and the process, restored when the block ends; logs
        what each switch did. Yields that record."""
        patches = Patches()
        try:
            with contextlib.ExitStack() as stack:
                self._install(trainer, patches, stack)
                logger.info("Fast path (--fast_path %s): %s", self.text,
                            "; ".join(f"{name} {self.done.get(name, 'n/a')}" for name in SWITCHES))
                yield self.done
        finally:
            patches.restore()

    def _install(self, trainer, patches: Patches, stack: contextlib.ExitStack) -> None:
        model = trainer.model
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        if not self._off("one_gpu"):
            needed = trainer.args.n_gpu > 1 and trainer.args.world_size <= 1
            self.done["one_gpu"] = (("on" if one_gpu.pin_one_gpu(trainer.args, patches) else "stock (guard)")
                                    if needed else "not needed")
        if not self._off("rms_norm"):
            self.done["rms_norm"] = f"{rms_norm.fuse_rms_norms(model, self.fp16, patches)} norms"
        if not self._off("lora_4bit"):
            self.done["lora_4bit"] = f"{lora_4bit.fuse_lora_4bit(model, self.keep_dequantized_weight, patches)} layers"
        if not self._off("varlen_attention"):
            self.done["varlen_attention"] = (
                ("on" if varlen_attention.use_varlen_attention(causal_lm, patches) else "stock (not sdpa, or guard)")
                if self.padding_free else "not used (batches not packed without padding)")
        compiled = 0
        if not self._off("compile_layers"):
            compiled = compiled_layers.compile_decoder_layers(model, patches=patches) if self.speed.compile_layers else 0
            self.done["compile_layers"] = f"{compiled} layers" if self.speed.compile_layers else "not chosen"
            one_graph = 0
            if not self._off("one_layer_graph"):  # after the compile: it wraps the compiled forwards
                one_graph = one_layer_graph.unify_layer_kinds(model, patches) if compiled else 0
                self.done["one_layer_graph"] = ("on" if one_graph else "stock (guard)") if compiled else "not compiled"
            if compiled:
                stack.enter_context(compiled_layers.compiler_settings())
                self._add_callback(trainer, compiled_layers.CompileWait(one_graph=one_graph > 0), patches)
        if not self._off("chunked_loss"):
            self.done["chunked_loss"] = "on" if chunked_loss.use_chunked_loss(
                causal_lm, compiled_chunks=compiled > 0, patches=patches) else "stock"
        if not self._off("skip_train"):
            self.done["skip_train"] = "on" if skip_train.skip_train_when_training(model, patches) else "stock (guard)"
        if not self._off("trainable_grads"):
            self.done["trainable_grads"] = ("on" if trainable_grads.walk_trainable_only(trainer, patches)
                                            else "stock (guard, or FSDP/DeepSpeed)")
        if not self._off("flops_once"):
            self.done["flops_once"] = "on" if flops_once.count_parameters_once(causal_lm, patches) else "stock (guard)"
        if not self._off("offload"):
            if self.speed.offload_activations and offload.offload_target_found(model):
                self._add_callback(trainer, offload.OffloadLayerInputs(patches, compiled=compiled > 0), patches)
                self.done["offload"] = "from the first step"
            else:
                self.done["offload"] = "not chosen" if not self.speed.offload_activations else "stock (guard)"
        if not self._off("cudnn_off"):
            sdpa = getattr(causal_lm.config, "_attn_implementation", None) in ("sdpa", varlen_attention.VARLEN_ATTENTION)
            self.done["cudnn_off"] = ("on" if cudnn_attention.cudnn_attention_off(patches) else "stock (guard)") \
                if sdpa else "not used (attention is not SDPA)"
        if not self._off("galore_resume"):
            self.done["galore_resume"] = ("on" if galore_resume.allow_projector_while_training(stack)
                                          else "stock (guard)") if self.method == "GaLore" else "n/a"

    @staticmethod
    def _add_callback(trainer, callback, patches: Patches) -> None:
        trainer.add_callback(callback)
        patches.on_restore(lambda: trainer.remove_callback(callback))
