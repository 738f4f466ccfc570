"""How the packages depend on each other, where a user feels it: exporting a run needs neither bitsandbytes, peft nor
trl unless it merges an adapter."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

FINETUNING_DIR = Path(__file__).resolve().parents[1] / "finetuning"

HEAVY = ("bitsandbytes", "peft", "trl")


def test_importing_the_export_script_loads_no_training_library():
    code = f"import sys, json, export_gguf; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    done = subprocess.run([sys.executable, "-c", code], cwd=FINETUNING_DIR, capture_output=True, text=True, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
