"""Model-side inputs that used to end in a library traceback: each is one message before the model loads."""
from __future__ import annotations

import logging
import shutil

import pytest

from cli import command_line
import common
from records import loading
from cli import errors
import train_galore
import train_qlora

SCRIPTS = {"qlora": train_qlora, "galore": train_galore}


def fails_before_the_model_loads(module, argv, caplog, monkeypatch) -> str:
    def fail_if_called(*args, **kwargs):
        raise AssertionError("the model loaded before its inputs were checked")

    monkeypatch.setattr(common, "load_causal_lm", fail_if_called)
    caplog.clear()
    assert command_line.run_cli(module.parse_args, module.main, [str(a) for a in argv]) == 2
    errors_logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors_logged) == 1 and "Traceback" not in caplog.text, caplog.text[-2000:]
    return errors_logged[0]


def smoke(out, *argv):
    return ["--smoke", "--output_dir", out, "--num_sample_prompts", "0", *argv]


@pytest.mark.parametrize("targets, unknown", [("foo", "foo"), ("q_proj,k_prj", "k_prj"), ("lm_head", "lm_head")])
def test_lora_target_modules_that_name_no_layer(targets, unknown, tmp_path, caplog, monkeypatch):
    message = fails_before_the_model_loads(train_qlora, smoke(tmp_path / "out", "--lora_target_modules", targets),
                                           caplog, monkeypatch)
    assert f"{unknown} names no linear layer" in message and "q_proj" in message and "all-linear" in message


def test_lora_target_modules_that_exist_train(tmp_path):
    trainer = train_qlora.main(*train_qlora.parse_args(smoke(tmp_path / "out", "--lora_target_modules",
                                                             "q_proj, v_proj", "--max_steps", "1")))
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in trainer.model.named_parameters()
               if "lora_A" in name}
    assert adapted == {"q_proj", "v_proj"}


@pytest.mark.parametrize("script", SCRIPTS)
def test_max_seq_length_past_the_models_context(script, tmp_path, caplog, monkeypatch):
    # The smoke model has 2,048 positions; the real gemma-3-1b 32,768.
    message = fails_before_the_model_loads(SCRIPTS[script], smoke(tmp_path / "out", "--max_seq_length", 4096),
                                           caplog, monkeypatch)
    assert "--max_seq_length 4096 is longer than the model's context of 2048 tokens" in message
    assert "Use at most 2048" in message


def test_every_record_too_long_never_suggests_more_than_the_context(tiny_tokenizer):
    from datasets import Dataset

    records = Dataset.from_dict({"text": ["word " * 3000]})
    with pytest.raises(errors.UserInputError) as error:
        loading.check_lengths(records, tiny_tokenizer, None, 1024, "long.json", context=2048)
    assert "--max_seq_length 4096" not in str(error.value) and "past the model's context of 2048" in str(error.value)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_model_folder_without_tokenizer_files(script, tiny_model_dir, tmp_path, caplog, monkeypatch):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    for path in folder.iterdir():
        if "token" in path.name or path.name == "chat_template.jinja":
            path.unlink()
    message = fails_before_the_model_loads(  # a dry run: no GPU needed, and no model loads anyway
        SCRIPTS[script], ["--dry_run", "--model_name_or_path", folder, "--output_dir", tmp_path / "out"], caplog,
        monkeypatch)
    assert "holds a model but no tokenizer" in message and "tokenizer.json" in message and str(folder) in message
    assert not (tmp_path / "out").exists()


def test_an_unreachable_hub_fails_at_once_and_names_the_offline_check(tmp_path, caplog, monkeypatch):
    import socket
    import time

    import huggingface_hub

    def no_network(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the tests set it; a user has not
    monkeypatch.setattr(socket, "create_connection", no_network)
    started = time.monotonic()
    message = fails_before_the_model_loads(train_qlora, ["--dry_run", "--output_dir", tmp_path / "out"], caplog,
                                           monkeypatch)
    assert time.monotonic() - started < 10, "no retries"
    assert "google/gemma-3-1b-it" in message and "cannot be reached" in message and "--smoke" in message
    assert "--dry_run" in message


def test_push_to_hub_without_a_network_is_refused_before_anything_loads(tmp_path, caplog, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", no_network)
    message = fails_before_the_model_loads(train_galore, smoke(tmp_path / "out", "--push_to_hub"), caplog, monkeypatch)
    assert "--push_to_hub" in message and "cannot be reached" in message and "--output_dir" in message
    assert not (tmp_path / "out").exists()


def test_behind_a_proxy_the_hub_check_stands_aside(monkeypatch):
    import socket

    from models import hub

    def no_direct_route(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_direct_route)
    assert hub.hub_unreachable() is not None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")  # downloads go through it, not a direct connect
    assert hub.hub_unreachable() is None
