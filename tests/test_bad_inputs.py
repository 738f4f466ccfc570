"""Every input answered, round 3 (issue 24): each class of bad input a new user tried ends in one message that says
what is wrong, where, and the fix (exit code 2, no traceback, nothing written), or in one warning where the input
can train; and the smaller things a user sees. The two-runs lock is in test_run_lock.py, the signals during saves
and exports in test_signals_during_save.py.

Most cases run the script's own command line in-process (conftest.fails_cleanly), with --smoke, and stop
before a model loads; a few read what the session's finished smoke runs left (conftest.finished_runs).
"""
from __future__ import annotations

import gzip
import json
import logging
import shutil
import sys
import time
import warnings
from pathlib import Path

import pytest

from conftest import fails_cleanly
import export_gguf
import train_galore
import train_qlora
from cli import errors, noise
from export import parity
from records import data
from cli.arguments import DataArguments
from training import loop, run_lock, saved_settings

SCRIPTS = {"qlora": train_qlora, "galore": train_galore}
RECORDS = [{"instruction": f"Name the number {i}.", "input": "", "output": f"It is {i}."} for i in range(8)]
CHAT = [{"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": f"Hello {i}."}]}
        for i in range(3)]


def refused(argv, caplog, module=train_qlora, out=None, config=None) -> str:
    """The script's command line (after `config`, a config file) with --smoke, its own --output_dir and no samples
    unless given: one message, exit 2, and no trained model. Returns the message."""
    given = [str(a).split("=")[0] for a in argv]
    quiet = [flag for flag in (["--num_sample_prompts", "0"], ["--report_card_prompts", "0"]) if flag[0] not in given]
    argv = [*([] if "--output_dir" in given else ["--output_dir", out]), *sum(quiet, []), *argv]
    out = Path(str(argv[[str(a) for a in argv].index("--output_dir") + 1]))
    message = fails_cleanly(module, [*([config] if config else []), "--smoke", *argv], caplog)
    assert not (out / "final").exists() and not (out / ".final.partial").exists()
    assert not (out / run_lock.LOCK_NAME).exists()
    return message


def has_all(message: str, *words: str) -> None:
    missing = [w for w in words if w not in message]
    assert not missing, f"{missing} not in: {message}"


def jsonl(records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


# --- numeric flags, each range-checked with its name ---------------------------------------------------------------

BAD_NUMBERS = {
    "sample_max_new_tokens 0": (["--sample_max_new_tokens", "0"], ["--sample_max_new_tokens must be 1 or more, got 0",
                                                                   "--num_sample_prompts 0"]),
    "num_sample_prompts -1": (["--num_sample_prompts=-1"], ["--num_sample_prompts must be 0 (no samples) or more, "
                                                           "got -1"]),
    "save_total_limit 0": (["--save_total_limit", "0"], ["--save_total_limit 0", "keeps every checkpoint",
                                                        "Give 1 or more"]),
    "num_train_epochs 0 under --smoke": (["--num_train_epochs", "0"], ["--num_train_epochs 0.0 asks for no training",
                                                                      "--max_steps 4"]),
    "save_steps 0": (["--save_strategy", "steps", "--save_steps", "0"], ["--save_steps must be above 0, got 0"]),
    "seed -1": (["--seed=-1"], ["--seed must be from 0 to 4294967295", "got -1"]),
    "max_grad_norm -1": (["--max_grad_norm=-1"], ["--max_grad_norm must be 0 or more, got -1"]),
    "per_device_eval_batch_size 0": (["--per_device_eval_batch_size", "0"], ["--per_device_eval_batch_size must be "
                                                                            "above 0"]),
}


@pytest.mark.parametrize("case", BAD_NUMBERS)
def test_a_numeric_flag_out_of_range_names_the_flag(case, tmp_path, caplog):
    argv, words = BAD_NUMBERS[case]
    has_all(refused(argv, caplog, out=tmp_path / "out"), *words)
    assert not (tmp_path / "out").exists(), "refused before the output folder was made"


def test_lora_r_larger_than_the_layers_is_refused_before_the_model_loads(tmp_path, caplog):
    message = refused(["--lora_r", "4096"], caplog, out=tmp_path / "out")
    has_all(message, "--lora_r 4096 is larger than the smaller side of", "(32)", "Use --lora_r 32 or less",
            "the --smoke model is 64 wide")


def test_fp16_and_bf16_together_are_refused_by_name(caplog):
    message = fails_cleanly(train_qlora, ["--fp16", "--bf16"], caplog)
    has_all(message, "--fp16 and --bf16 are both given", "give one")
    assert "Your setup doesn't support" not in message


# --- empty values ----------------------------------------------------------------------------------------------------


def test_empty_output_dir_is_refused_before_anything_is_written(tmp_path, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Path("") is the current folder: the smoke model used to land here
    message = fails_cleanly(train_qlora, ["--smoke", "--output_dir", ""], caplog)
    has_all(message, "--output_dir is empty ('')", "--output_dir outputs/my_run")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag, words", [
    ("--dataset_name", ["--dataset_name is empty ('')", "the toolkit's default data"]),
    ("--eval_file", ["--eval_file is empty ('')", "leave the flag out"]),
    ("--model_name_or_path", ["--model_name_or_path is empty ('')", "google/gemma-3-1b-it"]),
])
def test_an_empty_value_says_it_is_empty(flag, words, tmp_path, caplog):
    message = refused([flag, ""], caplog, out=tmp_path / "out")
    has_all(message, *words)
    assert "is a directory" not in message


def test_resume_from_a_file_says_it_is_a_file(finished_runs, tmp_path, caplog):
    out = copy_run(finished_runs, "galore", tmp_path)
    weights = out / "checkpoint-4" / "model.safetensors"
    message = refused(["--resume_from_checkpoint", weights], caplog, train_galore, out=out)
    has_all(message, f"--resume_from_checkpoint {weights} is a file, not a checkpoint folder",
            f"--resume_from_checkpoint {out / 'checkpoint-4'}")
    assert "does not exist" not in message


# --- config files ---------------------------------------------------------------------------------------------------


@pytest.fixture
def config(tmp_path):
    def write(name: str, text: str = "max_steps: 2\n") -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    return write


def test_a_toml_config_says_which_formats_are_read(config, caplog):
    message = fails_cleanly(train_qlora, [config("run.toml", "max_steps = 2")], caplog)
    has_all(message, "run.toml: .toml is not read", "YAML (.yaml, .yml) or JSON (.json)", "given first")
    assert "Unknown flag" not in message


def test_two_config_files_say_that_one_is_read(config, caplog):
    first, second = config("a.yaml"), config("b.yaml", "lora_r: 8\n")
    message = fails_cleanly(train_qlora, [first, second], caplog)
    has_all(message, f"{second}: a second config file", f"One config file is read, the first argument ({first})")


@pytest.mark.parametrize("before", [["--max_steps", "3"], ["--smoke"]], ids=["after a value", "after a bool flag"])
def test_a_config_after_flags_says_it_goes_first(before, config, caplog):
    path = config("run.yaml")
    message = fails_cleanly(train_qlora, [*before, path], caplog)
    has_all(message, f"{path}: a config file goes first, before any flag", "train_qlora.py")


def test_a_config_path_that_is_a_folder(config, caplog):
    path = config("configs/qlora.yaml").parent
    message = fails_cleanly(train_qlora, [path, "--smoke"], caplog)
    has_all(message, f"Config file {path} is a folder", "it holds qlora.yaml")


def test_a_data_file_given_first_says_to_use_dataset_name(write_data, caplog):
    path = write_data("records.jsonl", jsonl(RECORDS))
    message = fails_cleanly(train_qlora, [path], caplog)
    has_all(message, "looks like a data file", f"--dataset_name {path}")


def test_a_relative_dataset_name_in_a_config_is_read_beside_it(config, tmp_path, parse, caplog, monkeypatch):
    path = config("project/configs/run.yaml", "dataset_name: data/records.jsonl\neval_file: data/eval.jsonl\n")
    (path.parent / "data").mkdir()
    (path.parent / "data" / "records.jsonl").write_text(jsonl(RECORDS))
    monkeypatch.chdir(tmp_path)  # elsewhere: the path is the config file's, not the current folder's
    with caplog.at_level(logging.INFO, logger="cli.config_files"):
        _, data_args, *_ = parse(train_qlora, [path])
    assert data_args.dataset_name == str(path.parent / "data" / "records.jsonl")
    assert "relative to the config file's folder" in caplog.text
    # Not found anywhere: the message names the path tried, beside the config file.
    assert data_args.eval_file == str(path.parent / "data" / "eval.jsonl")
    assert "found neither beside the config file" in caplog.text


def test_a_relative_dataset_name_that_is_nowhere_names_the_path_tried(config, tmp_path, caplog, monkeypatch):
    path = config("configs/run.yaml", "dataset_name: missing.jsonl\nmax_steps: 2\n")
    monkeypatch.chdir(tmp_path)
    message = refused(["--dry_run"], caplog, out=tmp_path / "out", config=path)
    has_all(message, f"the file {path.parent / 'missing.jsonl'} does not exist")


def test_a_config_nested_thousands_deep(config, caplog):
    path = config("deep.json", '{"lora_r": ' + "[" * 5000 + "]" * 5000 + "}")
    message = fails_cleanly(train_qlora, [path], caplog)
    has_all(message, f"Config file {path} is nested too deeply to read")


# --- cache variables pointing at a file ------------------------------------------------------------------------------


@pytest.mark.parametrize("variable, inside", [("HF_HOME", False), ("XDG_CACHE_HOME", True)])
def test_a_cache_variable_pointing_at_a_file_names_it(variable, inside, tmp_path, caplog, monkeypatch):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    value = a_file / "cache" if inside else a_file
    monkeypatch.setenv(variable, str(value))
    message = refused(["--dry_run"], caplog, out=tmp_path / "out")
    has_all(message, f"The environment variable {variable} is {value}", f"unset {variable}",
            f"inside the file {a_file}" if inside else "which is a file")
    assert "gated" not in message and a_file.read_text() == "mine"


# --- data ------------------------------------------------------------------------------------------------------------


def test_records_that_change_format_part_way_name_the_record_and_data_format(write_data, tmp_path, caplog):
    path = write_data("mixed.jsonl", jsonl(CHAT + RECORDS[:2]))
    message = refused(["--dataset_name", path], caplog, out=tmp_path / "out")
    has_all(message, f"Record 3 of {path} is an Alpaca record (instruction/input/output)",
            "record 0 is a chat record (messages)", "--data_format auto")
    assert "must be a non-empty list" not in message


def test_data_format_chat_on_alpaca_records(write_data, tmp_path, caplog):
    path = write_data("alpaca.jsonl", jsonl(RECORDS))
    message = refused(["--dataset_name", path, "--data_format", "chat"], caplog, out=tmp_path / "out")
    has_all(message, f"Record 0 of {path} has no 'messages' field, which --data_format chat reads",
            "an Alpaca record", "Give --data_format alpaca (or auto)")


@pytest.mark.parametrize("name, content, words", [
    ("gzipped.jsonl", gzip.compress(jsonl(RECORDS).encode()), ["holds gzip-compressed data", ".jsonl.gz"]),
    ("archive.json", b"PK\x03\x04" + b"\x00" * 60, ["holds a zip archive", "unzip"]),
    ("table.json", b"PAR1" + b"\x00" * 60, ["holds a Parquet file", "name it .parquet"]),
    ("binary.jsonl", bytes(range(256)) * 4, ["holds NUL bytes, so it is binary data"]),
    ("fake.jsonl.gz", jsonl(RECORDS).encode(), ["is named .jsonl.gz but is not gzip-compressed"]),
], ids=["gzip", "zip", "parquet", "binary", "not gzip"])
def test_compressed_and_binary_data_are_said_as_such(name, content, words, write_data, tmp_path, caplog):
    path = write_data(name, content)
    message = refused(["--dataset_name", path], caplog, out=tmp_path / "out")
    has_all(message, str(path), *words)
    assert "iconv" not in message and "Windows-1252" not in message


@pytest.mark.parametrize("name", ["records.jsonl.gz", "records.json.gz"])
def test_gzipped_json_lines_are_read(name, write_data):
    text = jsonl(RECORDS) if name.endswith(".jsonl.gz") else json.dumps(RECORDS)
    path = write_data(name, gzip.compress(text.encode()))
    records = data.load_records(DataArguments(dataset_name=str(path)))
    assert records["output"] == [r["output"] for r in RECORDS]


def test_a_csv_with_a_header_and_no_rows(write_data, tmp_path, caplog):
    path = write_data("empty.csv", "instruction,input,output\n")
    message = refused(["--dataset_name", path], caplog, out=tmp_path / "out")
    has_all(message, f"{path} has a header line (instruction,input,output) and no records under it")
    assert "corresponds to no data" not in message


@pytest.mark.parametrize("name, text, words", [
    ("twice.jsonl", jsonl(RECORDS[:2])[:-1] + '\n{"instruction": "a", "output": "b", "output": "c"}\n',
     ["record 2 of", "(line 3) gives the key 'output' twice"]),
    ("twice.json", json.dumps(RECORDS[:1])[:-1] + ', {"instruction": "a", "instruction": "b", "output": "c"}]',
     ["record 1 of", "gives the key 'instruction' twice"]),
    ("nested.jsonl", '{"messages": [{"role": "user", "content": "a", "role": "assistant"}]}\n',
     ["record 0 of", "gives the key 'role' twice"]),
], ids=["jsonl", "json", "inside a turn"])
def test_a_key_given_twice_in_a_record_is_refused(name, text, words, write_data, tmp_path, caplog):
    path = write_data(name, text)
    message = refused(["--dataset_name", path], caplog, out=tmp_path / "out")
    has_all(message, *words, "Delete one of them")


@pytest.mark.parametrize("name, text", [
    ("deep.json", "[" * 5000 + "]" * 5000),
    ("deep.jsonl", '{"instruction": "a", "output": ' + "[" * 5000 + "]" * 5000 + "}\n"),
], ids=["json", "jsonl"])
def test_json_nested_thousands_deep(name, text, write_data, tmp_path, caplog):
    path = write_data(name, text)
    message = refused(["--dataset_name", path], caplog, out=tmp_path / "out")
    has_all(message, str(path), "is nested too deeply to read")
    assert "RecursionError" not in caplog.text


def test_one_record_of_a_megabyte_is_checked_not_a_crash(write_data, tmp_path, caplog):
    """The smoke run's tokenizer training failed on it ("[!sentences_.empty()]"): now the length check speaks."""
    path = write_data("big.jsonl", jsonl([{"instruction": "Summarise.", "input": "word " * 200_000,
                                          "output": "Short."}]))
    message = refused(["--dataset_name", path], caplog, out=tmp_path / "out")
    has_all(message, f"Every record of {path} is longer than --max_seq_length 256 tokens")


def test_a_control_token_inside_an_answer_is_warned_once(write_data, caplog):
    records = [*RECORDS, {"instruction": "Stop?", "input": "", "output": "Yes.<end_of_turn> And more."},
               {"instruction": "Again?", "input": "", "output": "No.<end_of_turn>"}]
    path = write_data("tokens.jsonl", jsonl(records))
    with caplog.at_level(logging.WARNING, logger="records.data"):
        data.load_records(DataArguments(dataset_name=str(path)))
    [warning] = [r.getMessage() for r in caplog.records if "control token" in r.getMessage()]
    has_all(warning, "2 record(s)", "<end_of_turn>", "the first: record 8, its output", "Remove it from the data")


def test_the_eval_file_equal_to_the_training_file_is_warned(write_data, caplog):
    path = write_data("records.jsonl", jsonl(RECORDS))
    with caplog.at_level(logging.WARNING, logger="records.data"):
        data.load_train_and_eval(DataArguments(dataset_name=str(path), eval_file=str(path)), seed=0)
    has_all(caplog.text, f"--eval_file {path} is the training file itself", "--eval_split_ratio 0.05")


def test_a_hub_data_set_that_cannot_be_loaded_offline_fails_at_once(tmp_path, caplog):
    started = time.monotonic()
    message = refused(["--dataset_name", "someone/no-such-data-set"], caplog, out=tmp_path / "out")
    assert time.monotonic() - started < 15
    has_all(message, "--dataset_name 'someone/no-such-data-set' is not a local file",
            "HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set", "not in the local cache")


def test_a_hub_data_set_that_does_not_exist_online_fails_at_once(tmp_path, caplog, monkeypatch):
    import huggingface_hub
    from models import hub

    def not_found(self, name, **kwargs):
        raise huggingface_hub.utils.RepositoryNotFoundError("404 Client Error: Repository Not Found")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(data.datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(hub, "hub_unreachable", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", not_found)
    message = refused(["--dataset_name", "someone/no-such-data-set"], caplog, out=tmp_path / "out")
    has_all(message, "is neither a local file nor a data set on the hub", "yahma/alpaca-cleaned")


# --- resuming a checkpoint that cannot go on ------------------------------------------------------------------------


def copy_run(finished_runs, script: str, tmp_path) -> Path:
    out = tmp_path / script
    shutil.copytree(finished_runs[script].output_dir, out)
    shutil.rmtree(out / "final")
    return out


@pytest.mark.parametrize("wrote, resumed_by", [("qlora", "galore"), ("galore", "qlora")])
def test_a_checkpoint_resumed_by_the_other_script_names_the_script_that_wrote_it(wrote, resumed_by, finished_runs,
                                                                                 tmp_path, caplog):
    out = copy_run(finished_runs, wrote, tmp_path)
    message = refused(["--resume_from_checkpoint", "latest"], caplog, SCRIPTS[resumed_by], out=out)
    has_all(message, f"it was written by train_{wrote}.py", f"this is train_{resumed_by}.py",
            f"python finetuning/train_{wrote}.py")
    assert "Can't find a checkpoint index" not in caplog.text and "Unsupported global" not in caplog.text


@pytest.mark.parametrize("script, flag, saved, given, drop_settings", [
    ("qlora", "lora_r", 16, 32, False),
    ("qlora", "lora_r", 16, 8, True),  # a checkpoint from before run_settings.json: its adapter_config.json says
    ("qlora", "use_rslora", False, True, False),
    ("galore", "galore_rank", 8, 4, False),
], ids=["lora_r", "lora_r without run_settings.json", "use_rslora", "galore_rank"])
def test_resuming_with_a_flag_that_shapes_the_checkpoint_names_the_flag(script, flag, saved, given, drop_settings,
                                                                        finished_runs, tmp_path, caplog):
    out = copy_run(finished_runs, script, tmp_path)
    if drop_settings:
        for path in out.glob("checkpoint-*/run_settings.json"):
            path.unlink()
    message = refused(["--resume_from_checkpoint", "latest", f"--{flag}", given], caplog, SCRIPTS[script], out=out)
    has_all(message, f"it was trained with --{flag} {saved} (this run: {given})", "Resume with the checkpoint's values")
    assert "size mismatch" not in caplog.text


def test_resuming_with_another_base_model_names_the_flag(finished_runs, tmp_path):
    checkpoint = copy_run(finished_runs, "qlora", tmp_path) / "checkpoint-4"
    settings = json.loads((checkpoint / "run_settings.json").read_text())
    settings.update(smoke=False, model_name_or_path="google/gemma-3-1b-it")
    (checkpoint / "run_settings.json").write_text(json.dumps(settings))
    now = {**settings, "model_name_or_path": "google/gemma-3-4b-it"}
    with pytest.raises(errors.UserInputError,
                       match=r"--model_name_or_path google/gemma-3-1b-it \(this run: google/gemma-3-4b-it\)"):
        saved_settings.check_resume(checkpoint, now)


def test_a_smoke_resume_on_other_data_keeps_its_base_and_says_so(finished_runs, tmp_path, write_data, caplog):
    out = copy_run(finished_runs, "galore", tmp_path)
    tokenizer_before = (out / "smoke_base_model" / "tokenizer.json").read_bytes()
    path = write_data("other.jsonl", jsonl([{"instruction": f"Quelle heure {i} ?", "input": "", "output": "Midi."}
                                            for i in range(16)]))
    with caplog.at_level(logging.WARNING):
        train_galore.main(*train_galore.parse_args(["--smoke", "--output_dir", str(out), "--num_sample_prompts", "0",
                                                    "--report_card_prompts", "0", "--dataset_name", str(path),
                                                    "--resume_from_checkpoint", "latest"]))
    has_all(caplog.text, "Resuming checkpoint-4, trained on the toolkit's default data, on other data", str(path))
    assert (out / "smoke_base_model" / "tokenizer.json").read_bytes() == tokenizer_before, "the base was rebuilt"


# --- export -----------------------------------------------------------------------------------------------------------


def export(run_dir, tools, *flags):
    return export_gguf.main(*export_gguf.parse_args(["--run_dir", str(run_dir), "--llama_cpp_dir", str(tools),
                                                     "--check_parity", "false", *map(str, flags)]))


def test_export_into_a_gguf_that_is_a_file_is_refused_before_any_work(finished_model_run, fake_llama_cpp, caplog,
                                                                       monkeypatch):
    (finished_model_run / "gguf").write_text("my notes")
    monkeypatch.setattr(export_gguf.gguf_files, "convert", lambda *a, **k: pytest.fail("converted"))
    message = fails_cleanly(export_gguf, ["--run_dir", finished_model_run, "--llama_cpp_dir", fake_llama_cpp,
                                          "--check_parity", "false"], caplog)
    has_all(message, f"{finished_model_run / 'gguf'} is a file", "Move or rename the file")
    assert (finished_model_run / "gguf").read_text() == "my notes"
    assert sorted(p.name for p in finished_model_run.iterdir()) == ["final", "gguf"]


@pytest.mark.parametrize("name", ["my model/v1", "-model", "a/b/c", "name:"])
def test_an_export_name_ollama_cannot_take_is_refused(name, finished_model_run, caplog):
    message = fails_cleanly(export_gguf, ["--run_dir", finished_model_run, f"--name={name}"], caplog)
    has_all(message, f"--name {name!r} cannot name an Ollama model", "no spaces", "e.g. --name ")
    assert sorted(p.name for p in finished_model_run.iterdir()) == ["final"]


def test_a_run_folder_name_becomes_an_ollama_name_and_paths_are_quoted(tmp_path, tiny_model_dir, fake_llama_cpp,
                                                                       caplog):
    run = tmp_path / "my run (v2)"
    shutil.copytree(tiny_model_dir, run / "final")
    with caplog.at_level(logging.INFO, logger="export_gguf"):
        export(run, fake_llama_cpp, "--outtypes", "f16")
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("GGUF export in")]
    assert f"ollama create my-run-v2 -f '{run}/gguf/Modelfile'" in line
    assert export_gguf.OLLAMA_NAME.fullmatch("me/my-model:v1.2")


def test_a_re_export_with_other_outtypes_keeps_the_others_and_says_what_it_replaced(finished_model_run,
                                                                                    fake_llama_cpp, caplog):
    export(finished_model_run, fake_llama_cpp, "--outtypes", "f16")
    with caplog.at_level(logging.INFO, logger="export_gguf"):
        folder = export(finished_model_run, fake_llama_cpp, "--outtypes", "q8_0")
    assert sorted(p.name for p in folder.iterdir()) == ["Modelfile", "model-f16.gguf", "model-q8_0.gguf"]
    has_all(caplog.text, "Re-export into", "replaced Modelfile", "kept model-f16.gguf from the earlier export")
    assert not (finished_model_run / ".gguf.partial").exists()


def test_parity_says_when_the_ids_agree_and_only_the_text_differs(tmp_path):
    hf = parity.Answer([2], [7, 8, 1], "caf\u00e9", "<end_of_turn>")
    gguf = parity.Answer([2], [7, 8, 1], "caf\ufffd", "<end_of_turn>")
    rows = parity.compare(["p"], "model-f16.gguf", [hf], [gguf], 16)
    parity.write_report(tmp_path, rows, {"model-f16.gguf": []})
    report = (tmp_path / "parity.md").read_text()
    assert "| 3/3 (same ids; the text differs: detokenized otherwise) |" in report
    assert "The token ids are the same" in report
    assert json.loads((tmp_path / "parity.json").read_text())["rows"][0]["text_differs_alone"] is True


# --- what a user sees -------------------------------------------------------------------------------------------------


@pytest.fixture
def help_of(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")

    def read(module) -> str:
        with pytest.raises(SystemExit) as stop:
            module.parse_args(["--help"])
        assert stop.value.code == 0
        return capsys.readouterr().out

    return read


def test_export_help_has_a_description_examples_and_named_groups(help_of):
    text = " ".join(help_of(export_gguf).split())
    has_all(text, "usage: python finetuning/export_gguf.py --run_dir RUN_DIR", "Export a finished run to GGUF",
            "Examples:", "python finetuning/export_gguf.py --run_dir outputs/qlora", "export (this script):",
            "Default: the run folder's name, made to fit.")
    assert "ExportArguments" not in text and "(default: None)" not in text
    assert "Turn --check_parity off." in text


def test_training_help_lists_the_trackers_and_files_the_time_budget(help_of):
    text = " ".join(help_of(train_qlora).split())
    has_all(text, "--report_to REPORT_TO Where the training metrics go: tensorboard", "wandb",
            "trackio", "dry run, samples, report card and time budget (toolkit):", "a minute is kept for the first one")
    group = text.split("dry run, samples, report card and time budget (toolkit):")[1].split("(this script):")[0]
    assert "--time_budget" in group


def test_the_time_budget_is_logged_with_what_it_leaves(caplog, monkeypatch):
    from training import interruptions

    monkeypatch.setattr(interruptions, "PROCESS_START", time.monotonic() - 30)
    with caplog.at_level(logging.INFO, logger="training.loop"):
        loop.log_time_budget(3600)
        loop.log_time_budget(60)
    first, second = [r for r in caplog.records if r.name == "training.loop"]
    has_all(first.getMessage(), "--time_budget 1h: 30s spent loading, 1m kept for the first checkpoint",
            "about 59m left for training" if "59m" in first.getMessage() else "left for training")
    assert second.levelno == logging.WARNING
    has_all(second.getMessage(), "--time_budget 1m:", "leaves no time to train", "stops after its first step")


def test_the_smoke_run_says_its_model_is_random(finished_runs):
    for run in finished_runs.values():
        assert b"(the smoke model is random, so its text is noise, not a fault)" in run.output


def test_trackios_upload_line_for_a_local_run_is_replaced(caplog, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # put back afterwards
    noise.correct_trackio_finish_line()
    with caplog.at_level(logging.INFO, logger="cli.noise"):
        print(noise.TRACKIO_LOCAL_FINISH)
        print("other output")
    out = capsys.readouterr().out
    assert "Uploading logs" not in out and "other output" in out
    assert "not uploaded" in caplog.text


def test_no_olora_conversion_warning_after_the_toolkit_converted(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_qlora.main(*train_qlora.parse_args(["--smoke", "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
                                                  "--init_lora_weights", "olora", "--num_sample_prompts", "0",
                                                  "--report_card_prompts", "0"]))
    assert not [w for w in caught if "Consider converting the OLoRA adapter" in str(w.message)]
    assert (tmp_path / "out" / "final" / "adapter_model.safetensors").is_file()
