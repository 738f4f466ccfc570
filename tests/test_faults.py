"""The catalogue of faults: bad inputs, a wrong installation, no GPU, a full disk, leaked secrets.

Each bad input must end in one clear message (UserInputError / SetupError / TrainingFailed
naming what is wrong, where, and the fix), exit code 2 through command_line.run_cli with no
traceback, and no half-written model (no OUTPUT_DIR/final, no OUTPUT_DIR/.final.partial).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from conftest import PLANTED_TOKEN, fails_cleanly
import common
from cli import command_line
from cli import errors
from training import checkpoints
from training import output_dir
from cli import versions
import train_galore
import train_qlora

REPO_ROOT = versions.PROJECT_DIR.parent
SCRIPTS = {"qlora": train_qlora, "galore": train_galore}
ENOSPC_MESSAGE = "No space left on device"


# --- helpers ------------------------------------------------------------------



def smoke_argv(output_dir, *argv, samples=False):
    """A smoke run's flags; without the before/after sample answers unless asked (they cost seconds here)."""
    return ["--smoke", "--output_dir", str(output_dir), *([] if samples else ["--num_sample_prompts", "0"]),
            *map(str, argv)]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def random_words(rng: random.Random, count: int) -> str:
    return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(count))


# --- bad data -----------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_columns(script, tmp_path, caplog):
    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "Say hi", "response": "Hi"}] * 3)
    message = fails_cleanly(SCRIPTS[script], smoke_argv(tmp_path / "out", "--dataset_name", data), caplog, tmp_path / "out")
    for words in ("instruction", "output", "Record 0", str(data), "prompt", "--instruction_column"):
        assert words in message, (words, message)


def test_missing_output_column(tmp_path, caplog):
    data = write_jsonl(tmp_path / "data.jsonl", [{"instruction": "Say hi", "response": "Hi"}] * 3)
    message = fails_cleanly(train_galore, smoke_argv(tmp_path / "out", "--dataset_name", data), caplog, tmp_path / "out")
    for words in ("'output'", "Record 0", str(data), "response", "--output_column"):
        assert words in message, (words, message)


@pytest.mark.parametrize("name, content", [
    ("empty.jsonl", ""), ("empty.json", ""), ("empty.csv", ""), ("blank.jsonl", "  \n\n  \n"), ("list.json", "[]"),
])
def test_empty_file(name, content, tmp_path, caplog):
    data = tmp_path / name
    data.write_text(content)
    message = fails_cleanly(train_galore, smoke_argv(tmp_path / "out", "--dataset_name", data), caplog, tmp_path / "out")
    assert "--dataset_name" in message and str(data) in message
    assert "empty" in message or "no records" in message


def test_malformed_jsonl_line_names_the_line(tmp_path, caplog):
    data = tmp_path / "data.jsonl"
    good = json.dumps({"instruction": "Say hi", "output": "Hi"})
    data.write_text(f"{good}\n{good}\n{{\"instruction\": \"Say hi\", \"output\": \"Hi\"\n{good}\n")
    message = fails_cleanly(train_qlora, smoke_argv(tmp_path / "out", "--dataset_name", data), caplog, tmp_path / "out")
    assert "line 3" in message and str(data) in message and "not valid JSON" in message


@pytest.mark.parametrize("field, value, kind", [("output", 42, "int"), ("instruction", ["a", "b"], "list"),
                                                ("input", {"x": 1}, "dict")])
def test_non_string_field(field, value, kind, tmp_path, caplog):
    records = [{"instruction": "Say hi", "input": "", "output": "Hi"} for _ in range(3)]
    records[1][field] = value
    data = write_jsonl(tmp_path / "data.jsonl", records)
    message = fails_cleanly(train_galore, smoke_argv(tmp_path / "out", "--dataset_name", data), caplog, tmp_path / "out")
    for words in (f"'{field}'", kind, "Record 1", "not a string", str(data)):
        assert words in message, (words, message)


def test_no_records_left_after_dropping_blank_ones(tmp_path, caplog):
    data = write_jsonl(tmp_path / "data.jsonl", [{"instruction": f"Question {i}", "output": " \n"} for i in range(5)])
    message = fails_cleanly(train_qlora, smoke_argv(tmp_path / "out", "--dataset_name", data), caplog, tmp_path / "out")
    assert "blank" in message and "nothing is left to train on" in message and str(data) in message


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_record_longer_than_max_seq_length(script, tmp_path, caplog):
    rng = random.Random(0)
    records = [{"instruction": random_words(rng, 30), "output": random_words(rng, 60)} for _ in range(8)]
    data = write_jsonl(tmp_path / "data.jsonl", records)
    argv = smoke_argv(tmp_path / "out", "--dataset_name", data, "--max_seq_length", 16)
    message = fails_cleanly(SCRIPTS[script], argv, caplog, tmp_path / "out")
    assert "--max_seq_length 16" in message and "Every record" in message and str(data) in message


def test_some_records_longer_than_max_seq_length_still_train(tmp_path):
    """Only when *all* records are too long is it an error: a few long ones are cut and the run goes on."""
    rng = random.Random(1)
    records = [{"instruction": "Say hi", "output": "Hi"} for _ in range(6)]
    records += [{"instruction": random_words(rng, 30), "output": random_words(rng, 60)} for _ in range(2)]
    data = write_jsonl(tmp_path / "data.jsonl", records)
    trainer = train_galore.main(*train_galore.parse_args(smoke_argv(tmp_path / "out", "--dataset_name", data, "--max_seq_length", 16,
                                           "--max_steps", 2)))
    assert trainer.state.global_step == 2 and (tmp_path / "out" / "final" / "model.safetensors").is_file()


# --- the model path -----------------------------------------------------------


def _fp32():
    return common.Precision(False, False, torch.float32, "test")


def test_unreachable_hub_model_explains_the_gate_and_the_token():
    with pytest.raises(errors.UserInputError) as info:
        common.load_tokenizer("google/gemma-3-does-not-exist")
    message = str(info.value)
    assert "google/gemma-3-does-not-exist" in message and "HF_TOKEN" in message and "license" in message


@pytest.mark.parametrize("script", SCRIPTS)
def test_model_path_that_does_not_exist_through_main(script, tmp_path, caplog, monkeypatch):
    """Without --smoke main() needs CUDA first; with the GPU checks stubbed, the bad path is the one message."""
    monkeypatch.setattr(common, "require_cuda", lambda what: None)
    monkeypatch.setattr(common, "choose_precision", lambda args, on_cpu: _fp32())
    missing = tmp_path / "no_such_model"
    argv = ["--model_name_or_path", missing, "--output_dir", tmp_path / "out", "--max_steps", 1]
    message = fails_cleanly(SCRIPTS[script], argv, caplog, tmp_path / "out")
    assert "--model_name_or_path" in message and str(missing) in message


# --- an output dir that holds an earlier run ----------------------------------


@pytest.fixture
def earlier_run(finished_runs):
    """A finished GaLore smoke run: checkpoint-2, checkpoint-4 and final. Copy it before changing it."""
    out = finished_runs["galore"].output_dir
    assert {p.name for p in out.iterdir()} >= {"checkpoint-2", "checkpoint-4", "final"}
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(run, out)
    return out


def test_earlier_run_is_refused(earlier_run, tmp_path, caplog):
    out = copy_of(earlier_run, tmp_path)
    final_weights = (out / "final" / "model.safetensors").read_bytes()
    caplog.clear()
    exit_code = command_line.run_cli(train_galore.parse_args, train_galore.main, smoke_argv(out, "--overwrite_output_dir", "False"))
    assert exit_code == 2 and "Traceback" not in caplog.text
    [error] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    for words in (str(out), "checkpoint-2", "--resume_from_checkpoint latest", "--overwrite_output_dir", "--output_dir"):
        assert words in error, (words, error)
    assert (out / "final" / "model.safetensors").read_bytes() == final_weights, "the refused run touched final"


def trained_files(out: Path) -> dict:
    """The earlier run's checkpoints and model, byte for byte (the smoke base model is rebuilt by every smoke run)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*")
            if p.is_file() and p.relative_to(out).parts[0] != "smoke_base_model"}


@pytest.mark.parametrize("bad_input", [
    ["--dataset_name", "typo.jsonl"],  # found when the data loads
    ["--max_seq_length", "16"],  # found once the tokenizer has measured every record
    ["--galore_target_modules", "nothing"],  # found once the model has loaded
], ids=["missing data file", "every record too long", "no layer to project"])
def test_overwrite_keeps_the_earlier_run_until_every_input_has_passed(bad_input, earlier_run, tmp_path, caplog):
    out = copy_of(earlier_run, tmp_path)
    before = trained_files(out)
    assert command_line.run_cli(train_galore.parse_args, train_galore.main,
                             smoke_argv(out, "--overwrite_output_dir", *bad_input)) == 2
    assert "removed the earlier run" not in caplog.text
    assert trained_files(out) == before, "a run that failed its checks deleted the earlier run"


def test_a_smoke_run_never_takes_a_config_files_output_dir(tmp_path, monkeypatch, parse):
    """`train_qlora.py configs/qlora_t4.yaml --smoke` next to a real run in the config's outputs/qlora_t4."""
    monkeypatch.chdir(tmp_path)
    real_run = tmp_path / "outputs" / "qlora_t4"
    for folder in ("checkpoint-1200", "final"):
        (real_run / folder).mkdir(parents=True)
        (real_run / folder / "adapter_model.safetensors").write_bytes(b"weeks of training")
    config = REPO_ROOT / "configs" / "qlora_t4.yaml"
    argv = [str(config), "--smoke", "--num_sample_prompts", "0", "--max_steps", "1"]
    *_, training_args = parse(train_qlora, argv)
    assert training_args.output_dir == "outputs/qlora-smoke"
    train_qlora.main(*parse(train_qlora, argv))
    assert (tmp_path / "outputs" / "qlora-smoke" / "final" / "adapter_model.safetensors").is_file()
    assert trained_files(real_run) == {f"{f}/adapter_model.safetensors": b"weeks of training"
                                       for f in ("checkpoint-1200", "final")}


def test_a_smoke_run_never_replaces_nor_resumes_a_run_it_did_not_write(tmp_path):
    out = tmp_path / "out"
    (out / "final").mkdir(parents=True)
    args = transformers.TrainingArguments(output_dir=str(out), overwrite_output_dir=True, report_to=[])
    with pytest.raises(errors.UserInputError, match="--smoke did not write"):
        output_dir.plan_output_dir(args, smoke=True)
    resume = transformers.TrainingArguments(output_dir=str(out), resume_from_checkpoint="latest", report_to=[])
    with pytest.raises(errors.UserInputError, match="--smoke did not write"):
        output_dir.plan_output_dir(resume, smoke=True)
    (out / "smoke_base_model").mkdir()  # an earlier smoke run: the next one replaces it
    assert output_dir.plan_output_dir(args, smoke=True).replaces == [out / "final"]


def test_a_real_run_replaces_a_smoke_runs_whole_folder_and_never_resumes_it(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (out / "smoke_base_model").mkdir()
    resume = transformers.TrainingArguments(output_dir=str(out), resume_from_checkpoint="latest", report_to=[])
    with pytest.raises(errors.UserInputError, match="holds a --smoke run"):
        output_dir.plan_output_dir(resume)
    overwrite = transformers.TrainingArguments(output_dir=str(out), overwrite_output_dir=True, report_to=[])
    # With the tiny model gone too, a later smoke run cannot take the real run's checkpoints for its own.
    assert output_dir.plan_output_dir(overwrite).replaces == [out / "checkpoint-2", out / "smoke_base_model"]


def test_overwrite_replaces_the_merged_model_and_gguf_files_made_from_the_earlier_final(tmp_path):
    out = tmp_path / "out"
    for name in ("final", "merged", "gguf", "notes"):
        (out / name).mkdir(parents=True)
    overwrite = transformers.TrainingArguments(output_dir=str(out), overwrite_output_dir=True, report_to=[])
    assert output_dir.plan_output_dir(overwrite).replaces == [out / "final", out / "gguf", out / "merged"]


@pytest.mark.parametrize("leftover", ["checkpoint-7", "final"])
def test_any_earlier_output_is_refused(leftover, tmp_path):
    out = tmp_path / "out"
    (out / leftover).mkdir(parents=True)
    args = transformers.TrainingArguments(output_dir=str(out), overwrite_output_dir=False, report_to=[])
    with pytest.raises(errors.UserInputError, match=leftover):
        output_dir.plan_output_dir(args)


def test_earlier_run_is_overwritten_with_overwrite_output_dir(earlier_run, tmp_path):
    out = copy_of(earlier_run, tmp_path)
    trainer = train_galore.main(*train_galore.parse_args(smoke_argv(out, "--overwrite_output_dir", "--seed", 7, "--max_steps", 2)))
    assert trainer.state.global_step == 2
    assert json.loads((out / "final" / "config.json").read_text())
    assert (out / "final" / "model.safetensors").read_bytes() != (earlier_run / "final" / "model.safetensors").read_bytes()


def test_overwrite_output_dir_removes_the_earlier_runs_checkpoints(earlier_run, tmp_path):
    out = copy_of(earlier_run, tmp_path)  # checkpoint-2, checkpoint-4, final
    train_galore.main(*train_galore.parse_args(smoke_argv(out, "--overwrite_output_dir", "--max_steps", 2, "--save_strategy", "steps",
                                 "--save_steps", 1, "--save_total_limit", 10)))
    folders = sorted(p.name for p in out.glob("checkpoint-*"))
    assert folders == ["checkpoint-1", "checkpoint-2"], folders
    assert checkpoints.latest_complete_checkpoint(out) == str(out / "checkpoint-2")


def test_earlier_run_is_resumed_with_resume_from_checkpoint_latest(earlier_run, tmp_path, caplog):
    out = copy_of(earlier_run, tmp_path)
    (out / "checkpoint-6").mkdir()  # cut off mid-save: no trainer_state.json; must not be chosen
    (out / "checkpoint-6" / "model.safetensors").write_bytes(b"\0" * 10)
    shutil.rmtree(out / "checkpoint-4")
    caplog.set_level(logging.INFO)
    trainer = train_galore.main(*train_galore.parse_args(smoke_argv(out, "--overwrite_output_dir", "False", "--resume_from_checkpoint", "latest",
                                           "--max_steps", 4, "--save_strategy", "steps", "--save_steps", 2)))
    assert f"Resuming from the latest complete checkpoint, {out / 'checkpoint-2'}" in caplog.text
    assert trainer.state.global_step == 4
    assert (out / "final" / "model.safetensors").is_file()


def test_resume_latest_with_no_checkpoint(tmp_path, caplog):
    out = tmp_path / "out"
    (out / "checkpoint-3").mkdir(parents=True)  # incomplete
    (out / "smoke_base_model").mkdir()  # an earlier smoke run's folder, which a smoke run may resume
    message = fails_cleanly(train_qlora, smoke_argv(out, "--resume_from_checkpoint", "latest"), caplog, out)
    assert "no complete checkpoint" in message and str(out) in message and "--resume_from_checkpoint" in message


def test_resume_from_an_incomplete_checkpoint_names_the_latest_complete_one(earlier_run, tmp_path, caplog):
    out = copy_of(earlier_run, tmp_path)
    shutil.rmtree(out / "final")
    (out / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4, "log_hi')  # cut off mid-write
    message = fails_cleanly(train_galore, smoke_argv(out, "--resume_from_checkpoint", out / "checkpoint-5"), caplog, out)
    assert "checkpoint-5" in message and "trainer_state.json" in message and str(out / "checkpoint-2") in message


# --- bad numbers and flags ----------------------------------------------------


@pytest.mark.parametrize("flag, value", [
    ("--per_device_train_batch_size", "0"), ("--per_device_train_batch_size", "-2"),
    ("--gradient_accumulation_steps", "0"),
    ("--learning_rate", "0"), ("--learning_rate", "-1e-4"), ("--learning_rate", "nan"), ("--learning_rate", "inf"),
])
@pytest.mark.parametrize("script", SCRIPTS)
def test_zero_or_negative_batch_size_and_learning_rate(script, flag, value, tmp_path, caplog):
    # `--flag=-1` form: argparse reads a separate "-1e-4" as a flag (that case is the next test).
    message = fails_cleanly(SCRIPTS[script], smoke_argv(tmp_path / "out", f"{flag}={value}"), caplog, tmp_path / "out")
    assert flag in message and "got" in message
    assert not (tmp_path / "out").exists(), "nothing is written before the arguments are checked"


def test_negative_value_after_a_space_still_names_the_flag(tmp_path, caplog):
    message = fails_cleanly(train_galore, smoke_argv(tmp_path / "out", "--learning_rate", "-1e-4"), caplog, tmp_path / "out")
    assert "--learning_rate" in message
    assert not (tmp_path / "out").exists(), "nothing is written before the arguments are checked"


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_flag(script, tmp_path, caplog):
    message = fails_cleanly(SCRIPTS[script], smoke_argv(tmp_path / "out", "--not_a_flag", 3), caplog, tmp_path / "out")
    assert "--not_a_flag" in message and "--help" in message


def test_a_flag_cut_short_is_unknown(tmp_path, caplog):
    message = fails_cleanly(train_galore, smoke_argv(tmp_path / "out", "--learning_rat", "1e-4", "--max_steps", 1),
                            caplog, tmp_path / "out")
    assert "--learning_rat" in message and "--help" in message


def test_hub_token_cut_short_is_rejected_without_echoing_it(tmp_path, caplog):
    out = tmp_path / "out"
    argv = smoke_argv(out, "--hub_tok", "hf_cmdlineSECRET0123", "--max_steps", 1, "--save_strategy", "steps",
                      "--save_steps", 1)
    caplog.clear()
    exit_code = command_line.run_cli(train_galore.parse_args, train_galore.main, argv)
    leaked = [str(p) for p in out.rglob("*") if p.is_file() and b"hf_cmdlineSECRET0123" in p.read_bytes()]
    assert not leaked, f"the token given on the command line was saved in {leaked}"
    assert exit_code == 2 and "--hub_tok" in caplog.text
    assert "hf_cmdlineSECRET0123" not in caplog.text, "the rejected token was echoed to the log"


def test_hub_token_spelt_with_dashes_points_to_hf_token(tmp_path, caplog):
    out = tmp_path / "out"
    message = fails_cleanly(train_galore, smoke_argv(out, "--hub-token", "hf_cmdlineSECRET0123", "--max_steps", 1),
                            caplog, out)
    assert "HF_TOKEN" in message and "hf_cmdlineSECRET0123" not in caplog.text


@pytest.mark.parametrize("argv", [["--hub_token", "hf_cmdlineSECRET0123"], ["--hub_token=hf_cmdlineSECRET0123"]])
def test_hub_token_flag_points_to_hf_token(argv, tmp_path, caplog):
    message = fails_cleanly(train_qlora, smoke_argv(tmp_path / "out", *argv), caplog, tmp_path / "out")
    assert "--hub_token" in message and "HF_TOKEN" in message
    assert "hf_cmdlineSECRET0123" not in caplog.text, "the rejected token was echoed to the log"


# --- versions -----------------------------------------------------------------


@pytest.mark.parametrize("package, planted, shown", [
    ("transformers", "5.0.0", "found 5.0.0"), ("trl", "0.9.4", "found 0.9.4"),
    ("bitsandbytes", None, "found not installed"),
])
def test_wrong_version_is_one_message_with_the_fix(package, planted, shown):
    pins = versions.read_pins()
    installed = {name: pins[versions.normalise(name)] for name in versions.CHECKED_PACKAGES}
    installed[package] = planted
    with pytest.raises(errors.SetupError) as info:
        versions.check_versions(installed=installed)
    message = str(info.value)
    assert f"{package}: {shown}, need {pins[package]}" in message
    assert "pip install -r" in message and f"{package}=={pins[package]}" in message
    assert message.count(": found ") == 1, "only the wrong package is listed"


VERSION_PROBE = """
import atexit, importlib.metadata as metadata, runpy, sys
atexit.register(lambda: print("TORCH_IMPORTED=" + str("torch" in sys.modules)))
real_version = metadata.version
metadata.version = lambda name: {planted!r} if name == {package!r} else real_version(name)
sys.path.insert(0, "finetuning")
sys.argv = ["finetuning/{script}.py", "--smoke"]
runpy.run_path("finetuning/{script}.py", run_name="__main__")
"""


@pytest.mark.parametrize("package, planted", [("transformers", "5.0.0"), ("trl", "0.12.0"), ("bitsandbytes", "0.42.0")])
@pytest.mark.parametrize("script", ["train_qlora", "train_galore"])
def test_wrong_version_stops_the_script_before_torch_loads(script, package, planted):
    code = VERSION_PROBE.format(planted=planted, package=package, script=script)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    need = versions.read_pins()[package]
    assert result.returncode != 0
    assert f"{package}: found {planted}, need {need}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert "TORCH_IMPORTED=False" in result.stdout, "the version check must run before torch/transformers load"


# --- no GPU -------------------------------------------------------------------



@pytest.mark.parametrize("script, what", [("galore", "GaLore with 8-bit optimizer states"), ("qlora", "QLoRA")])
def test_without_cuda_the_real_run_says_use_a_gpu_or_smoke(script, what, no_gpu, tmp_path, caplog):
    out = tmp_path / "out"
    message = fails_cleanly(SCRIPTS[script], ["--output_dir", out], caplog, out)
    for words in (what, "CUDA", "--smoke", "Colab"):
        assert words in message, (words, message)
    assert not out.exists()


# --- a full disk --------------------------------------------------------------


def enospc(path=""):
    return OSError(errno.ENOSPC, ENOSPC_MESSAGE, str(path))


def safetensors_enospc():
    """What safetensors really raises on a full disk (checked on a 2 MB tmpfs): not an OSError."""
    from safetensors import SafetensorError

    return SafetensorError(f"Error while serializing: I/O error: {ENOSPC_MESSAGE} (os error 28)")


def fail_checkpoint_save(monkeypatch, step: int, error_factory):
    """Trainer._save_checkpoint writes part of checkpoint-<step>, then the disk is full."""
    original = transformers.Trainer._save_checkpoint

    def save_checkpoint(self, model, trial):
        if self.state.global_step != step:
            return original(self, model, trial)
        folder = Path(self.args.output_dir) / f"checkpoint-{step}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.safetensors").write_bytes(b"\0" * 100)  # half-written
        raise error_factory(folder / "model.safetensors")

    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", save_checkpoint)


@pytest.mark.parametrize("script", SCRIPTS)
def test_full_disk_while_saving_a_checkpoint(script, tmp_path, caplog, monkeypatch):
    out = tmp_path / "out"
    fail_checkpoint_save(monkeypatch, 4, enospc)
    argv = smoke_argv(out, "--save_strategy", "steps", "--save_steps", 2)
    message = fails_cleanly(SCRIPTS[script], argv, caplog, out)
    for words in ("disk", ENOSPC_MESSAGE, "--save_total_limit", "--save_steps", "--resume_from_checkpoint",
                  str(out / "checkpoint-2")):
        assert words in message, (words, message)
    assert checkpoints.latest_complete_checkpoint(out) == str(out / "checkpoint-2")

    # With space again, the advised resume finishes the run.
    monkeypatch.undo()
    trainer = SCRIPTS[script].main(*SCRIPTS[script].parse_args(argv + ["--resume_from_checkpoint", "latest"]))
    assert trainer.state.global_step == 4
    assert (out / "final").is_dir() and not (out / ".final.partial").exists()


def test_full_disk_while_saving_a_checkpoint_as_safetensors_reports_it(tmp_path, caplog, monkeypatch):
    import safetensors.torch

    out = tmp_path / "out"
    original = safetensors.torch.serialize_file

    def serialize_file(tensors, filename, metadata=None):
        if "checkpoint-4" in str(filename):
            Path(filename).write_bytes(b"\0" * 100)
            raise safetensors_enospc()
        return original(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "serialize_file", serialize_file)
    message = fails_cleanly(train_galore, smoke_argv(out, "--save_strategy", "steps", "--save_steps", 2), caplog, out)
    assert "--save_total_limit" in message and str(out / "checkpoint-2") in message


def fail_final_save(monkeypatch, error_factory):
    """trainer.save_model(OUTPUT_DIR/.final.partial) writes part of the model, then the disk is full."""
    original = transformers.Trainer.save_model

    def save_model(self, output_dir=None, _internal_call=False):
        if output_dir is None or not str(output_dir).endswith(".partial"):
            return original(self, output_dir, _internal_call)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"\0" * 100)
        raise error_factory(Path(output_dir) / "model.safetensors")

    monkeypatch.setattr(transformers.Trainer, "save_model", save_model)


@pytest.mark.parametrize("script", SCRIPTS)
def test_full_disk_while_saving_the_final_model(script, tmp_path, caplog, monkeypatch):
    out = tmp_path / "out"
    fail_final_save(monkeypatch, enospc)
    message = fails_cleanly(SCRIPTS[script], smoke_argv(out, "--save_strategy", "steps", "--save_steps", 2), caplog, out)
    for words in (str(out / "final"), ENOSPC_MESSAGE, "Free disk space", "--output_dir",
                  f"--resume_from_checkpoint {out / 'checkpoint-4'}", "Nothing half-written"):
        assert words in message, (words, message)


def test_full_disk_while_saving_the_final_model_as_safetensors(tmp_path, caplog, monkeypatch):
    out = tmp_path / "out"
    fail_final_save(monkeypatch, lambda path: safetensors_enospc())
    message = fails_cleanly(train_galore, smoke_argv(out), caplog, out)
    assert "Free disk space" in message


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a folder on a tmpfs of that size (root only; skipped where mounting is not allowed)."""
    mounted = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("needs root to mount a small tmpfs")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.parametrize("size, save_argv", [
    ("2m", ["--save_strategy", "steps", "--save_steps", "2"]),  # the base model fits; checkpoint-4 does not
    ("1m", []),  # the base model fits; the final model does not
])
def test_a_really_full_disk(size, save_argv, small_disk, caplog):
    out = small_disk(size) / "out"
    message = fails_cleanly(train_galore, smoke_argv(out, *save_argv), caplog, out)
    assert ENOSPC_MESSAGE in message and "--resume_from_checkpoint" in message


# --- secrets and the weights format (whole script runs) -----------------------

@pytest.mark.parametrize("script", SCRIPTS)
def test_hf_token_is_never_printed_nor_saved(script, finished_runs):
    out, output = finished_runs[script].output_dir, finished_runs[script].output
    assert PLANTED_TOKEN.encode() not in output
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.parent.name == "checkpoint-4" for p in files) and any(p.parent.name == "final" for p in files)
    leaked = [str(p) for p in files if PLANTED_TOKEN.encode() in p.read_bytes()]
    assert not leaked, f"HF_TOKEN found in {leaked}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_weights_are_saved_as_safetensors_only(script, finished_runs):
    out = finished_runs[script].output_dir
    pickled = [str(p) for p in out.rglob("*.bin") if p.name != "training_args.bin"]
    pickled += [str(p) for p in out.rglob("*") if p.name in ("pytorch_model.bin", "adapter_model.bin")]
    assert not pickled, pickled
    weights = "adapter_model.safetensors" if script == "qlora" else "model.safetensors"
    for folder in ("checkpoint-2", "checkpoint-4", "final"):
        assert (out / folder / weights).is_file(), (folder, sorted(p.name for p in (out / folder).iterdir()))


# --- --auto_find_batch_size ---------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_auto_find_batch_size_runs(script, tmp_path, monkeypatch):
    """A smoke run with --auto_find_batch_size; it also records that no remote code is trusted on loading."""
    trusted = []

    def spy(cls):
        original = cls.from_pretrained.__func__

        def from_pretrained(klass, *args, **kwargs):
            trusted.append((klass.__name__, kwargs.get("trust_remote_code", False)))
            return original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(from_pretrained))

    spy(transformers.AutoTokenizer)
    spy(transformers.AutoModelForCausalLM)
    trainer = SCRIPTS[script].main(*SCRIPTS[script].parse_args(smoke_argv(tmp_path / "out", "--auto_find_batch_size", samples=True)))
    assert trainer.args.auto_find_batch_size
    assert trainer.state.global_step == 4
    weights = "adapter_model.safetensors" if script == "qlora" else "model.safetensors"
    assert (tmp_path / "out" / "final" / weights).is_file()
    assert {"AutoTokenizer", "AutoModelForCausalLM"} <= {name for name, _ in trusted}
    assert not any(flag for _, flag in trusted), trusted
