"""--help: what the script does and how to run it, the toolkit's flags in sections before the Trainer's, and the
Trainer's help corrected where this toolkit behaves otherwise."""
from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path
from typing import Any, Mapping


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each flag's help, and the script's docstring and examples kept as written."""

    def _format_action_invocation(self, action):
        # Each flag once: the --flag-with-dashes alias of every --flag_name doubled the list.
        shown = [flag for flag in action.option_strings if "-" not in flag.lstrip("-")]
        if shown and len(shown) < len(action.option_strings):
            action = copy.copy(action)
            action.option_strings = shown
        return super()._format_action_invocation(action)

    def _get_help_string(self, action):
        # A help that says its default (one chosen at run time) would read "(default: None)" after it; so would a
        # required flag, and one whose default is no value.
        if isinstance(action.help, str) and re.search(r"\bDefault[:,]", action.help):
            return action.help
        if action.required or action.default is None:
            return action.help
        if action.option_strings and action.option_strings[0].startswith("--no_") and action.default is False:
            # HfArgumentParser's --no_FLAG of a flag that defaults to True: the same help again, with "default: False"
            return f"Turn {action.option_strings[0].replace('--no_', '--', 1)} off."
        return super()._get_help_string(action)


# The --help sections, in this order: the toolkit's own flags first, the Trainer's last.
HELP_GROUPS = {
    "ModelArguments": "model and smoke run (toolkit)",
    "DataArguments": "data (toolkit)",
    "ReportArguments": "dry run, samples, report card and time budget (toolkit)",
    "LoraArguments": "LoRA adapters (this script)",
    "GaloreArguments": "GaLore optimizer (this script)",
    "TrainingArguments": "Trainer flags (transformers.TrainingArguments; defaults are this script's)",
    "ExportArguments": "export (this script)",
}


def write_small_script_help(parser, module, examples) -> None:
    """--help of a script without the Trainer's flags (export_gguf.py): its docstring, how to run it, examples.
    `examples`: (flags, why) pairs."""
    script = Path(getattr(module, "__file__", None) or sys.argv[0]).name
    parser.prog = script
    required = " ".join(f"{a.option_strings[0]} {a.metavar or a.dest.upper()}" for a in parser._actions if a.required)
    parser.usage = f"python finetuning/{script} {required + ' ' if required else ''}[--flag value ...]"
    lines = "\n".join(f"  # {why}\n  python finetuning/{script} {command}" for command, why in examples)
    parser.description = f"""{(getattr(module, "__doc__", None) or "").strip()}

Examples:
{lines}"""


def write_help(parser, script_arguments: type, defaults: Mapping[str, Any], refused_flags) -> None:
    """--help: what the script does and how to run it, then the flags, with the Trainer's help corrected where
    this toolkit behaves otherwise."""
    module = sys.modules.get(script_arguments.__module__)
    script = Path(getattr(module, "__file__", None) or sys.argv[0]).name
    parser.prog = script
    parser.usage = f"python finetuning/{script} [CONFIG.yaml|CONFIG.json] [--flag value ...]"
    method = script.removeprefix("train_").removesuffix(".py")
    examples = [
        ("--dataset_name my_data.jsonl --dry_run", "check the data and the formatting; loads no model"),
        (f"configs/{method}_t4.yaml --max_steps 100", "a config file; flags after it win"),
        (f"--output_dir {defaults['output_dir']} --resume_from_checkpoint latest", "continue a stopped run"),
    ]
    lines = "\n".join(f"  # {why}\n  python finetuning/{script} {command}" for command, why in examples)
    parser.description = f"""{(getattr(module, "__doc__", None) or "").strip()}

Examples:
{lines}

Every --flag_name also takes dashes (--flag-name). In a config file each key is a flag without its leading
dashes; a key set to null (~) keeps its default."""
    output_dir = defaults["output_dir"]
    rewritten = {
        "output_dir": f"Where checkpoints, OUTPUT_DIR/final (the trained model) and logs go. With --smoke: "
                      f"{output_dir}-smoke.",
        "overwrite_output_dir": "Start over in an --output_dir that holds an earlier run: DELETES its checkpoints "
                                "and final model when training starts. To continue a run instead, use "
                                "--resume_from_checkpoint latest. Without either, such a folder is refused.",
        "resume_from_checkpoint": "Continue an interrupted run: 'latest' (the newest complete checkpoint in "
                                  "--output_dir) or a checkpoint-N folder.",
        # Without any batch flag the run batches by tokens (--max_tokens_per_batch): these defaults apply only
        # where a batch flag was given.
        "per_device_train_batch_size": f"Records per GPU in a training micro-batch: give it (without "
                                       f"--max_tokens_per_batch) to batch by records instead of the default token "
                                       f"batches. Default: {defaults.get('per_device_train_batch_size')}, where "
                                       f"batches are counted in records.",
        "report_to": "Where the training metrics go: tensorboard (the default where it is installed, as on Colab), "
                     "wandb, trackio (kept on this machine unless --trackio_space_id is given), several at once "
                     "(--report_to tensorboard wandb), or none. pip install -r "
                     "finetuning/requirements-tracking.txt installs the three; transformers' other integrations "
                     "(mlflow, comet_ml, ...) work where their package is installed.",
        "gradient_accumulation_steps": f"Micro-batches per optimizer step. Default: 1 where no batch flag is given "
                                       f"(token batches chosen for the GPU), "
                                       f"{defaults.get('gradient_accumulation_steps')} otherwise.",
    }
    # Refused flags, and a deprecated one that would also put a token in shell history.
    hidden = {flag.removeprefix("--") for flag in refused_flags} | {"push_to_hub_token"}
    hidden |= set(getattr(script_arguments, "trainer_flags_not_used", ()))
    for action in parser._actions:
        if action.dest in rewritten:
            action.help = rewritten[action.dest]
        elif action.dest in hidden or (isinstance(action.help, str) and "deprecated" in action.help.lower()):
            action.help = argparse.SUPPRESS
        elif isinstance(action.help, str) and "%(" not in action.help:
            # argparse %-formats each help: a bare "10%" printed the action's whole dict.
            action.help = action.help.replace("%", "%%")
