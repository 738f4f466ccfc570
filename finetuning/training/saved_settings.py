"""The run's own settings, saved in every checkpoint (run_settings.json, beside the Trainer's training_args.bin) and
compared with a resumed run's before anything loads.

A checkpoint resumed by the other script, or with another --lora_r, --galore_rank or base model, used to fail deep in
a library (`size mismatch for ...lora_A.default.weight`, `Unsupported global: GLOBAL
galore_torch.galore_projector.GaLoreProjector`, `Can't find a checkpoint index`): `check_resume` names the script
that wrote the checkpoint, or the flag and both values. Other data than the checkpoint was trained on is allowed,
and said once. A checkpoint written before this file existed is judged from its files (adapter_config.json: QLoRA;
model.safetensors alone: GaLore).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Optional

from transformers import TrainerCallback

from cli.errors import UserInputError
from training import processes

logger = logging.getLogger(__name__)

SETTINGS_FILE = "run_settings.json"
SCRIPTS = {"QLoRA": "train_qlora.py", "GaLore": "train_galore.py"}
# The flags whose values shape a checkpoint's weights or optimizer state: a resume must give the same.
SHAPING_FLAGS = {
    "QLoRA": ("lora_r", "lora_alpha", "lora_target_modules", "use_dora", "use_rslora", "init_lora_weights"),
    "GaLore": ("galore_rank", "galore_proj_type", "galore_target_modules"),
}
# adapter_config.json's names for them, for a checkpoint without run_settings.json
ADAPTER_CONFIG_NAMES = {"lora_r": "r", "lora_alpha": "lora_alpha", "use_dora": "use_dora", "use_rslora": "use_rslora"}


def describe(method: str, model_args, data_args, method_args) -> dict:
    """What run_settings.json holds: the script, the base model, the data and the flags that shape the weights."""
    dataset = data_args.dataset_name
    if dataset is not None and Path(dataset).exists():
        dataset = str(Path(dataset).resolve())
    return {
        "method": method,
        "script": SCRIPTS.get(method, method),
        "model_name_or_path": model_args.model_name_or_path,
        "smoke": bool(model_args.smoke),
        "dataset_name": dataset,
        "flags": {name: getattr(method_args, name) for name in SHAPING_FLAGS.get(method, ())
                  if method_args is not None and hasattr(method_args, name)},
    }


class SaveRunSettings(TrainerCallback):
    """run_settings.json into each checkpoint as it is saved, and the checkpoint's files made to follow the umask
    (safetensors writes its files 0600)."""

    def __init__(self, settings: Mapping[str, Any]):
        self.settings = dict(settings)

    def on_save(self, args, state, control, **kwargs):
        if not self.settings or not processes.writes(args):
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not checkpoint.is_dir():
            return
        from training.saving import follow_umask

        (checkpoint / SETTINGS_FILE).write_text(json.dumps(self.settings, indent=2) + "\n", encoding="utf-8")
        follow_umask(checkpoint)


def read(checkpoint) -> Optional[dict]:
    """A checkpoint's run_settings.json; None where it has none (written before it existed) or it is unreadable."""
    try:
        settings = json.loads((Path(checkpoint) / SETTINGS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return settings if isinstance(settings, dict) else None


def _adapter_config(checkpoint: Path) -> Optional[dict]:
    try:
        config = json.loads((checkpoint / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def written_by(checkpoint) -> Optional[str]:
    """The method ("QLoRA" or "GaLore") whose script wrote the checkpoint; None where its files do not say."""
    checkpoint = Path(checkpoint)
    saved = read(checkpoint)
    if saved and saved.get("method") in SCRIPTS:
        return saved["method"]
    if (checkpoint / "adapter_config.json").is_file() or (checkpoint / "adapter_model.safetensors").is_file():
        return "QLoRA"
    if (checkpoint / "model.safetensors").is_file() or (checkpoint / "model.safetensors.index.json").is_file():
        return "GaLore"
    return None


def check_resume(checkpoint, now: Mapping[str, Any]) -> None:
    """Refuse a resume that cannot continue the checkpoint (another script, base model or shaping flag), naming what
    differs; say once where the data differs. `now`: this run's `describe`."""
    checkpoint = Path(checkpoint)
    method = now["method"]
    wrote = written_by(checkpoint)
    if wrote is not None and wrote != method:
        what = "a LoRA adapter" if wrote == "QLoRA" else "the whole model, with GaLore's optimizer state"
        raise UserInputError(
            f"--resume_from_checkpoint {checkpoint}: it was written by {SCRIPTS[wrote]} ({wrote}: {what}), and "
            f"this is {SCRIPTS[method]}. Resume it with python finetuning/{SCRIPTS[wrote]} and the same flags, or "
            f"start a new {method} run in another --output_dir."
        )
    saved = read(checkpoint) or {}
    flags = dict(saved.get("flags") or {})
    adapter = _adapter_config(checkpoint) if method == "QLoRA" else None
    if adapter is not None:  # a checkpoint from before run_settings.json: what its adapter_config.json says
        for flag, key in ADAPTER_CONFIG_NAMES.items():
            if flag not in flags and key in adapter:
                flags[flag] = adapter[key]
    differ = [f"--{flag} {flags[flag]} (this run: {now['flags'][flag]})" for flag in SHAPING_FLAGS.get(method, ())
              if flag in flags and flag in now["flags"] and flags[flag] != now["flags"][flag]]
    base = saved.get("model_name_or_path")
    if base is None and adapter is not None and not now["smoke"]:
        base = adapter.get("base_model_name_or_path")
    if base is not None and not now["smoke"] and not saved.get("smoke") and base != now["model_name_or_path"]:
        differ.insert(0, f"--model_name_or_path {base} (this run: {now['model_name_or_path']})")
    if differ:
        raise UserInputError(
            f"--resume_from_checkpoint {checkpoint}: it was trained with {'; '.join(differ)}. Its weights and "
            "optimizer state have the first run's shapes and base, so it cannot go on with other values. Resume with "
            "the checkpoint's values, or start a new run in another --output_dir."
        )
    if "dataset_name" in saved and saved["dataset_name"] != now["dataset_name"]:
        logger.warning(
            "Resuming %s, trained on %s, on other data: %s (--dataset_name). The Trainer skips the batches the "
            "checkpoint has seen by their position, so the run goes on over the new data from that point.",
            checkpoint.name, saved["dataset_name"] or "the toolkit's default data",
            now["dataset_name"] or "the toolkit's default data")
