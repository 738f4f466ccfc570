"""The fast path both scripts train on: fewer kernel launches per step, and no padding.

A gemma-3-1b training step launches thousands of small kernels, and on a fast GPU
the Python and dispatcher time to launch them costs more than the arithmetic
(bench/RESULTS.md). Three pieces cut that cost without changing the answer:

- `fuse_rms_norms`: Gemma's RMSNorm as one fused `rms_norm` call instead of about
  ten element-wise kernels (the model has 157 of them, two in every attention).
- `fuse_lora_4bit`: a LoRA layer on a 4-bit base as one autograd node: the 4-bit
  weight dequantized once for the forward pass and, under gradient checkpointing,
  kept from the recomputation for the backward pass; the adapter's matrix products
  folded into the base product's output.
- `pack_records`: records packed into rows of --max_seq_length tokens, each record
  seeing only itself (position ids restart at every record, which transformers
  turns into a block-diagonal attention mask), so a batch holds no padding.

tests/test_speed.py checks each against the stock computation in float32.
"""
from __future__ import annotations

import bisect
import functools
import random
import types
from typing import Callable, Optional, Sequence


# ---------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------


def fuse_rms_norms(model, fp32_residual: bool = False) -> int:
    """Compute every Gemma3RMSNorm with one fused `rms_norm` call. Returns how many were changed.

    Gemma's norm is `x / rms(x) * (1 + weight)` in float32, cast back to the
    input's dtype. With `fp32_residual` (fp16 training) the output keeps the
    promoted dtype of input and weight, so float32 weights give a float32 residual
    stream: Gemma 3's residual grows past float16's 65,504 (transformers issue
    36822), and the norms are where it would be cast down.
    """
    import torch

    rms_norm = torch.nn.functional.rms_norm

    def forward(self, x):
        if fp32_residual:
            output = rms_norm(x.float(), (x.shape[-1],), self.weight.float() + 1.0, self.eps)
            return output.to(torch.promote_types(x.dtype, self.weight.dtype))
        # The fused kernel computes in float32 inside, so a 16-bit input needs no float32 copy in and out (those
        # copies were 12% of a QLoRA step's GPU time on an H100). The one difference from Gemma's: the scale
        # (1 + weight) is rounded to 16 bits before the product, not after. A 16-bit add rounds its exact sum
        # once, so `weight + 1` is that rounding in one kernel instead of three (float, add, cast).
        return rms_norm(x, (x.shape[-1],), (self.weight + 1.0).to(x.dtype), self.eps)

    changed = 0
    for module in model.modules():
        if type(module).__name__ == "Gemma3RMSNorm":
            module.forward = types.MethodType(forward, module)
            changed += 1
    return changed


# ---------------------------------------------------------------------------
# LoRA on a 4-bit base layer
# ---------------------------------------------------------------------------


def fuse_lora_4bit(model, keep_dequantized_weight: bool) -> int:
    """Run every peft LoRA layer on a bitsandbytes 4-bit base through one autograd Function. Returns how many.

    `keep_dequantized_weight`: save the dequantized weight for the backward pass
    instead of dequantizing it again. Under gradient checkpointing only the
    recomputed layer's weights are held at a time (tens of MB); without it, every
    layer's would be, so the scripts pass their --gradient_checkpointing setting.
    Layers with more than one active adapter, a DoRA or other variant, or merged
    weights keep peft's own forward.
    """
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    changed = 0
    for module in model.modules():
        if not isinstance(module, LoraLinear4bit) or len(module.active_adapters) != 1:
            continue
        adapter = module.active_adapters[0]
        if adapter not in module.lora_A or adapter in getattr(module, "lora_variant", {}):
            continue
        module.forward = types.MethodType(_lora_4bit_forward(module.forward, adapter, keep_dequantized_weight), module)
        changed += 1
    return changed


def _lora_4bit_forward(stock_forward: Callable, adapter: str, keep_weight: bool) -> Callable:
    function = _lora_4bit_function()

    def forward(self, x, *args, **kwargs):
        base = self.base_layer
        # bitsandbytes repacks CPU weights for its inference kernel on a first no-grad call; dequantize_4bit
        # does not read that layout.
        repacked = getattr(base.weight.quant_state, "packing_format_for_cpu", False)
        if args or kwargs or self.disable_adapters or self.merged or repacked:
            return stock_forward(x, *args, **kwargs)
        p = getattr(self.lora_dropout[adapter], "p", 0.0) if self.training else 0.0  # nn.Identity where 0
        return function.apply(
            x, base.weight, base.weight.quant_state, base.compute_dtype or x.dtype, base.bias,
            self.lora_A[adapter].weight, self.lora_B[adapter].weight, self.scaling[adapter], p, keep_weight,
        )

    return forward


def _dequantize(weight, quant_state, dtype):
    """bitsandbytes.functional.dequantize_4bit(weight, quant_state).to(dtype), in one kernel.

    Double quantization stores the blocks' scales (absmax) in 8 bits, and
    bitsandbytes undoes that on every call: three more kernels and about 0.2 ms
    of Python a call, 364 calls a step for gemma-3-1b. The base weights are
    frozen, so the float32 scales are computed once and kept on the quant state
    (1/16 of the 16-bit weight's size: 44 MB for gemma-3-1b).
    """
    import torch

    absmax = getattr(quant_state, "float32_absmax", None)
    if absmax is None or absmax.device != weight.device:  # QuantState.to() moves only its own tensors
        import bitsandbytes.functional as bnb_functional

        absmax = quant_state.absmax
        if quant_state.nested:
            absmax = bnb_functional.dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset
        absmax = quant_state.float32_absmax = absmax.float()
    weight = torch.ops.bitsandbytes.dequantize_4bit.default(
        weight, absmax, quant_state.blocksize, quant_state.quant_type, quant_state.shape, quant_state.dtype
    )
    return weight.to(dtype)


@functools.cache  # built on first use, so importing this module needs no torch
def _lora_4bit_function():
    import torch

    class Lora4bitLinear(torch.autograd.Function):
        """y = x W^T + b + scale * dropout(x) A^T B^T, W stored in 4 bits; the same value and gradients as peft + bitsandbytes.

        As peft under autocast: products run in the base layer's compute dtype;
        adapter gradients come back in the adapters' own dtype (float32).
        """

        @staticmethod
        def forward(ctx, x, weight, quant_state, compute_dtype, bias, lora_a, lora_b, scale, p, keep_weight):
            xc = x.to(compute_dtype)
            w = _dequantize(weight, quant_state, compute_dtype)
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
            ctx.weight, ctx.quant_state, ctx.compute_dtype, ctx.scale, ctx.p = weight, quant_state, compute_dtype, scale, p
            ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
            ctx.adapter_dtypes = (lora_a.dtype, lora_b.dtype)
            return out.reshape(*x.shape[:-1], out.shape[-1]).to(x.dtype)

        @staticmethod
        def backward(ctx, grad_out):
            dropped, xa, mask, a, b, w = ctx.saved_tensors
            g = grad_out.reshape(-1, grad_out.shape[-1]).to(ctx.compute_dtype)
            grad_x = grad_a = grad_b = None
            g_b = (g @ b).mul_(ctx.scale)  # d loss / d (x A^T), through B and the scale
            if ctx.needs_input_grad[6]:
                grad_b = (g.t() @ xa).mul_(ctx.scale).to(ctx.adapter_dtypes[1])
            if ctx.needs_input_grad[5]:
                grad_a = (g_b.t() @ dropped).to(ctx.adapter_dtypes[0])
            if ctx.needs_input_grad[0]:
                if w is None:
                    w = _dequantize(ctx.weight, ctx.quant_state, ctx.compute_dtype)
                grad_x = g_b @ a
                if mask is not None:
                    grad_x = torch.ops.aten.native_dropout_backward(grad_x, mask, 1.0 / (1.0 - ctx.p))
                grad_x = torch.addmm(grad_x, g, w)
                grad_x = grad_x.reshape(ctx.x_shape).to(ctx.x_dtype)
            return grad_x, None, None, None, None, grad_a, grad_b, None, None, None

    return Lora4bitLinear


# ---------------------------------------------------------------------------
# Packing without cross-attention
# ---------------------------------------------------------------------------


def pack_into_rows(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    """Record indices grouped into rows of at most `row_tokens` tokens: best-fit decreasing bin packing.

    Each record goes to the fullest row it still fits in, longest records first,
    so rows come out nearly full (a few per cent of padding for instruction data).
    """
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens left, row number), sorted
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        length = min(lengths[index], row_tokens)
        at = bisect.bisect_left(free, (length, -1))
        if at < len(free):
            left, row = free.pop(at)
        else:
            left, row = row_tokens, len(rows)
            rows.append([])
        rows[row].append(index)
        if left - length > 0:
            bisect.insort(free, (left - length, row))
    return rows


def packed_rows(features: Sequence[dict], labels: Sequence[Sequence[int]], rows: Sequence[Sequence[int]]) -> list[dict]:
    """Each row's records concatenated (input_ids, labels), with the records' lengths, from which `pad_rows`
    derives the position ids.

    The first label of every record is masked: in a packed row it would be
    predicted from the previous record's last token.
    """
    packed = []
    for row in rows:
        input_ids, row_labels, lengths = [], [], []
        for index in row:
            ids = list(features[index]["input_ids"])
            record_labels = list(labels[index])
            record_labels[0] = -100
            input_ids += ids
            row_labels += record_labels
            lengths.append(len(ids))
        packed.append({"input_ids": input_ids, "labels": row_labels, "lengths": lengths})
    return packed


def record_labels(features: Sequence[dict], collator: Optional[Callable], chunk: int = 256) -> list[list[int]]:
    """Each record's labels as the collator sets them (answers only, say), unpadded; the input ids where it is None."""
    if collator is None:
        return [list(f["input_ids"]) for f in features]
    labels = []
    for start in range(0, len(features), chunk):
        part = [{"input_ids": f["input_ids"], "attention_mask": [1] * len(f["input_ids"])}
                for f in features[start : start + chunk]]
        batch = collator(part)
        for row_labels, row_mask in zip(batch["labels"], batch["attention_mask"]):
            labels.append(row_labels[row_mask.bool()].tolist())
    return labels


class PackedBatches:
    """Batches of packed rows for a DataLoader's batch_sampler: rows shuffled per epoch, the fullest batch first.

    Every batch but the last has the same number of rows, padded to the same
    length, so memory is the same at every step and an out-of-memory error shows
    at step 1.
    """

    def __init__(self, row_count: int, rows_per_batch: int, seed: int = 0):
        self.row_count, self.rows_per_batch, self.seed, self.epoch = row_count, rows_per_batch, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.row_count // self.rows_per_batch)

    def __iter__(self):
        order = list(range(self.row_count))
        random.Random(self.seed * 1000003 + self.epoch).shuffle(order)
        # A short remainder goes last, so the first step has the full shape.
        for start in range(0, self.row_count, self.rows_per_batch):
            yield order[start : start + self.rows_per_batch]


def pad_rows(pad_token_id: int, row_tokens: int) -> Callable[[Sequence[dict]], dict]:
    """Collate packed rows to one [rows, row_tokens] shape. Padding gets label -100 and position ids of its own.

    The batch also carries each record's bounds in the flattened batch
    (`cu_seq_lens_q/k`, `max_length_q/k`, transformers' names for them), which
    `use_varlen_attention` hands to a variable-length attention kernel.
    """
    import torch

    def collate(rows: Sequence[dict]) -> dict:
        batch = {
            "input_ids": torch.full((len(rows), row_tokens), pad_token_id, dtype=torch.long),
            "labels": torch.full((len(rows), row_tokens), -100, dtype=torch.long),
        }
        lengths = []
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            batch["input_ids"][i, :n] = torch.tensor(row["input_ids"])
            batch["labels"][i, :n] = torch.tensor(row["labels"])
            lengths += row["lengths"]
            # Padding is one more "record", after every real token, so none of them can see it.
            if n < row_tokens:
                lengths.append(row_tokens - n)
        # Position ids restart at 0 for every record (and the padding).
        batch["position_ids"] = torch.cat([torch.arange(n) for n in lengths]).view(len(rows), row_tokens)
        bounds = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        batch.update(cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=max(lengths), max_length_k=max(lengths))
        return batch

    return collate


# ---------------------------------------------------------------------------
# Variable-length attention for packed rows
# ---------------------------------------------------------------------------


def use_varlen_attention() -> None:
    """Run attention over packed batches record by record, with PyTorch's variable-length kernels.

    transformers' SDPA path sees a packed row as one sequence under a
    block-diagonal mask: it computes all row_tokens x row_tokens scores and masks
    most away. The variable-length kernels take the records' bounds
    (`cu_seq_lens_q`, from `pad_rows`) and compute only each record's own causal
    triangle. Flash attention where the GPU has it (Ampere or newer, 16-bit),
    the memory-efficient kernel on other GPUs (T4); batches without bounds, the
    CPU, and sliding windows the memory-efficient kernel cannot express keep
    transformers' SDPA with its mask. Registered under "sdpa", so nothing else changes.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register("sdpa", _varlen_or_sdpa(sdpa_attention_forward))


def _varlen_or_sdpa(sdpa: Callable) -> Callable:
    import torch

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, **kwargs):
        bounds, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
        if bounds is None or not query.is_cuda or dropout:
            return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                        sliding_window=sliding_window, **kwargs)
        batch, heads, length, head_dim = query.shape
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else query.dtype
        if dtype not in (torch.float16, torch.bfloat16):
            return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                        sliding_window=sliding_window, **kwargs)
        window_applies = sliding_window is not None and longest > sliding_window
        flash = torch.cuda.get_device_capability(query.device)[0] >= 8 and head_dim <= 256 and head_dim % 8 == 0
        if not flash and window_applies:
            return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                        sliding_window=sliding_window, **kwargs)

        def tokens_first(states):  # [batch, heads, length, dim] -> [batch * length, heads, dim]
            return states.transpose(1, 2).reshape(batch * length, states.shape[1], head_dim).to(dtype)

        q, k, v = tokens_first(query), tokens_first(key), tokens_first(value)
        bounds = bounds.to(device=query.device, dtype=torch.int32)
        if flash:
            # Gemma's window: a token sees itself and the sliding_window - 1 tokens before it.
            window = dict(window_size_left=sliding_window - 1, window_size_right=0) if window_applies else {}
            output = torch.ops.aten._flash_attention_forward(
                q, k, v, bounds, bounds, longest, longest, 0.0, True, False, scale=scaling, **window
            )[0]
        else:
            # The memory-efficient kernel wants as many key/value heads as query heads.
            repeat = heads // k.shape[1]
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
            output = torch.ops.aten._efficient_attention_forward(
                q[None], k[None], v[None], None, bounds, bounds, longest, longest, 0.0, 1, True, scale=scaling
            )[0][0]
        return output.reshape(batch, length, heads, head_dim), None

    return attention


def row_fill(lengths: Sequence[int], rows: Sequence[Sequence[int]], row_tokens: int) -> float:
    """The share of the rows' tokens that are real (not padding)."""
    return sum(min(length, row_tokens) for length in lengths) / max(1, len(rows) * row_tokens)
