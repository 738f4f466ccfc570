"""Mistakes on the command line and in config files: each is one message naming the file, line, key or flag and the
fix, exit code 2 through run_cli, no traceback. Also what --smoke says it changed, and what --help says."""
from __future__ import annotations

import codecs
import json
import logging
import re

import pytest

from cli import parsing
from cli import command_line
import train_galore
import train_qlora
from conftest import fails_cleanly

SCRIPTS = {"qlora": train_qlora, "galore": train_galore}


def must_not_run(*parsed, **kwargs):
    raise AssertionError("the arguments parsed, although they hold a mistake")



def has_all(message: str, *words: str) -> None:
    missing = [w for w in words if w not in message]
    assert not missing, f"{missing} not in: {message}"


# --- malformed config files -----------------------------------------------------------------------------------------

MALFORMED = {
    # name: (file name, bytes, words the message must hold)
    "yaml_unclosed_list": ("run.yaml", b"lora_r: [16\n", ["run.yaml", "not valid YAML", "line 2, column 1",
                                                           "starts at line 1", "close every ["]),
    "yaml_colon_in_value": ("run.yaml", b"max_steps: 3\nrun_name: a: b\n", ["run.yaml", "line 2, column 12",
                                                                            "mapping values are not allowed",
                                                                            "quote values"]),
    "yaml_tab": ("run.yml", b"max_steps: 3\nlora_r:\t8\n", ["run.yml", "line 2", "tabs"]),
    "json_trailing_comma": ("run.json", b'{"lora_r": 8,\n "max_steps": 2,}\n', ["run.json", "not valid JSON",
                                                                               "line 2, column 17",
                                                                               "no comma after the last item"]),
    "json_single_quotes": ("run.json", b"{'lora_r': 8}", ["run.json", "line 1, column 2", "double quotes"]),
    "latin1_yaml": ("run.yaml", "max_steps: 3\nrun_name: café\n".encode("latin-1"),
                    ["run.yaml", "not UTF-8", "byte 0xe9 on line 2", "Save it as UTF-8"]),
    "latin1_json": ("run.json", '{"run_name": "café"}'.encode("latin-1"), ["run.json", "not UTF-8", "line 1",
                                                                          "Save it as UTF-8"]),
    "utf16_without_bom": ("run.yaml", "max_steps: 3\n".encode("utf-16-le"), ["run.yaml", "NUL bytes", "UTF-16",
                                                                            "Save it as UTF-8"]),
    "empty": ("run.yaml", b"", ["run.yaml", "mapping of flag names"]),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_config_file_is_one_message_with_where_and_fix(case, tmp_path, caplog):
    name, content, words = MALFORMED[case]
    (tmp_path / name).write_bytes(content)
    has_all(fails_cleanly(train_qlora, [tmp_path / name], caplog, main=must_not_run), *words)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig", "utf-16-be"])
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_with_a_byte_order_mark_is_read(encoding, suffix, tmp_path, parse):
    values = {"run_name": "café", "max_steps": 3}
    text = json.dumps(values, ensure_ascii=False) if suffix == ".json" else "run_name: café\nmax_steps: 3\n"
    raw = text.encode(encoding)
    if encoding == "utf-16-be":  # Python writes no mark for an explicit byte order
        raw = codecs.BOM_UTF16_BE + raw
    config = tmp_path / f"run{suffix}"
    config.write_bytes(raw)
    training = parse(train_qlora, [config])[-1]
    assert (training.run_name, training.max_steps) == ("café", 3)


# --- a key given twice ------------------------------------------------------------------------------------------------

DUPLICATES = {
    "yaml": ("run.yaml", "learning_rate: 1.0e-4\nlora_r: 8\nlearning_rate: 2.0e-4\n",
             ["run.yaml", "learning_rate twice", "lines 1 and 3", "Delete one"]),
    "yaml_dash_and_underscore": ("run.yaml", "max_steps: 3\nlearning-rate: 1.0e-4\nlearning_rate: 2.0e-4\n",
                                 ["learning_rate twice", "lines 2 and 3"]),
    "yaml_nested": ("run.yaml", "gradient_checkpointing_kwargs:\n  use_reentrant: true\n  use_reentrant: false\n",
                    ["use_reentrant twice", "lines 2 and 3"]),
    "json": ("run.json", '{"lora_r": 8,\n "max_steps": 3,\n "lora_r": 4}', ["run.json", "lora_r twice",
                                                                            "lines 1 and 3"]),
    "json_dash_and_underscore": ("run.json", '{"max-steps": 3, "max_steps": 4}',
                                 ["run.json", "max_steps twice", "'max-steps' and 'max_steps' are the same flag"]),
    "yaml_flow_mapping": ("run.yaml", "gradient_checkpointing_kwargs: {use_reentrant: true, use_reentrant: false}\n",
                          ["use_reentrant twice", "both on line 1"]),
}


@pytest.mark.parametrize("case", DUPLICATES)
def test_config_key_given_twice_names_the_key_and_both_lines(case, tmp_path, caplog):
    name, text, words = DUPLICATES[case]
    (tmp_path / name).write_text(text, encoding="utf-8")
    has_all(fails_cleanly(train_qlora, [tmp_path / name], caplog, main=must_not_run), *words)


def test_yaml_merge_key_may_be_overridden(tmp_path, parse):
    # `<<: *base` then a key of its own is YAML's way to override, not a duplicate.
    config = tmp_path / "run.yaml"
    config.write_text("gradient_checkpointing_kwargs:\n  <<: {use_reentrant: true}\n  use_reentrant: false\n",
                      encoding="utf-8")
    training = parse(train_qlora, [config])[-1]
    assert training.gradient_checkpointing_kwargs == {"use_reentrant": False}


# --- null means the default -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, text", [
    ("run.yaml", "dataset_name: ~\nmax_train_samples: null\nmax_steps: 3\n"),
    ("run.json", '{"dataset_name": null, "max_train_samples": null, "max_steps": 3}'),
], ids=["yaml", "json"])
def test_null_in_a_config_file_keeps_the_default(name, text, tmp_path, parse, caplog):
    config = tmp_path / name
    config.write_text(text, encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="cli.config_files"):
        _, data, _, _, training = parse(train_qlora, [config])
    # Not the text "None", which the data loader would look up on the hub.
    assert data.dataset_name is None and data.max_train_samples is None
    assert training.max_steps == 3
    notes = [r.getMessage() for r in caplog.records if "null" in r.getMessage()]
    assert len(notes) == 1 and "dataset_name, max_train_samples" in notes[0] and "default" in notes[0]


# --- a flag given twice on the command line ---------------------------------------------------------------------------


@pytest.mark.parametrize("argv, words", [
    (["--learning_rate", "1e-4", "--learning_rate", "2e-4"], ["--learning_rate is given twice"]),
    (["--learning_rate=1e-4", "--max_steps", "3", "--learning_rate", "2e-4"], ["--learning_rate is given twice"]),
    (["--learning_rate", "1e-4", "--learning-rate", "2e-4"], ["--learning_rate and --learning-rate are the same flag"]),
    (["--completion_only_loss", "false", "--no_completion_only_loss"],
     ["--completion_only_loss and --no_completion_only_loss"]),
    (["--smoke", "--lora_r", "8", "--lora_r", "16"], ["--lora_r is given twice"]),
], ids=["same", "with_equals", "dash_alias", "no_form", "smoke"])
def test_flag_given_twice_is_an_error(argv, words, caplog):
    message = fails_cleanly(train_qlora, argv, caplog, main=must_not_run)
    has_all(message, *words, "Keep one")
    assert "1e-4" not in message and "2e-4" not in message, "values are not echoed (they may be secrets)"


def test_flag_after_a_config_file_still_overrides_its_key(tmp_path, parse):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 1.0e-4\nmax_steps: 3\n", encoding="utf-8")
    training = parse(train_qlora, [config, "--learning_rate", "5e-5"])[-1]
    assert (training.learning_rate, training.max_steps) == (5e-5, 3)


# --- what --smoke says it changed -------------------------------------------------------------------------------------


def smoke_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "cli.smoke_flags" and r.getMessage().startswith("--smoke")]


@pytest.mark.parametrize("script", SCRIPTS)
def test_smoke_names_a_gpu_flag_it_overrides_and_why(script, parse, caplog):
    # Before: "Your setup doesn't support bf16/gpu" on a CPU-only machine, or --bf16 silently dropped on a GPU one.
    with caplog.at_level(logging.INFO, logger="cli.smoke_flags"):
        training = parse(SCRIPTS[script], ["--smoke", "--bf16", "--max_steps", "3"])[-1]
    (line,) = smoke_lines(caplog)
    has_all(line, "Overrides --bf16", "--smoke trains on the CPU in fp32", "--save_strategy no",
            f"--output_dir outputs/{script}-smoke")
    assert "--max_steps" not in line, "a flag the user gave is not listed as set by --smoke"
    assert (training.bf16, training.fp16, training.use_cpu, training.max_steps) == (False, False, True, 3)


def test_smoke_names_each_forced_setting_the_user_contradicted(parse, caplog):
    with caplog.at_level(logging.INFO, logger="cli.smoke_flags"):
        training = parse(train_qlora, ["--smoke", "--fp16", "True", "--use_cpu=False"])[-1]
    (line,) = smoke_lines(caplog)
    has_all(line, "--fp16", "--use_cpu False", "trains on the CPU in fp32")
    assert (training.fp16, training.use_cpu) == (False, True)


def test_smoke_keeps_save_and_report_flags_the_user_gave(parse, caplog):
    argv = ["--smoke", "--save_strategy", "steps", "--save_steps", "1", "--report_to", "tensorboard"]
    with caplog.at_level(logging.INFO, logger="cli.smoke_flags"):
        training = parse(train_qlora, argv)[-1]
    assert (training.save_strategy.value, training.save_steps, training.report_to) == ("steps", 1, ["tensorboard"])
    (line,) = smoke_lines(caplog)
    assert "--save_strategy" not in line and "--report_to" not in line


def test_smoke_reports_nowhere_unless_told(parse, monkeypatch):
    monkeypatch.setattr(parsing, "default_report_to", lambda: "tensorboard")
    assert parse(train_qlora, ["--smoke"])[-1].report_to == []
    assert parse(train_qlora, [])[-1].report_to == ["tensorboard"], "a real run keeps the default"


def test_smoke_says_which_config_keys_it_ignores(tmp_path, parse, caplog):
    config = tmp_path / "run.yaml"
    config.write_text("output_dir: outputs/real\nreport_to: [tensorboard]\nmax_steps: 2\n", encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="cli.smoke_flags"):
        training = parse(train_qlora, [config, "--smoke"])[-1]
    (line,) = smoke_lines(caplog)
    has_all(line, "Ignores the config file's output_dir, report_to", "--output_dir outputs/qlora-smoke")
    assert (training.output_dir, training.report_to, training.max_steps) == ("outputs/qlora-smoke", [], 2)


# --- --help -------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def wide_help(monkeypatch):
    # argparse wraps help to the terminal's width, and breaks words at hyphens (outputs/qlora- smoke).
    monkeypatch.setenv("COLUMNS", "200")


def help_text(module, capsys, argv=("--help",)) -> str:
    with pytest.raises(SystemExit) as stop:
        module.parse_args(list(argv))
    assert stop.value.code == 0
    return capsys.readouterr().out


def flag_entry(text: str, flag: str) -> str:
    """The help entry of one flag: its line and the indented lines under it."""
    match = re.search(rf"^  {flag}\b.*?(?=^  -|^\S|\Z)", text, re.S | re.M)
    assert match, f"{flag} has no entry in --help"
    return " ".join(match.group(0).split())


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_opens_with_the_script_then_the_toolkits_flags_then_the_trainers(script, capsys):
    module = SCRIPTS[script]
    text = help_text(module, capsys)
    first_line = module.__doc__.strip().splitlines()[0]
    order = [first_line, "Examples:", "--resume_from_checkpoint latest", "model and smoke run (toolkit):\n  --",
             "data (toolkit):\n  --", "\n  --lora_r" if script == "qlora" else "\n  --galore_rank",
             "Trainer flags", "\n  --per_device_train_batch_size"]
    positions = [text.find(words) for words in order]
    assert -1 not in positions and positions == sorted(positions), list(zip(order, positions))


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_does_not_contradict_the_toolkit(script, capsys):
    text = help_text(SCRIPTS[script], capsys)
    assert "--hub_token" not in text and "--hub-token" not in text, "a refused flag is offered"
    assert "--push_to_hub_token" not in text
    assert "to continue training" not in text
    assert "trainer_output" not in text
    assert "'option_strings'" not in text, "a help string's % printed the action's dict"
    assert "10% slower" in flag_entry(text, "--torch_empty_cache_steps")
    has_all(flag_entry(text, "--overwrite_output_dir"), "DELETES", "--resume_from_checkpoint latest")
    has_all(flag_entry(text, "--output_dir"), f"(default: outputs/{script})", f"outputs/{script}-smoke")
    has_all(flag_entry(text, "--resume_from_checkpoint"), "'latest'", "checkpoint-N")


def test_help_after_a_config_file(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("max_steps: 3\n", encoding="utf-8")
    assert "--lora_r" in help_text(train_qlora, capsys, [str(config), "--help"])


def test_unknown_flags_are_still_refused_after_the_help_rewrite(caplog):
    has_all(fails_cleanly(train_galore, ["--not_a_flag", "3"], caplog, main=must_not_run), "--not_a_flag", "--help")
    has_all(fails_cleanly(train_qlora, ["--hub_token", "hf_x"], caplog, main=must_not_run), "--hub_token", "HF_TOKEN")


def test_smoke_names_the_model_and_galore_rank_it_overrides(parse, caplog):
    with caplog.at_level(logging.INFO, logger="cli.smoke_flags"):
        *_, galore, _ = parse(train_galore, ["--smoke", "--model_name_or_path", "my/model", "--galore_rank", "64"])
    assert galore.galore_rank == 8
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("--smoke sets")]
    assert "Overrides --model_name_or_path my/model, --galore_rank 64 (to 8)" in line
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cli.smoke_flags"):
        *_, galore, _ = parse(train_galore, ["--smoke"])
    assert galore.galore_rank == 8 and "--galore_rank" not in caplog.text, "a default the user did not give"


@pytest.mark.parametrize("flag", [["--optim", "adamw_torch"], ["--optim_args", "rank=64"]])
def test_galore_refuses_the_trainers_optimizer_flags_and_hides_them(flag, tmp_path, caplog, capsys):
    assert command_line.run_cli(train_galore.parse_args, train_galore.main,
                             ["--smoke", "--output_dir", str(tmp_path / "out"), *flag]) == 2
    assert "this script's optimizer is always GaLore" in caplog.text and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        train_galore.parse_args(["--help"])
    assert "--optim " not in capsys.readouterr().out
