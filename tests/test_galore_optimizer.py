"""GaLoreAdamW8bitFixed against galore-torch's 32-bit GaLoreAdamW, and the stock 8-bit class it fixes."""
from __future__ import annotations

import galore_torch
import pytest
import torch

from fastpath import galore_8bit

LR, STEPS, RANK = 1e-3, 5, 8


def relative_change(optimizer_class, size, steps=STEPS, **kwargs):
    """Train one size x size weight, projected at RANK, for `steps` steps on a fixed gradient."""
    generator = torch.Generator().manual_seed(size)
    weight = torch.nn.Parameter(torch.randn(size, size, generator=generator) * 0.02)
    gradient = torch.randn(size, size, generator=generator)
    start = weight.detach().clone()
    group = {"params": [weight], "rank": RANK, "update_proj_gap": 200, "scale": 1.0, "proj_type": "std"}
    optimizer = optimizer_class([group], lr=LR, weight_decay=0.0, eps=1e-8, **kwargs)
    for _ in range(steps):
        weight.grad = gradient.clone()
        optimizer.step()
    assert torch.isfinite(weight).all()
    return ((weight.detach() - start).norm() / start.norm()).item(), optimizer


@pytest.fixture
def no_cuda_synchronize(monkeypatch):
    # the stock class calls torch.cuda.synchronize() after every update; nothing runs on a GPU here
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)


# 512 x 512 at rank 8 projects to 4,096 values: bitsandbytes' threshold for 8-bit (blockwise) states.
@pytest.mark.parametrize("size", [64, 256, 512])
def test_fixed_moves_weights_like_the_32bit_reference(size):
    reference, _ = relative_change(galore_torch.GaLoreAdamW, size)
    fixed, _ = relative_change(galore_8bit.galore_adamw8bit(), size)
    assert reference > 1e-3, "the reference itself must move the weight measurably"
    assert fixed >= 0.9 * reference, f"fixed moved {fixed:.3g}, reference {reference:.3g}"
    assert fixed <= 1.1 * reference


@pytest.mark.parametrize("size", [64, 256])
def test_stock_8bit_class_barely_moves(size, no_cuda_synchronize):
    """Where the projected gradient is under bitsandbytes' min_8bit_size (4,096 values), the state is 32-bit and
    the misplaced max_unorm=100 clips every update against the zeroed projected weight. (With 8-bit blockwise
    states, as for Gemma 3 1B at rank 128, bitsandbytes ignores max_unorm.)"""
    reference, _ = relative_change(galore_torch.GaLoreAdamW, size)
    stock, optimizer = relative_change(galore_torch.GaLoreAdamW8bit, size)
    # galore-torch passes percentile_clipping=100, block_wise=True by position; bitsandbytes 0.50 reads them as:
    assert optimizer.args.max_unorm == 100
    assert optimizer.args.skip_zeros is True
    assert stock < 0.1 * reference, f"stock moved {stock:.3g}, reference {reference:.3g}"


def test_fixed_settings():
    weight = torch.nn.Parameter(torch.zeros(64, 64))
    optimizer = galore_8bit.galore_adamw8bit()([{"params": [weight]}], lr=1e-3)
    assert optimizer.args.max_unorm == 0
    assert optimizer.args.skip_zeros is False
    assert optimizer.args.optim_bits == 8


def test_fixed_step_restores_cuda_synchronize():
    original = torch.cuda.synchronize
    relative_change(galore_8bit.galore_adamw8bit(), 64, steps=1)
    assert torch.cuda.synchronize is original


def test_unprojected_group_is_plain_adamw():
    """The second group (embeddings, norms) gets ordinary Adam updates: lr * sign(grad) on the first step."""
    vector = torch.nn.Parameter(torch.ones(4096))
    matrix = torch.nn.Parameter(torch.randn(64, 64) * 0.02)
    optimizer = galore_8bit.galore_adamw8bit()(
        [{"params": [matrix], "rank": RANK, "update_proj_gap": 200, "scale": 1.0, "proj_type": "std"},
         {"params": [vector]}],
        lr=LR, weight_decay=0.0,
    )
    gradient = torch.linspace(-1, 1, 4096)
    gradient[gradient.abs() < 1e-3] = 0.5
    vector.grad, matrix.grad = gradient.clone(), torch.randn(64, 64)
    optimizer.step()
    torch.testing.assert_close(vector.detach(), 1 - LR * torch.sign(gradient), atol=LR * 0.05, rtol=0)
