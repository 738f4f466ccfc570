"""Batching by tokens (--max_tokens_per_batch): every record once per epoch, no batch over budget, resumable."""
from __future__ import annotations

import random

import pytest
from safetensors.torch import load_file

from cli import arguments
from records import batching
from cli import errors
from training import reports
import train_galore


def test_every_record_once_and_no_batch_over_budget():
    lengths = [random.Random(i).randint(5, 300) for i in range(500)]
    sampler = batching.TokenBudgetBatchSampler(lengths, max_tokens=1024, seed=1)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert sorted(i for batch in batches for i in batch) == list(range(500))
        assert all(max(lengths[i] for i in batch) * len(batch) <= 1024 for batch in batches)
        assert len(batches) == len(sampler)
        # The fullest batch comes first, so an out-of-memory error shows at once.
        padded = [max(lengths[i] for i in b) * len(b) for b in batches]
        assert padded[0] == max(padded)
    # Similar lengths share a batch: far less padding than random batches of the same count.
    waste = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    assert waste < 0.15 * sum(lengths)


def test_order_changes_per_epoch_and_is_reproducible():
    lengths = list(range(10, 210))
    first = batching.TokenBudgetBatchSampler(lengths, 800, seed=3)
    again = batching.TokenBudgetBatchSampler(lengths, 800, seed=3)
    assert list(first) == list(again)
    first.set_epoch(1)
    assert list(first) != list(again)


def test_budget_below_max_seq_length_is_refused(parse):
    model, data, _, _, training = parse(train_galore, ["--max_seq_length", "1024", "--max_tokens_per_batch", "512"])
    with pytest.raises(errors.UserInputError, match="--max_tokens_per_batch 512 must be at least --max_seq_length"):
        arguments.check_arguments(model, data, training)


def test_token_batched_training_resumes_to_the_same_weights(tmp_path):
    flags = ["--smoke", "--max_tokens_per_batch", "1024", "--max_steps", "6", "--save_strategy", "steps",
             "--save_steps", "3", "--seed", "3", "--learning_rate", "1e-3", "--num_sample_prompts", "0"]
    train_galore.main(*train_galore.parse_args([*flags, "--output_dir", str(tmp_path / "straight")]))
    interrupted = tmp_path / "interrupted"
    train_galore.main(*train_galore.parse_args([*flags, "--output_dir", str(interrupted)]))
    for leftover in ("checkpoint-6", "final"):
        import shutil

        shutil.rmtree(interrupted / leftover)
    train_galore.main(*train_galore.parse_args([*flags, "--output_dir", str(interrupted), "--resume_from_checkpoint", "latest"]))
    straight = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    resumed = load_file(str(interrupted / "final" / "model.safetensors"))
    assert all((straight[name] - resumed[name]).abs().max() <= 1e-6 for name in straight)


def test_dry_run_predicts_the_packed_runs_step_count(tmp_path, caplog, monkeypatch):
    flags = ["--smoke", "--max_tokens_per_batch", "1024", "--max_seq_length", "256", "--max_steps", "-1",
             "--num_train_epochs", "1", "--num_sample_prompts", "0"]
    caplog.set_level("INFO")
    reported = {}
    real_report = reports.dry_run_report
    monkeypatch.setattr(reports, "dry_run_report", lambda *args, **kwargs: reported.update(real_report(*args, **kwargs)))
    assert train_galore.main(*train_galore.parse_args([*flags, "--dry_run", "--output_dir", str(tmp_path / "dry")])) is None
    assert "Packed without padding" in caplog.text
    trainer = train_galore.main(*train_galore.parse_args([*flags, "--output_dir", str(tmp_path / "run")]))
    assert trainer.state.max_steps == reported["optimizer_steps_per_epoch"] > 1
