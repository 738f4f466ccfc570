"""Command-line and config-file arguments of both scripts, and run_cli's exit codes."""
from __future__ import annotations

import json
import logging

import pytest

import common
from cli import arguments
from cli import command_line
from records import data
from cli import errors
import train_galore
import train_qlora


SCRIPTS = [train_qlora, train_galore]
ids = ["qlora", "galore"]


@pytest.mark.parametrize("arg", [["--evaluation_strategy", "steps"], ["--evaluation_strategy=steps"]])
def test_renamed_flag_names_the_new_one(arg, parse):
    with pytest.raises(errors.UserInputError, match="use --eval_strategy instead"):
        parse(train_qlora, arg)


@pytest.mark.parametrize("module", SCRIPTS, ids=ids)
def test_training_arguments_flags(module, parse):
    _, _, _, _, training = parse(module, ["--per_device_train_batch_size", "3", "--learning_rate", "1e-4"])
    assert training.per_device_train_batch_size == 3
    assert training.learning_rate == 1e-4


def test_qlora_defaults(parse):
    model, data, _, lora, training = parse(train_qlora, [])
    assert training.optim == "adamw_torch_fused"
    assert training.gradient_checkpointing is True
    assert training.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert (training.learning_rate, training.max_grad_norm, training.output_dir) == (2e-4, 0.3, "outputs/qlora")
    assert (lora.lora_r, lora.lora_alpha, lora.lora_target_modules) == (16, 32, "all-linear")
    assert model.model_name_or_path == arguments.DEFAULT_MODEL and model.smoke is False
    assert data.dataset_name is None and data.max_train_samples is None


def test_galore_defaults(parse):
    _, _, _, galore, training = parse(train_galore, [])
    assert training.per_device_train_batch_size == 1
    assert training.gradient_accumulation_steps == 8
    assert training.learning_rate == 1e-5
    assert training.gradient_checkpointing is True
    assert (galore.galore_rank, galore.galore_proj_type, galore.galore_target_modules) == (128, "std", "self_attn,mlp")


@pytest.mark.parametrize("module", SCRIPTS, ids=ids)
def test_smoke_defaults(module, parse):
    _, data, _, _, training = parse(module, ["--smoke"])
    assert (training.max_steps, training.per_device_train_batch_size, training.logging_steps) == (4, 2, 1)
    assert training.gradient_checkpointing is False
    assert data.max_train_samples == 64


@pytest.mark.parametrize("module", SCRIPTS, ids=ids)
def test_smoke_keeps_what_the_user_set(module, parse):
    argv = ["--smoke", "--max_steps", "30", "--per_device_train_batch_size", "8", "--max_train_samples", "8",
            "--logging_steps", "5"]
    _, data, _, _, training = parse(module, argv)
    assert (training.max_steps, training.per_device_train_batch_size, training.logging_steps) == (30, 8, 5)
    assert data.max_train_samples == 8


def test_json_config_with_override(parse, tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"lora_r": 4, "learning_rate": 3e-4, "max_steps": 7, "report_to": ["none"],
                                  "gradient_checkpointing_kwargs": {"use_reentrant": True}}))
    _, _, _, lora, training = parse(train_qlora, [str(config), "--lora_r", "8"])
    assert lora.lora_r == 8, "the command line after the file wins"
    assert (training.learning_rate, training.max_steps) == (3e-4, 7)
    assert training.gradient_checkpointing_kwargs == {"use_reentrant": True}
    assert training.optim == "adamw_torch_fused", "script defaults still apply"


def test_yaml_config_with_override(parse, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("galore_rank: 32\ngradient_checkpointing: false\nlearning_rate: 2.0e-5\nmax_train_samples: 100\n")
    _, data, _, galore, training = parse(train_galore, [str(config), "--learning_rate", "5e-6"])
    assert galore.galore_rank == 32
    assert training.gradient_checkpointing is False
    assert training.learning_rate == 5e-6
    assert data.max_train_samples == 100


def test_missing_config_file(parse, tmp_path):
    with pytest.raises(errors.UserInputError, match="does not exist"):
        parse(train_qlora, [str(tmp_path / "missing.yaml")])


def test_config_file_must_be_a_mapping(parse, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("- lora_r\n- 8\n")
    with pytest.raises(errors.UserInputError, match="mapping"):
        parse(train_qlora, [str(config)])


def test_config_file_with_an_unknown_key(parse, tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"lora_rank": 8}))
    with pytest.raises(errors.UserInputError, match="--lora_rank"):
        parse(train_qlora, [str(config)])


def test_config_file_with_a_renamed_key(parse, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("evaluation_strategy: steps\n")
    with pytest.raises(errors.UserInputError, match="--eval_strategy"):
        parse(train_qlora, [str(config)])


# --- value checks (main() stops before any CUDA check or loading) -------------


@pytest.mark.parametrize(
    "module, argv, flag",
    [
        (train_qlora, ["--per_device_train_batch_size", "0"], "--per_device_train_batch_size"),
        (train_galore, ["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps"),
        (train_qlora, ["--learning_rate", "0"], "--learning_rate"),
        (train_galore, ["--learning_rate=-1e-4"], "--learning_rate"),
        (train_qlora, ["--max_steps", "0"], "--max_steps"),
        (train_qlora, ["--lora_r", "0"], "--lora_r"),
        (train_qlora, ["--lora_dropout", "1"], "--lora_dropout"),
        (train_galore, ["--galore_proj_type", "bogus"], "--galore_proj_type 'bogus'"),
        (train_galore, ["--galore_rank", "0"], "--galore_rank"),
        (train_galore, ["--max_seq_length", "4"], "--max_seq_length 4"),
        (train_qlora, ["--max_train_samples", "0"], "--max_train_samples"),
        (train_galore, ["--compile_layers", "maybe"], "--compile_layers 'maybe': give auto, yes or no"),
        (train_qlora, ["--offload_activations", "yes", "--gradient_checkpointing", "false"],
         "--offload_activations yes moves checkpointed layer inputs, and --gradient_checkpointing is off"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_bad_values_name_the_flag(module, argv, flag):
    # UserInputError, not the SetupError a CPU machine would give later: values are checked first
    with pytest.raises(errors.UserInputError, match=flag.replace("(", r"\(")):
        module.main(*module.parse_args(argv))


def test_check_arguments_directly():
    from transformers import TrainingArguments

    def check(**training):
        arguments.check_arguments(arguments.ModelArguments(), arguments.DataArguments(),
                                  TrainingArguments(output_dir="x", **training))

    with pytest.raises(errors.UserInputError, match="--per_device_train_batch_size must be 1 or more, got 0"):
        check(per_device_train_batch_size=0)
    with pytest.raises(errors.UserInputError, match="--learning_rate must be a positive number"):
        check(learning_rate=-1.0)
    with pytest.raises(errors.UserInputError, match="Nothing to train"):
        check(num_train_epochs=0)
    with pytest.raises(errors.UserInputError, match="--eval_strategy steps needs evaluation records"):
        check(eval_strategy="steps")
    with pytest.raises(errors.UserInputError, match="safetensors only"):
        check(save_safetensors=False)
    with pytest.raises(errors.UserInputError, match="cannot be resumed"):
        check(save_only_model=True)
    check()


# --- run_cli ------------------------------------------------------------------


def test_run_cli_setup_error_returns_2(caplog, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.ERROR):
        assert command_line.run_cli(train_galore.parse_args, train_galore.main, ["--output_dir", "unused"]) == 2
    assert "CUDA" in caplog.text


def test_run_cli_success_and_real_bugs():
    seen = []
    assert command_line.run_cli(lambda argv: (argv,), seen.append, ["--a"]) == 0
    assert seen == [["--a"]]

    def broken(argv):
        raise KeyError("a bug, not a user error")

    with pytest.raises(KeyError):  # a bug keeps its traceback
        command_line.run_cli(lambda argv: (argv,), broken, [])


def test_max_tokens_per_batch_with_packing_is_refused_before_anything_loads(monkeypatch, tmp_path):
    def fail_if_called(*args, **kwargs):
        raise AssertionError("data or model was loaded before the flags were checked")

    monkeypatch.setattr(data, "load_train_and_eval", fail_if_called)
    monkeypatch.setattr(common, "load_causal_lm", fail_if_called)
    argv = ["--smoke", "--output_dir", str(tmp_path / "out"), "--max_tokens_per_batch", "4096", "--packing",
            "--completion_only_loss", "false"]
    with pytest.raises(errors.UserInputError, match="--max_tokens_per_batch and --packing both set the batch shape"):
        train_qlora.main(*train_qlora.parse_args(argv))
    assert not (tmp_path / "out").exists()
