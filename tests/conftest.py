"""Shared fixtures for the finetuning toolkit's tests.

The scripts live in finetuning/ and import each other as top-level modules
(`import common`, `from fastpath import rms_norm`), so that folder goes on sys.path here, found relative to this file.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

# No test may reach the hub: a hub lookup fails at once instead of retrying for 20 s.
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
FINETUNING_DIR = REPO_ROOT / "finetuning"
BENCH_DIR = REPO_ROOT / "bench"  # the bench's own modules have tests too (step_diagnostics, mlp_chunks)
for _folder in (BENCH_DIR, FINETUNING_DIR):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

# Real instruction data kept next to the repository (never inside it: its license forbids shipping it).
ALPACA_FILE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "alpaca_5000.json"


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu run only where torch sees a CUDA GPU (`pytest -m gpu` there)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; torch.cuda.is_available() is False")
    for item in gpu_items:
        item.add_marker(skip)


def build_tiny_model(directory: Path, texts) -> Path:
    """The smoke run's tiny random Gemma 3 + tokenizer."""
    from models import smoke

    return Path(smoke.build_random_gemma(Path(directory), list(texts)))


@pytest.fixture
def write_data(tmp_path):
    """write_data(name, content) -> Path: a str is written as is, anything else as JSON."""

    def write(name: str, content) -> Path:
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        else:
            path.write_text(json.dumps(content), encoding="utf-8")
        return path

    return write


@pytest.fixture
def alpaca_path() -> Path:
    if not ALPACA_FILE.is_file():
        pytest.skip(f"{ALPACA_FILE} is not present")
    return ALPACA_FILE


@pytest.fixture(scope="session")
def default_texts() -> list[str]:
    """The embedded data set, formatted: what the smoke model's tokenizer is trained on."""
    import common
    from records import data

    records = json.loads(data.DEFAULT_DATASET_FILE.read_text(encoding="utf-8"))
    return [common.format_record(record) for record in records]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_texts) -> Path:
    """One tiny random Gemma 3 (tokenizer + weights) shared by the whole session; treat it as read-only."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_gemma"), default_texts)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def parse():
    """parse(module, argv) -> (model, data, report, method, training): what the script parses from argv, with its
    own dataclasses and defaults; nothing is checked or loaded."""

    def run(module, argv):
        return module.parse_args([str(a) for a in argv])

    return run


# --- one finished smoke run per script, for the tests that only read what it left -----------------------------

# A token planted in the runs' environment: no output, log or saved file may contain it.
PLANTED_TOKEN = "hf_PlantedTokenDoNotLeak7Q3x9Z"
FINISHED_RUN_FLAGS = ["--save_strategy", "steps", "--save_steps", "2", "--max_steps", "4"]


@dataclass
class FinishedRun:
    exit_code: int
    output_dir: Path
    output: bytes  # everything the process printed and logged

    def state(self) -> dict:
        """The Trainer's trainer_state.json (global_step, log_history)."""
        return json.loads((self.output_dir / "trainer_state.json").read_text())

    def losses(self) -> list:
        return [entry["loss"] for entry in self.state()["log_history"] if "loss" in entry]


@pytest.fixture(scope="session")
def finished_runs(tmp_path_factory) -> dict:
    """{"qlora": FinishedRun, "galore": FinishedRun}: each script's --smoke run through its real command line, both
    at once, with checkpoints every 2 of 4 steps, the sample answers on and HF_TOKEN planted. Read-only: copy an
    output dir before changing it."""
    root = tmp_path_factory.mktemp("finished_runs")
    env = {**os.environ, "HF_TOKEN": PLANTED_TOKEN}
    started = {}
    for script in ("qlora", "galore"):
        log = (root / f"{script}.log").open("wb")
        argv = [sys.executable, f"finetuning/train_{script}.py", "--smoke", "--output_dir", str(root / script),
                *FINISHED_RUN_FLAGS]
        started[script] = (subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    runs = {}
    for script, (process, log) in started.items():
        process.wait(timeout=300)
        log.close()
        runs[script] = FinishedRun(process.returncode, root / script, (root / f"{script}.log").read_bytes())
        assert runs[script].exit_code == 0, runs[script].output.decode(errors="replace")[-3000:]
    return runs
