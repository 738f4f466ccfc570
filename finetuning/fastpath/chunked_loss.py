"""Override 5 (`chunked_loss`): the causal LM's training loss from the hidden states in vocabulary chunks
(`ChunkedCrossEntropy`), never holding the full logits, which are a step's largest tensor with Gemma's 262k
vocabulary (1 GiB of fp32 logits per 1,024 tokens); masked positions are skipped. Under override 10 each chunk's
loss and gradient is compiled too.

Target: transformers 4.57 Gemma 3, both classes (`model.model` returns `last_hidden_state`, `lm_head` a plain Linear).
For `Gemma3ForConditionalGeneration` the stock loss is its own (the micro-batch's mean over the positions the
attention mask keeps; the Trainer passes no `num_items_in_batch`, as its `accepts_loss_kwargs` is False): the chunked
loss gives that mean too, as the labels of padding are -100.
"""
from __future__ import annotations

import functools
import logging
from typing import Optional

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from fastpath.guards import has, version_ok
from fastpath.patches import Patches

logger = logging.getLogger(__name__)


def use_chunked_loss(causal_lm: torch.nn.Module, chunk_tokens: Optional[int] = None, compiled_chunks: bool = False,
                     patches: Patches | None = None) -> bool:
    """The training loss in chunks (an instance `forward` on the causal LM). Returns False, leaving the model as it
    was, where the output layer is not a plain Linear or there is no `model` returning hidden states.
    `compiled_chunks`: each chunk's loss and gradient through compiled_chunk_loss_and_grad (with override 10)."""
    lm_head = causal_lm.get_output_embeddings()
    if type(lm_head) is not torch.nn.Linear or lm_head.bias is not None:
        logger.warning("Output layer is %s, not a plain Linear: using the stock loss.", type(lm_head).__name__)
        return False
    if not (version_ok("transformers", "chunked loss") and has(causal_lm, ["model"], "chunked loss")):
        return False
    stock_forward = causal_lm.forward
    # A multimodal Gemma 3 (gemma-3-4b) keeps it in its text config; its `model` (Gemma3Model) returns the language
    # model's last hidden states as the text model's does, and its lm_head is on the top model as there.
    softcap = getattr(causal_lm.config.get_text_config(), "final_logit_softcapping", None)

    # logits_to_keep named, as the stock forward names it: generation then asks for the last position's logits only.
    # None (which Gemma3ForConditionalGeneration's prepare_inputs_for_generation passes when the signature lacks it)
    # means all of them; stock, it would index the hidden states with None and give logits of one dimension more.
    def forward(input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None, logits_to_keep=0, **kwargs):
        logits_to_keep = 0 if logits_to_keep is None else logits_to_keep
        if labels is None or logits_to_keep or kwargs.get("return_dict") is False:
            return stock_forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                 logits_to_keep=logits_to_keep, **kwargs)
        outputs = causal_lm.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        loss = chunked_causal_lm_loss(
            outputs.last_hidden_state, lm_head.weight, labels, softcap, num_items_in_batch, chunk_tokens,
            compiled_chunk_loss_and_grad() if compiled_chunks else None,
        )
        return CausalLMOutputWithPast(loss=loss, past_key_values=outputs.past_key_values)

    (patches if patches is not None else Patches()).set(causal_lm, "forward", forward)
    return True


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



def chunk_bounds(tokens: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """(start, end) of each chunk: `chunk_tokens` each, the last one whatever is left, except that a last chunk of one
    token joins the one before. The compiled chunk function treats sizes as symbols but a size of 1 as a constant:
    a one-token chunk would compile it again in the middle of a run."""
    starts = list(range(0, tokens, chunk_tokens))
    if len(starts) > 1 and tokens - starts[-1] == 1:
        starts.pop()
    return list(zip(starts, starts[1:] + [tokens]))


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
        for start, end in chunk_bounds(hidden.shape[0], chunk_tokens):
            h = hidden[start:end].to(compute_dtype)
            target = labels[start:end]
            # The logits go straight into the call, so that _eager_chunk can free them once it has used them.
            if chunk_function is not None and need_grad:
                loss, grad_logits = chunk_function(h @ weight_c.T, target, softcap, compute_dtype)
            else:
                loss, grad_logits = _eager_chunk(h @ weight_c.T, target, softcap, compute_dtype, need_grad)
            total += loss
            if not need_grad:
                continue
            if need_hidden_grad:
                grad_hidden[start:end] = grad_logits @ weight_c
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
    """chunk_loss_and_grad compiled once per process; sizes are symbols, so a smaller last chunk compiles nothing
    (chunk_bounds never makes one of a single token, a size torch compiles apart)."""
    return torch.compile(chunk_loss_and_grad, dynamic=True)
