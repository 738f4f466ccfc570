"""Two autograd Functions of the fast path, plain torch: the loss without the full logits, and a LoRA layer on a
4-bit base as one node; and the forms of both that torch.compile traces inside compiled layers (a loss chunk, the LoRA
layer and its 4-bit dequantization in plain operations). overrides.py installs them into the model;
tests/test_speed.py, tests/test_numerics.py and tests/test_compiled_layers.py check each against the stock computation."""
from __future__ import annotations

import functools

import bitsandbytes.functional as bnb_functional
import torch


def chunked_causal_lm_loss(hidden, weight, labels, softcap=None, num_items_in_batch=None, chunk_tokens=None,
                           chunk_function=None):
    """Next-token cross-entropy of `hidden @ weight.T`, the same value as transformers' ForCausalLMLoss.

    The mean over unmasked tokens, or the sum divided by `num_items_in_batch` (the
    Trainer's count over all accumulated micro-batches) when given. `chunk_function`: how a chunk's loss and
    gradient are taken from its logits (chunk_loss_and_grad, compiled), else _eager_chunk.
    """
    shift_hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(hidden.device)
    kept = (shift_labels != -100).nonzero().squeeze(1)
    if num_items_in_batch is None:
        divisor = max(int(kept.numel()), 1)
    else:
        divisor = num_items_in_batch.item() if torch.is_tensor(num_items_in_batch) else num_items_in_batch
    if chunk_tokens is None:
        chunk_tokens = max(64, 2**28 // (4 * weight.shape[0]))  # about 256 MiB of fp32 probabilities a chunk
    return ChunkedCrossEntropy.apply(
        shift_hidden.index_select(0, kept), weight, shift_labels.index_select(0, kept), softcap, divisor, chunk_tokens,
        chunk_function,
    )



class ChunkedCrossEntropy(torch.autograd.Function):
    """Loss and its gradients in one pass over vocabulary chunks, as fused linear cross-entropy kernels do.

    The gradients are computed in the forward pass, chunk by chunk, so no chunk
    of logits has to be kept or recomputed for the backward pass.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, softcap, divisor, chunk_tokens, chunk_function=None):
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # Under autocast the matrix products run in its dtype, as nn.Linear's would.
        if torch.is_autocast_enabled(hidden.device.type):
            compute_dtype = torch.get_autocast_dtype(hidden.device.type)
        else:
            compute_dtype = hidden.dtype
        weight_c = weight.to(compute_dtype)
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        need_grad = need_hidden_grad or need_weight_grad
        for start in range(0, hidden.shape[0], chunk_tokens):
            h = hidden[start : start + chunk_tokens].to(compute_dtype)
            target = labels[start : start + chunk_tokens]
            # The logits go straight into the call, so that _eager_chunk can free them once it has used them.
            if chunk_function is not None and need_grad:
                loss, grad_logits = chunk_function(h @ weight_c.T, target, softcap, compute_dtype)
            else:
                loss, grad_logits = _eager_chunk(h @ weight_c.T, target, softcap, compute_dtype, need_grad)
            total += loss
            if not need_grad:
                continue
            if need_hidden_grad:
                grad_hidden[start : start + chunk_tokens] = grad_logits @ weight_c
            if need_weight_grad:
                grad_weight += grad_logits.T @ h
            del grad_logits
        ctx.divisor = divisor
        ctx.save_for_backward(
            grad_hidden if need_hidden_grad else None,
            grad_weight.to(weight.dtype) if need_weight_grad else None,
        )
        return total / divisor

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_output / ctx.divisor
        return (
            grad_hidden * scale.to(grad_hidden.dtype) if grad_hidden is not None else None,
            grad_weight * scale.to(grad_weight.dtype) if grad_weight is not None else None,
            None,
            None,
            None,
            None,
            None,
        )


def _eager_chunk(logits, target, softcap, dtype, need_grad=True):
    """A chunk's summed loss and its logits' gradient (in `dtype`; None without `need_grad`) in few kernels, without
    a compiler."""
    if softcap:
        capped = torch.tanh(logits.float() / softcap)
        logits = capped * softcap
    # One fused pass from the 16-bit logits to float32 probabilities: the loss (-log p of the target) and its
    # gradient (p - one_hot) both come from it, where log-sum-exp, subtract and exp would each read and write the
    # whole float32 chunk.
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    del logits  # each chunk tensor is freed as soon as it is used: they are a step's largest
    rows = torch.arange(target.shape[0], device=target.device)
    # A target's probability can underflow float32 only past a loss of 87 for that token.
    loss = -probs[rows, target].clamp_min(torch.finfo(torch.float32).tiny).log().sum()
    if not need_grad:
        return loss, None
    probs[rows, target] -= 1
    if softcap:
        probs *= 1 - capped * capped
    return loss, probs.to(dtype)


def chunk_loss_and_grad(logits, target, softcap, dtype):
    """_eager_chunk's value in a form for torch.compile: inductor fuses it into a reduction (log-sum-exp) and one
    pass that writes the 16-bit gradient, with no float32 chunk in memory (the eager form writes and reads one). Run
    eagerly (a compiler that failed), it holds several float32 chunks at once: about 1 GiB at 256 tokens."""
    logits = logits.float()
    if softcap:
        capped = torch.tanh(logits / softcap)
        logits = capped * softcap
    log_total = torch.logsumexp(logits, dim=-1, keepdim=True)
    loss = (log_total.squeeze(1) - logits.gather(1, target[:, None]).squeeze(1)).sum()
    probs = torch.exp(logits - log_total)
    columns = torch.arange(logits.shape[1], device=logits.device)
    grad = torch.where(columns[None, :] == target[:, None], probs - 1, probs)
    if softcap:
        grad = grad * (1 - capped * capped)
    return loss, grad.to(dtype)


@functools.cache
def compiled_chunk_loss_and_grad():
    """chunk_loss_and_grad compiled once per process; sizes are symbols (a smaller last chunk compiles nothing,
    except one of a single token)."""
    return torch.compile(chunk_loss_and_grad, dynamic=True)


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
