"""Every place where the toolkit reaches into torch, transformers, peft, trl, bitsandbytes or galore-torch internals.

| # | what is overridden | target, as pinned | why | checked against the stock path by |
|---|---|---|---|---|
| 1 | `Gemma3RMSNorm.forward` of each norm instance: one fused `rms_norm` call; float32 output under fp16 | transformers 4.57 `Gemma3RMSNorm(dim, eps)`, torch >= 2.4 `rms_norm` | about ten element-wise kernels a norm, 157 norms; Gemma 3's residual stream overflows float16 (transformers issue 36822) | tests/test_speed.py::test_fused_rms_norm_*, tests/test_numerics.py (fp16 overflow) |
| 2 | peft `lora.bnb.Linear4bit.forward` of each layer: `fused.Lora4bitLinear` | peft 0.21, bitsandbytes 0.50 (`torch.ops.bitsandbytes.dequantize_4bit`, `QuantState.absmax/nested/state2/offset`) | one autograd node instead of several; the 4-bit weight dequantized once | tests/test_speed.py::test_fused_lora_4bit_*, tests/test_gpu_real_shapes.py |
| 3 | an attribute `float32_absmax` written onto each bitsandbytes `QuantState` | bitsandbytes 0.50 | double quantization's scales undone once per frozen layer, not at every call | tests/test_speed.py::test_one_kernel_dequantization_equals_bitsandbytes |
| 4 | transformers' `AttentionInterface["sdpa"]`, for the whole process: packed rows go to `torch.ops.aten._flash_attention_forward` / `_efficient_attention_forward` (private), all else to the stock SDPA function | transformers 4.57 `sdpa_attention_forward`; the two aten schemas' argument names | a packed row's records attend only to themselves without a row x row mask | tests/test_speed.py::test_varlen_*, tests/test_gpu_real_shapes.py |
| 5 | the causal LM's `forward` (instance attribute): the loss from the hidden states in vocabulary chunks (`fused.ChunkedCrossEntropy`; each chunk compiled where the layers are, 10) | transformers 4.57 Gemma 3: `model.model` returns `last_hidden_state`, `lm_head` a plain Linear | the 262k-vocabulary logits are a step's largest tensor | tests/test_numerics.py::test_chunked_loss_* |
| 6 | `torch.backends.cuda.enable_cudnn_sdp(False)`, for the whole process | torch >= 2.5 on Hopper | cuDNN's attention builds a plan per batch shape on the CPU, about 18 ms a call | bench/run_bench.py (speed only; the other SDPA kernels give the same answer) |
| 7 | (galore_optimizer.py) `GaLoreAdamW8bit.__init__` skipped to bind bitsandbytes' `Optimizer2State` by keyword; `torch.cuda.synchronize` a no-op inside `step` | galore-torch 1.0, bitsandbytes 0.50 (`optim_bits`, `is_paged` keywords) | galore-torch passes two settings by position that bitsandbytes 0.50 reads as `max_unorm=100, skip_zeros=True`; a GPU sync after every weight | tests/test_galore_optimizer.py |
| 8 | `torch.serialization.add_safe_globals([GaLoreProjector])` | torch >= 2.4 | the Trainer resumes with `torch.load(weights_only=True)`, which refuses GaLore's projector state | tests/test_kill_resume.py (GaLore resume) |
| 9 | `TrainingArguments.n_gpu` capped at 1 (the run's arguments become `OneGpuTrainingArguments`) under plain python with several GPUs | transformers 4.57 `n_gpu` property, read by the Trainer for DataParallel and the batch size | the Trainer would use nn.DataParallel, which fails with 4-bit models | tests/test_distributed.py::test_plain_python_on_two_gpus_* |
| 10 | each `Gemma3DecoderLayer.forward` (instance attribute): `torch.compile(..., dynamic=True)` in training mode; inside it the fused LoRA layer (2) runs as plain operations (`fused.lora_4bit_traced`), its NF4 weight dequantized by plain operations too (`fused.dequantize_4bit_traced`; other 4-bit formats through bitsandbytes' op) | transformers 4.57 decoder layer; torch >= 2.6 (`torch.compiler.is_compiling`, bitsandbytes' `dequantize_4bit` op with its fake kernel) | a step of small batches is bound by the CPU's kernel launches; one graph per layer kind, shared by all layers | tests/test_compiled_layers.py (graph count, same answer), tests/test_gpu_real_shapes.py::test_compiled_offloaded_* (inductor, against float32) |
| 11 | each decoder layer's `_gradient_checkpointing_func`, set at `on_train_begin` (after the Trainer switches checkpointing on): `offload.checkpoint` | transformers 4.57 `GradientCheckpointingLayer.__call__` calling it as `(partial(__call__, **kwargs), hidden_states)` | the checkpointed layer inputs (1.6 GiB at 32k tokens) wait in pinned CPU memory | tests/test_compiled_layers.py (stock checkpoint's loss and gradients, dropout, autocast) |
| 12 | the model's `train` (instance attribute): returns at once while every module is in training mode | torch `nn.Module.train`; the Trainer calling `model.train()` every step | a walk over about 2,300 modules a step | tests/test_step_overhead.py::test_train_* |
| 13 | the causal LM's `floating_point_ops` (instance attribute): the parameter count taken once | transformers 4.57 `floating_point_ops` = 6 x `estimate_tokens` x `num_parameters` | the Trainer counts FLOPs every step; `num_parameters` visits every parameter, 4-bit ones through Python | tests/test_step_overhead.py::test_flops_* |
| 14 | (mlp_chunks.py) `Gemma3MLP.forward` of each MLP instance, on request only (`mlp_chunks.chunk_mlp_tokens`; the bench's "MLP in 2 token chunks" rows): the stock forward over the tokens in pieces | transformers 4.57 `Gemma3MLP.forward(self, x)` | the MLP's intermediates (tokens x 6,912) are a layer's largest tensors: fewer of them alive at once in the backward pass | tests/test_compiled_layers.py::test_mlp_in_token_chunks_* |
| 15 | (kbit_preparation.py) `trl.trainer.sft_trainer.prepare_model_for_kbit_training`, while the QLoRA script builds its SFTTrainer under bf16: the bf16 weights of the modules trl casts back by name (embed_tokens, lm_head, ...) hidden from its float32 cast | trl 0.8.6 (`SFTTrainer.__init__` calling peft's `prepare_model_for_kbit_training`, then `peft_module_casting_to_bf16`) | the cast there and back holds the 262k-row embedding in bf16 and float32 at once, a whole run's peak at small budgets | tests/test_model_loading.py::test_trainer_keeps_the_bf16_embedding_* |

Each install checks its target first (a version prefix and the names it touches). Where the target is not what
it expects, it leaves the stock path in place and logs one line saying so: a library that moved costs speed,
never a crash (9, which has no stock path that runs, stops with the torchrun command instead). `enable_fast_path`
is the one call that switches 1-6 and 10-13 on; the scripts make it explicitly in main(), 10 and 11 as
speed_choices.py decides. 14 runs only where called (the bench); 15 around the QLoRA script's SFTTrainer.
"""
from __future__ import annotations

import functools
import inspect
import logging
import types
from typing import Callable, Optional

import torch
from transformers import TrainerCallback, TrainingArguments
from transformers.modeling_outputs import CausalLMOutputWithPast

import fused
import offload
import step_overhead
import varlen
from speed_choices import SpeedChoices
from versions import installed_version

logger = logging.getLogger(__name__)

# The targets, imported here so that one that moved leaves its override off (with a log line), not a crash.
try:
    from transformers.models.gemma3.modeling_gemma3 import Gemma3DecoderLayer, Gemma3RMSNorm
except ImportError:
    Gemma3DecoderLayer = Gemma3RMSNorm = None
try:
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
except ImportError:
    LoraLinear4bit = None
try:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
except ImportError:
    AttentionInterface = sdpa_attention_forward = None

# The versions each override was written and tested against (version prefixes).
TESTED = {"transformers": "4.57.", "peft": "0.21.", "bitsandbytes": "0.50.", "galore-torch": "1.0", "trl": "0.8.6"}


def _version_ok(package: str, what: str) -> bool:
    found = installed_version(package)
    if found is not None and found.startswith(TESTED[package]):
        return True
    logger.warning("%s: written for %s %s*, found %s; using the stock path.", what, package, TESTED[package], found)
    return False


def _found(target, name: str, what: str) -> bool:
    if target is None:
        logger.warning("%s: %s could not be imported; using the stock path.", what, name)
    return target is not None


def _has(target, names, what: str) -> bool:
    missing = [name for name in names if not hasattr(target, name)]
    if missing:
        logger.warning("%s: %s has no %s; using the stock path.", what, getattr(target, "__name__", target), missing)
    return not missing


def enable_fast_path(trainer, fp16: bool, padding_free: bool, keep_dequantized_weight: bool,
                     speed: Optional[SpeedChoices] = None) -> dict:
    """Switch on overrides 1-6 and 12-13, and 10-11 as `speed` says, for the trainer's model; returns what
    changed. `fp16`: a float32 residual stream. `padding_free`: packed rows (variable-length attention).
    `keep_dequantized_weight`: see fuse_lora_4bit."""
    model = trainer.model
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    norms = fuse_rms_norms(model, fp32_residual=fp16)
    lora = fuse_lora_4bit(model, keep_dequantized_weight)
    varlen_attention = padding_free and use_varlen_attention()
    compiled = compile_decoder_layers(model) if speed and speed.compile_layers else 0
    changed = {
        "chunked loss": use_chunked_loss(causal_lm, compiled_chunks=compiled > 0),  # compiled where the layers are
        "fused RMSNorms": norms,
        "fused LoRA-on-4-bit layers": lora,
        "variable-length attention": varlen_attention,
        "compiled decoder layers": compiled,
        "per-step bookkeeping": trim_step_bookkeeping(model, causal_lm),
    }
    if speed and speed.offload_activations and offload_target_found(model):
        trainer.add_callback(OffloadLayerInputs())
        changed["checkpointed inputs offloaded"] = "from the first step"
    if getattr(causal_lm.config, "_attn_implementation", None) == "sdpa" and _has(
            torch.backends.cuda, ["enable_cudnn_sdp"], "cuDNN attention off"):
        torch.backends.cuda.enable_cudnn_sdp(False)
    logger.info("Fast path: %s", ", ".join(f"{name} {value}" for name, value in changed.items()))
    return changed


# ---------------------------------------------------------------------------
# 1. RMSNorm
# ---------------------------------------------------------------------------


def fuse_rms_norms(model, fp32_residual: bool = False) -> int:
    """Compute every Gemma3RMSNorm (`x / rms(x) * (1 + weight)` in float32) with one fused `rms_norm` call; returns
    how many. `fp32_residual` (fp16 training): the output keeps float32 weights' dtype, so the residual stream,
    which grows past float16's 65,504 in Gemma 3 (transformers issue 36822), is not cast down at the norms."""
    what = "fused RMSNorm"
    if not (_found(Gemma3RMSNorm, "Gemma3RMSNorm", what) and _version_ok("transformers", what)
            and _has(torch.nn.functional, ["rms_norm"], what)):
        return 0
    if list(inspect.signature(Gemma3RMSNorm.__init__).parameters) != ["self", "dim", "eps"]:
        logger.warning("%s: Gemma3RMSNorm's constructor changed; using the stock path.", what)
        return 0
    rms_norm = torch.nn.functional.rms_norm

    def forward(self, x):
        if fp32_residual:
            output = rms_norm(x.float(), (x.shape[-1],), self.weight.float() + 1.0, self.eps)
            return output.to(torch.promote_types(x.dtype, self.weight.dtype))
        # The fused kernel computes in float32 inside, so a 16-bit input needs no float32 copy in and out (those
        # copies were 12% of a QLoRA step's GPU time). The one difference from Gemma's: the scale (1 + weight) is
        # rounded to 16 bits before the product, not after; a 16-bit add rounds its exact sum once.
        return rms_norm(x, (x.shape[-1],), (self.weight + 1.0).to(x.dtype), self.eps)

    changed = 0
    for module in model.modules():
        if isinstance(module, Gemma3RMSNorm):
            module.forward = types.MethodType(forward, module)
            changed += 1
    return changed


# ---------------------------------------------------------------------------
# 2-3. LoRA on a 4-bit base layer
# ---------------------------------------------------------------------------


def fuse_lora_4bit(model, keep_dequantized_weight: bool) -> int:
    """Run every peft LoRA layer on a bitsandbytes 4-bit base through fused.Lora4bitLinear. Returns how many.

    `keep_dequantized_weight`: save the dequantized weight for the backward pass instead of dequantizing it again;
    only under gradient checkpointing (one recomputed layer's weights at a time), so the scripts pass that setting.
    Layers with several active adapters, a DoRA or other variant, or merged weights keep peft's own forward.
    """
    what = "fused LoRA on 4-bit"
    if not _found(LoraLinear4bit, "peft's lora.bnb.Linear4bit", what):
        return 0
    layers = [m for m in model.modules() if isinstance(m, LoraLinear4bit)]
    if not layers or not (_version_ok("peft", what) and _version_ok("bitsandbytes", what)
                          and _has(torch.ops.bitsandbytes, ["dequantize_4bit"], what)):
        return 0
    changed = 0
    for module in layers:
        if len(module.active_adapters) != 1:
            continue
        adapter = module.active_adapters[0]
        if adapter not in module.lora_A or adapter in getattr(module, "lora_variant", {}):
            continue
        module.forward = types.MethodType(_lora_4bit_forward(module.forward, adapter, keep_dequantized_weight), module)
        fused.float32_absmax(module.base_layer.weight.quant_state, module.base_layer.weight.device)
        changed += 1
    return changed


def _lora_4bit_forward(stock_forward: Callable, adapter: str, keep_weight: bool) -> Callable:
    def forward(self, x, *args, **kwargs):
        base = self.base_layer
        # bitsandbytes repacks CPU weights for its inference kernel on a first no-grad call; dequantize_4bit
        # does not read that layout.
        repacked = getattr(base.weight.quant_state, "packing_format_for_cpu", False)
        if args or kwargs or self.disable_adapters or self.merged or repacked:
            return stock_forward(x, *args, **kwargs)
        p = getattr(self.lora_dropout[adapter], "p", 0.0) if self.training else 0.0  # nn.Identity where 0
        if torch.compiler.is_compiling():  # inside a compiled decoder layer (override 10)
            return fused.lora_4bit_traced(
                x, base.weight, base.weight.quant_state, base.compute_dtype or x.dtype, base.bias,
                self.lora_A[adapter].weight, self.lora_B[adapter].weight, self.scaling[adapter], p, self.training,
            )
        return fused.Lora4bitLinear.apply(
            x, base.weight, base.weight.quant_state, fused.dequantize_4bit, base.compute_dtype or x.dtype, base.bias,
            self.lora_A[adapter].weight, self.lora_B[adapter].weight, self.scaling[adapter], p, keep_weight,
        )

    return forward


# ---------------------------------------------------------------------------
# 4. Variable-length attention for packed rows
# ---------------------------------------------------------------------------

def _schema_has(op_name: str, names) -> bool:
    op = getattr(torch.ops.aten, op_name, None)
    try:
        found = {argument.name for argument in op.default._schema.arguments}
    except (AttributeError, RuntimeError):
        found = set()
    missing = set(names) - found
    if missing:
        logger.warning("variable-length attention: torch.ops.aten.%s lacks %s; using stock SDPA with a mask.",
                       op_name, sorted(missing))
    return not missing


@functools.cache  # once per process: the registration is process-wide
def use_varlen_attention() -> bool:
    """Run attention over packed batches record by record, with PyTorch's variable-length kernels.

    transformers' SDPA sees a packed row as one sequence under a block-diagonal mask (all row x row scores, most
    masked away). The variable-length kernels take the records' bounds (`cu_seq_lens_q`, batching.pad_rows) and
    compute each record's own causal triangle: flash attention on Ampere or newer in 16 bits, the memory-efficient
    kernel elsewhere (T4). Batches without bounds, the CPU, and sliding windows that kernel cannot express keep
    transformers' SDPA with its mask. Registered under "sdpa", so nothing else changes. Returns whether it was.
    """
    what = "variable-length attention"
    if not (_found(sdpa_attention_forward, "transformers' AttentionInterface and SDPA function", what)
            and _version_ok("transformers", what) and _schema_has("_flash_attention_forward", varlen.FLASH_ARGUMENTS)
            and _schema_has("_efficient_attention_forward", varlen.EFFICIENT_ARGUMENTS)):
        return False
    AttentionInterface.register("sdpa", _varlen_or_sdpa(sdpa_attention_forward))
    return True


def _varlen_or_sdpa(sdpa: Callable) -> Callable:
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, **kwargs):
        output = varlen.attention(query, key, value, dropout, scaling, sliding_window, kwargs)
        if output is None:
            return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                        sliding_window=sliding_window, **kwargs)
        return output, None

    return attention


# ---------------------------------------------------------------------------
# 5. The chunked loss
# ---------------------------------------------------------------------------


def use_chunked_loss(causal_lm: torch.nn.Module, chunk_tokens: Optional[int] = None,
                     compiled_chunks: bool = False) -> bool:
    """Compute the training loss from the hidden states in chunks, never holding the full logits (Gemma's 262k
    vocabulary: 1 GiB of fp32 logits per 1,024 tokens), skipping masked positions. Returns False, leaving the model
    as it was, where the output layer is not a plain Linear or there is no `model` returning hidden states.
    `compiled_chunks`: each chunk's loss and gradient through fused.compiled_chunk_loss_and_grad (with override 10)."""
    lm_head = causal_lm.get_output_embeddings()
    if type(lm_head) is not torch.nn.Linear or lm_head.bias is not None:
        logger.warning("Output layer is %s, not a plain Linear: using the stock loss.", type(lm_head).__name__)
        return False
    if not (_version_ok("transformers", "chunked loss") and _has(causal_lm, ["model"], "chunked loss")):
        return False
    stock_forward = causal_lm.forward
    softcap = getattr(causal_lm.config, "final_logit_softcapping", None)

    def forward(input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None, **kwargs):
        if labels is None or kwargs.get("logits_to_keep") or kwargs.get("return_dict") is False:
            return stock_forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        outputs = causal_lm.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        loss = fused.chunked_causal_lm_loss(
            outputs.last_hidden_state, lm_head.weight, labels, softcap, num_items_in_batch, chunk_tokens,
            fused.compiled_chunk_loss_and_grad() if compiled_chunks else None,
        )
        return CausalLMOutputWithPast(loss=loss, past_key_values=outputs.past_key_values)

    causal_lm.forward = forward
    return True


# ---------------------------------------------------------------------------
# 10. Decoder layers compiled as regions
# ---------------------------------------------------------------------------


def compile_decoder_layers(model, backend="inductor") -> int:
    """torch.compile each decoder layer's forward as one region, in training mode only (evaluation and generation,
    with their caches and changing shapes, stay eager); returns how many. All layers share the compiled code: torch
    inlines modules, so a layer's weights are inputs of the graph, not constants. Sizes are symbols from the first
    compilation (`dynamic=True`): a batch with other record bounds or fewer rows is not compiled again."""
    what = "compiled decoder layers"
    if not (_found(Gemma3DecoderLayer, "Gemma3DecoderLayer", what) and _version_ok("transformers", what)
            and _has(torch, ["compile"], what)):
        return 0
    layers = _decoder_layers(model)
    config = torch._dynamo.config
    # A layer torch cannot compile (a compiler that fails on this machine) runs eagerly, with torch's warning,
    # instead of stopping the run; and room for the graphs a run can need (up to 8: layer kinds x grad modes x a
    # batch of one row) under torch's limit of recompilations.
    config.suppress_errors = True
    if hasattr(config, "recompile_limit"):
        config.recompile_limit = max(config.recompile_limit, 16)
    for layer in layers:
        compiled = torch.compile(layer.forward, backend=backend, dynamic=True)
        layer.forward = types.MethodType(_training_only(compiled, layer.forward), layer)
    return len(layers)


def _decoder_layers(model) -> list:
    return [module for module in model.modules() if isinstance(module, Gemma3DecoderLayer)]


def _training_only(compiled: Callable, stock: Callable) -> Callable:
    def forward(self, *args, **kwargs):
        return (compiled if self.training else stock)(*args, **kwargs)

    return forward


# ---------------------------------------------------------------------------
# 12-13. The Trainer's bookkeeping at every step
# ---------------------------------------------------------------------------


def trim_step_bookkeeping(model, causal_lm) -> str:
    """model.train() skipped where all is in training mode already; the FLOPs count's parameter count taken once."""
    what = "per-step bookkeeping"
    if not (_version_ok("transformers", what) and _has(causal_lm, ["floating_point_ops", "num_parameters",
                                                                   "estimate_tokens"], what)):
        return "stock"
    step_overhead.skip_train_when_training(model)
    step_overhead.count_parameters_once(causal_lm)
    return "trimmed"


# ---------------------------------------------------------------------------
# 11. Checkpointed layer inputs in pinned CPU memory
# ---------------------------------------------------------------------------


def offload_target_found(model) -> bool:
    what = "offloaded layer inputs"
    return (_found(Gemma3DecoderLayer, "Gemma3DecoderLayer", what) and _version_ok("transformers", what)
            and bool(_decoder_layers(model)))


class OffloadLayerInputs(TrainerCallback):
    """At the start of train(), once the Trainer has switched checkpointing on (which sets each layer's
    `_gradient_checkpointing_func`), makes offload.checkpoint every decoder layer's checkpointing function."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        layers = [layer for layer in _decoder_layers(model) if getattr(layer, "gradient_checkpointing", False)]
        for layer in layers:
            layer._gradient_checkpointing_func = offload.checkpoint
        logger.info("Checkpointed inputs of %d decoder layers go to pinned CPU memory.", len(layers))


# ---------------------------------------------------------------------------
# 9. One GPU under plain python
# ---------------------------------------------------------------------------


class OneGpuTrainingArguments(TrainingArguments):
    """n_gpu at most 1: the Trainer never uses nn.DataParallel. A class, not the private `_n_gpu`, so that it
    survives the dataclasses.replace copies that trl and the scripts make."""

    @property
    def n_gpu(self):
        return min(1, TrainingArguments.n_gpu.fget(self))


def train_on_one_gpu(training_args) -> bool:
    """Keep the Trainer on one GPU (no nn.DataParallel) where plain python sees several; False where it cannot."""
    if not (_version_ok("transformers", "one GPU without a launcher") and type(training_args) is TrainingArguments
            and isinstance(getattr(TrainingArguments, "n_gpu", None), property)):
        return False
    training_args.__class__ = OneGpuTrainingArguments
    return training_args.n_gpu == 1
