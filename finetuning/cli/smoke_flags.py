"""What --smoke does to the flags: its own defaults under the ones the user gave, what it forces (the CPU, fp32),
what it ignores from a config file (a real run's folder and dashboard), and what it caps for its tiny model; all of
it said in one log line."""
from __future__ import annotations

import argparse
import logging
from typing import Any, Callable, Mapping, Sequence

from cli.config_files import config_argv

logger = logging.getLogger(__name__)

# A smoke run's own defaults (a few CPU steps on a slice of the data); flags the user gave still win.
SMOKE_DEFAULTS = dict(
    max_steps=4,
    per_device_train_batch_size=2,
    gradient_accumulation_steps=1,
    logging_steps=1,
    save_strategy="no",
    gradient_checkpointing=False,
    max_train_samples=64,
    max_seq_length=256,
    # A smoke run is a check: the next one replaces it (never a run it did not write: training.plan_output_dir).
    overwrite_output_dir=True,
    sample_max_new_tokens=8,
    report_card_prompts=8,
    report_card_max_new_tokens=16,
    # A check needs no dashboard; --report_to on the command line still wins.
    report_to="none",
)
# What a smoke run forces, whatever flags came with it (training/settings.py's check applies use_cpu to arguments
# built without this parser, as the tests and the bench build them).
SMOKE_FORCES = dict(use_cpu=True, bf16=False, fp16=False)
# Config-file keys a smoke run ignores: it writes to its own folder, never to a real run's, nor its dashboard.
SMOKE_IGNORES_FROM_CONFIG = ("output_dir", "overwrite_output_dir", "report_to")


def parse_smoke(parser, parse: Callable[[list], tuple], defaults: Mapping[str, Any], config: dict, argv: list[str],
                namespace: argparse.Namespace) -> tuple:
    """A smoke run's arguments: its own defaults under the user's flags, minus what it forces; logged in one line.

    `parser` is arguments' parser, `parse` what turns a command line into the dataclasses with it, and `namespace`
    argparse's reading of the user's flags, before any dataclass is built.
    """
    ignored = [key for key in config if key in SMOKE_IGNORES_FROM_CONFIG]
    config = {key: value for key, value in config.items() if key not in SMOKE_IGNORES_FROM_CONFIG}
    given = {action.dest for action in map(parser.action_for, config_argv(config) + argv) if action is not None}
    overridden = [f"--{name}" if getattr(namespace, name) else f"--{name} False"
                  for name, forced in SMOKE_FORCES.items() if name in given and getattr(namespace, name) != forced]
    # Left out, not overridden later: a CPU-only machine refuses --bf16 when TrainingArguments is built.
    config = {key: value for key, value in config.items() if key not in SMOKE_FORCES}
    argv = _without_flags(parser, argv, SMOKE_FORCES)
    smoke_defaults = dict(SMOKE_DEFAULTS, output_dir=f"{defaults['output_dir']}-smoke")
    parser.set_defaults(**smoke_defaults, **SMOKE_FORCES)
    parsed = parse(config_argv(config) + argv)
    sets = [f"--{key}" if value is True else f"--{key} {value}"
            for key, value in smoke_defaults.items() if key not in given]
    line = (f"--smoke sets {', '.join(sets) or 'nothing more'} (flags you give win), and always trains on the "
            "CPU in fp32 (--use_cpu, no --bf16/--fp16).")
    if overridden:
        line += f" Overrides {', '.join(overridden)}: --smoke trains on the CPU in fp32."
    # A tiny random model of its own, whose layers cap some of the script's flags (its `smoke_caps`).
    tiny = [f"--model_name_or_path {parsed[0].model_name_or_path}"] if "model_name_or_path" in given else []
    for name, cap in getattr(type(parsed[3]), "smoke_caps", {}).items():
        if getattr(parsed[3], name) > cap:
            if name in given:
                tiny.append(f"--{name} {getattr(parsed[3], name)} (to {cap})")
            setattr(parsed[3], name, cap)
    if tiny:
        line += (f" Overrides {', '.join(tiny)}: --smoke trains a tiny random model of the class the name means, 64 "
                 "wide (a multimodal one with a tiny vision tower beside it).")
    if ignored:
        line += (f" Ignores the config file's {', '.join(ignored)}: a smoke run never writes into a real run's "
                 "folder or dashboard (give them on the command line to apply).")
    logger.log(logging.WARNING if overridden or ignored or tiny else logging.INFO, "%s", line)
    return parsed


def _without_flags(parser, argv: Sequence[str], dests) -> list[str]:
    """argv without the flags of these dests, and their values (`--bf16`, `--bf16 True`, `--bf16=True`)."""
    kept, value_may_follow = [], False
    for arg in argv:
        action = parser.action_for(arg)
        if action is not None and action.dest in dests:
            value_may_follow = "=" not in arg
            continue
        if action is None and value_may_follow and not arg.startswith("-"):
            value_may_follow = False
            continue
        value_may_follow = False
        kept.append(arg)
    return kept
