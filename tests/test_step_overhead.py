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
