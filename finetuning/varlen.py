"""Attention over packed rows record by record, with PyTorch's variable-length kernels (override 4 in overrides.py,
which installs it and checks these kernels' argument names first): each record's own causal triangle, not a row x row
score matrix under a block-diagonal mask."""
from __future__ import annotations

from typing import Optional

import torch

# The argument names the calls below pass by keyword; a torch whose private ops changed them keeps stock SDPA.
FLASH_ARGUMENTS = ("query", "key", "value", "cum_seq_q", "cum_seq_k", "max_q", "max_k", "dropout_p", "is_causal",
                   "return_debug_mask", "scale", "window_size_left", "window_size_right")
EFFICIENT_ARGUMENTS = ("query", "key", "value", "bias", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
                       "max_seqlen_k", "dropout_p", "custom_mask_type", "compute_log_sumexp", "scale")



def attention(query, key, value, dropout, scaling, sliding_window, kwargs) -> Optional[torch.Tensor]:
    """The packed batch's attention output, [batch, length, heads, dim]; None where stock SDPA must run."""
    bounds, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if bounds is None or not query.is_cuda or dropout:
        return None
    batch, heads, length, head_dim = query.shape
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else query.dtype
    if dtype not in (torch.float16, torch.bfloat16):
        return None
    flash = torch.cuda.get_device_capability(query.device)[0] >= 8 and head_dim <= 256 and head_dim % 8 == 0
    if flash:
        # Flash attention takes the window, and the row length as a bound on the records' lengths that holds: the
        # same values every step, so that a compiled layer sees nothing new (a window wider than a record changes
        # nothing in it).
        window_applies = sliding_window is not None and length > sliding_window
        longest = length
    elif sliding_window is not None and longest > sliding_window:
        return None  # the memory-efficient kernel has no window

    def tokens_first(states):  # [batch, heads, length, dim] -> [batch * length, heads, dim]
        return states.transpose(1, 2).reshape(batch * length, states.shape[1], head_dim).to(dtype)

    q, k, v = tokens_first(query), tokens_first(key), tokens_first(value)
    bounds = bounds.to(device=query.device, dtype=torch.int32)
    if flash:
        # Gemma's window: a token sees itself and the sliding_window - 1 tokens before it.
        window = dict(window_size_left=sliding_window - 1, window_size_right=0) if window_applies else {}
        output = torch.ops.aten._flash_attention_forward(
            query=q, key=k, value=v, cum_seq_q=bounds, cum_seq_k=bounds, max_q=longest, max_k=longest,
            dropout_p=0.0, is_causal=True, return_debug_mask=False, scale=scaling, **window,
        )[0]
    else:
        # The memory-efficient kernel wants as many key/value heads as query heads.
        repeat = heads // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        output = torch.ops.aten._efficient_attention_forward(
            query=q[None], key=k[None], value=v[None], bias=None, cu_seqlens_q=bounds, cu_seqlens_k=bounds,
            max_seqlen_q=longest, max_seqlen_k=longest, dropout_p=0.0, custom_mask_type=1,
            compute_log_sumexp=True, scale=scaling,  # the backward pass needs the log-sum-exp
        )[0][0]
    return output.reshape(batch, length, heads, head_dim)
