"""Overrides 12-13: the Trainer's per-step bookkeeping, trimmed without changing what it does."""
from __future__ import annotations

import copy

import torch

from fastpath import flops_once, skip_train
from conftest import small_gemma


def test_train_returns_at_once_while_all_is_training_and_runs_the_stock_walk_otherwise():
    model = small_gemma()
    skip_train.skip_train_when_training(model)
    walks = []
    layer = model.model.layers[0]
    stock_train = layer.train
    layer.train = lambda mode=True: walks.append(mode) or stock_train(mode)

    model.train()
    assert walks == []  # all in training mode already: no walk
    model.eval()
    assert walks == [False] and not any(module.training for module in model.modules())
    model.train()
    assert walks == [False, True] and all(module.training for module in model.modules())
    # A module switched off on its own is found, and switched back on by the next train().
    model.model.layers[1].mlp.eval()
    model.train()
    assert walks == [False, True, True] and all(module.training for module in model.modules())
    # A copy switches itself, not the model it was copied from.
    del layer.train  # the counting stand-in above calls the original layer
    copied = copy.deepcopy(model)
    copied.eval()
    assert all(module.training for module in model.modules())
    assert not any(module.training for module in copied.modules())
    copied.train()
    assert all(module.training for module in copied.modules())


def test_flops_count_equals_transformers_and_counts_parameters_once(monkeypatch):
    model = small_gemma()
    batch = {"input_ids": torch.ones(3, 40, dtype=torch.long)}
    expected = model.floating_point_ops(batch)
    counts = []
    stock_count = model.num_parameters
    monkeypatch.setattr(model, "num_parameters", lambda **kwargs: counts.append(kwargs) or stock_count(**kwargs))
    flops_once.count_parameters_once(model)
    assert [model.floating_point_ops(batch) for _ in range(3)] == [expected] * 3
    assert model.floating_point_ops({"input_ids": torch.ones(1, 10, dtype=torch.long)}) == expected // 12
    assert len(counts) == 1


def test_clip_and_zero_walk_the_trainable_parameters_and_give_the_stock_answer():
    """Override 16: the norm, the clipped gradients and the zeroing of the stock walk over every parameter, without
    reading a frozen parameter; and both instance methods gone after the run."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from fastpath import trainable_grads
    from fastpath.patches import Patches

    model = small_gemma()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(".layers.1." in name)  # a frozen base, as QLoRA's is
    model(input_ids=torch.arange(3, 43).reshape(2, 20), labels=torch.arange(3, 43).reshape(2, 20)).loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    stock = copy.deepcopy(model)  # the stock walk over every parameter, on a copy given the same gradients
    for copied, parameter in zip(stock.parameters(), model.parameters()):
        copied.grad = None if parameter.grad is None else parameter.grad.clone()
    expected = torch.nn.utils.clip_grad_norm_(stock.parameters(), 0.01)
    clipped = [p.grad for p in stock.parameters() if p.requires_grad]
    assert expected > 0.01  # so that the clip changes the gradients

    trainer = SimpleNamespace(model=model, accelerator=Accelerator(cpu=True))
    patches = Patches()
    assert trainable_grads.walk_trainable_only(trainer, patches)

    def no_walk():
        raise AssertionError("the model's parameters were walked")
        yield

    one = trainable[0]
    alone = trainer.accelerator.clip_grad_norm_([one], 1e9)  # another caller's own list is what it gets
    assert torch.allclose(alone, one.grad.norm())
    norm = trainer.accelerator.clip_grad_norm_(no_walk(), 0.01)  # the Trainer's call, given model.parameters()
    assert torch.allclose(norm, expected)
    assert all(torch.allclose(p.grad, c) for p, c in zip(trainable, clipped))
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    patches.restore()
    assert "zero_grad" not in vars(model) and "clip_grad_norm_" not in vars(trainer.accelerator)
