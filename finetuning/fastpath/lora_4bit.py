"""Overrides 2-3 (`lora_4bit`): each peft LoRA layer on a bitsandbytes 4-bit base runs as one autograd node,
`Lora4bitLinear` (the same value and gradients as peft + bitsandbytes), its weight dequantized once; the block scales
of double quantization undone once per frozen layer (`float32_absmax`, kept on the QuantState), not at every call.
Inside a compiled decoder layer (override 10) the layer runs as plain operations that torch.compile traces
(`lora_4bit_traced`, `dequantize_4bit_traced`).

Target: peft 0.21 `lora.bnb.Linear4bit`, bitsandbytes 0.50 (`torch.ops.bitsandbytes.dequantize_4bit`,
`QuantState.absmax/nested/state2/offset`).
"""
from __future__ import annotations

from typing import Callable

import torch

from fastpath.guards import found, has, version_ok
from fastpath.patches import Patches

try:
    import bitsandbytes.functional as bnb_functional
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
except ImportError:
    bnb_functional = LoraLinear4bit = None


def fuse_lora_4bit(model, keep_dequantized_weight: bool, patches: Patches | None = None) -> int:
    """Run every peft LoRA layer on a bitsandbytes 4-bit base through Lora4bitLinear. Returns how many.

    `keep_dequantized_weight`: save the dequantized weight for the backward pass instead of dequantizing it again;
    only under gradient checkpointing (one recomputed layer's weights at a time), so the scripts pass that setting.
    Layers with several active adapters, a DoRA or other variant, or merged weights keep peft's own forward.
    """
    what = "fused LoRA on 4-bit"
    if not found(LoraLinear4bit, "peft's lora.bnb.Linear4bit", what):
        return 0
    layers = [m for m in model.modules() if isinstance(m, LoraLinear4bit)]
    if not layers or not (version_ok("peft", what) and version_ok("bitsandbytes", what)
                          and has(torch.ops.bitsandbytes, ["dequantize_4bit"], what)):
        return 0
    patches = patches if patches is not None else Patches()
    changed = 0
    for module in layers:
        if len(module.active_adapters) != 1:
            continue
        adapter = module.active_adapters[0]
        if adapter not in module.lora_A or adapter in getattr(module, "lora_variant", {}):
            continue
        forward = _lora_4bit_forward(module.forward, adapter, keep_dequantized_weight)
        patches.set(module, "forward", forward.__get__(module))
        float32_absmax(module.base_layer.weight.quant_state, module.base_layer.weight.device)
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
            return lora_4bit_traced(
                x, base.weight, base.weight.quant_state, base.compute_dtype or x.dtype, base.bias,
                self.lora_A[adapter].weight, self.lora_B[adapter].weight, self.scaling[adapter], p, self.training,
            )
        return Lora4bitLinear.apply(
            x, base.weight, base.weight.quant_state, dequantize_4bit, base.compute_dtype or x.dtype, base.bias,
            self.lora_A[adapter].weight, self.lora_B[adapter].weight, self.scaling[adapter], p, keep_weight,
        )

    return forward


def lora_4bit_traced(x, weight, quant_state, compute_dtype, bias, lora_a, lora_b, scale, p, training):
    """Lora4bitLinear's value in plain operations, for torch.compile to trace inside a compiled decoder layer: it
    derives the backward pass and fuses the element-wise work itself. The float32 scales must already be on the quant
    state (float32_absmax), so that tracing reads them and writes nothing."""
    w = dequantize_4bit_traced(weight, quant_state, compute_dtype)
    xc = x.to(compute_dtype)
    dropped = torch.nn.functional.dropout(xc, p, training) if p > 0 else xc
    adapter = (dropped @ lora_a.to(compute_dtype).t() * scale) @ lora_b.to(compute_dtype).t()
    out = torch.nn.functional.linear(xc, w, None if bias is None else bias.to(compute_dtype))
    return (out + adapter).to(x.dtype)


class Lora4bitLinear(torch.autograd.Function):
    """y = x W^T + b + scale * dropout(x) A^T B^T, W stored in 4 bits; the same value and gradients as peft + bitsandbytes.

    As peft under autocast: products run in the base layer's compute dtype;
    adapter gradients come back in the adapters' own dtype (float32).
    """

    @staticmethod
    def forward(ctx, x, weight, quant_state, dequantize, compute_dtype, bias, lora_a, lora_b, scale, p, keep_weight):
        xc = x.to(compute_dtype)
        w = dequantize(weight, quant_state, compute_dtype)
        a, b = lora_a.to(compute_dtype), lora_b.to(compute_dtype)
        x2d = xc.reshape(-1, xc.shape[-1])
        if p > 0:
            dropped, mask = torch.native_dropout(x2d, p, True)
        else:
            dropped, mask = x2d, None
        xa = dropped @ a.t()
        # The adapter's product first, then the base product adds onto it inside the GEMM: one pass over the
        # output fewer than adding afterwards.
        out = (xa * scale) @ b.t()
        if bias is not None:
            out += bias.to(compute_dtype)
        out = torch.addmm(out, x2d, w.t())
        ctx.save_for_backward(dropped, xa, mask, a, b, w if keep_weight else None)
        ctx.weight, ctx.quant_state, ctx.dequantize = weight, quant_state, dequantize
        ctx.compute_dtype, ctx.scale, ctx.p = compute_dtype, scale, p
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.adapter_dtypes = (lora_a.dtype, lora_b.dtype)
        return out.reshape(*x.shape[:-1], out.shape[-1]).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        dropped, xa, mask, a, b, w = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(ctx.compute_dtype)
        grad_x = grad_a = grad_b = None
        g_b = (g @ b).mul_(ctx.scale)  # d loss / d (x A^T), through B and the scale
        if ctx.needs_input_grad[7]:
            grad_b = (g.t() @ xa).mul_(ctx.scale).to(ctx.adapter_dtypes[1])
        if ctx.needs_input_grad[6]:
            grad_a = (g_b.t() @ dropped).to(ctx.adapter_dtypes[0])
        if ctx.needs_input_grad[0]:
            if w is None:
                w = ctx.dequantize(ctx.weight, ctx.quant_state, ctx.compute_dtype)
            grad_x = g_b @ a
            if mask is not None:
                grad_x = torch.ops.aten.native_dropout_backward(grad_x, mask, 1.0 / (1.0 - ctx.p))
            grad_x = torch.addmm(grad_x, g, w)
            grad_x = grad_x.reshape(ctx.x_shape).to(ctx.x_dtype)
        return grad_x, None, None, None, None, None, grad_a, grad_b, None, None, None


def dequantize_4bit(weight, quant_state, dtype):
    """bitsandbytes.functional.dequantize_4bit(weight, quant_state).to(dtype), in one kernel.

    Double quantization stores the blocks' scales in 8 bits, which bitsandbytes undoes at every call (three more
    kernels, 364 calls a step for gemma-3-1b). The base weights are frozen, so the float32 scales are computed once
    and kept on the quant state (1/16 of the 16-bit weight's size).
    """
    weight = torch.ops.bitsandbytes.dequantize_4bit.default(
        weight, float32_absmax(quant_state, weight.device), quant_state.blocksize, quant_state.quant_type,
        quant_state.shape, quant_state.dtype,
    )
    return weight.to(dtype)


def dequantize_4bit_traced(weight, quant_state, dtype):
    """dequantize_4bit's value in plain operations where the weight is NF4 in whole blocks of bytes (else the same
    op): inside a compiled layer, inductor makes one kernel of it, launched without the Python that bitsandbytes'
    op runs at every call. Each byte holds two 4-bit codes, the first in its high half; a code's value in the NF4
    table, times its block's float32 scale, rounded once to `dtype`, as bitsandbytes' kernel does."""
    numel = quant_state.shape.numel()
    if not (quant_state.quant_type == "nf4" and weight.dtype == torch.uint8 and numel % quant_state.blocksize == 0
            and weight.numel() * 2 == numel):
        return dequantize_4bit(weight, quant_state, dtype)
    packed = weight.reshape(-1)
    codes = torch.stack(((packed >> 4).long(), (packed & 15).long()), dim=1).reshape(-1)
    blocks = quant_state.code.to(weight.device)[codes].reshape(-1, quant_state.blocksize)
    scales = float32_absmax(quant_state, weight.device).reshape(-1, 1)
    return (blocks * scales).reshape(quant_state.shape).to(dtype)


def float32_absmax(quant_state, device):
    """The quant state's block scales in float32, computed once and kept on it as `float32_absmax`."""
    absmax = getattr(quant_state, "float32_absmax", None)
    if absmax is None or absmax.device != device:  # QuantState.to() moves only its own tensors
        absmax = quant_state.absmax
        if quant_state.nested:
            absmax = bnb_functional.dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset
        absmax = quant_state.float32_absmax = absmax.float()
    return absmax
