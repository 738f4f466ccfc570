"""Shared fixtures for the finetuning toolkit's tests.

The scripts live in finetuning/ and import each other as top-level modules
(`import common`), so that folder goes on sys.path here, found relative to this file.
"""
from __future__ import annotations

import json
import os
import sys
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
if str(FINETUNING_DIR) not in sys.path:
    sys.path.insert(0, str(FINETUNING_DIR))

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
    """common's tiny random Gemma 3 + tokenizer (named build_random_gemma, earlier build_tiny_gemma)."""
    import common

    build = getattr(common, "build_random_gemma", None) or getattr(common, "build_tiny_gemma")
    return Path(build(Path(directory), list(texts)))


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

    records = json.loads(common.DEFAULT_DATASET_FILE.read_text(encoding="utf-8"))
    return [common.format_record(record) for record in records]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_texts) -> Path:
    """One tiny random Gemma 3 (tokenizer + weights) shared by the whole session; treat it as read-only."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_gemma"), default_texts)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


class Parsed(Exception):
    """Raised by the `parse` fixture's spy once a script's main() has parsed its arguments."""


@pytest.fixture
def parse(monkeypatch):
    """parse(module, argv) -> (model, data, report, method, training): what module.main(argv) parsed, through the
    script itself (its dataclasses, its defaults), stopping before anything is checked or loaded."""
    import common

    real = common.parse_arguments

    def spy(*args, **kwargs):
        raise Parsed(real(*args, **kwargs))

    monkeypatch.setattr(common, "parse_arguments", spy)

    def run(module, argv):
        with pytest.raises(Parsed) as info:
            module.main(list(argv))
        return info.value.args[0]

    return run
