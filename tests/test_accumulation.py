"""The gradient-accumulation self-check (training/accumulation_check.py, finetuning/check_accumulation.py): the same
records as one batch of N and as N accumulated micro-batches give the same loss and gradient, packed and padded; and
the check does catch the bug it is for (transformers issue 37197: each micro-batch's mean loss averaged)."""
from __future__ import annotations

import logging

import check_accumulation
from cli import command_line
from training import accumulation_check


def test_one_batch_and_accumulated_micro_batches_agree_packed_and_padded(caplog):
    with caplog.at_level(logging.INFO):
        assert command_line.run_cli(check_accumulation.parse_args, check_accumulation.main, []) == 0
    assert "Gradient accumulation check passed (--fast_path all)" in caplog.text
    assert "packed rows: 1 batch of 3 vs 3 x 1 accumulated" in caplog.text
    assert "padded records: 1 batch of 10 vs 10 x 1 accumulated" in caplog.text


def test_the_check_catches_micro_batch_means_averaged():
    def average_micro_batch_means(trainer):
        # What the Trainer does for a model that takes no num_items_in_batch: each micro-batch's mean loss / N.
        trainer.model_accepts_loss_kwargs = False

    outcomes = accumulation_check.check(after_build=average_micro_batch_means)
    assert [outcome.passed() for outcome in outcomes] == [False, False]
    assert all(outcome.gradient_difference > 1e-3 for outcome in outcomes)
    assert "DIFFERENT (tolerance 1e-04)" in outcomes[1].line()
