"""The training guards: a NaN loss stops the run, an out-of-memory error says what to lower and where to resume."""
from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments

from cli import command_line
from cli import errors
from training import loop


def tiny_trainer(model_dir, tokenizer, output_dir, **args):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    texts = ["<start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\nhi<end_of_turn>\n"] * 8
    dataset = Dataset.from_dict(dict(tokenizer(texts)))
    training_args = TrainingArguments(
        output_dir=str(output_dir), max_steps=6, logging_steps=1, per_device_train_batch_size=2,
        report_to=[], use_cpu=True, save_strategy="no", **args,
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    return Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator)


def test_nan_loss_stops_training_with_advice(tiny_model_dir, tiny_tokenizer, tmp_path):
    trainer = tiny_trainer(tiny_model_dir, tiny_tokenizer, tmp_path)
    with torch.no_grad():
        trainer.model.model.norm.weight.fill_(float("nan"))

    with pytest.raises(errors.TrainingFailed, match="--learning_rate") as error:
        loop.train(trainer)

    assert "step 1" in str(error.value)  # stopped at the first logged step, not after all 6
    assert trainer.state.global_step == 1
    # TrainingArguments' own default filter would have logged the NaN step as 0.0, hiding it from the guard
    assert math.isnan(trainer.state.log_history[-1]["loss"])


def test_finite_training_is_untouched(tiny_model_dir, tiny_tokenizer, tmp_path):
    trainer = tiny_trainer(tiny_model_dir, tiny_tokenizer, tmp_path)
    loop.train(trainer)
    assert trainer.state.global_step == 6



def out_of_memory(**kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")

def test_out_of_memory_names_the_settings_and_the_checkpoint(tiny_model_dir, tiny_tokenizer, tmp_path, monkeypatch):
    trainer = tiny_trainer(tiny_model_dir, tiny_tokenizer, tmp_path)
    (tmp_path / "checkpoint-40").mkdir()
    (tmp_path / "checkpoint-40" / "trainer_state.json").write_text("{}")
    for name in ("optimizer.pt", "scheduler.pt"):
        torch.save({}, tmp_path / "checkpoint-40" / name)
    trainer.save_model(str(tmp_path / "checkpoint-40"))
    (tmp_path / "checkpoint-50").mkdir()  # cut off mid-save: no trainer_state.json

    monkeypatch.setattr(trainer, "train", out_of_memory)
    with pytest.raises(errors.TrainingFailed) as error:
        loop.train(trainer)
    message = str(error.value)
    for advice in ("--per_device_train_batch_size", "--max_seq_length", "--gradient_checkpointing",
                   "--auto_find_batch_size", "checkpoint-40"):
        assert advice in message
    assert "checkpoint-50" not in message
    assert isinstance(error.value.__cause__, torch.OutOfMemoryError)


def test_out_of_memory_with_token_batches_names_the_token_budget(tiny_model_dir, tiny_tokenizer, tmp_path, monkeypatch):
    # Token batches are the default: halving --per_device_train_batch_size would change nothing there.
    trainer = tiny_trainer(tiny_model_dir, tiny_tokenizer, tmp_path)
    trainer.max_tokens, trainer.row_tokens = 32768, 1024  # as batching.TokenBudgetSFTTrainer holds them

    monkeypatch.setattr(trainer, "train", out_of_memory)
    with pytest.raises(errors.TrainingFailed) as error:
        loop.train(trainer)
    message = str(error.value)
    assert "(32,768 tokens a batch" in message
    assert "--max_tokens_per_batch 16384 --gradient_accumulation_steps 2 (the same tokens a step)" in message
    assert "--per_device_train_batch_size" not in message and "--auto_find_batch_size" not in message


def test_run_cli_turns_a_training_failure_into_exit_code_2(caplog):
    def failing_main(*parsed):
        raise errors.TrainingFailed("The training loss became nan at step 3")

    assert command_line.run_cli(lambda argv: (), failing_main, []) == 2
    assert "nan at step 3" in caplog.text
