"""The pieces that replace stock numerics, each checked against a float32 reference on the CPU."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from fastpath import chunked_loss, rms_norm
from transformers import Gemma3ForCausalLM
from conftest import small_gemma



def batch():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 500, (3, 40), generator=generator)
    labels = input_ids.clone()
    labels[0, :10] = -100  # a masked prompt
    labels[2, 30:] = -100  # padding
    return input_ids, labels


def loss_and_grads(model, **kwargs):
    input_ids, labels = batch()
    model.zero_grad()
    loss = model(input_ids=input_ids, labels=labels, **kwargs).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("chunk_tokens", [7, 1000])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager chunks", "compiled chunks"])
def test_chunked_loss_matches_stock_loss_and_gradients(softcap, chunk_tokens, compiled, monkeypatch):
    stock = small_gemma(vocab_size=500, sliding_window=4096, random_norms=False, final_logit_softcapping=softcap)
    chunked = copy.deepcopy(stock)
    # The compiled form, traced by dynamo and run without inductor's code generation (the GPU runs that).
    monkeypatch.setattr(chunked_loss, "compiled_chunk_loss_and_grad", lambda: torch.compile(
        chunked_loss.chunk_loss_and_grad, backend="aot_eager", dynamic=True))
    assert chunked_loss.use_chunked_loss(chunked, chunk_tokens=chunk_tokens, compiled_chunks=compiled)

    stock_loss, stock_grads = loss_and_grads(stock)
    ours, chunked_grads = loss_and_grads(chunked)

    assert torch.allclose(ours, stock_loss, rtol=1e-5)
    for name, grad in stock_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # The tied embedding gets the output layer's gradient too.
    assert chunked_grads["model.embed_tokens.weight"].abs().sum() > 0


def test_chunked_loss_divides_by_the_trainers_token_count_under_accumulation():
    stock = small_gemma(vocab_size=500, sliding_window=4096, random_norms=False)
    chunked = copy.deepcopy(stock)
    chunked_loss.use_chunked_loss(chunked, chunk_tokens=16)
    count = torch.tensor(250)
    stock_loss, _ = loss_and_grads(stock, num_items_in_batch=count)
    ours, _ = loss_and_grads(chunked, num_items_in_batch=count)
    assert torch.allclose(ours, stock_loss, rtol=1e-5)


def test_chunked_loss_without_gradients_and_returns_no_logits():
    model = small_gemma(vocab_size=500, sliding_window=4096, random_norms=False)
    chunked_loss.use_chunked_loss(model)
    input_ids, labels = batch()
    with torch.no_grad():
        output = model(input_ids=input_ids, labels=labels)
    assert output.logits is None and math.isfinite(output.loss.item())
    # Generation (no labels) still goes through the stock forward and gets logits.
    assert model(input_ids=input_ids).logits.shape == (3, 40, 500)


def overflowing_gemma() -> Gemma3ForCausalLM:
    """Post-norm weights scaled up until the residual stream passes float16's 65,504, as the real Gemma 3's does."""
    model = small_gemma(vocab_size=500, sliding_window=4096, random_norms=False)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "post_attention_layernorm" in name or "post_feedforward_layernorm" in name:
                parameter.fill_(3e4)
    return model


def test_the_overflow_model_really_passes_the_float16_range():
    model = overflowing_gemma()
    input_ids, _ = batch()
    with torch.no_grad():
        hidden = model(input_ids=input_ids, output_hidden_states=True).hidden_states
    assert max(h.abs().max().item() for h in hidden) > 65504


def test_stock_fp16_paths_go_nan_where_ours_stays_finite():
    reference = overflowing_gemma()
    input_ids, labels = batch()
    with torch.no_grad():
        fp32_loss = reference(input_ids=input_ids, labels=labels).loss.item()

    # Stock 1: the model loaded in float16 (the common tutorial). Stock 2: fp16 autocast alone.
    half = copy.deepcopy(reference).half()
    with torch.no_grad():
        assert not math.isfinite(half(input_ids=input_ids, labels=labels).loss.item())
    autocast_only = copy.deepcopy(reference)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        assert not math.isfinite(autocast_only(input_ids=input_ids, labels=labels).loss.item())

    # Ours: the scripts' fp16 path (fp32 weights, fp16 autocast, fp32 residual stream, chunked loss).
    ours = copy.deepcopy(reference)
    assert rms_norm.fuse_rms_norms(ours, fp32_residual=True) == 2 * 4 + 1 + 2 * 2  # 4 per layer, final, q/k norms
    chunked_loss.use_chunked_loss(ours)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = ours(input_ids=input_ids, labels=labels).loss
    loss.backward()
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(fp32_loss, rel=1e-2)
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.grad is not None)


def test_fp32_residual_patch_changes_nothing_in_float32():
    stock = small_gemma(vocab_size=500, sliding_window=4096, random_norms=False)
    patched = copy.deepcopy(stock)
    rms_norm.fuse_rms_norms(patched, fp32_residual=True)
    stock_loss, stock_grads = loss_and_grads(stock)
    patched_loss, patched_grads = loss_and_grads(patched)
    assert torch.equal(stock_loss, patched_loss)
    assert all(torch.equal(stock_grads[name], grad) for name, grad in patched_grads.items())


def test_chunk_bounds_cover_every_token_and_never_leave_a_one_token_chunk():
    for tokens in (1, 2, 63, 64, 65, 128, 129, 130, 1000):
        bounds = chunked_loss.chunk_bounds(tokens, 64)
        assert [start for start, _ in bounds][0] == 0 and bounds[-1][1] == tokens
        assert all(end == start_next for (_, end), (start_next, _) in zip(bounds, bounds[1:]))
        assert tokens == 1 or all(end - start > 1 for start, end in bounds)


def test_the_compiled_chunk_loss_compiles_once_whatever_tokens_a_step_keeps(monkeypatch):
    """A step's unmasked token count changes every step; the compiled chunk loss must not compile again (issue 27:
    no recompilation after the first step), a last chunk of one token included."""
    graphs = []

    def counting(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compiled = torch.compile(chunked_loss.chunk_loss_and_grad, backend=counting, dynamic=True)
    torch._dynamo.reset()
    weight = torch.randn(500, 64, requires_grad=True)
    counts = []
    for kept in (200, 129, 193, 65, 130):  # 129, 193 and 65 would leave one token in a chunk of 64
        hidden = torch.randn(1, kept + 1, 64, requires_grad=True)
        labels = torch.randint(0, 500, (1, kept + 1))
        loss = chunked_loss.chunked_causal_lm_loss(hidden, weight, labels, chunk_tokens=64, chunk_function=compiled)
        loss.backward()
        counts.append(len(graphs))
    assert counts[0] >= 1 and counts[1:] == [counts[0]] * 4, counts
