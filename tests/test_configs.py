"""The example config files in configs/: each parses through its own script, flags after it win, every key says why."""
from __future__ import annotations

import enum
import re
from pathlib import Path

import pytest
import yaml

import train_galore
import train_qlora

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = {
    "qlora_t4.yaml": train_qlora,
    "qlora_a100.yaml": train_qlora,
    "galore_t4.yaml": train_galore,
    "galore_a100.yaml": train_galore,
    "qlora_4b_t4.yaml": train_qlora,  # gemma-3-4b (issue 25): QLoRA fits a T4 at 8k tokens
    "galore_4b_24gb.yaml": train_galore,  # GaLore of 4b needs a 24 GB card with bf16
}
KEY_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*:")


def load(name: str) -> dict:
    return yaml.safe_load((CONFIG_DIR / name).read_text())


def parsed_value(parsed, key: str):
    """The value of flag `key` in whichever of the parsed dataclasses has it."""
    for values in parsed:
        if hasattr(values, key):
            value = getattr(values, key)
            return value.value if isinstance(value, enum.Enum) else value
    raise AssertionError(f"no parsed dataclass has {key!r}")


def test_every_config_is_present():
    assert sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) == sorted(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_parses_with_its_values(name, parse):
    values = load(name)
    parsed = parse(CONFIGS[name], [str(CONFIG_DIR / name)])
    for key, value in values.items():
        got = parsed_value(parsed, key)
        if isinstance(value, float):
            assert got == pytest.approx(value), key
        else:
            assert got == value, key


@pytest.mark.parametrize("name", CONFIGS)
def test_command_line_overrides_config(name, parse):
    module = CONFIGS[name]
    values = load(name)
    argv = [str(CONFIG_DIR / name), "--max_steps", "7", "--per_device_train_batch_size", "3",
            "--output_dir", "elsewhere", "--eval_split_ratio", "0.1"]
    parsed = parse(module, argv)
    assert parsed_value(parsed, "max_steps") == 7
    assert parsed_value(parsed, "per_device_train_batch_size") == 3 != values["per_device_train_batch_size"]
    assert parsed_value(parsed, "output_dir") == "elsewhere"
    assert parsed_value(parsed, "eval_split_ratio") == 0.1
    # Untouched keys keep the file's values.
    assert parsed_value(parsed, "gradient_accumulation_steps") == values["gradient_accumulation_steps"]
    assert parsed_value(parsed, "max_seq_length") == values["max_seq_length"]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_settings_are_consistent(name):
    values = load(name)
    assert not {"bf16", "fp16"} & set(values), "precision is chosen by the scripts, per GPU"
    assert values["eval_split_ratio"] == 0.05
    assert values["eval_strategy"] == "steps" and values["eval_steps"] == values["save_steps"]
    assert values["logging_steps"] == 10
    assert values["output_dir"] == f"outputs/{Path(name).stem}"
    expected = {
        "qlora_t4.yaml": (8192, 1, 1024),
        "qlora_a100.yaml": (32768, 1, 2048),
        "galore_t4.yaml": (4096, 1, 1024),
        "galore_a100.yaml": (32768, 1, 2048),
        "qlora_4b_t4.yaml": (8192, 1, 1024),
        "galore_4b_24gb.yaml": (4096, 1, 1024),
    }[name]
    assert (values["max_tokens_per_batch"], values["gradient_accumulation_steps"],
            values["max_seq_length"]) == expected
    # Whole rows of --max_seq_length tokens per batch.
    assert values["max_tokens_per_batch"] % values["max_seq_length"] == 0


@pytest.mark.parametrize("name", CONFIGS)
def test_every_key_has_a_comment(name):
    lines = (CONFIG_DIR / name).read_text().splitlines()
    keys = []
    for index, line in enumerate(lines):
        match = KEY_LINE.match(line)
        if not match:
            continue
        keys.append(match.group(1))
        same_line = "#" in line
        line_above = index > 0 and lines[index - 1].lstrip().startswith("#")
        assert same_line or line_above, f"{name}: {match.group(1)} has no comment saying why"
    assert keys == list(load(name)), "every top-level key was checked"


@pytest.mark.parametrize("name, script, card", [("qlora_4b_t4.yaml", "QLoRA", (14.74, True)),
                                                ("galore_4b_24gb.yaml", "GaLore", (22.0, False))])
def test_the_4b_configs_fit_their_cards_by_the_memory_estimate(name, script, card):
    """What each 4b file says it fits: its token budget within the memory estimate on its card (fp16 on the T4)."""
    from models import shapes
    from training import memory_estimate

    gib, fp16 = card
    estimate = memory_estimate.estimate(shapes.gemma3_shape("4b"), script, fp16=fp16)
    assert estimate.at(load(name)["max_tokens_per_batch"]) <= memory_estimate.usable_bytes(gib)
    assert memory_estimate.largest_budget(estimate, gib, 1024) == load(name)["max_tokens_per_batch"]
