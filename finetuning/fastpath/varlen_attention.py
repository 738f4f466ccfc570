"""Override 4 (`varlen_attention`): attention over packed rows record by record, with PyTorch's variable-length
kernels: each record's own causal triangle, not a row x row score matrix under a block-diagonal mask.

The attention function is registered with transformers under its own name (VARLEN_ATTENTION), its mask function as
SDPA's, and selected on the model's config for the run; nothing else in the process sees it, and the run's end puts
"sdpa" back and removes the name. Batches without record bounds, the CPU, and sliding windows the kernel cannot express
run transformers' SDPA function with its mask.

Where the kernels will serve every layer of a packed batch (`serves`), transformers is not asked for the two masks it
would build every step and no layer reads (a hook on the model under the LM head passes `{"full_attention": None,
"sliding_attention": None}`, which Gemma 3's models take as masks made already). Should a layer still fall back to
SDPA, it builds the packed batch's mask from the record bounds (`packed_mask`), so the answer never depends on that
forecast.

Target: transformers 4.57 (`AttentionInterface`, `AttentionMaskInterface`, `sdpa_attention_forward`); the private
aten ops `_flash_attention_forward` / `_efficient_attention_forward`, whose argument names are checked first.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from fastpath.guards import found, version_ok
from fastpath.patches import Patches

logger = logging.getLogger(__name__)

try:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
except ImportError:
    AttentionInterface = sdpa_attention_forward = ALL_MASK_ATTENTION_FUNCTIONS = AttentionMaskInterface = None

VARLEN_ATTENTION = "gemma_finetuning_varlen_sdpa"
# Override 17 passes each layer's window under this keyword, as a number for both kinds (one compiled graph).
LAYER_WINDOW = "gemma_finetuning_layer_window"


def use_varlen_attention(causal_lm, patches: Optional[Patches] = None) -> bool:
    """Select the variable-length attention on this model's language model (its text config's
    `_attn_implementation`), where it runs SDPA; returns whether it did. The name is registered with transformers
    until `patches` are restored. A multimodal Gemma 3's vision tower keeps its own config's attention: set on the
    top config, transformers would pass the name down to every sub-config."""
    what = "variable-length attention"
    config = causal_lm.config.get_text_config()  # the text model's config is its own text config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if not (found(sdpa_attention_forward, "transformers' AttentionInterface, AttentionMaskInterface and SDPA", what)
            and version_ok("transformers", what) and _schema_has("_flash_attention_forward", FLASH_ARGUMENTS)
            and _schema_has("_efficient_attention_forward", EFFICIENT_ARGUMENTS)):
        return False
    patches = patches if patches is not None else Patches()
    AttentionInterface.register(VARLEN_ATTENTION, _varlen_or_sdpa(sdpa_attention_forward))
    AttentionMaskInterface.register(VARLEN_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    patches.on_restore(_unregister)
    config._attn_implementation = VARLEN_ATTENTION
    patches.on_restore(lambda: setattr(config, "_attn_implementation", "sdpa"))
    if isinstance(getattr(causal_lm, "model", None), torch.nn.Module):
        hook = causal_lm.model.register_forward_pre_hook(_masks_not_built(config), with_kwargs=True)
        patches.on_restore(hook.remove)
    return True


NO_MASKS = {"full_attention": None, "sliding_attention": None}


def _masks_not_built(config) -> Callable:
    """A forward pre-hook for the model under the LM head: a packed text batch (record bounds, no mask, no cache, no
    images) whose every layer the kernels serve gets NO_MASKS instead of transformers' masks."""
    def hook(module, args, kwargs):
        if (kwargs.get("cu_seq_lens_q") is None or kwargs.get("max_length_q") is None or args
                or any(kwargs.get(name) is not None for name in ("attention_mask", "past_key_values", "pixel_values",
                                                                  "token_type_ids"))
                or getattr(config, "use_bidirectional_attention", False)):
            return None
        tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if tokens is None:
            return None
        if torch.is_autocast_enabled("cuda"):
            dtype = torch.get_autocast_dtype("cuda")
        else:
            dtype = module.get_input_embeddings().weight.dtype  # the hidden states', and so the queries'
        dropout = getattr(config, "attention_dropout", 0.0) if module.training else 0.0
        if not serves_every_layer(tokens.device, dtype, config, kwargs["max_length_q"], dropout):
            return None
        return args, {**kwargs, "attention_mask": dict(NO_MASKS)}

    return hook


def serves_every_layer(device, dtype, config, longest: int, dropout: float) -> bool:
    """`serves` for every layer, with the flash kernel only (which takes any window): where the memory-efficient
    kernel runs (a T4), whether it serves depends on each batch's longest record, and compiled layers given a mask one
    step and none the next would compile twice."""
    if device.type != "cuda" or not flash_kernel(device, config.head_dim):
        return False
    return serves(device, dtype, config.head_dim, getattr(config, "sliding_window", None), longest, dropout)


def serves(device, dtype, head_dim: int, sliding_window: Optional[int], longest: int, dropout: float) -> bool:
    """Whether `attention` runs a packed batch's layer of these settings (else stock SDPA with a mask): the one test
    for both the layers and the hook that skips the masks."""
    if device.type != "cuda" or dropout or dtype not in (torch.float16, torch.bfloat16):
        return False
    if flash_kernel(device, head_dim):
        return True
    return sliding_window is None or (longest is not None and longest <= sliding_window)  # that kernel: no window


def flash_kernel(device, head_dim: int) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 8 and head_dim <= 256 and head_dim % 8 == 0


def packed_mask(bounds: torch.Tensor, batch: int, length: int, sliding_window: Optional[int],
                device) -> torch.Tensor:
    """The packed batch's boolean mask, [batch, 1, length, length]: a token sees the tokens of its own record up to
    itself, and within a sliding window the window - 1 before it; what transformers builds from the position ids."""
    positions = torch.arange(batch * length, device=device)
    record = torch.searchsorted(bounds.to(device=device, dtype=torch.int64)[1:], positions, right=True)
    record, positions = record.view(batch, length), positions.view(batch, length)
    distance = positions[:, :, None] - positions[:, None, :]
    mask = (record[:, :, None] == record[:, None, :]) & (distance >= 0)
    if sliding_window is not None:
        mask &= distance < sliding_window
    return mask[:, None]


def _unregister() -> None:
    AttentionInterface._global_mapping.pop(VARLEN_ATTENTION, None)
    AttentionMaskInterface._global_mapping.pop(VARLEN_ATTENTION, None)


def _schema_has(op_name: str, names) -> bool:
    op = getattr(torch.ops.aten, op_name, None)
    try:
        present = {argument.name for argument in op.default._schema.arguments}
    except (AttributeError, RuntimeError):
        present = set()
    missing = set(names) - present
    if missing:
        logger.warning("variable-length attention: torch.ops.aten.%s lacks %s; using stock SDPA with a mask.",
                       op_name, sorted(missing))
    return not missing


def _varlen_or_sdpa(sdpa: Callable) -> Callable:
    def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                          **kwargs):
        given = kwargs.pop(LAYER_WINDOW, None)  # override 17: every layer's window as a number
        window = sliding_window if given is None else given
        output = attention(query, key, value, dropout, scaling, window, kwargs, always_window=given is not None)
        if output is None:
            if attention_mask is None and kwargs.get("cu_seq_lens_q") is not None:  # the hook skipped the masks
                attention_mask = packed_mask(kwargs["cu_seq_lens_q"], query.shape[0], query.shape[2], window,
                                             query.device)
            return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                        sliding_window=sliding_window, **kwargs)
        return output, None

    return attention_forward


# The argument names the calls below pass by keyword; a torch whose private ops changed them keeps stock SDPA.
FLASH_ARGUMENTS = ("query", "key", "value", "cum_seq_q", "cum_seq_k", "max_q", "max_k", "dropout_p", "is_causal",
                   "return_debug_mask", "scale", "window_size_left", "window_size_right")
EFFICIENT_ARGUMENTS = ("query", "key", "value", "bias", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
                       "max_seqlen_k", "dropout_p", "custom_mask_type", "compute_log_sumexp", "scale")



def attention(query, key, value, dropout, scaling, sliding_window, kwargs,
              always_window: bool = False) -> Optional[torch.Tensor]:
    """The packed batch's attention output, [batch, length, heads, dim]; None where stock SDPA must run.
    `always_window`: the window came from override 17, a number for both kinds, passed to the kernel whatever the
    row length (a symbol of the compiled graph, which a comparison with the length would split in two)."""
    bounds, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    batch, heads, length, head_dim = query.shape
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else query.dtype
    if bounds is None or not serves(query.device, dtype, head_dim, sliding_window, longest, dropout):
        return None
    flash = flash_kernel(query.device, head_dim)
    if flash:
        # Flash attention takes the window, and the row length as a bound on the records' lengths that holds: the
        # same values every step, so that a compiled layer sees nothing new (a window wider than a record changes
        # nothing in it; the kernel takes one at least as long as the row for none).
        window_applies = always_window or (sliding_window is not None and length > sliding_window)
        longest = length

    def tokens_first(states):  # [batch, heads, length, dim] -> [batch * length, heads, dim]
        return states.transpose(1, 2).reshape(batch * length, states.shape[1], head_dim).to(dtype)

    q, k, v = tokens_first(query), tokens_first(key), tokens_first(value)
    bounds = bounds.to(device=query.device, dtype=torch.int32)
    if flash:
        # Gemma's window: a token sees itself and the sliding_window - 1 tokens before it.
        limits = dict(window_size_left=sliding_window - 1, window_size_right=0) if window_applies else {}
        output = torch.ops.aten._flash_attention_forward(
            query=q, key=k, value=v, cum_seq_q=bounds, cum_seq_k=bounds, max_q=longest, max_k=longest,
            dropout_p=0.0, is_causal=True, return_debug_mask=False, scale=scaling, **limits,
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
